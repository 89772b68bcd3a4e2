"""Studies and CLI: outputs exist, tables agree with the library recomputed independently."""

import json

import numpy as np
import pytest

from unmerge_jax.analysis.scaling import fit_scaling_law
from unmerge_jax.cli.main import main


def test_scaling_law_study_small(tmp_path):
    out = tmp_path / "sl"
    rc = main(["study", "scaling-law", "--out", str(out), "--param", "sizes=[1,7,70]", "--param", "trials=3",
               "--param", "d=20000", "--param", "n_boot=50", "--param", "lengths=[5000]"])
    assert rc == 0
    for f in ("table1.md", "table1.csv", "scaling_fit.json", "inter_agent.md", "fig1_scaling.png", "fig5_inter_agent.png"):
        assert (out / f).stat().st_size > 0, f
    trials = json.loads((out / "trials.json").read_text())
    table = json.loads((out / "table1.json").read_text())
    assert [r["size_b"] for r in table] == [1, 7, 70] and len(trials) == 9
    l0_7 = [t["l0"] for t in trials if t["size_b"] == 7]
    assert table[1]["l0_mean"] == pytest.approx(np.mean(l0_7))
    assert table[1]["set_sparsity"] == pytest.approx(0.90)
    fit = json.loads((out / "scaling_fit.json").read_text())[0]
    ref = fit_scaling_law([t["size_b"] for t in trials], [t["l0"] for t in trials], n_boot=0)
    assert fit["a"] == pytest.approx(ref.a) and fit["b"] == pytest.approx(ref.b)
    ia = json.loads((out / "inter_agent.json").read_text())
    assert ia[0]["mean_jaccard"] == pytest.approx(0.2 / 1.8, rel=1e-3)  # 20% shared by all → J = n_sh/(2n−n_sh)
    # the output directory is not overwritten without --force
    assert main(["study", "scaling-law", "--out", str(out)]) == 2


def test_memory_study_formula(tmp_path):
    out = tmp_path / "mem"
    assert main(["study", "memory", "--out", str(out), "--param", "measure=false"]) == 0
    rows = {r["size"]: r for r in json.loads((out / "table4.json").read_text())}
    r70 = rows["70B"]
    # naive = 4 models × d × 2 bytes; stream = 4 × embedding (128256 × 8192) × 4 bytes
    assert r70["naive_gb"] == pytest.approx(4 * 70_553_706_496 * 2 / 1e9)
    assert r70["stream_tensor_gb"] == pytest.approx(4 * 128256 * 8192 * 4 / 1e9)
    assert r70["paper_stream_gb"] == 6.0 and (out / "fig6_memory.png").exists()
    # mergekit's loader: K + 1 inputs and the output of the largest tensor, bfloat16
    assert r70["mergekit_bf16_gb"] == pytest.approx(5 * 128256 * 8192 * 2 / 1e9)
    # the row-block column without a measured run: the formula of its buffers, labelled as such
    from unmerge_jax.analysis.study_memory import rows_formula_bytes

    assert r70["stream_rows_gb"] == pytest.approx(rows_formula_bytes(128256 * 8192, 3) / 1e9)
    assert r70["stream_rows_source"].startswith("formula") and r70["stream_rows_gb"] < 1.0


def test_virtual_model_rows_are_the_whole_tensor():
    """A virtual model's row blocks (any boundaries, across its generation groups) are exactly the
    rows of the whole tensor; values have the requested scale; seeds and names give other values."""
    from unmerge_jax.analysis.study_memory import GROUP, virtual_layout, virtual_model

    shapes = {"w": (300, 700), "v": (5,), "s": ()}
    src = virtual_model(shapes, 4, 0.02, "weights")
    whole = src.read("w")
    assert whole.shape == (300, 700) and 300 * 700 > 2 * GROUP
    for lo, hi in ((0, 1), (93, 94), (93, 188), (299, 300), (0, 300)):
        np.testing.assert_array_equal(src.read_rows("w", lo, hi), whole[lo:hi])
    assert src.exact_rows("w") and src.read("s").shape == () and src.read("v").shape == (5,)
    assert abs(whole.std() - 0.02) < 1e-3 and abs(whole.mean()) < 1e-3
    assert not np.array_equal(virtual_model(shapes, 5, 0.02, "weights").read("w"), whole)
    assert not np.array_equal(virtual_model({"x": (300, 700)}, 4, 0.02, "weights").read("x"), whole)
    lay = virtual_layout("llama-3-70b", 2)
    assert lay["model.embed_tokens.weight"] == (128256, 8192) and lay["lm_head.weight"] == (128256, 8192)
    assert lay["model.layers.1.self_attn.k_proj.weight"] == (1024, 8192) and len(lay) == 3 + 2 * 9


def test_anatomy_study_small(tmp_path):
    from unmerge_jax.analysis.study_anatomy import anatomy_study

    tables = anatomy_study(tmp_path, arch="qwen2.5-0.5b", sparsity=0.95, profiles=("paper-like",), max_elements=4096)
    rows = {r["module"]: r for r in tables["paper-like"]}
    assert rows["attention"]["count"] == 24 * 7 and rows["mlp"]["count"] == 24 * 3  # q/k/v weights+biases, o
    assert rows["norm"]["count"] == 49 and rows["overall"]["count"] == 290
    # the profile makes attention sparser than MLP and norms densest
    assert rows["attention"]["mean_l0"] > rows["mlp"]["mean_l0"] > rows["norm"]["mean_l0"]
    assert (tmp_path / "fig4_anatomy_paper-like.png").exists()


def test_sparsity_cli_json_matches_api(tmp_path, capsys):
    from safetensors.numpy import save_file

    from unmerge_jax.analysis.metrics import sparsity_metrics

    rng = np.random.default_rng(0)
    t = {"model.layers.0.mlp.up_proj.weight": (rng.standard_normal((64, 32)) * (rng.random((64, 32)) < 0.1)).astype(np.float32),
         "model.layers.1.self_attn.q_proj.weight": rng.standard_normal((32, 32)).astype(np.float32)}
    f = tmp_path / "delta.safetensors"
    save_file(t, str(f))
    assert main(["sparsity", str(f), "--json", str(tmp_path / "s.json")]) == 0
    got = json.loads((tmp_path / "s.json").read_text())
    want = sparsity_metrics(t)
    for k in ("l0", "gini", "kurtosis", "top1_mass", "top5_mass", "n_params", "exact_zero"):
        assert got["overall"][k] == pytest.approx(want["overall"][k])
    assert "overall" in capsys.readouterr().out


def test_simulate_cli(tmp_path, capsys):
    assert main(["simulate", "--length", "50000", "--sparsity", "0.95", "--agents", "2", "--json",
                 str(tmp_path / "sim.json"), "--out", str(tmp_path / "agents")]) == 0
    r = json.loads((tmp_path / "sim.json").read_text())
    assert r["agents"][0]["overall"]["exact_zero"] == pytest.approx(0.95)
    from safetensors.numpy import load_file

    a0 = load_file(str(tmp_path / "agents" / "agent_0.safetensors"))["delta"]
    assert np.count_nonzero(a0) == 2500
    assert main(["simulate", "--length", "100", "--sparsity", "0.1", "--agents", "3"]) == 2  # cannot fit
    assert "error:" in capsys.readouterr().err
