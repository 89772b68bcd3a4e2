"""``--compute-dtype bfloat16`` against mergekit 0.1.5 on ``dtype: bfloat16`` configurations: tiny
seeded Llama models stored in bfloat16 (a base and fine-tunes of it), each method merged by
mergekit and by ``unmerge merge --compute-dtype bfloat16``; every tensor bit-identical. The
default mode merges the same configuration in float32 and says so in one line. Skipped with a
visible reason when mergekit is absent.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("mergekit", reason="mergekit is not installed: bf16 parity with mergekit not checked")

from tests._tiny_models import merge_config, parity_llama, run_mergekit, stored_state  # noqa: E402
from unmerge_jax import merge  # noqa: E402


def _fine_tune(seed: int, scale: float, base_seed: int = 0):
    model = parity_llama(base_seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return model.to(torch.bfloat16)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A bfloat16 base (seed 0), three fine-tunes of it and one unrelated model (seed 1)."""
    root = tmp_path_factory.mktemp("bf16zoo")
    out = {}
    parity_llama(0).to(torch.bfloat16).save_pretrained(root / "base")
    out["base"] = str(root / "base")
    for i, (seed, scale) in enumerate(((11, 0.3), (12, 0.5), (13, 0.2))):
        _fine_tune(seed, scale).save_pretrained(root / f"ft{i}")
        out[f"ft{i}"] = str(root / f"ft{i}")
    parity_llama(1).to(torch.bfloat16).save_pretrained(root / "other")
    out["other"] = str(root / "other")
    return out


def _config(zoo, method, names, base="base", params=None, weights=None):
    return merge_config(zoo, method, names, base, params, weights, dtype="bfloat16")


def _assert_bits(cfg, tmp_path):
    want = stored_state(run_mergekit(cfg, tmp_path / "mk"))
    res = merge(cfg, tmp_path / "bits", compute_dtype="bfloat16")
    assert not any("merging in float32" in n for n in res.notes)
    got = stored_state(tmp_path / "bits")
    assert set(got) == set(want)
    diff = {n: int((got[n].view(np.uint16) != want[n].view(np.uint16)).sum()) for n in want
            if got[n].dtype == want[n].dtype}
    assert all(got[n].dtype == want[n].dtype for n in want), {n: (got[n].dtype, want[n].dtype) for n in want}
    assert not any(diff.values()), {n: d for n, d in diff.items() if d}
    # The default merges the same configuration in float32, says so in one line, and (where
    # mergekit computes in bfloat16) differs from mergekit's bits.
    res = merge(cfg, tmp_path / "f32")
    assert sum("merging in float32" in n and "--compute-dtype bfloat16" in n for n in res.notes) == 1
    f32 = stored_state(tmp_path / "f32")
    return want, sum(int((f32[n].astype(np.float32) != want[n].astype(np.float32)).sum()) for n in want)


CASES = {
    "slerp": lambda z: _config(z, "slerp", ["ft0"], params={"t": 0.4}),
    "slerp gradient": lambda z: _config(z, "slerp", ["ft1"], params={"t": [0.0, 0.3, 0.8, 1.0]}),
    "slerp unrelated": lambda z: _config(z, "slerp", ["other"], params={"t": 0.5}),
}


NUSLERP = {f"nuslerp base={b} row_wise={rw} flatten={fl}": (b, rw, fl)
           for b in (None, "base") for rw in (False, True) for fl in (False, True)}
for _case, (_b, _rw, _fl) in NUSLERP.items():
    CASES[_case] = (lambda b, rw, fl: lambda z: _config(
        z, "nuslerp", ["ft0", "ft1"], base=b, params={"nuslerp_row_wise": rw, "nuslerp_flatten": fl},
        weights=[{"weight": 0.6}, {"weight": 0.4}]))(_b, _rw, _fl)
CASES["nuslerp weights sum to zero"] = lambda z: _config(z, "nuslerp", ["ft0", "other"], base="base",
                                                        weights=[{"weight": 0.5}, {"weight": -0.5}])


CASES.update({
    "multislerp": lambda z: _config(z, "multislerp", ["ft0", "ft1", "ft2"], base="base",
                                    weights=[{"weight": 0.6}, {"weight": 0.4}, {"weight": 0.3}]),
    "multislerp no base unnormalised": lambda z: _config(z, "multislerp", ["ft0", "other"], base=None,
                                                         params={"normalize_weights": False},
                                                         weights=[{"weight": 0.7}, {"weight": 0.5}]),
})


_GTA_W = [{"weight": 0.5, "density": 0.6, "gamma": 0.05}, {"weight": 0.3, "density": 0.8, "gamma": 0.1},
          {"weight": 0.4, "density": 0.5, "gamma": 0.02}]
CASES.update({
    "breadcrumbs": lambda z: _config(z, "breadcrumbs", ["ft0", "ft1", "ft2"], weights=_GTA_W),
    "breadcrumbs_ties": lambda z: _config(z, "breadcrumbs_ties", ["ft0", "ft1", "ft2"], weights=_GTA_W),
    "breadcrumbs_ties normalize rescale lambda": lambda z: _config(
        z, "breadcrumbs_ties", ["ft0", "ft1", "ft2"], weights=_GTA_W,
        params={"normalize": True, "rescale": True, "lambda": 0.7}),
    "ties rescale int8_mask": lambda z: _config(z, "ties", ["ft0", "ft1", "ft2"], weights=[{k: v for k, v in w.items() if k != "gamma"} for w in _GTA_W],
                                                params={"rescale": True, "int8_mask": True}),
})


CASES.update({
    "model_stock": lambda z: _config(z, "model_stock", ["ft0", "ft1", "ft2"]),
    "model_stock filter_wise": lambda z: _config(z, "model_stock", ["ft0", "ft1", "ft2"],
                                                 params={"filter_wise": True}),
    "model_stock two models": lambda z: _config(z, "model_stock", ["ft0", "ft1"]),
})


CASES.update({
    "ram": lambda z: _config(z, "ram", ["ft0", "ft1", "ft2"]),
    "ram epsilon": lambda z: _config(z, "ram", ["ft0", "ft1"], params={"epsilon": 2e-3}),
    "ramplus_tl": lambda z: _config(z, "ramplus_tl", ["ft0", "ft1", "ft2"]),
    "ramplus_tl r alpha epsilon": lambda z: _config(z, "ramplus_tl", ["ft0", "ft1", "ft2"],
                                                    params={"r": 0.4, "alpha": 0.9, "epsilon": 1e-3}),
})


CASES.update({
    "sce": lambda z: _config(z, "sce", ["ft0", "ft1", "ft2"]),
    "sce select_topk": lambda z: _config(z, "sce", ["ft0", "ft1", "ft2"], params={"select_topk": 0.5}),
    "sce select_topk int8_mask": lambda z: _config(z, "sce", ["ft0", "ft1"],
                                                   params={"select_topk": 0.3, "int8_mask": True}),
    "nearswap": lambda z: _config(z, "nearswap", ["ft0"], params={"t": 1e-3}),
    "nearswap large t": lambda z: _config(z, "nearswap", ["other"], params={"t": 0.05}),
})


CASES.update({
    "arcee_fusion": lambda z: _config(z, "arcee_fusion", ["ft0"]),
    "arcee_fusion unrelated": lambda z: _config(z, "arcee_fusion", ["other"]),
})


CASES.update({
    "karcher": lambda z: _config(z, "karcher", ["ft0", "ft1", "other"], base=None),
    "karcher with base": lambda z: _config(z, "karcher", ["ft0", "ft1"], params={"max_iter": 20, "tol": 1e-7}),
})


@pytest.mark.parametrize("case", list(CASES))
def test_bfloat16_compute_reproduces_mergekit_bit_for_bit(zoo, tmp_path, case):
    _, changed = _assert_bits(CASES[case](zoo), tmp_path)
    # slerp computes in float32 in mergekit too (only its coefficients' reductions differ from ours)
    if not case.startswith("slerp"):
        assert changed > 0


def test_default_mode_says_it_computes_in_float32(zoo, tmp_path):
    cfg = CASES["slerp"](zoo)
    res = merge(cfg, tmp_path / "f32")
    assert sum("merging in float32" in n and "--compute-dtype bfloat16" in n for n in res.notes) == 1
