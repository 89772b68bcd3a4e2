"""Hostile input through the real `unmerge` command, as a subprocess: decompose, stats, sweep, sparsity,
simulate, study, demo.

The contract for every refused case: exit status 2, exactly one line on stderr, ``error: ...``
naming the culprit (and the fix), no traceback, nothing written, every input byte-identical.
Classes: outputs overlapping inputs, OS faults (read-only and full file systems on a tiny tmpfs,
a directory or a file where the other is needed, unreadable inputs), parameters out of range,
damaged array files, NaN/Inf in checkpoints and arrays. Ambiguous-but-valid inputs (the same
task vector twice, an all-zero entry, a target equal to the base) exit 0 with ``warning:`` lines.

The cases run concurrently (two at a time) in one module fixture; each test then checks one
result. Each class is represented here; the long tail of each class (every option, every damaged
file) runs in-process through the same ``main`` in ``test_pipeline_checks.py``, which also checks
the library functions behind them against independent references.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

CFG = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8, "vocab_size": 16,
       "architectures": ["LlamaForCausalLM"]}
NAMES = ["model.embed_tokens.weight"] + [f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(2) for m in "qkvo"]
NAN_TENSOR, NAN_AT = NAMES[3], (2, 5)
WEIGHTS = (0.6, 0.3)  # ta = base + 0.6 d0 + 0.3 d1


# ---------------------------------------------------------------------------------------------
# inputs: tiny safetensors models (NumPy only), array files, damaged files
# ---------------------------------------------------------------------------------------------
def _model(path: Path, tensors: dict, config=CFG):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))


def build_inputs(root: Path) -> Path:
    """Models ``base, ft0..ft2, ta`` (= base + 0.6 d0 + 0.3 d1), ``ft0_copy`` (ft0 again),
    ``base_copy`` (the base again), ``ta_nan`` / ``base_nan`` (one NaN), array files and damaged files."""
    rng = np.random.default_rng(0)
    base = {n: rng.standard_normal((16, 8) if "embed" in n else (8, 8)).astype(np.float32) for n in NAMES}
    _model(root / "base", base)
    deltas = []
    for i in range(3):
        d = {n: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in base.items()}
        deltas.append(d)
        _model(root / f"ft{i}", {n: base[n] + d[n] for n in base})
    _model(root / "ta", {n: base[n] + WEIGHTS[0] * deltas[0][n] + WEIGHTS[1] * deltas[1][n] for n in base})
    _model(root / "ft0_copy", {n: base[n] + deltas[0][n] for n in base})
    _model(root / "base_copy", dict(base))
    nan = {n: base[n] + deltas[0][n] for n in base}
    nan[NAN_TENSOR][NAN_AT] = np.nan
    _model(root / "ta_nan", nan)
    bnan = {n: v.copy() for n, v in base.items()}
    bnan[NAN_TENSOR][NAN_AT] = np.inf
    _model(root / "base_nan", bnan)

    a = root / "arrays"
    a.mkdir()
    D = rng.standard_normal((200, 3))
    np.save(a / "D.npy", D)
    np.save(a / "V.npy", D @ np.array([0.5, 0.25, 0.0]))
    np.save(a / "truth.npy", np.array([[0.5, 0.25, 0.0]]))
    Dn = D.copy()
    Dn[17, 1] = np.nan
    np.save(a / "D_nan.npy", Dn)
    (a / "empty.npy").write_bytes(b"")
    (a / "truncated.npy").write_bytes((a / "D.npy").read_bytes()[:300])
    np.save(a / "cube.npy", np.zeros((4, 3, 2)))
    np.save(a / "no_rows.npy", np.zeros((0, 3)))
    np.savez(a / "wrong_keys.npz", foo=np.zeros(3))
    np.savez(a / "misshaped.npz", gram=np.zeros((3, 2)), cross=np.zeros((3, 1)), target_sq=np.ones(1),
             n_rows=np.array(5))
    np.savez(a / "strings.npz", gram=np.array(["a"]), cross=np.zeros((3, 1)), target_sq=np.ones(1),
             n_rows=np.array(5))
    np.savez(a / "list_provenance.npz", gram=np.eye(3), cross=np.zeros((3, 1)), target_sq=np.ones(1),
             n_rows=np.array(5), provenance_json=np.asarray("[1]"))
    from unmerge_jax import gram_stats, save_stats

    save_stats(a / "stats.npz", gram_stats(D, D @ np.array([[0.5], [0.25], [0.0]]), seeds=2),
               {"atom_names": ["a", "b", "c"], "target_names": ["t"]})
    good = (a / "stats.npz").read_bytes()
    (a / "truncated.npz").write_bytes(good[: len(good) // 2])
    (a / "grid_nan.json").write_text('{"lasso": {"alpha": [1e-6, NaN]}}')
    (a / "grid_empty.json").write_text('{"lasso": {"alpha": []}}')
    (root / "a_file").write_text("not a directory")
    (root / "a_dir").mkdir()
    return root


def digest(root: Path) -> dict:
    """``{relative path: sha256}`` of every file under ``root`` (symlinks and modes excluded)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# running the real command
# ---------------------------------------------------------------------------------------------
def unmerge_command() -> list[str]:
    """The installed `unmerge` console script beside this interpreter (else ``python -m``)."""
    script = Path(sys.executable).parent / "unmerge"
    return [str(script)] if script.exists() else [sys.executable, "-m", "unmerge_jax.cli.main"]


def cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device: faster start
    env.update(HF_HUB_OFFLINE="1", UNMERGE_PROGRESS="0", JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore::DeprecationWarning")
    return env


def run_unmerge(argv, cwd, prefix=()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *unmerge_command(), *map(str, argv)], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=600)


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def _fill(path: Path) -> None:
    """Fill a small file system to the last byte (unbuffered writes until ENOSPC)."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)


def _without_permission_bypass(root: Path):
    """A command prefix under which chmod 000 is honoured (root bypasses permission bits), or None."""
    probe = root / "probe"
    probe.write_text("x")
    probe.chmod(0)
    try:
        if os.geteuid() != 0:
            return ()
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            return None
        prefix = (setpriv, "--bounding-set=-dac_override,-dac_read_search")
        r = subprocess.run([*prefix, sys.executable, "-c", f"open({str(probe)!r}).read()"], capture_output=True)
        return prefix if r.returncode != 0 and b"PermissionError" in r.stderr else None
    finally:
        probe.chmod(0o644)
        probe.unlink()


# ---------------------------------------------------------------------------------------------
# the cases: argv (with {in}/{out}/{ro}/{full} placeholders), what stderr must name
# ---------------------------------------------------------------------------------------------
D3 = ["--base", "{in}/base", "--dictionary", "{in}/ft0", "{in}/ft1", "--target", "{in}/ta"]
ARR = ["--dictionary", "{in}/arrays/D.npy", "--target", "{in}/arrays/V.npy"]
SW = ["sweep", "--dictionary", "{in}/arrays/D.npy", "--targets", "{in}/arrays/V.npy", "--methods", "nnls", "--seeds", "0"]

REFUSED = {
    # outputs never overlap inputs
    "decompose --json inside the base": (["decompose", *D3, "--json", "{in}/base/r.json"],
                                         ["output {in}/base/r.json is inside the input {in}/base"]),
    "sweep --out over the dictionary": ([*SW, "--out", "{in}/arrays/D.npy"], ["is the input"]),
    "sparsity --json inside the target": (["sparsity", "{in}/ta", "--base", "{in}/base", "--json", "{in}/ta/s.json"],
                                          ["inside the input {in}/ta"]),
    "study --force over a directory holding its input": (["study", "anatomy", "--target", "{in}/ta", "--base",
                                                          "{in}/base", "--out", "{in}", "--force"],
                                                         ["contains the input"]),
    # every OS error one line
    "read-only location": (["decompose", *ARR, "--json", "{ro}/r.json"], ["{ro}/r.json", "read-only"]),
    "full disk": (["stats", *ARR, "--seeds", "2", "--out", "{full}/s.npz"], ["{full}/s.npz", "disk is full"]),
    "existing directory as the output file": (["decompose", *ARR, "--json", "{in}/a_dir"],
                                              ["{in}/a_dir is a directory; give a file path"]),
    "output under a file": (["stats", *ARR, "--out", "{in}/a_file/s.npz"], ["{in}/a_file is a file, not a directory"]),
    "unreadable checkpoint": (["decompose", "--base", "{in}/base", "--dictionary", "{locked}/ft", "--target",
                               "{in}/ta"], ["cannot read {locked}/ft/model.safetensors: permission denied"]),
    "unreadable model directory (an OSError no reader expects)": (
        ["decompose", "--base", "{locked}/closed", "--dictionary", "{in}/ft0", "--target", "{in}/ta"],
        ["{locked}/closed", "permission denied"]),
    "unreadable array file": (["sweep", "--dictionary", "{locked}/D.npy", "--targets", "{in}/arrays/V.npy"],
                              ["cannot read {locked}/D.npy: permission denied"]),
    # parameters
    "--seed 2**70": (["decompose", *ARR, "--seeds", "2", "--seed", str(2 ** 70)], ["--seed", "seeds are 32-bit"]),
    "--param alpha=nan": (["decompose", *ARR, "--method", "lasso", "--param", "alpha=nan"],
                          ["--param alpha is nan; give a finite number"]),
    "--seeds not a number": (["decompose", *ARR, "--seeds", "many"], ["argument --seeds: invalid int value"]),
    # damaged array files
    "empty .npy": (["sweep", "--dictionary", "{in}/arrays/empty.npy", "--targets", "{in}/arrays/V.npy"],
                   ["{in}/arrays/empty.npy"]),
    "truncated statistics .npz": (["sweep", "--stats", "{in}/arrays/truncated.npz"], ["{in}/arrays/truncated.npz"]),
    "mis-shaped statistics": (["sweep", "--stats", "{in}/arrays/misshaped.npz", "--seeds", "0"],
                              ["field gram has shape (3, 2)", "need (3, 3)"]),
    # non-finite values name the file, the tensor (or column) and the first index
    "NaN in a target checkpoint": (["decompose", "--base", "{in}/base", "--dictionary", "{in}/ft0", "{in}/ft1",
                                    "--target", "{in}/ta_nan"],
                                   [f"tensor {NAN_TENSOR} of target ta_nan ({{in}}/ta_nan/model.safetensors) holds "
                                    f"NaN/Inf", f"at index {NAN_AT}"]),
    "Inf in the base (stats)": (["stats", "--base", "{in}/base_nan", "--dictionary", "{in}/ft0", "--target", "{in}/ta",
                                 "--out", "{out}/s.npz"],
                                [f"tensor {NAN_TENSOR} of base {{in}}/base_nan/model.safetensors", f"index {NAN_AT}"]),
    "NaN in an array file": (["decompose", "--dictionary", "{in}/arrays/D_nan.npy", "--target", "{in}/arrays/V.npy"],
                             ["{in}/arrays/D_nan.npy holds 1 non-finite value(s) in column 1", "row 17"]),
    "NaN in sparsity's target": (["sparsity", "{in}/ta_nan", "--base", "{in}/base"],
                                 [f"tensor '{NAN_TENSOR}' of {{in}}/ta_nan/model.safetensors", f"index {NAN_AT}"]),
}

NEEDS = {"read-only location": "ro", "full disk": "full", "unreadable checkpoint": "locked",
         "unreadable array file": "locked", "unreadable model directory (an OSError no reader expects)": "locked"}

WARNED = {
    "decompose": (["decompose", "--base", "{in}/base", "--dictionary", "{in}/ft0", "{in}/ft0_copy", "{in}/ft1",
                   "z={in}/base_copy", "--target", "{in}/ta", "{in}/base_copy", "--json", "{out}/r.json"]),
    "stats": (["stats", "--base", "{in}/base", "--dictionary", "{in}/ft0", "{in}/ft0_copy", "--target", "{in}/base_copy",
               "--out", "{out}/s.npz"]),
}


def _fill_in(argv, places):
    return [a.format(**places) for a in argv]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    inputs = build_inputs(root / "in")
    places = {"in": str(inputs)}
    mounts, skip = [], {}
    locked = root / "locked"
    try:
        ro, full = root / "ro", root / "full"
        if _mount_tmpfs(ro, "ro,size=64k"):
            mounts.append(ro)
            places["ro"] = str(ro)
        else:
            skip["ro"] = "cannot mount a read-only tmpfs here"
        if _mount_tmpfs(full, "size=64k"):
            mounts.append(full)
            _fill(full)
            places["full"] = str(full)
        else:
            skip["full"] = "cannot mount a small tmpfs here"
        locked.mkdir()
        shutil.copytree(inputs / "ft0", locked / "ft")
        shutil.copy(inputs / "arrays" / "D.npy", locked / "D.npy")
        shutil.copytree(inputs / "base", locked / "closed")
        prefix = _without_permission_bypass(root)
        if prefix is None:
            skip["locked"] = "permission bits cannot be enforced here (root without setpriv)"
        else:
            (locked / "ft" / "model.safetensors").chmod(0)
            (locked / "D.npy").chmod(0)
            (locked / "closed").chmod(0)
            places["locked"] = str(locked)
        before = digest(inputs)
        full_before = sorted(p.name for p in full.iterdir()) if "full" in places else None

        jobs = {}
        for case, (argv, _) in REFUSED.items():
            need = NEEDS.get(case)
            if need in skip:
                continue
            out = root / "out" / f"r{len(jobs)}"
            out.mkdir(parents=True)
            jobs[case] = (_fill_in(argv, {**places, "out": str(out)}), out, prefix if need == "locked" else ())
        for case, argv in WARNED.items():
            out = root / "out" / f"w{case}"
            out.mkdir(parents=True)
            jobs[f"warn:{case}"] = (_fill_in(argv, {**places, "out": str(out)}), out, ())
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {case: pool.submit(run_unmerge, argv, root, pfx) for case, (argv, _, pfx) in jobs.items()}
            results = {case: f.result() for case, f in futures.items()}
        full_after = sorted(p.name for p in full.iterdir()) if "full" in places else None
    finally:
        for p in (locked / "ft" / "model.safetensors", locked / "D.npy", locked / "closed"):
            if p.exists():
                p.chmod(0o755)
        for m in mounts:
            subprocess.run(["umount", str(m)], capture_output=True)
    return {"results": results, "jobs": jobs, "places": places, "skip": skip, "inputs": inputs,
            "before": before, "after": digest(inputs), "full": (full_before, full_after)}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_one_line_exit_2_nothing_written(hostile, case):
    need = NEEDS.get(case)
    if need in hostile["skip"]:
        pytest.skip(hostile["skip"][need])
    r = hostile["results"][case]
    argv, out, _ = hostile["jobs"][case]
    err = r.stderr.strip()
    assert r.returncode == 2, (argv, r.returncode, r.stderr[-3000:])
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in REFUSED[case][1]:
        assert needle.format(**hostile["places"], out=str(out)) in err, (needle, err)
    assert list(out.iterdir()) == [], f"{case} wrote {list(out.iterdir())}"


def test_inputs_are_byte_identical_and_nothing_was_written_into_them(hostile):
    assert hostile["after"] == hostile["before"]
    before, after = hostile["full"]
    if before is not None:
        assert after == before  # the full disk holds its filler only: no temporary, no lock left behind


def _warnings(r):
    lines = r.stderr.strip().splitlines()
    return [line for line in lines if line.startswith("warning: ")], lines


def test_ambiguous_decomposition_warns_and_still_answers(hostile):
    r = hostile["results"]["warn:decompose"]
    assert r.returncode == 0, r.stderr[-3000:]
    warned, lines = _warnings(r)
    assert warned == lines and len(warned) == 3, lines
    dup = next(w for w in warned if "ft0 and ft0_copy" in w)
    assert "same task vector" in dup and "split between them" in dup
    assert any("dictionary entry z is all zero" in w for w in warned)
    assert any("the target equals the base: nothing to decompose" in w and "base_copy" in w for w in warned)
    assert "target base_copy: the target equals the base: nothing to decompose" in r.stdout
    assert "cos 1.000000" in r.stdout.split("target base_copy")[0]  # ta is a real fit ...
    assert "cos" not in r.stdout.split("target base_copy")[1]       # ... base_copy is not reported as one
    _, out, _ = hostile["jobs"]["warn:decompose"]
    rep = json.loads((out / "r.json").read_text())
    assert rep["warnings"] == [w[len("warning: "):] for w in warned]
    zero = next(t for t in rep["targets"] if t["target"] == "base_copy")
    assert zero["cosine"] is None and zero["recon_error"] is None and zero["unexplained"] is None
    assert zero["note"] == "the target equals the base: nothing to decompose"
    ta = next(t for t in rep["targets"] if t["target"] == "ta")
    # the weight of d0 is split between its two copies: their sum is the true weight
    assert ta["coefficients"]["ft0"] + ta["coefficients"]["ft0_copy"] == pytest.approx(WEIGHTS[0], rel=1e-5)
    assert ta["coefficients"]["ft1"] == pytest.approx(WEIGHTS[1], rel=1e-5)


def test_stats_warns_too(hostile):
    r = hostile["results"]["warn:stats"]
    assert r.returncode == 0, r.stderr[-3000:]
    warned, lines = _warnings(r)
    assert warned == lines and len(warned) == 2, lines
    assert "wrote" in r.stdout
