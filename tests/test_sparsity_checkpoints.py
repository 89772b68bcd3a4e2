"""`unmerge sparsity TARGET --base BASE` on real (tiny) model and PEFT adapter directories."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.models
pytest.importorskip("peft")

from unmerge_jax.analysis.metrics import sparsity_metrics  # noqa: E402
from unmerge_jax.cli.main import main  # noqa: E402


def _deltas(target, base):
    from tests._tiny_models import numpy_state

    t, b = numpy_state(target), numpy_state(base)
    return {n: t[n] - b[n] for n in sorted(b)}


def test_model_dir_task_vector_matches_numpy_deltas(tiny, tmp_path, capsys):
    qwen = tiny["qwen"]
    out = tmp_path / "s.json"
    assert main(["sparsity", str(qwen / "ft0"), "--base", str(qwen / "base"), "--mode", "exact", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    want = sparsity_metrics(_deltas(qwen / "ft0", qwen / "base"), mode="exact")
    for k in ("l0", "exact_zero", "gini", "kurtosis", "top1_mass", "top5_mass", "n_params"):
        assert got["overall"][k] == pytest.approx(want["overall"][k], rel=1e-9, abs=1e-12), k
    # ft0 changes ~60% of the entries of every tensor (tests/_tiny_models.py).
    assert 0.3 < got["overall"]["exact_zero"] < 0.5
    assert set(got["by_module"]) == set(want["by_module"]) and got["by_layer"].keys() == want["by_layer"].keys()
    assert "overall" in capsys.readouterr().out


def test_adapter_dir_equals_its_merged_model(tiny, tmp_path):
    qwen = tiny["qwen"]
    a = sparsity_metrics(str(qwen / "lora0"), base=str(qwen / "base"), mode="exact")
    m = sparsity_metrics(str(qwen / "lora0_merged"), base=str(qwen / "base"), mode="exact")
    # Every base tensor counts (untouched ones as zeros); only q/k/v/o change.
    assert a["overall"]["n_params"] == m["overall"]["n_params"]
    for k in ("l0", "gini", "top1_mass", "top5_mass"):
        assert a["overall"][k] == pytest.approx(m["overall"][k], rel=1e-3, abs=1e-6), k
    # A q/k/v/o adapter leaves MLP, norms and embeddings exactly unchanged; attention is dense (B@A).
    for cls in ("mlp", "norm", "embedding"):
        assert a["by_module"][cls]["exact_zero"] == 1.0, cls
    assert a["by_module"]["attention"]["exact_zero"] < 0.05
