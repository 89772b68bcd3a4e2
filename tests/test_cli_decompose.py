"""`unmerge decompose` / `unmerge stats` on tiny Qwen2 and Llama checkpoints and PEFT adapters:
known task-arithmetic weights recovered (NNLS, relative error ≤ 1e-4) with --full and --top-k,
adapter dirs == merged model dirs, bootstrap CIs, array mode, stats → sweep, and bad input (one
line, exit 2, nothing written)."""

import json
import shutil

import numpy as np
import pytest

from unmerge_jax.cli.main import main

pytestmark = pytest.mark.models



def _decompose(tmp_path, base, dictionary, targets, *flags):
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}.json"
    argv = ["decompose", "--base", str(base), "--dictionary", *map(str, dictionary), "--target", *map(str, targets),
            *flags, "--json", str(out)]
    assert main(argv) == 0
    return json.loads(out.read_text())


def _coef(report, target):
    row = next(t for t in report["targets"] if t["target"] == target)
    return row["coefficients"], row


def _rel_err(coef: dict, truth: dict):
    a = np.array([coef[k] for k in truth])
    w = np.array(list(truth.values()))
    return np.linalg.norm(a - w) / np.linalg.norm(w)


FLAGS = [["--full"], ["--top-k", "3000"], ["--top-k", "2000", "--scope", "global"],
         ["--modules", "q,k,v,o", "--top-k", "800"]]


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: " ".join(f))
def test_full_finetunes_task_arithmetic_recovered(tiny, tmp_path, flags, capsys):
    from tests._tiny_models import QWEN_TA

    q = tiny["qwen"]
    rep = _decompose(tmp_path, q / "base", [q / f"ft{i}" for i in range(3)], [q / "ta"], *flags)
    coef, row = _coef(rep, "ta")
    assert _rel_err(coef, QWEN_TA) <= 1e-4
    assert row["unexplained"] <= 1e-8 and row["recon_error"] <= 1e-8 and row["converged"]
    assert rep["method"] == "nnls" and rep["provenance"]["mask"]["mode"] == ("full" if flags == ["--full"] else "top_k")
    out = capsys.readouterr().out
    assert "target ta:" in out and "ft0" in out and "0.600000" in out and "unexplained energy" in out


@pytest.mark.parametrize("family", ["qwen", "llama"])
@pytest.mark.parametrize("flags", [["--full"], ["--top-k", "600", "--modules", "q,k,v,o"]], ids=["full", "topk"])
def test_adapter_dirs_and_merged_dirs_give_the_same_answer(tiny, tmp_path, family, flags):
    from tests._tiny_models import LLAMA_LORA_TA, QWEN_LORA_TA

    root = tiny[family]
    truth = QWEN_LORA_TA if family == "qwen" else LLAMA_LORA_TA
    names = list(truth)
    as_adapters = _decompose(tmp_path, root / "base", [root / n for n in names], [root / "lora_ta"], *flags)
    as_models = _decompose(tmp_path, root / "base", [f"{n}={root / (n + '_merged')}" for n in names],
                           [root / "lora_ta"], *flags)
    ca, _ = _coef(as_adapters, "lora_ta")
    cm, _ = _coef(as_models, "lora_ta")
    assert _rel_err(ca, truth) <= 1e-4 and _rel_err(cm, truth) <= 1e-4
    assert max(abs(ca[n] - cm[n]) for n in names) <= 1e-4
    kinds = lambda rep: {d["kind"] for d in rep["provenance"]["dictionary"]}
    assert kinds(as_adapters) == {"adapter"} and kinds(as_models) == {"model"}


def test_bootstrap_confidence_intervals(tiny, tmp_path, capsys):
    q = tiny["qwen"]
    rep = _decompose(tmp_path, q / "base", [q / "ft0", q / "ft1", q / "ft2"], [q / "ta", q / "lora_ta"],
                     "--seeds", "4", "--seed", "3", "--top-k", "3000")
    assert rep["n_seeds"] == 4 and rep["ci_level"] == 0.95
    for row in rep["targets"]:
        for name, (lo, hi) in row["ci"].items():
            assert lo <= hi and 0 <= row["selected"][name] <= 1
    coef, row = _coef(rep, "ta")
    assert row["ci"]["ft0"][0] == pytest.approx(0.6, rel=1e-4) and row["ci"]["ft0"][1] == pytest.approx(0.6, rel=1e-4)
    assert row["selected"] == {"ft0": 1.0, "ft1": 1.0, "ft2": 0.0}
    # lora_ta is not in this dictionary: its fit is poor and the table says so
    _, other = _coef(rep, "lora_ta")
    assert other["unexplained"] > 0.9
    assert "95% CI" in capsys.readouterr().out


def test_array_mode(tmp_path):
    rng = np.random.default_rng(0)
    D = rng.standard_normal((500, 3))
    W = np.array([[0.5, 0.0, 0.25], [0.0, 1.0, 0.0]])
    np.save(tmp_path / "D.npy", D)
    np.save(tmp_path / "V.npy", D @ W.T)
    out = tmp_path / "r.json"
    assert main(["decompose", "--dictionary", str(tmp_path / "D.npy"), "--target", f"mix={tmp_path / 'V.npy'}",
                 "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert [t["target"] for t in rep["targets"]] == ["mix:0", "mix:1"]
    for t, w in zip(rep["targets"], W):
        np.testing.assert_allclose(list(t["coefficients"].values()), w, atol=1e-8)
    assert list(rep["targets"][0]["coefficients"]) == ["0", "1", "2"] and rep["provenance"]["mode"] == "arrays"


def test_stats_then_sweep_and_mask_reuse(tiny, tmp_path, capsys):
    from unmerge_jax import load_stats

    q = tiny["qwen"]
    s, m = tmp_path / "s.npz", tmp_path / "mask.npz"
    args = ["--base", str(q / "base"), "--dictionary", *(str(q / f"lora{i}") for i in range(3)),
            "--target", str(q / "lora_ta"), str(q / "ta"), "--modules", "q,k,v,o"]
    assert main(["stats", *args, "--top-k", "800", "--seeds", "2", "--save-mask", str(m), "--out", str(s)]) == 0
    stats, prov = load_stats(s)
    assert prov["atom_names"] == ["lora0", "lora1", "lora2"] and prov["target_names"] == ["lora_ta", "ta"]
    assert stats.n_seeds == 2 and int(stats.n_rows) == prov["n_rows"] and prov["mask"]["per_group"] == 800 // 8
    assert main(["sweep", "--stats", str(s), "--methods", "nnls,omp", "--seeds", "2", "--json", str(tmp_path / "sw.json")]) == 0
    assert json.loads((tmp_path / "sw.json").read_text())
    assert main(["stats", *args, "--mask", str(m), "--out", str(tmp_path / "s2.npz")]) == 0
    again, prov2 = load_stats(tmp_path / "s2.npz")
    np.testing.assert_allclose(np.asarray(again.gram), np.asarray(stats.gram), rtol=1e-12)
    assert prov2["mask_file"] == str(m) and prov2["n_rows"] == prov["n_rows"]
    assert "wrote" in capsys.readouterr().out


def test_help_text(capsys):
    for cmd in ("decompose", "stats"):
        with pytest.raises(SystemExit) as ex:
            main([cmd, "--help"])
        assert ex.value.code == 0
    out = capsys.readouterr().out
    for needle in ("--top-k", "--full", "NAME=DIR", "PEFT LoRA", "--modules", "--seeds", "--json",
                   "unexplained", "unmerge sweep --stats", "--coordinator"):
        assert needle in out, needle


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def broken(tiny, tmp_path_factory):
    from safetensors.numpy import load_file, save_file

    q, root = tiny["qwen"], tmp_path_factory.mktemp("broken")

    def copy(name, new):
        shutil.copytree(q / name, root / new)
        return root / new

    out = {}
    p = copy("ft0", "ft_missing")
    t = load_file(str(p / "model.safetensors"))
    del t["model.layers.0.mlp.gate_proj.weight"]
    save_file(t, str(p / "model.safetensors"), metadata={"format": "pt"})
    out["missing"] = p
    p = copy("base", "base_truncated")
    shard = sorted(p.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-100])
    out["truncated"] = p
    p = copy("base", "base_no_shard")
    sorted(p.glob("model-*.safetensors"))[-1].unlink()
    out["no_shard"] = p
    p = copy("ta", "ta_garbled")
    f = p / "model.safetensors"
    f.write_bytes(b"not a safetensors file at all")
    out["garbled"] = p
    p = copy("ta", "ta_nan")
    t = load_file(str(p / "model.safetensors"))
    t["model.layers.1.self_attn.o_proj.weight"][3, 4] = np.inf
    save_file(t, str(p / "model.safetensors"), metadata={"format": "pt"})
    out["nan"] = p
    return out


def _bad_cases():
    # (dictionary, target, base, extra, expected message fragment)
    return {
        "missing tensor": (["B:missing", "Q:ft1"], ["Q:ta"], "Q:base", [],
                           r"ft_missing has no tensor model\.layers\.0\.mlp\.gate_proj\.weight"),
        "architecture mismatch": (["Q:ft0", "Q:wide"], ["Q:ta"], "Q:base", [], r"wide has hidden_size = 32 in config.json"),
        "adapter of another base (shapes)": (["Q:lora0", "Q:lora_wide"], ["Q:lora_ta"], "Q:base", [],
                                             r"lora_wide gives .* shape .*different base"),
        "adapter of another base (config)": (["Q:lora_cousin"], ["Q:lora_ta"], "Q:base", [],
                                             r"declares base_model_name_or_path"),
        "truncated shard": (["Q:ft0"], ["Q:ta"], "B:truncated", [], r"model-00003-of-\d+\.safetensors.*truncated or corrupt"),
        "corrupt target": (["Q:ft0"], ["B:garbled"], "Q:base", [], r"ta_garbled/model\.safetensors.*truncated or corrupt"),
        "missing index shard": (["Q:ft0"], ["Q:ta"], "B:no_shard", [], r"lists shard model-\d+-of-\d+\.safetensors .* is missing"),
        "NaN/Inf in a target": (["Q:ft0", "Q:ft1"], ["B:nan"], "Q:base", ["--modules", "o"],
                                r"tensor model\.layers\.1\.self_attn\.o_proj\.weight of target ta_nan \(.*ta_nan/model\."
                                r"safetensors\) holds NaN/Inf: a non-finite value at index \(3, 4\) \(inf\)"),
        "empty dictionary": ([], ["Q:ta"], "Q:base", [], r"dictionary is empty"),
        "directory without --base": (["Q:ft0"], ["Q:ta"], None, [], r"need --base DIR"),
        "nonexistent entry": (["Q:nope"], ["Q:ta"], "Q:base", [], r"nope does not exist"),
        "top-k below groups": (["Q:ft0"], ["Q:ta"], "Q:base", ["--top-k", "5"], r"smaller than the number of .* groups"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_one_line_exit_2_nothing_written(tiny, broken, tmp_path, capsys, case):
    dic, tgt, base, extra, match = _bad_cases()[case]
    resolve = lambda s: str(broken[s[2:]] if s[0] == "B" else tiny["qwen"] / s[2:])
    out = tmp_path / "out"
    out.mkdir()
    argv = ["decompose"] + (["--base", resolve(base)] if base else [])
    if dic:
        argv += ["--dictionary", *map(resolve, dic)]
    argv += ["--target", *map(resolve, tgt), *extra, "--json", str(out / "r.json"), "--stats-out", str(out / "s.npz")]
    if base:
        argv += ["--save-mask", str(out / "m.npz")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    import re

    assert re.search(match, err), err
    assert list(out.iterdir()) == []
    # `unmerge stats` refuses the same input the same way
    sargv = ["stats"] + argv[1:argv.index("--json")] + ["--out", str(out / "s.npz")]
    assert main(sargv) == 2
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# attribution: verdict, present entries, merge method (real merges made by the merge engine)
# ---------------------------------------------------------------------------------------------
def _merge_argv(root, *flags):
    from tests._tiny_merges import entries

    dictionary, targets = entries(root)
    return ["decompose", "--base", str(root / "base"), "--dictionary", *dictionary, "--target", *targets,
            "--top-k", "4000", *flags]


OLD_KEYS = {"target", "coefficients", "recon_error", "unexplained", "cosine", "converged", "n_iter", "ci", "selected",
            "recon_error_boot"}


def test_decompose_reports_verdicts_present_entries_and_methods(merges, tmp_path, capsys):
    from tests._tiny_merges import MERGES

    out = tmp_path / "r.json"
    assert main(_merge_argv(merges, "--json", str(out))) == 0
    rep = json.loads(out.read_text())
    assert rep["n_seeds"] == 200 and rep["method"] == "nnls" and rep["attribution"]["rules"]["floor_ta"] > 0
    for row, (target, (_, _, _, verdict, present, method, density)) in zip(rep["targets"], MERGES.items()):
        assert row["target"] == target and OLD_KEYS <= set(row)
        assert row["verdict"] == verdict and set(row["present"]) == present, row
        assert set(row["method"]) == {"name", "confidence", "density"} and 0 <= row["method"]["confidence"] <= 1
        if method is not None:
            assert row["method"]["name"] == method
        if density is not None:
            assert row["method"]["density"] == pytest.approx(density)
        assert {row["decisions"][a] for a in present} <= {"present"}
        assert set(row["decisions"]) == set(row["shares"]) == set(row["weights"]) == set(row["coefficients"])
        assert 0 <= row["unknown_share"] <= 1
    ties = rep["targets"][0]
    assert ties["weights"] == pytest.approx({"d0": 0.6, "d1": 0.4, "d2": 0.0, "d3": 0.0}, abs=1e-6)
    assert ties["method"]["density"] == 0.5 and ties["weight_sum"] == pytest.approx(1.0)
    text = capsys.readouterr().out
    assert "target ties_d0_d1: KNOWN — TIES (confidence " in text and "density 0.50" in text
    assert "present: d0, d1" in text and "target x: UNKNOWN — no dictionary entry is present" in text
    assert "target linear_d2_x: MIXED — " in text and "decision" in text and " absent" in text


def test_decompose_with_the_merge_method_given(merges, tmp_path):
    out = tmp_path / "r.json"
    assert main(_merge_argv(merges, "--merge-method", "ties", "--density", "0.5", "--json", str(out))) == 0
    ties = json.loads(out.read_text())["targets"][0]
    assert ties["method"] == {"name": "ties", "confidence": 1.0, "density": 0.5}
    assert ties["verdict"] == "known" and ties["present"] == ["d0", "d1"]
    assert ties["weights"] == pytest.approx({"d0": 0.6, "d1": 0.4, "d2": 0.0, "d3": 0.0}, abs=1e-6)


def test_decompose_with_fewer_replicates_reports_the_fit_only(merges, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(_merge_argv(merges, "--seeds", "20", "--json", str(out))) == 0
    rep = json.loads(out.read_text())
    err = capsys.readouterr().err
    assert "warning: no presence decisions with --seeds 20: the rules were calibrated with 200" in err
    assert rep["attribution"] is None and any("no presence decisions" in w for w in rep["warnings"])
    for row in rep["targets"]:
        assert row["verdict"] is None and row["method"] is None and row["present"] == [] and OLD_KEYS <= set(row)
    assert rep["targets"][2]["coefficients"]["d0"] == pytest.approx(0.5, rel=1e-4)  # the fit is still there


@pytest.mark.parametrize("flags,match", [
    (["--merge-method", "ties", "--density", "0.55"], r"TIES density 0\.55 is not on the signature grid"),
    (["--density", "0.5"], r"--density needs --merge-method ties or dare"),
    (["--merge-method", "dare", "--density", "1.5"], r"--density must be a fraction in \(0, 1\]"),
    (["--merge-method", "slerp"], r"argument --merge-method: invalid choice"),
])
def test_bad_attribution_options_one_line_exit_2(tiny, tmp_path, capsys, flags, match):
    import re

    q = tiny["qwen"]
    out = tmp_path / "r.json"
    argv = ["decompose", "--base", str(q / "base"), "--dictionary", str(q / "ft0"), "--target", str(q / "ta"), *flags,
            "--json", str(out)]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as ex:  # argparse's own errors (an invalid choice) exit from the parser
        code = ex.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(match, err), err
    assert not out.exists()


def test_help_explains_the_verdicts(capsys):
    with pytest.raises(SystemExit):
        main(["decompose", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for needle in ("known ", "mixed ", "unknown ", "present", "uncertain", "--merge-method", "--density",
                   "TIES-consistent", "calibrated with 200 bootstrap replicates", "(default 200)"):
        assert needle in out, needle
