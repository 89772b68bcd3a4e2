"""Merge-quality study on the merge engine's kernels, checked against NumPy formulas written here."""

import jax
import numpy as np
import pytest

import unmerge_jax
from unmerge_jax.analysis.simulator import simulate_agents
from unmerge_jax.analysis.study_merge import merge_quality, merge_quality_study


def ram_percentile(x, lam=1.5, q=90):
    """The sparsity-scaling paper's eq. 4–5: active = |δ_k| ≥ 90th percentile of |δ_k|; shared → mean over K; unique → λδ."""
    act = np.abs(x) >= np.percentile(np.abs(x), q, axis=1, keepdims=True)
    c = act.sum(axis=0)
    out = np.zeros(x.shape[1])
    out[c >= 2] = x[:, c >= 2].mean(axis=0)
    uniq = (c == 1)
    out[uniq] = lam * (x * act)[:, uniq].sum(axis=0)
    return out


def cos(a, b):
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


@pytest.mark.parametrize("s", [0.8, 0.9, 0.95])
def test_quality_of_average_and_percentile_ram_match_numpy(s):
    x = np.asarray(simulate_agents(jax.random.key(3), 20_000, 3, s)).astype(np.float64)
    methods = [("avg", "linear", {}), ("ram", "ram", {"face": "percentile"})]
    got = merge_quality(x, methods, unmerge_jax.merge_tensors)
    oracle = x.sum(axis=0)
    avg = x.mean(axis=0)
    assert got["avg"]["cos"] == pytest.approx(1.0, abs=1e-6)
    assert got["avg"]["fid"] == pytest.approx(np.mean([cos(avg, xk) for xk in x]), rel=1e-5)
    r = ram_percentile(x)
    assert got["ram"]["cos"] == pytest.approx(cos(r, oracle), rel=1e-5)
    assert got["ram"]["fid"] == pytest.approx(np.mean([cos(r, xk) for xk in x]), rel=1e-5)
    if s > 0.9:  # < 10 % non-zero: the 90th percentile of |δ| is 0, every entry is "active" → plain mean
        assert got["ram"]["cos"] == pytest.approx(1.0, abs=1e-6)


def test_study_writes_tables(tmp_path):
    res = merge_quality_study(tmp_path, sparsities=(0.8, 0.9), agents=(3,), d=4096, trials=2,
                              table_sparsities=(0.8, 0.9))
    assert (tmp_path / "table2.md").exists() and (tmp_path / "fig3_advantage.png").exists()
    labels = {r["method"] for r in res["grid"]}
    assert "Simple Avg" in labels and any(lab.startswith("RAM") for lab in labels)


def test_a_method_the_engine_rejects_is_an_error_not_a_skipped_row(tmp_path):
    from unmerge_jax.errors import UnmergeError

    with pytest.raises(UnmergeError, match="no_such_method"):
        merge_quality_study(tmp_path, sparsities=(0.9,), agents=(3,), d=1024, trials=1,
                            methods=[("Simple Avg", "linear", {}), ("typo", "no_such_method", {})],
                            table_sparsities=(0.9,))
