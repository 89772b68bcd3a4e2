"""Checks that need no weights, and the messages behind the hostile-input contract, in-process.

Every case of :data:`MORE_REFUSED` goes through the same ``main`` as the `unmerge` command (one
line, exit 2, nothing written, inputs byte-identical); ``test_hostile_cli.py`` runs one case of
each class as a real subprocess. Then the library functions behind them: options and outputs
(``pipeline.check_options``, ``check_outputs``), 32-bit seeds, damaged statistics, mask and array
files, the ambiguity warnings (checked against cosines computed independently in NumPy), the
report of a target equal to the base, non-finite values named by file, tensor and first index
(including finite weights whose difference overflows float32), and the CLI's fallbacks for an
``OSError`` (one line) and for a bug (a traceback).
"""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.test_hostile_cli import CFG, NAMES, build_inputs, digest
from unmerge_jax.cli.main import main
from unmerge_jax.errors import UnmergeError

D3 = ["--base", "{in}/base", "--dictionary", "{in}/ft0", "{in}/ft1", "--target", "{in}/ta"]
ARR = ["--dictionary", "{in}/arrays/D.npy", "--target", "{in}/arrays/V.npy"]
SW = ["sweep", "--dictionary", "{in}/arrays/D.npy", "--targets", "{in}/arrays/V.npy", "--methods", "nnls", "--seeds", "0"]

MORE_REFUSED = {
    # outputs never overlap inputs
    "stats --out inside a NAME=DIR entry": (["stats", "--base", "{in}/base", "--dictionary", "x={in}/ft0", "--target",
                                             "{in}/ta", "--out", "{in}/ft0/s.npz"], ["inside the input {in}/ft0"]),
    "stats --save-mask over the --mask input": (["stats", *D3, "--mask", "{in}/arrays/stats.npz", "--save-mask",
                                                 "{in}/arrays/stats.npz", "--out", "{out}/s.npz"],
                                                ["output {in}/arrays/stats.npz is the input"]),
    "decompose --stats-out over an array input": (["decompose", *ARR, "--stats-out", "{in}/arrays/D.npy"],
                                                  ["is the input {in}/arrays/D.npy"]),
    "sweep --json and --out the same file": ([*SW, "--out", "{out}/r", "--json", "{out}/r"],
                                             ["two outputs are the same file"]),
    # every OS error one line
    "demo --out is a file": (["demo", "--out", "{in}/a_file"], ["{in}/a_file is a file; give a directory path"]),
    # parameters
    "--seed 2**32 (sweep)": ([*SW, "--seed", str(2 ** 32)], ["--seed", "outside 0..4294967295"]),
    "--seed -1": (["stats", *ARR, "--seed", "-1", "--out", "{out}/s.npz"], ["--seed", "outside"]),
    "--ci nan": (["decompose", *ARR, "--seeds", "2", "--ci", "nan"], ["--ci must be a confidence level in (0, 1)"]),
    "--top-k 0": (["decompose", *D3, "--top-k", "0"], ["--top-k must be a whole number >= 1"]),
    "--block-rows -1": (["stats", *D3, "--block-rows", "-1", "--out", "{out}/s.npz"], ["--block-rows"]),
    "--modules empty": (["decompose", *D3, "--modules", ","], ["--modules is empty"]),
    "grid with NaN": (["sweep", "--stats", "{in}/arrays/stats.npz", "--grid", "{in}/arrays/grid_nan.json"],
                      ["grid lasso alpha value is nan"]),
    "grid with an empty list": (["sweep", "--stats", "{in}/arrays/stats.npz", "--grid", "{in}/arrays/grid_empty.json"],
                                ["grid lasso alpha is an empty list"]),
    "--methods empty": (["sweep", "--stats", "{in}/arrays/stats.npz", "--methods", ""], ["--methods"]),
    "sparsity --eps nan": (["sparsity", "{in}/ta", "--base", "{in}/base", "--eps", "nan"], ["--eps"]),
    "simulate --length 0": (["simulate", "--length", "0"], ["--length must be a whole number >= 1"]),
    # damaged array files
    "truncated .npy": (["decompose", "--dictionary", "{in}/arrays/truncated.npy", "--target", "{in}/arrays/V.npy"],
                       ["{in}/arrays/truncated.npy"]),
    "3-D .npy": ([*SW[:2], "{in}/arrays/cube.npy", *SW[3:]], ["{in}/arrays/cube.npy holds a 3-D array"]),
    ".npy without rows": ([*SW[:2], "{in}/arrays/no_rows.npy", *SW[3:]], ["{in}/arrays/no_rows.npy holds an empty"]),
    "statistics .npz with other keys": (["sweep", "--stats", "{in}/arrays/wrong_keys.npz"],
                                        ["is not a GramStats file (missing gram"]),
    "statistics of strings": (["sweep", "--stats", "{in}/arrays/strings.npz", "--seeds", "0"],
                              ["field gram holds <U1 values"]),
    "statistics with a list as provenance": (["sweep", "--stats", "{in}/arrays/list_provenance.npz", "--seeds", "0"],
                                             ["the provenance is a list"]),
    "truncated --truth": ([*SW, "--truth", "{in}/arrays/truncated.npy"], ["truth file {in}/arrays/truncated.npy"]),
    "a statistics file as --mask": (["decompose", *D3, "--mask", "{in}/arrays/stats.npz"], ["is not a mask file"]),
}



@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("checks") / "in")


@pytest.mark.parametrize("case", list(MORE_REFUSED))
def test_refused_in_process(inputs, tmp_path, capsys, case):
    argv, needles = MORE_REFUSED[case]
    places = {"in": str(inputs), "out": str(tmp_path)}
    before = digest(inputs)
    capsys.readouterr()
    try:
        rc = main([a.format(**places) for a in argv])
    except SystemExit as ex:  # argparse refused the value (in a subprocess: the same exit status)
        rc = ex.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle.format(**places) in err, (needle, err)
    assert list(tmp_path.iterdir()) == [] and digest(inputs) == before


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["decompose", "--top-k", "many"])
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 2 and "\n" not in err
    assert err == "error: unmerge decompose: argument --top-k: invalid int value: 'many' (see `unmerge decompose --help`)"


# ---------------------------------------------------------------------------------------------
# the CLI's last lines of defence
# ---------------------------------------------------------------------------------------------
def test_an_escaping_os_error_is_one_line_and_a_bug_stays_a_traceback(monkeypatch, capsys):
    import unmerge_jax.cli.sweep as cmd

    def unreadable(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/model/config.json")

    monkeypatch.setattr(cmd, "run", unreadable)
    assert main(["sweep", "--stats", "x.npz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot access /data/model/config.json: permission denied") and "\n" not in err

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/out/s.npz")

    monkeypatch.setattr(cmd, "run", full)
    assert main(["sweep", "--stats", "x.npz"]) == 2
    assert "cannot access /out/s.npz: the disk is full" in capsys.readouterr().err

    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cmd, "run", bug)
    with pytest.raises(ZeroDivisionError):
        main(["sweep", "--stats", "x.npz"])


# ---------------------------------------------------------------------------------------------
# options, seeds, outputs
# ---------------------------------------------------------------------------------------------
def test_seeds_are_32_bit_and_refused_not_folded():
    from unmerge_jax.stats import check_seed, gram_stats

    assert check_seed(0) == 0 and check_seed(2 ** 32 - 1) == 2 ** 32 - 1 and check_seed(np.uint32(7)) == 7
    for bad in (2 ** 32, 2 ** 70, -1, 1.5, True, "3"):
        with pytest.raises(UnmergeError):
            check_seed(bad)
    D = np.random.default_rng(0).standard_normal((50, 2))
    with pytest.raises(UnmergeError, match="seeds are 32-bit"):
        gram_stats(D, D[:, 0], seeds=2, key=2 ** 32 + 5)  # would equal key 5 modulo 2**32


@pytest.mark.parametrize("options, needle", [
    (dict(seeds=-1), "--seeds must be a whole number >= 0"),
    (dict(seeds=2.5), "--seeds"),
    (dict(key=2 ** 40), "--seed"),
    (dict(top_k=0), "--top-k"),
    (dict(top_k=np.int64(-3)), "--top-k"),
    (dict(block_rows=0), "--block-rows"),
    (dict(bootstrap_block=0), "--bootstrap-block"),
    (dict(modules=""), "--modules is empty"),
    (dict(modules=[" ", ""]), "--modules is empty"),
    (dict(ci=float("nan")), "--ci"),
    (dict(ci=1.0), "--ci"),
    (dict(ci=float("inf")), "--ci"),
])
def test_check_options_refuses(options, needle):
    from unmerge_jax.pipeline import check_options

    with pytest.raises(UnmergeError, match=needle.replace("-", "\\-")):
        check_options(**options)


def test_check_options_accepts_the_defaults_and_edges():
    from unmerge_jax.pipeline import check_options

    check_options()
    check_options(seeds=0, key=2 ** 32 - 1, top_k=1, block_rows=1, bootstrap_block=1, modules="q,k", ci=0.5)


@pytest.mark.parametrize("grid, needle", [
    ({}, "non-empty object"),
    ([1], "non-empty object"),
    ({"lasso": [1e-6]}, "expected an object"),
    ({"lasso": {"alpha": []}}, "empty list"),
    ({"lasso": {"alpha": [1e-6, float("inf")]}}, "value is inf"),
    ({"ridge": {"alpha": float("nan")}}, "value is nan"),
    ({"ridge": {"alpha": [[1e-6]]}}, "give a number"),
])
def test_check_grid_refuses(grid, needle):
    from unmerge_jax.pipeline import check_grid

    with pytest.raises(UnmergeError, match=needle):
        check_grid(grid)


def test_check_grid_accepts_the_paper_grid_and_options():
    from unmerge_jax import PAPER_GRID
    from unmerge_jax.pipeline import check_grid

    check_grid("paper")
    check_grid(PAPER_GRID)
    check_grid({"dot": {"threshold": 0.1, "coef": ["lstsq", "score"]}, "nnls": {}})


def test_outputs_are_checked_against_every_input_before_any_work(tmp_path):
    from unmerge_jax.pipeline import check_outputs

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x")
    arr = tmp_path / "D.npy"
    arr.write_bytes(b"y")
    with pytest.raises(UnmergeError, match="inside the input"):
        check_outputs([None, [f"name={model}"], []], [tmp_path / "ok.json", model / "r.json"])
    with pytest.raises(UnmergeError, match="is the input"):
        check_outputs([None, {"a": arr}, None], [arr])
    with pytest.raises(UnmergeError, match="two outputs are the same file"):
        check_outputs([], [tmp_path / "a.json", tmp_path / "." / "a.json"])
    with pytest.raises(UnmergeError, match="is a directory"):
        check_outputs([], [model])
    check_outputs([model, [arr]], [tmp_path / "out" / "r.json", None])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D.npy", "model"]  # checking creates nothing


# ---------------------------------------------------------------------------------------------
# damaged statistics, mask and array files
# ---------------------------------------------------------------------------------------------
def _stats_arrays(K=3, T=2, S=0):
    rng = np.random.default_rng(1)
    d = rng.standard_normal((40, K))
    from unmerge_jax import gram_stats

    st = gram_stats(d, d @ rng.standard_normal((K, T)), seeds=S)
    return {f: np.asarray(getattr(st, f)) for f in st._fields if getattr(st, f) is not None}


@pytest.mark.parametrize("change, needle", [
    (lambda a: a.pop("boot_cross"), "only some bootstrap fields"),
    (lambda a: a.update(target_sq=np.ones(3)), "field target_sq has shape \\(3,\\)"),
    (lambda a: a.update(boot_gram=np.zeros((2, 3, 4))), "field boot_gram has shape"),
    (lambda a: a.update(n_rows=np.array([40, 40])), "field n_rows has shape"),
    (lambda a: a.update(n_rows=np.array(0)), "n_rows is 0"),
    (lambda a: a.update(gram=a["gram"].astype(complex)), "complex128 values"),
    (lambda a: a.update(gram=np.zeros(3)), "expected \\(K, K\\)"),
])
def test_damaged_statistics_files_are_one_line_errors(tmp_path, change, needle):
    from unmerge_jax.stats import load_stats

    arrays = _stats_arrays(S=2)
    change(arrays)
    np.savez(tmp_path / "s.npz", **arrays)
    with pytest.raises(UnmergeError, match=needle) as err:
        load_stats(tmp_path / "s.npz")
    assert "\n" not in str(err.value) and str(tmp_path / "s.npz") in str(err.value)


def test_saved_statistics_load_back(tmp_path):
    from unmerge_jax.stats import GramStats, load_stats, save_stats

    arrays = _stats_arrays(S=2)
    save_stats(tmp_path / "s.npz", GramStats(**arrays), {"atom_names": list("abc"), "target_names": ["x", "y"]})
    got, prov = load_stats(tmp_path / "s.npz")
    for f, a in arrays.items():
        np.testing.assert_array_equal(np.asarray(getattr(got, f)), a)
    assert prov["atom_names"] == list("abc")
    save_stats(tmp_path / "bad.npz", GramStats(**arrays), {"atom_names": ["a"]})
    with pytest.raises(UnmergeError, match="provenance atom_names .* not a list of 3 names"):
        load_stats(tmp_path / "bad.npz")


@pytest.mark.parametrize("meta, needle", [
    ({"names": "w", "shapes": [[2]], "spec": {}}, "names is not"),
    ({"names": ["w", "w"], "shapes": [[2], [2]], "spec": {}}, "names is not"),
    ({"names": ["w"], "shapes": [[2], [3]], "spec": {}}, "shapes is not"),
    ({"names": ["w"], "shapes": [["2"]], "spec": {}}, "shapes is not"),
    ({"names": ["w"], "shapes": [[2]], "spec": []}, "spec is not"),
])
def test_damaged_mask_files_are_one_line_errors(tmp_path, meta, needle):
    from unmerge_jax.io.arrays import write_npz
    from unmerge_jax.passes.mask import Selection

    write_npz(tmp_path / "m.npz", {}, meta)
    with pytest.raises(UnmergeError, match=needle):
        Selection.load(tmp_path / "m.npz")
    write_npz(tmp_path / "m2.npz", {"idx_0": np.zeros((1, 1), np.int64)}, {"names": ["w"], "shapes": [[2]], "spec": {}})
    with pytest.raises(UnmergeError, match="indices are 1-D integers"):
        Selection.load(tmp_path / "m2.npz")


def test_array_files(tmp_path):
    from unmerge_jax.io.arrays import load_array, load_columns

    np.savez(tmp_path / "two.npz", a=np.zeros(2))
    (tmp_path / "two.npy").write_bytes((tmp_path / "two.npz").read_bytes())  # an archive under a .npy name
    (tmp_path / "dir.npy").mkdir()
    save_file({"a": np.zeros(0, np.float32)}, str(tmp_path / "empty.safetensors"))
    for path, needle in [("two.npy", "is an .npz archive"), ("dir.npy", "is a directory"),
                         ("empty.safetensors", "are empty"), ("missing.npy", "does not exist")]:
        with pytest.raises(UnmergeError, match=needle):
            load_columns(tmp_path / path)
    with pytest.raises(UnmergeError, match="truth .*two.npy is an .npz archive"):
        load_array(tmp_path / "two.npy", "truth")
    with pytest.raises(UnmergeError, match="truth .*dir.npy is a directory"):
        load_array(tmp_path / "dir.npy", "truth")


def test_nonfinite_array_inputs_name_file_column_and_row(tmp_path):
    from unmerge_jax.pipeline import collect_stats

    rng = np.random.default_rng(2)
    np.save(tmp_path / "a.npy", rng.standard_normal((30, 2)))
    b = rng.standard_normal((30, 2))
    b[11, 1] = -np.inf
    b[20, 0] = np.nan
    np.save(tmp_path / "b.npy", b)
    np.save(tmp_path / "v.npy", rng.standard_normal(30))
    with pytest.raises(UnmergeError) as err:
        collect_stats(None, [str(tmp_path / "a.npy"), f"bee={tmp_path / 'b.npy'}"], [str(tmp_path / "v.npy")])
    msg = str(err.value)
    assert f"{tmp_path / 'b.npy'} holds 1 non-finite value(s) in column bee:0 (first: nan at row 20)" in msg


# ---------------------------------------------------------------------------------------------
# ambiguity warnings and the target equal to the base
# ---------------------------------------------------------------------------------------------
def _with_cosine(u, w, c):
    """A unit vector at cosine ``c`` to the unit vector ``u`` (``w`` gives the orthogonal direction)."""
    w = w - (w @ u) * u
    return c * u + np.sqrt(1 - c * c) * w / np.linalg.norm(w)


def test_warnings_follow_the_cosines_of_the_dictionary():
    from unmerge_jax import gram_stats
    from unmerge_jax.report import DUPLICATE_TOL, stats_warnings

    rng = np.random.default_rng(3)
    n = 4000
    a, b, c, e, f = (x / np.linalg.norm(x) for x in rng.standard_normal((5, n)))
    near = _with_cosine(a, b, 1 - DUPLICATE_TOL / 4)    # a duplicate up to rounding
    apart = _with_cosine(c, e, 1 - 4 * DUPLICATE_TOL)   # very close, but a different vector
    D = np.stack([a, 2.5 * near, c, apart, -f, f, np.zeros(n), e], axis=1)
    V = np.stack([D[:, 0] + D[:, 2], np.zeros(n)], axis=1)
    names = ["a", "a2", "c", "c_near", "minus_f", "f", "zero", "e"]
    st = gram_stats(D, V)
    cos = lambda i, j: D[:, i] @ D[:, j] / np.linalg.norm(D[:, i]) / np.linalg.norm(D[:, j])
    assert cos(0, 1) >= 1 - DUPLICATE_TOL > cos(2, 3)  # the reference cosines straddle the threshold
    got = stats_warnings(st, names, ["t", "same_as_base"])
    assert len(got) == 4, got
    assert got[0].startswith("dictionary entry zero is all zero")
    assert got[1].startswith("dictionary entries a and a2 are the same task vector (cosine 1.000000")
    assert "split between them" in got[1]
    assert got[2].startswith("dictionary entries minus_f and f are the same task vector with opposite signs")
    assert got[3].startswith("the target equals the base: nothing to decompose (target same_as_base")
    assert stats_warnings(gram_stats(D[:, [0, 2, 3, 7]], V[:, 0])) == []


def test_a_target_equal_to_the_base_is_not_a_perfect_fit(capsys):
    from unmerge_jax import gram_stats
    from unmerge_jax.report import decomposition_report, format_report, report_json

    rng = np.random.default_rng(4)
    D = rng.standard_normal((300, 3))
    V = np.stack([D @ [0.2, 0.0, 0.7], np.zeros(300)], axis=1)
    rep = decomposition_report(gram_stats(D, V, seeds=3), list("abc"), ["real", "zero"], "nnls")
    real, zero = rep["targets"]
    assert real["cosine"] == pytest.approx(1.0) and "note" not in real
    assert np.isnan(zero["cosine"]) and np.isnan(zero["recon_error"]) and np.isnan(zero["unexplained"])
    assert np.isnan(zero["recon_error_boot"]).all() and zero["coefficients"] == {"a": 0.0, "b": 0.0, "c": 0.0}
    assert zero["note"] == "the target equals the base: nothing to decompose"
    assert len(rep["warnings"]) == 1 and "target zero" in rep["warnings"][0]
    js = json.loads(report_json(rep))  # strict JSON: NaN is null
    assert js["targets"][1]["cosine"] is None and js["targets"][0]["cosine"] == pytest.approx(1.0)
    text = format_report(rep)
    assert "target zero: the target equals the base: nothing to decompose (no fit to report)" in text
    assert "cos 1.000000" in text.split("target zero")[0] and "cos" not in text.split("target zero")[1]


# ---------------------------------------------------------------------------------------------
# non-finite values in checkpoints: file, tensor, first index; overflow of the difference
# ---------------------------------------------------------------------------------------------
def _pair(root, base_vals, ft_vals):
    for who, vals in (("base", base_vals), ("ft", ft_vals), ("tgt", ft_vals)):
        (root / who).mkdir(parents=True)
        save_file({n: vals[n] for n in NAMES}, str(root / who / "model.safetensors"))
        (root / who / "config.json").write_text(json.dumps(CFG))


def _tensors(fill=None):
    rng = np.random.default_rng(5)
    return {n: rng.standard_normal((16, 8) if "embed" in n else (8, 8)).astype(np.float32) for n in NAMES}


@pytest.mark.parametrize("top_k", [None, 200])
def test_finite_weights_whose_difference_overflows_are_named(tmp_path, top_k):
    from unmerge_jax.passes.statistics import stream_stats

    base, ft = _tensors(), _tensors()
    name = NAMES[2]
    base[name][1, 3], ft[name][1, 3] = 3e38, -3e38   # both finite, ft - base = -inf in float32
    ft[name][1, 2] += 1.0
    _pair(tmp_path, base, ft)
    with pytest.raises(UnmergeError) as err:
        stream_stats(tmp_path / "base", [tmp_path / "ft"], [tmp_path / "tgt"], top_k=top_k)
    msg = str(err.value)
    assert f"tensor {name} of the task vector of dictionary entry ft" in msg and "overflows float32" in msg
    assert "at index (1, 3) (-inf)" in msg


def test_sparsity_names_a_nonfinite_base_not_the_target(tmp_path):
    from unmerge_jax.analysis.metrics import sparsity_metrics

    base, ft = _tensors(), _tensors()
    base[NAMES[4]][0, 6] = np.nan
    _pair(tmp_path, base, ft)
    with pytest.raises(UnmergeError) as err:
        sparsity_metrics(tmp_path / "ft", base=tmp_path / "base")
    assert f"tensor '{NAMES[4]}' of base {tmp_path / 'base' / 'model.safetensors'} holds NaN/Inf" in str(err.value)
    assert "at index (0, 6) (nan)" in str(err.value)


@pytest.mark.parametrize("kw, needle", [
    (dict(eps=float("nan")), "--eps"), (dict(eps=2.0), "--eps"), (dict(atol=-1.0), "--atol"),
    (dict(atol=float("inf")), "--atol"), (dict(exact_limit=-1), "--exact-limit"),
])
def test_sparsity_thresholds_are_checked(kw, needle):
    from unmerge_jax.analysis.metrics import sparsity_metrics

    with pytest.raises(UnmergeError, match=needle):
        sparsity_metrics({"w": np.ones(4, np.float32)}, **kw)


@pytest.mark.parametrize("kw, needle", [
    (dict(length=0), "--length"), (dict(length=10, n_agents=0), "--agents"),
    (dict(length=10, sparsity=1.5), "--sparsity"), (dict(length=10, sparsity=float("nan")), "--sparsity"),
    (dict(length=10, shared=-0.1), "--shared"), (dict(length=10, size_b=0.0), "--size"),
    (dict(length=10, seed=2 ** 32), "seeds are 32-bit"),
])
def test_simulation_parameters_are_checked(kw, needle):
    from unmerge_jax.analysis.simulator import simulate_and_measure

    with pytest.raises(UnmergeError, match=needle):
        simulate_and_measure(**kw)
