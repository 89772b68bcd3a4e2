"""Hostile inputs to ``unmerge merge``: every class is refused with one line naming the culprit and
the fix — through the real command as a subprocess (exit code 2, one line on stderr, no traceback,
nothing written, inputs byte-identical) and, for the finer cases, through the library.

Classes: non-finite values (model, base, LoRA factor, ``lora_alpha``, an overflowing weight, a
merged value beyond float32 or the output dtype; TIES and RAM would absorb a NaN silently), outputs
overlapping inputs, concurrent runs, side files linked from outside the model, integer buffers,
parameters (shard size, seed, weights, density, lambda, epsilon, empty lists) and YAML limits.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from unmerge_jax import merge
from unmerge_jax.errors import UnmergeError
from unmerge_jax.kernels import merge as K
from unmerge_jax.merge import MERGE_METHODS, merge_tensors
from unmerge_jax.merge.chunks import NonFinite
from unmerge_jax.merge.config import MAX_YAML_NODES, load_config
from unmerge_jax.merge.driver import output_limit

Q = "model.layers.{}.self_attn.q_proj.weight"
CFG = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 4, "vocab_size": 16}
LORA = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
MAX_LINE = 300


def _save(path: Path, tensors: dict, config=CFG):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def _weights(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    t = {Q.format(i): (scale * rng.standard_normal((4, 4))).astype(np.float32) for i in range(2)}
    t["model.embed_tokens.weight"] = rng.standard_normal((16, 4)).astype(np.float32)
    return t


def _fine_tune(base: dict, seed: int, edit=None) -> dict:
    rng = np.random.default_rng(seed)
    t = {n: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in base.items()}
    if edit:
        edit(t)
    return t


def _set(name, index, value):
    def edit(t):
        t[name][index] = value
    return edit


def _adapter(path: Path, alpha=4.0, edit=None):
    rng = np.random.default_rng(7)
    t = {LORA.format("A"): rng.standard_normal((2, 4)).astype(np.float32),
         LORA.format("B"): rng.standard_normal((4, 2)).astype(np.float32)}
    if edit:
        edit(t)
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": alpha, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(cfg))   # NaN is written as the JSON token NaN
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Small safetensors models (no torch needed): a base, two fine-tunes, one bad input per class."""
    root = tmp_path_factory.mktemp("zoo")
    base = _weights()
    _save(root / "base", base)
    (root / "base" / "tokenizer.json").write_text('{"model": "tiny"}')
    for k in range(2):
        _save(root / f"ft{k}", _fine_tune(base, 10 + k))
    _save(root / "nan_model", _fine_tune(base, 20, _set(Q.format(1), (1, 2), np.nan)))
    # A NaN at a small |δ| entry TIES trims away, and one RAM's ε-rule leaves inactive.
    _save(root / "nan_small", _fine_tune(base, 21, _set(Q.format(0), (3, 1), np.nan)))
    inf_base = {n: v.copy() for n, v in base.items()}
    inf_base["model.embed_tokens.weight"][5, 3] = -np.inf
    _save(root / "inf_base", inf_base)
    _save(root / "inf_ft", _fine_tune(inf_base, 22))
    _adapter(root / "lora")
    _adapter(root / "lora_nan", edit=_set(LORA.format("B"), (2, 1), np.nan))
    _adapter(root / "lora_alpha_nan", alpha=float("nan"))
    big = _weights(scale=6e4)            # float16 holds ±65504: 6e4·N(0, 1) does not fit
    _save(root / "big_base", {n: v / 1e4 for n, v in big.items()})
    _save(root / "big_ft", {n: v for n, v in big.items()})
    return root


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() or p.is_symlink():
            h.update(str(p.relative_to(root)).encode() + b"\0" + (p.read_bytes() if p.exists() else b"<link>"))
    return h.hexdigest()


def _config(zoo: Path, method="task_arithmetic", models=("ft0", "ft1"), base="base", params=None, **top):
    params = params or [{} for _ in models]
    cfg = {"merge_method": method, "base_model": str(zoo / base) if base else None,
           "models": [{"model": str(zoo / m), "parameters": p} for m, p in zip(models, params)], **top}
    return {k: v for k, v in cfg.items() if v is not None}


def _cli(*args, cwd=None, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UNMERGE_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "unmerge_jax.cli.main", "merge", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def _refused(r, *words):
    """Exit 2, exactly one short stderr line ``error: ...`` containing ``words``, no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert "Traceback" not in r.stderr and len(lines[0]) <= MAX_LINE, lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ---------------------------------------------------------------- non-finite values (CLI)
NONFINITE_CASES = {
    "nan in a model": (dict(models=("ft0", "nan_model")),
                       ["nan_model/model.safetensors", Q.format(1), "(1, 2)", "nan"]),
    "inf in the base": (dict(base="inf_base", models=("inf_ft", "ft1")),
                        ["inf_base/model.safetensors", "model.embed_tokens.weight", "(5, 3)", "-inf"]),
    "ties absorbs a trimmed nan": (dict(method="ties", models=("ft0", "nan_small"),
                                        params=[{"density": 0.2}, {"density": 0.2}]),
                                   ["nan_small/model.safetensors", Q.format(0), "(3, 1)"]),
    "dare_ties": (dict(method="dare_ties", models=("ft0", "nan_small"), params=[{"density": 0.3}, {"density": 0.3}]),
                  ["nan_small/model.safetensors", Q.format(0), "(3, 1)"]),
    "ram leaves nan inactive": (dict(method="ram", models=("ft0", "nan_small")),
                                ["nan_small/model.safetensors", Q.format(0), "(3, 1)"]),
    "ram percentile face": (dict(method="ram", models=("ft0", "nan_small"), parameters={"face": "percentile"}),
                            ["nan_small/model.safetensors", Q.format(0), "(3, 1)"]),
    "ram whole-model face": (dict(method="ram", models=("ft0", "nan_small"), parameters={"face": "overlap_unique"}),
                             ["nan_small/model.safetensors", Q.format(0), "(3, 1)"]),
    "nan in a lora factor": (dict(models=("ft0", "lora_nan")),
                             ["lora_nan/adapter_model.safetensors", LORA.format("B"), "(2, 1)"]),
    "lora_alpha nan": (dict(models=("ft0", "lora_alpha_nan")), ["lora_alpha_nan", "lora_alpha", "nan"]),
    "weight 1e308": (dict(params=[{"weight": 1e308}, {}]), ["weight of model 0", "float32"]),
    "float32 overflow of the merge": (dict(base="big_base", models=("big_ft",), params=[{"weight": 3e38}]),
                                      ["merged value", "not finite in float32", "smaller weights"]),
    "float16 overflow of the output": (dict(base="big_base", models=("big_ft",), out_dtype="float16"),
                                       ["merged value", "beyond the range of float16", "bfloat16"]),
}


def test_an_unmerged_base_tensor_is_checked_too(zoo, tmp_path):
    """A LoRA adapter leaves most tensors at the base: those are checked on the way out as well
    (an Inf in the base's embedding, and a layer-1 weight beyond float16, which the layer-0 q_proj
    adapter does not touch)."""
    with pytest.raises(UnmergeError, match=r"model.embed_tokens.weight of .*inf_base.* index \(5, 3\)"):
        merge(_config(zoo, base="inf_base", models=("lora",)), tmp_path / "out")
    wide = _weights()
    wide[Q.format(1)][2, 3] = 7e4
    _save(tmp_path / "in" / "wide", wide)
    with pytest.raises(UnmergeError, match=r"layers.1.* holds 70000 at index \(2, 3\).*beyond the output dtype"):
        merge(_config(zoo, base=None, base_model=str(tmp_path / "in" / "wide"), models=("lora",), out_dtype="float16"),
              tmp_path / "out")
    assert os.listdir(tmp_path) == ["in"]


def test_finite_inputs_whose_task_vector_overflows_are_named(tmp_path):
    """θ and θ_base both finite but θ − θ_base beyond float32 (not a fine-tune of this base), and a
    LoRA update B@A·α/r beyond float32 from finite factors: each named as such, not as a NaN input."""
    base = _weights()
    base[Q.format(1)][0, 1] = -3e38
    _save(tmp_path / "in" / "base", base)
    far = _fine_tune(base, 40, _set(Q.format(1), (0, 1), 3e38))
    _save(tmp_path / "in" / "far", far)
    _save(tmp_path / "in" / "ft", _fine_tune(base, 41))
    for method in ("task_arithmetic", "ties"):
        with pytest.raises(UnmergeError, match=r"task vector of tensor .*layers.1.* overflows float32 at index \(0, 1\)"):
            merge(_config(tmp_path / "in", method, models=("ft", "far"), params=[{"density": 0.5}] * 2
                          if method == "ties" else None), tmp_path / "out")
    _adapter(tmp_path / "in" / "loud", alpha=3e38, edit=_set(LORA.format("A"), (0, 0), 100.0))
    with pytest.raises(UnmergeError, match=r"LoRA update B@A·scale of .*loud.* overflows float32 \(scale 1\.5e\+38\)"):
        merge(_config(tmp_path / "in", models=("loud",)), tmp_path / "out")
    assert os.listdir(tmp_path) == ["in"]


# ---------------------------------------------------------------- non-finite values (library)
@pytest.mark.parametrize("method", list(MERGE_METHODS))
@pytest.mark.parametrize("where", ["base", "model", "inf_model"])
def test_every_method_refuses_a_nonfinite_input_at_its_index(method, where):
    """Every registry entry, NaN/Inf in the base or an input at an entry the method would drop
    (a small |δ|: trimmed by TIES, dropped by RAM's masks): an error naming the input and index,
    for one chunk and for many (the first index is the tensor's first, not the chunk's)."""
    from tests.test_merge_registry import REFERENCES, _k

    rng = np.random.default_rng(3)
    base = rng.standard_normal((6, 50)).astype(np.float32)
    k = _k(method)                                # methods that take a fixed number of models
    bad = min(1, k - 1)
    d = (0.1 * rng.standard_normal((3, 6, 50))).astype(np.float32)[:k]
    idx = (4, 17)
    if where == "base":
        base[idx] = np.nan
    else:
        d[bad][idx] = np.nan if where == "model" else np.inf
        d[bad][5, 40] = np.nan                    # a later one: not the one named
    params = {"density": 0.5} if "density" in MERGE_METHODS[method].per_model else {}
    params = {**REFERENCES[method][1][0], **params}   # required parameters (slerp's t)
    if MERGE_METHODS[method].per_model.get("weight", 1.0) is None:
        params["weight"] = [1.0] * k              # a required per-model weight
    for chunk in (None, 7):
        kw = {} if chunk is None else {"chunk": chunk}
        with pytest.raises(NonFinite) as err:
            _merge_in_memory(method, base, d, params, **kw)
        assert err.value.index == idx and err.value.culprit == ("base" if where == "base" else bad)
        assert "(4, 17)" in str(err.value) and "\n" not in str(err.value)


def _merge_in_memory(method, base, d, params, chunk=None):
    if chunk is None:
        return merge_tensors(method, base, d, **params)
    from unmerge_jax.merge.params import resolve
    from unmerge_jax.merge.tensor import merge_resolved

    per_model = [{n: params[n] if n == "density" else params[n][i] for n in ("density", "weight") if n in params}
                 for i in range(len(d))]
    shared = {n: v for n, v in params.items() if n not in ("density", "weight")}
    return merge_resolved(resolve(method, len(d), shared, per_model), base.copy(), tuple(d), chunk=chunk)


def test_a_merged_value_beyond_the_limit_is_refused_and_finite_merges_are_unchanged():
    rng = np.random.default_rng(4)
    base = rng.standard_normal(1000).astype(np.float32)
    d = (0.1 * rng.standard_normal((2, 1000))).astype(np.float32)
    from unmerge_jax.merge.params import resolve
    from unmerge_jax.merge.tensor import merge_resolved

    res = resolve("task_arithmetic", 2, {}, [{"weight": 0.5}, {"weight": 0.5}])
    plain = merge_resolved(res, base.copy(), tuple(d))
    np.testing.assert_array_equal(merge_resolved(res, base.copy(), tuple(d), limit=output_limit("F16")), plain)
    np.testing.assert_allclose(plain, base + 0.5 * d[0] + 0.5 * d[1], rtol=0, atol=1e-6)
    big = base.copy()
    big[321] = 65519.0                        # rounds to 65504 in float16: fits
    merge_resolved(res, big.copy(), tuple(np.zeros_like(d)), limit=output_limit("F16"))
    big[654] = 65520.0                        # rounds to inf in float16
    with pytest.raises(NonFinite) as err:
        merge_resolved(res, big.copy(), tuple(np.zeros_like(d)), limit=output_limit("F16"))
    assert err.value.culprit == "output" and err.value.index == (654,)
    with pytest.raises(NonFinite, match="not finite"):
        merge_tensors("task_arithmetic", base, d, [3e38, 3e38], **{"lambda": 3.0})


def test_output_limits_are_the_first_value_each_dtype_rounds_to_inf():
    import ml_dtypes

    for tag, dt in (("F16", np.float16), ("BF16", ml_dtypes.bfloat16)):
        lim = output_limit(tag)
        below = np.nextafter(lim, np.float32(0), dtype=np.float32)
        with np.errstate(over="ignore"):
            assert np.isinf(np.float32(lim).astype(dt)) and np.isfinite(below.astype(dt))
    assert output_limit("F16") == 65520.0 and np.isinf(output_limit("F32")) and np.isinf(output_limit("F64"))


def test_the_check_adds_no_pass_to_the_apply_kernels():
    """The non-finite check is an elementwise select in the kernel's loop: the compiled programs
    with and without it have the same number of fusions and no reduction."""
    n = 1 << 12
    rng = np.random.default_rng(0)
    base = rng.standard_normal(n).astype(np.float32)
    ts = tuple(rng.standard_normal(n).astype(np.float32) for _ in range(3))
    w, dens = np.ones(3, np.float32), np.full(3, 0.5, np.float32)
    stats = K.GTAStats(np.zeros(3, np.uint32), np.zeros(3, np.int32), np.ones(3, np.float32))
    for cfg in (K.GTAConfig(deltas=False), K.GTAConfig(sparsify="magnitude", consensus="sum", normalize=True)):
        hlo = {}
        for limit in (None, np.float32(np.inf)):
            text = K.gta_kernel.lower(base, ts, w, dens, np.float32(1), stats, np.int64(0), np.uint32(0), np.uint32(0),
                                      None, limit, cfg=cfg).compile().as_text()
            entry = text[text.index("ENTRY"):]
            hlo[limit is None] = (entry.count(" fusion("), "reduce" in entry)
        assert hlo[True] == hlo[False] and not hlo[False][1], hlo
    rcfg = K.RAMConfig(deltas=False)
    hlo = {}
    for limit in (None, np.float32(np.inf)):
        text = K.ram_kernel.lower(base, ts, w, w, np.float32(1e-5), w, limit, cfg=rcfg).compile().as_text()
        entry = text[text.index("ENTRY"):]
        hlo[limit is None] = (entry.count(" fusion("), "reduce" in entry)
    assert hlo[True] == hlo[False] and not hlo[False][1], hlo


# ---------------------------------------------------------------- outputs never touch inputs
def _link_to_ft0(zoo, d):
    (d / "link").symlink_to(zoo / "ft0")
    return d / "link"


# {case: (where --out goes: a function of (zoo, case directory), extra arguments, words)}
OVERLAP_CASES = {
    "out exists": (lambda zoo, d: zoo / "ft1", [], ["already exists"]),
    "out is an input": (lambda zoo, d: zoo / "ft1", ["--force"], ["is the input", "ft1"]),
    "out inside an input": (lambda zoo, d: zoo / "base" / "merged", [], ["inside the input", "base"]),
    "out contains an input": (lambda zoo, d: zoo, ["--force"], ["contains the input", "delete"]),
    "out links to an input": (_link_to_ft0, ["--force"], ["is the input"]),
    "out contains the config": (lambda zoo, d: d, ["--force"], ["contains the input", "cfg.yaml"]),
}


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """A base and two fine-tunes of 1,500 small tensors: a merge of them stays inside its output
    lock for about a second, long enough to stop or kill it there."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal(16).astype(np.float32) for i in range(1500)}
    _save(root / "base", base, config=None)
    for k in range(2):
        _save(root / f"ft{k}", _fine_tune(base, k), config=None)
    return root, len(base)


def _start_merge(cfg: Path, out: Path):
    """A merge in a real process, returned once it writes its temporary (it then holds the
    output's lock and has its SIGTERM handler in place)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UNMERGE_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "unmerge_jax.cli.main", "merge", str(cfg), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if any(out.parent.glob(f".{out.name}.unmerge-*.tmp")):
            return proc
        time.sleep(0.005)
    raise AssertionError(proc.communicate())


def test_a_second_concurrent_merge_fails_at_once(many, tmp_path):
    """Two real processes, neither with --force: while the first holds the output's lock (stopped
    mid-run with SIGSTOP), the second fails at once; the first then finishes normally."""
    inputs, n = many
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(inputs)))
    out = tmp_path / "out"
    first = _start_merge(cfg, out)
    try:
        os.kill(first.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        _refused(_cli(cfg, "--out", out), "another unmerge run is writing", str(out))
        assert time.monotonic() - t0 < 60
        os.kill(first.pid, signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=120)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
            first.wait()
    assert sorted(os.listdir(tmp_path)) == ["cfg.yaml", "out"]
    assert len(load_file(str(out / "model.safetensors"))) == n


def test_a_merge_stopped_by_sigterm_or_kill_leaves_nothing(many, tmp_path):
    """SIGTERM mid-merge: exit 143, no traceback, neither temporary nor lock left. kill -9: the
    temporary stays, and the next merge to the same output names it, removes it and succeeds."""
    inputs, n = many
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(inputs)))
    out = tmp_path / "out"
    proc = _start_merge(cfg, out)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    assert sorted(os.listdir(tmp_path)) == ["cfg.yaml"]
    proc = _start_merge(cfg, out)
    proc.kill()
    proc.wait()
    assert any(p.name.startswith(".out.unmerge-") for p in tmp_path.iterdir()) and not out.exists()
    r = _cli(cfg, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "left by an earlier run" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["cfg.yaml", "out"]
    assert len(load_file(str(out / "model.safetensors"))) == n


SWALLOWED_SIGTERM = """
import gc, os, signal, sys, time
from pathlib import Path
from unmerge_jax.io.atomic import atomic_dir

def callback(phase, info):          # SIGTERM arrives while a gc callback runs, as JAX registers one
    if phase == "start" and not fired:
        fired.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(1000))            # bytecode: the handler runs here, inside the callback

fired = []
out = Path(sys.argv[1])
try:
    with atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_text("half")
        gc.callbacks.append(callback)
        gc.collect()
        gc.callbacks.remove(callback)
        for _ in range(200):        # the re-sent signal stops the run here
            time.sleep(0.01)
    print("published")
except SystemExit as err:
    print("exit", err.code)
    raise
"""


def test_a_sigterm_swallowed_by_a_gc_callback_still_stops_the_run(tmp_path):
    """Python swallows (and prints) an exception a signal handler raises inside a gc callback: the
    run then went on and published its output with exit 0. Now the signal is sent again and the
    run stops — exit 143, nothing printed, nothing published, no temporary or lock left."""
    r = subprocess.run([sys.executable, "-c", SWALLOWED_SIGTERM, str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 128 + signal.SIGTERM and r.stdout.strip() == "exit 143", (r.stdout, r.stderr)
    assert r.stderr.strip() == "" and os.listdir(tmp_path) == []


def test_an_output_that_appears_during_the_run_is_not_replaced(zoo, tmp_path, monkeypatch):
    """Another run to the same --out finished while this one was writing (neither with --force):
    the existence check is made again under the lock, at rename time — the first result stays."""
    import importlib

    D = importlib.import_module("unmerge_jax.merge.driver")   # unmerge_jax.merge is also the function

    out = tmp_path / "out"
    real = D.write_config

    def other_run_finishes(src, tmp, tag):
        out.mkdir()
        (out / "theirs.txt").write_text("first result")
        return real(src, tmp, tag)

    monkeypatch.setattr(D, "write_config", other_run_finishes)
    with pytest.raises(UnmergeError, match="already exists"):
        merge(_config(zoo), out)
    assert os.listdir(out) == ["theirs.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ---------------------------------------------------------------- side files, integer buffers
def test_side_files_linked_from_outside_the_model_are_not_copied(zoo, tmp_path):
    base = tmp_path / "base"
    _save(base, load_file(str(zoo / "base" / "model.safetensors")))
    secret = tmp_path / "secret.txt"
    secret.write_text("not a tokenizer")
    (base / "tokenizer.json").symlink_to(secret)
    (base / "tokenizer_config.json").write_text("{}")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(zoo, base=None, base_model=str(base))))
    r = _cli(cfg, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    notes = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(notes) == 1 and notes[0].startswith("note: ") and str(base / "tokenizer.json") in notes[0], r.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["README.md", "config.json", "model.safetensors", "tokenizer_config.json",
                                                    "unmerge_merge_config.yaml"]


def test_a_hugging_face_cache_snapshot_keeps_its_side_files(zoo, tmp_path):
    repo = tmp_path / "models--org--base"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "rev0"
    snap.mkdir(parents=True)
    for name, src in (("model.safetensors", zoo / "base" / "model.safetensors"), ("config.json", zoo / "base" / "config.json"),
                      ("tokenizer.json", zoo / "base" / "tokenizer.json")):
        blob = repo / "blobs" / hashlib.sha256(name.encode()).hexdigest()
        blob.write_bytes(src.read_bytes())
        (snap / name).symlink_to(Path("../../blobs") / blob.name)
    res = merge(_config(zoo, base=None, base_model=str(snap)), tmp_path / "out")
    assert res.skipped == ()
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (zoo / "base" / "tokenizer.json").read_text()


def test_integer_buffers_of_the_base_pass_through_unchanged(tmp_path):
    base = _weights()
    ids = np.arange(32, dtype=np.int64).reshape(1, 32)
    _save(tmp_path / "base", {**base, "model.position_ids": ids})
    for k in range(2):
        _save(tmp_path / f"ft{k}", {**_fine_tune(base, 30 + k), "model.position_ids": ids})
    res = merge(_config(tmp_path), tmp_path / "out", dtype="bfloat16")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert got["model.position_ids"].dtype == np.int64
    np.testing.assert_array_equal(got["model.position_ids"], ids)
    assert res.n_merged == len(base) and str(got[Q.format(0)].dtype) == "bfloat16"


# ---------------------------------------------------------------- parameters
PARAM_CASES = {
    "shard-size nan": ({}, ["--shard-size", "nan"], ["--shard-size", "nan"]),
    "shard-size negative": ({}, ["--shard-size", "-1"], ["--shard-size", "-1"]),
    "shard-size zero": ({}, ["--shard-size", "0"], ["--shard-size", "positive"]),
    "shard-size inf": ({}, ["--shard-size", "inf"], ["--shard-size"]),
    "seed 2**70": ({}, ["--seed", str(2**70)], ["seed 1180591620717411303424", "4294967295"]),
    "seed negative": ({}, ["--seed", "-1"], ["seed -1", "outside"]),
    "weight nan": (dict(params=[{"weight": float("nan")}, {}]), [], ["weight of model 0", "finite"]),
    "weight inf": (dict(params=[{}, {"weight": float("inf")}]), [], ["weight of model 1", "finite"]),
    "density nan": (dict(method="ties", params=[{"density": float("nan")}, {}]), [], ["density", "finite"]),
    "density above 1": (dict(method="ties", params=[{"density": 1.5}, {}]), [], ["density 1.5", "(0, 1]"]),
    "lambda inf": (dict(parameters={"lambda": float("-inf")}), [], ["lambda", "finite"]),
    "epsilon nan": (dict(method="ram", parameters={"epsilon": float("nan")}), [], ["epsilon", "finite"]),
    "epsilon negative": (dict(method="ram", parameters={"epsilon": -1.0}), [], ["epsilon", "≥ 0"]),
    "empty models": (dict(models=()), [], ["no models to merge"]),
    "models not a list": (dict(models=(), _models="ft0"), [], ["models must be a list"]),
    "long method name": (dict(method="x" * 100_000), [], ["unknown merge method", "..."]),
    "missing lora": (dict(models=("ft0+no_such_lora",)), [], ["lora", "does not exist"]),
    "model+lora+lora": (dict(models=("ft0+lora+lora",)), [], ["cannot parse model reference"]),
    "compute bf16 for dare_linear": (dict(method="dare_linear"), ["--compute-dtype", "bfloat16"],
                                     ["reproduces mergekit for", "torch.bernoulli"]),
    "compute bf16 for a ram face mergekit lacks": (dict(method="ram", parameters={"face": "overlap_unique"}),
                                                   ["--compute-dtype", "bfloat16"], ["mergekit's ram faces"]),
}


def test_seeds_at_the_ends_of_the_range():
    base = np.zeros(64, np.float32)
    d = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    a = merge_tensors("dare_linear", base, d, density=0.5, seed=2**32 - 1)
    b = merge_tensors("dare_linear", base, d, density=0.5, seed=0)
    assert not np.array_equal(a, b)
    for seed in (2**32, -1, 1.5, True):
        with pytest.raises(UnmergeError, match="seed"):
            merge_tensors("dare_linear", base, d, density=0.5, seed=seed)


# ---------------------------------------------------------------- YAML limits
BOMB = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                 + [f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
                    for p, c in zip("abcdefgh", "bcdefghi")]
                 + ["merge_method: [*i]", "models: [*i]", ""])


YAML_CASES = {
    "alias bomb": (BOMB, ["aliases", f"{MAX_YAML_NODES:,}"]),
    "recursive alias": ("a: &a [*a]\nmerge_method: ties\n", ["unbounded"]),
    "not utf-8": (b"merge_method: ties\n# \xff\xfe\n", ["not UTF-8"]),
    "over 1 MiB": ("merge_method: ties\nmodels: []\n" + "#" * (1 << 20), ["1,048,576", "bytes"]),
    "python tag": ("merge_method: !!python/object/apply:os.system [echo hi]\n", ["cannot parse", "YAML"]),
    "nested too deeply": ("[" * 5000 + "]" * 5000, ["YAML"]),
}


# ---------------------------------------------------------------- every refusal through the CLI
def _cases(zoo):
    """``{case: (config dict or YAML text/bytes, --out function or None, extra arguments, words the
    error names)}``."""
    cases = {}
    for case, (kw, words) in NONFINITE_CASES.items():
        cases[case] = (_config(zoo, **kw), None, [], words)
    for case, (kw, args, words) in PARAM_CASES.items():
        kw = dict(kw)
        raw_models = kw.pop("_models", None)
        cfg = _config(zoo, **kw)
        if raw_models is not None:
            cfg["models"] = str(zoo / raw_models)
        cases[case] = (cfg, None, args, words)
    for case, (text, words) in YAML_CASES.items():
        cases[case] = (text, None, [], words)
    for case, (out, args, words) in OVERLAP_CASES.items():
        cases[case] = (_config(zoo), out, args, words)
    return cases


CASE_NAMES = [*NONFINITE_CASES, *PARAM_CASES, *YAML_CASES, *OVERLAP_CASES]


@pytest.fixture(scope="module")
def refusals(zoo, tmp_path_factory):
    """Every case run once by the real command, two at a time (each is a fresh process: importing
    JAX is most of its time), each in a directory holding only its config; the inputs are hashed
    before and after. Returns ``{case: (CompletedProcess, seconds, directory)}`` and the digests."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("refusals")
    jobs = {}
    for i, (case, (cfg, out, args, words)) in enumerate(_cases(zoo).items()):
        d = root / f"case{i}"
        d.mkdir()
        path = d / "cfg.yaml"
        if isinstance(cfg, dict):
            path.write_text(yaml.safe_dump(cfg))
        else:
            path.write_bytes(cfg if isinstance(cfg, bytes) else cfg.encode())
        out = (out or (lambda zoo, d: d / "out"))(zoo, d)
        jobs[case] = (d, [path, "--out", out, *args], words, sorted(os.listdir(d)))
    before = _digest(zoo)

    def run(argv):
        t0 = time.monotonic()
        r = _cli(*argv)
        return r, time.monotonic() - t0

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(run, job[1]) for case, job in jobs.items()}
        results = {case: (*f.result(), jobs[case]) for case, f in futures.items()}
    return results, (before, _digest(zoo))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_refused_by_the_cli_with_one_line_and_nothing_written(refusals, case):
    """Exit 2, one line naming the culprit (``words``) and no traceback; nothing beside the config
    (no output, temporary or lock file); every input byte-identical; well within a minute."""
    results, (before, after) = refusals
    r, seconds, (d, _, words, listing) = results[case]
    _refused(r, *words)
    assert sorted(os.listdir(d)) == listing, os.listdir(d)
    assert before == after
    assert seconds < 60


def test_the_alias_bomb_is_small_and_refused_before_it_is_expanded():
    assert len(BOMB.encode()) < 500
    t0 = time.monotonic()
    with pytest.raises(UnmergeError, match="1,362,025,168 nodes"):
        load_config(BOMB)
    assert time.monotonic() - t0 < 5


def test_quoted_values_are_cut_short(zoo):
    huge = ["x" * 1000] * 1000
    for cfg in ({**_config(zoo), "merge_method": huge}, {**_config(zoo), "dtype": huge},
                {**_config(zoo), "parameters": {"lambda": huge}}, {**_config(zoo), "models": [huge]},
                {**_config(zoo, method="ram"), "parameters": {"face": "y" * 10_000}}):
        with pytest.raises(UnmergeError) as err:
            load_config(cfg)
        assert len(str(err.value)) < MAX_LINE, str(err.value)[:500]
