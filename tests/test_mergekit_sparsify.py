"""Parity with mergekit 0.1.5 on tiny seeded Llama models for ``model_stock`` (± ``filter_wise``),
``breadcrumbs``, ``breadcrumbs_ties``, ``sce`` (every tensor ≤ 1e-5) and ``della``,
``della_linear`` (in distribution: the generators differ). Skipped, with the reason shown, when
mergekit is not installed."""


import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("mergekit", reason="mergekit is not installed: parity with mergekit not checked")
from tests._tiny_models import parity_llama as _llama, stored_state as _read, run_mergekit  # noqa: E402

from tests._tiny_models import fine_tune  # noqa: E402
from unmerge_jax import merge  # noqa: E402

K_MODELS = 3
ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sparsify")
    _llama(0).save_pretrained(root / "base")
    models = []
    for i in range(K_MODELS):
        fine_tune(lambda: _llama(0), 300 + i).save_pretrained(root / f"ft{i}")
        models.append(str(root / f"ft{i}"))
    return {"base": str(root / "base"), "models": models}


def _config(tiny, method, params=None, **top):
    params = params or [{} for _ in tiny["models"]]
    cfg = {"merge_method": method, "base_model": tiny["base"], "dtype": "float32",
           "models": [{"model": m, "parameters": p} for m, p in zip(tiny["models"], params)]}
    cfg.update(top)
    return cfg


def _mergekit(cfg, out):
    return _read(run_mergekit(cfg, out))


def _both(tiny, tmp_path, cfg, seed=0):
    want = _mergekit(cfg, tmp_path / "mk")
    merge(cfg, tmp_path / "us", seed=seed)
    got = _read(tmp_path / "us")
    assert set(got) == set(want)
    return got, want


@pytest.mark.parametrize("top", [{}, {"parameters": {"filter_wise": True}}])
def test_model_stock_matches_mergekit(tiny, tmp_path, top):
    got, want = _both(tiny, tmp_path, _config(tiny, "model_stock", **top))
    base = _read(tiny["base"])
    assert any(not np.array_equal(got[n], base[n]) for n in got)
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=0, atol=ATOL, err_msg=n)


W3 = [{"weight": 0.5, "density": 0.5}, {"weight": 0.3, "density": 0.7}, {"weight": 0.2, "density": 0.3}]


@pytest.mark.parametrize("method,params,top", [
    ("breadcrumbs", W3, {}),
    ("breadcrumbs", [{**p, "gamma": g} for p, g in zip(W3, (0.05, 0.1, 0.0))], {"parameters": {"lambda": 0.8}}),
    ("breadcrumbs_ties", W3, {}),
    ("breadcrumbs_ties", [{**p, "gamma": 0.1} for p in W3], {"parameters": {"normalize": True, "rescale": True}}),
])
def test_breadcrumbs_matches_mergekit(tiny, tmp_path, method, params, top):
    got, want = _both(tiny, tmp_path, _config(tiny, method, params, **top))
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=0, atol=ATOL, err_msg=n)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_equal_in_distribution_to_mergekit(tiny, tmp_path, method):
    """Different generators, same law: over the entries every model changed, the fraction left at
    the base (no model kept it: Π_k (1 − p_k(rank))) agrees within 5 two-sample s.d.; the merged
    task vectors' L1 mass within 3%; per tensor, both differ from the base in the same tensors."""
    params = [{**p, "epsilon": e} for p, e in zip(W3, (0.15, 0.1, 0.2))]
    got, want = _both(tiny, tmp_path, _config(tiny, method, params), seed=3)
    base = _read(tiny["base"])
    fts = [_read(m) for m in tiny["models"]]
    all3 = np.concatenate([np.stack([ft[n] != base[n] for ft in fts]).all(0).ravel() for n in base])
    frac = [np.concatenate([(o[n] == base[n]).ravel() for n in base])[all3].mean() for o in (got, want)]
    pooled = np.mean(frac)
    assert abs(frac[0] - frac[1]) < 5 * np.sqrt(2 * pooled * (1 - pooled) / all3.sum())
    l1 = [sum(np.abs(o[n].astype(np.float64) - base[n]).sum() for n in base) for o in (got, want)]
    assert l1[0] == pytest.approx(l1[1], rel=0.03)
    assert {n for n in got if not np.array_equal(got[n], base[n])} == {n for n in want if not np.array_equal(want[n], base[n])}
    assert not all(np.array_equal(got[n], want[n]) for n in base)


@pytest.mark.parametrize("top", [{}, {"parameters": {"select_topk": 0.3}}, {"parameters": {"select_topk": 0.8}}])
def test_sce_matches_mergekit(tiny, tmp_path, top):
    got, want = _both(tiny, tmp_path, _config(tiny, "sce", **top))
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=0, atol=ATOL, err_msg=n)
