"""The other architectures of mergekit's ``tests/test_basic_merges.py``, run through mergekit 0.1.5
and ``unmerge merge`` on tiny seeded models of mergekit's own shapes (``tests/common.py``):

* Granite (``TestGraniteMerges``: copy, linear, slerp) — every tensor within 1e-5, logits of the
  loaded outputs equal; the bfloat16 configurations as written bit for bit
  (``--compute-dtype bfloat16``) where that option reproduces mergekit.
* LLaVA (the ``*_VLM_merge`` tests: linear, slerp, nuslerp in every layout, task arithmetic,
  breadcrumbs, TIES, DARE-TIES, Model Stock ± filter_wise). mergekit 0.1.5 infers the architecture
  from the loaded model and writes the vision tower and projector under transformers 5's names
  (``model.vision_tower.…``) but drops the 21 language-model tensors; ``unmerge merge`` writes
  all 64 under the checkpoint's own names. So the vision tensors are compared with mergekit's
  LLaVA output, and the language-model tensors with mergekit run on the same text models saved
  as Llama checkpoints of their own; the logits of our LLaVA (an image and text) equal those of
  the LLaVA assembled from mergekit's two outputs.

mergekit's tests merge in bfloat16; these run the same configurations in float32 (``dtype:
float32``), in which both compute, so the comparison is of the methods and not of bf16 rounding.
DARE's draws differ between the two generators: mergekit is fed our keep-masks. Skipped with a
visible reason when mergekit is absent.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("mergekit", reason="mergekit is not installed: parity with mergekit not checked")

from tests._tiny_models import (LLAVA_TEXT_PREFIX, PICO_LLAVA_IMAGE_TOKEN, feed_mergekit_our_dare_masks,  # noqa: E402
                                llava_text_as_llama, numpy_state, pico_granite, pico_llava, run_mergekit,
                                stored_state)
from unmerge_jax import merge  # noqa: E402

ATOL = 1e-5
SLOW = pytest.mark.slow
DARE_SEED = 7


def _two(models, a, b, method, base=None, params=None, dtype="float32"):
    """mergekit's ``two_model_config``: weights 0.6 / 0.4, the method's parameters at the top."""
    cfg = {"merge_method": method, "dtype": dtype,
           "models": [{"model": models[a], "parameters": {"weight": 0.6}},
                      {"model": models[b], "parameters": {"weight": 0.4}}]}
    if base is not None:
        cfg["base_model"] = models[base]
    if params:
        cfg["parameters"] = params
    return cfg


def _close(got, want, rename=lambda n: n):
    for n in want:
        np.testing.assert_allclose(got[rename(n)].astype(np.float32), want[n].astype(np.float32), rtol=0, atol=ATOL,
                                   err_msg=n)


def _bits_equal(got, want):
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == want[n].dtype, n
        assert np.array_equal(got[n].view(np.uint16), want[n].view(np.uint16)), n


# ----------------------------------------------------------------------------------------------
# Granite: TestGraniteMerges
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def granite(tmp_path_factory):
    root = tmp_path_factory.mktemp("granite")
    out = {}
    for name, seed in (("granite_a", 0), ("granite_b", 1)):
        pico_granite(seed).save_pretrained(root / name)
        out[name] = str(root / name)
    return out


GRANITE = {
    "test_granite_copy": lambda m, dt: {"merge_method": "passthrough", "dtype": dt,
                                        "models": [{"model": m["granite_a"]}]},
    "test_granite_linear_merge": lambda m, dt: _two(m, "granite_a", "granite_b", "linear", dtype=dt),
    "test_granite_slerp": lambda m, dt: {"merge_method": "slerp", "base_model": m["granite_a"], "dtype": dt,
                                         "models": [{"model": m["granite_a"]}, {"model": m["granite_b"]}],
                                         "parameters": {"t": 0.5}},
}


def _causal_logits(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.arange(0, 64, 3).reshape(1, -1)
    with torch.no_grad():
        return model(ids).logits.numpy()


@pytest.mark.parametrize("case", list(GRANITE))
def test_granite_matches_mergekit(granite, tmp_path, case):
    cfg = GRANITE[case](granite, "float32")
    want = numpy_state(run_mergekit(cfg, tmp_path / "mk"))
    merge(cfg, tmp_path / "us")
    got = numpy_state(tmp_path / "us")
    assert set(got) == set(want) == set(stored_state(granite["granite_a"]))
    _close(got, want)
    config = json.loads((tmp_path / "us" / "config.json").read_text())
    assert config["architectures"] == ["GraniteForCausalLM"]
    np.testing.assert_allclose(_causal_logits(tmp_path / "us"), _causal_logits(tmp_path / "mk"), rtol=0, atol=1e-5)
    if case == "test_granite_copy":
        src = stored_state(granite["granite_a"])
        for n in src:
            np.testing.assert_array_equal(got[n], src[n])


@pytest.mark.parametrize("case", ["test_granite_copy", "test_granite_linear_merge"])
def test_granite_bfloat16_as_written_bit_for_bit(granite, tmp_path, case):
    """mergekit's configuration as written (``dtype: bfloat16``): its bits with ``--compute-dtype
    bfloat16`` (slerp has no bf16 path here: its float32 parity is the test above)."""
    cfg = GRANITE[case](granite, "bfloat16")
    want = stored_state(run_mergekit(cfg, tmp_path / "mk"))
    merge(cfg, tmp_path / "us", compute_dtype="bfloat16")
    _bits_equal(stored_state(tmp_path / "us"), want)


# ----------------------------------------------------------------------------------------------
# LLaVA: the *_VLM_merge tests of TestBasicMerges
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """vlm_a, vlm_b, vlm_c (seeds 0, 1, 2) and their text models as Llama checkpoints (``…_text``)."""
    root = tmp_path_factory.mktemp("vlm")
    out = {}
    for name, seed in (("vlm_a", 0), ("vlm_b", 1), ("vlm_c", 2)):
        pico_llava(seed).save_pretrained(root / name)
        out[name] = str(root / name)
        out[name + "_text"] = llava_text_as_llama(root / name, root / (name + "_text"))
    return out


def _text_models(models):
    return {k: models[k + "_text"] for k in ("vlm_a", "vlm_b", "vlm_c")}


def _nuslerp(base, row_wise, flatten, weights=None):
    return (base, {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}, weights)


VLM = {   # id -> (method, (model a, model b), base, params, weights or None for 0.6 / 0.4)
    "test_linear_VLM_merge": ("linear", ("vlm_a", "vlm_b"), None, None, None),
    "test_slerp_VLM_merge": ("slerp", ("vlm_a", "vlm_b"), "vlm_a", {"t": 0.35}, None),
    **{f"test_nuslerp_VLM_merges[base={b or 'none'}-row_wise={rw}-flatten={fl}]":
       ("nuslerp", ("vlm_a", "vlm_b"), *_nuslerp(b, rw, fl)) for b in (None, "vlm_c") for rw in (False, True)
       for fl in (False, True)},
    "test_nuslerp_VLM_merges[weights sum to zero]": ("nuslerp", ("vlm_a", "vlm_b"), *_nuslerp("vlm_c", False, False,
                                                                                             (-0.5, 0.5))),
    "test_task_arithmetic_VLM_merge": ("task_arithmetic", ("vlm_a", "vlm_b"), "vlm_c", None, None),
    "test_breadcrumbs_VLM_merge": ("breadcrumbs", ("vlm_a", "vlm_b"), "vlm_c", None, None),
    "test_ties_VLM_merge": ("ties", ("vlm_a", "vlm_b"), "vlm_c", {"density": 0.3}, None),
    "test_dare_ties_VLM_merge": ("dare_ties", ("vlm_a", "vlm_b"), "vlm_c", {"density": 0.66}, None),
    "test_model_stock_VLM_merge": ("model_stock", ("vlm_b", "vlm_c"), "vlm_a", None, None),
    "test_model_stock_filterwise_VLM_merge": ("model_stock", ("vlm_b", "vlm_c"), "vlm_a", {"filter_wise": True}, None),
}
# The default run keeps one nuslerp layout per base and the zero-sum weights; the rest are slow.
VLM_DEFAULT_NUSLERP = {"test_nuslerp_VLM_merges[base=none-row_wise=False-flatten=False]",
                       "test_nuslerp_VLM_merges[base=vlm_c-row_wise=True-flatten=True]",
                       "test_nuslerp_VLM_merges[weights sum to zero]"}
VLM_CASES = [pytest.param(k, id=k, marks=SLOW if k.startswith("test_nuslerp") and k not in VLM_DEFAULT_NUSLERP else ())
             for k in VLM]


def _vlm_config(models, case):
    method, (a, b), base, params, weights = VLM[case]
    cfg = _two(models, a, b, method, base, params)
    if weights is not None:
        for m, w in zip(cfg["models"], weights):
            m["parameters"]["weight"] = w
    return cfg


def _llava_logits(path):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    n_image = (32 // 4) ** 2     # patch features the default strategy keeps (the CLS token dropped)
    ids = torch.tensor([[1, 5, *[PICO_LLAVA_IMAGE_TOKEN] * n_image, 7, 9, 11, 2]])
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits.numpy()


def _mergekit_llava(cfg, models, tmp_path, monkeypatch):
    """mergekit's two outputs for a LLaVA config: its LLaVA merge (vision tower and projector) and
    the same config on the text models as Llama checkpoints."""
    text = _text_models(models)
    text_cfg = json.loads(json.dumps(cfg))
    for m in text_cfg["models"]:
        m["model"] = text[next(k for k in text if models[k] == m["model"])]
    if "base_model" in text_cfg:
        text_cfg["base_model"] = text[next(k for k in text if models[k] == cfg["base_model"])]
    if cfg["merge_method"] == "dare_ties":
        base = numpy_state(cfg["base_model"])
        fts = [numpy_state(m["model"]) for m in cfg["models"]]
        used = feed_mergekit_our_dare_masks(monkeypatch, base, fts, [0.66, 0.66], DARE_SEED)
        n_float = sum(np.issubdtype(v.dtype, np.floating) for v in base.values())
    vision = numpy_state(run_mergekit(cfg, tmp_path / "mk"))
    language = numpy_state(run_mergekit(text_cfg, tmp_path / "mk_text"))
    if cfg["merge_method"] == "dare_ties":
        assert len(used) == 2 * n_float        # mergekit drew every mask from ours
    return vision, language


@pytest.mark.parametrize("case", VLM_CASES)
def test_llava_matches_mergekit(vlm, tmp_path, monkeypatch, case):
    cfg = _vlm_config(vlm, case)
    vision, language = _mergekit_llava(cfg, vlm, tmp_path, monkeypatch)
    merge(cfg, tmp_path / "us", seed=DARE_SEED)
    got = numpy_state(tmp_path / "us")
    assert set(got) == set(stored_state(vlm["vlm_a"]))          # every tensor, under the checkpoint's names
    # mergekit's LLaVA output: the vision tower and projector, renamed model.<name>.
    assert all(n.startswith("model.") for n in vision)
    _close(got, vision, rename=lambda n: n[len("model."):])
    _close(got, language, rename=lambda n: LLAVA_TEXT_PREFIX + n)
    covered = {n[len("model."):] for n in vision} | {LLAVA_TEXT_PREFIX + n for n in language}
    assert covered == set(got)
    # Logits with an image: ours against the LLaVA assembled from mergekit's two outputs.
    from safetensors.numpy import save_file

    ref = tmp_path / "mk_llava"
    ref.mkdir()
    (ref / "config.json").write_text((tmp_path / "us" / "config.json").read_text())
    assembled = {n[len("model."):]: v for n, v in vision.items()}
    assembled.update({LLAVA_TEXT_PREFIX + n: v for n, v in language.items()})
    save_file(assembled, str(ref / "model.safetensors"), metadata={"format": "pt"})
    np.testing.assert_allclose(_llava_logits(tmp_path / "us"), _llava_logits(ref), rtol=0, atol=1e-4)


def test_mergekit_drops_the_llava_language_model_and_we_keep_it(vlm, tmp_path):
    """mergekit 0.1.5 on mergekit's own LLaVA config: 43 of the 64 tensors, none of the language
    model; ours: all 64, and the output loads and runs as the merged LLaVA."""
    cfg = _vlm_config(vlm, "test_linear_VLM_merge")
    mk = stored_state(run_mergekit(cfg, tmp_path / "mk"))
    src = stored_state(vlm["vlm_a"])
    text = {n for n in src if n.startswith(LLAVA_TEXT_PREFIX)}
    assert (len(src), len(text), len(mk)) == (64, 21, 43)
    assert {n[len("model."):] for n in mk} == set(src) - text
    merge(cfg, tmp_path / "us")
    got = numpy_state(tmp_path / "us")
    a, b = numpy_state(vlm["vlm_a"]), numpy_state(vlm["vlm_b"])
    for n in text:     # linear, normalised weights: the NumPy float64 formula
        np.testing.assert_allclose(got[n], 0.6 * a[n].astype(np.float64) + 0.4 * b[n].astype(np.float64), rtol=0,
                                   atol=1e-6, err_msg=n)
    assert np.isfinite(_llava_logits(tmp_path / "us")).all()


@pytest.mark.parametrize("case", ["test_linear_VLM_merge", "test_task_arithmetic_VLM_merge", "test_ties_VLM_merge"])
def test_llava_bfloat16_as_written_bit_for_bit(vlm, tmp_path, case):
    """mergekit's LLaVA configurations as written (``dtype: bfloat16``), for the methods whose bf16
    arithmetic ``--compute-dtype bfloat16`` reproduces: mergekit's bits on every tensor it writes."""
    cfg = {**_vlm_config(vlm, case), "dtype": "bfloat16"}
    want = stored_state(run_mergekit(cfg, tmp_path / "mk"))
    merge(cfg, tmp_path / "us", compute_dtype="bfloat16")
    got = stored_state(tmp_path / "us")
    _bits_equal({n: got[n[len("model."):]] for n in want}, want)


def _nuslerp_columns_ref(d0, d1, t):
    """mergekit's ``nuslerp`` with ``dim=0`` in NumPy float64: one vector along axis 0 per flat
    position of the other axes; the lerp where the two are (anti)parallel."""
    x0, x1 = (d.astype(np.float64).reshape(d.shape[0], -1) for d in (d0, d1))
    u0 = x0 / np.maximum(np.linalg.norm(x0, axis=0), 1e-7)
    u1 = x1 / np.maximum(np.linalg.norm(x1, axis=0), 1e-7)
    cos = np.clip((u0 * u1).sum(0), -1, 1)
    colinear = 1 - cos ** 2 <= 1e-16
    theta = np.arccos(np.where(colinear, 0.0, cos))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (np.sin((1 - t) * theta) * x0 + np.sin(t * theta) * x1) / np.sin(theta)
    out = np.where(colinear, (1 - t) * x0 + t * x1, out)
    return out.reshape(d0.shape)


@pytest.mark.parametrize("chunk", [None, 28, 100])
def test_nuslerp_row_wise_on_a_conv_kernel_is_columns_along_axis_0(vlm, tmp_path, chunk):
    """The vision tower's 4-D patch embedding (64, 3, 4, 4) under ``nuslerp_row_wise``: the NumPy
    float64 formula, whatever the chunk (28 and 100 entries cut its 48-entry columns)."""
    cfg = _vlm_config(vlm, "test_nuslerp_VLM_merges[base=vlm_c-row_wise=True-flatten=False]")
    merge(cfg, tmp_path / "us", **({} if chunk is None else {"chunk": chunk}))
    n = "vision_tower.embeddings.patch_embedding.weight"
    a, b, c = (numpy_state(vlm[k])[n] for k in ("vlm_a", "vlm_b", "vlm_c"))
    assert a.ndim == 4
    want = c + _nuslerp_columns_ref(a - c.astype(np.float64), b - c.astype(np.float64), 0.4)
    np.testing.assert_allclose(numpy_state(tmp_path / "us")[n], want, rtol=0, atol=1e-6)
