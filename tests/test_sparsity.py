"""Sparsity metrics vs direct NumPy float64 formulas; streamed == in-memory; hist-mode bounds."""

import json
import math

import numpy as np
import pytest
import scipy.stats

from unmerge_jax.analysis.metrics import sparsity_metrics
from unmerge_jax.errors import UnmergeError


def reference(x, eps=0.01, atol=1e-5):
    """The sparsity-scaling paper's formulas, written directly on the whole vector."""
    x = np.ravel(np.asarray(x, dtype=np.float32))
    a = np.sort(np.abs(x).astype(np.float64))
    n, l1 = a.size, a.sum()
    mx = np.abs(x).max()
    k = np.arange(1, n + 1)
    out = {
        "l0": 1.0 if mx == 0 else float(np.mean(np.abs(x) < np.float32(eps * np.float64(mx)))),
        "exact_zero": float(np.mean(x == 0)),
        "near_zero": float(np.mean(np.abs(x) <= np.float32(atol))),
        "gini": float(1 - 2 * np.sum((a / l1) * (n - k + 0.5) / n)) if l1 > 0 else math.nan,
        "kurtosis": float(scipy.stats.kurtosis(x.astype(np.float64), fisher=True, bias=True))
        if np.var(x.astype(np.float64)) > 0 else math.nan,
        "n_params": n,
    }
    for key, p in (("top1_mass", 0.01), ("top5_mass", 0.05)):
        kk = max(1, math.ceil(p * n))
        out[key] = float(a[n - kk:].sum() / l1) if l1 > 0 else math.nan
    return out


def assert_metrics(got, want, rtol=1e-9, atol=1e-12):
    for key, w in want.items():
        g = got[key]
        if isinstance(w, float) and math.isnan(w):
            assert math.isnan(g), (key, g)
        else:
            assert g == pytest.approx(w, rel=rtol, abs=atol), (key, g, w)


def sparse_vector(rng, n, density, scale=1.0):
    mask = rng.random(n) < density
    mag = np.exp(rng.normal(-3, 1.5, n)) * rng.choice([-1, 1], n)
    return (mag * mask * scale).astype(np.float32)


VECTORS = {
    "dense_normal": lambda rng: rng.standard_normal(20_000).astype(np.float32),
    "sparse_lognormal": lambda rng: sparse_vector(rng, 50_000, 0.07),
    "all_zero": lambda rng: np.zeros(1000, np.float32),
    "constant": lambda rng: np.full(1000, 0.25, np.float32),
    "single_nonzero": lambda rng: np.eye(1, 777, 345, dtype=np.float32)[0] * -3.0,
    "tiny_updates": lambda rng: (rng.standard_normal(5000) * 1e-6).astype(np.float32),
}


@pytest.mark.parametrize("mode", ["exact", "hist"])
@pytest.mark.parametrize("kind", list(VECTORS))
def test_metrics_match_numpy(kind, mode):
    x = VECTORS[kind](np.random.default_rng(1))
    r = sparsity_metrics(x, mode=mode)
    want = reference(x)
    if mode == "exact":
        assert_metrics(r["overall"], want)
        assert r["error_bounds"] == {}
    else:
        b = r["error_bounds"].get("overall", {})
        # L0, zeros, kurtosis stay exact; Gini / top-k within the reported (rigorous) half-width.
        assert_metrics(r["overall"], {k: want[k] for k in ("l0", "exact_zero", "near_zero", "kurtosis", "n_params")})
        for key in ("gini", "top1_mass", "top5_mass"):
            if math.isnan(want[key]):
                assert math.isnan(r["overall"][key])
            else:
                assert abs(r["overall"][key] - want[key]) <= b[key] * (1 + 1e-9) + 1e-12, key
                assert b[key] <= 2.0 ** -12 + 1e-12  # the documented bound, r = 2^-hist_bits


def test_special_values_are_what_the_doc_says():
    z = sparsity_metrics(np.zeros(10, np.float32))["overall"]
    assert z["l0"] == 1.0 and z["exact_zero"] == 1.0 and math.isnan(z["gini"]) and math.isnan(z["kurtosis"])
    one = sparsity_metrics(np.eye(1, 100, 3, dtype=np.float32)[0])["overall"]
    assert one["gini"] == pytest.approx(1 - 1 / 100) and one["top1_mass"] == 1.0 and one["l0"] == 0.99
    c = sparsity_metrics(np.full(200, 2.0, np.float32))["overall"]
    assert c["gini"] == pytest.approx(0.0, abs=1e-15) and c["l0"] == 0.0 and c["top5_mass"] == pytest.approx(0.05)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_is_a_clear_error(bad):
    x = np.ones((4, 5), np.float32)
    x[2, 3] = bad
    with pytest.raises(UnmergeError, match=r"'model.layers.3.mlp.up_proj.weight'.*NaN/Inf"):
        sparsity_metrics({"model.layers.3.mlp.up_proj.weight": x})


def toy_model(rng, n_layers=3):
    """A task vector shaped like a tiny Llama, with unchanged (all-zero) tensors."""
    t = {"model.embed_tokens.weight": sparse_vector(rng, 64 * 16, 0.02).reshape(64, 16)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for m, shape in (("self_attn.q_proj", (16, 16)), ("self_attn.k_proj", (8, 16)), ("self_attn.v_proj", (8, 16)),
                         ("self_attn.o_proj", (16, 16)), ("mlp.gate_proj", (40, 16)), ("mlp.up_proj", (40, 16)),
                         ("mlp.down_proj", (16, 40))):
            t[p + m + ".weight"] = sparse_vector(rng, int(np.prod(shape)), 0.05 + 0.05 * i).reshape(shape)
        t[p + "input_layernorm.weight"] = np.zeros(16, np.float32)  # unchanged
        t[p + "post_attention_layernorm.weight"] = sparse_vector(rng, 16, 0.5)
    t["model.norm.weight"] = np.zeros(16, np.float32)
    t["lm_head.weight"] = sparse_vector(rng, 64 * 16, 0.1).reshape(64, 16)
    return t


def concat(tensors, names):
    return np.concatenate([np.ravel(tensors[n]) for n in names])


@pytest.mark.parametrize("mode", ["exact", "hist", "auto"])
def test_streamed_equals_in_memory_and_groups(mode):
    t = toy_model(np.random.default_rng(2))
    r = sparsity_metrics(t, mode=mode, exact_limit=300)  # auto: switches to hist mid-stream
    assert r["mode"] == ("exact" if mode == "exact" else "hist")
    tol = dict(rtol=1e-9, atol=2.0 ** -10 if r["mode"] == "hist" else 1e-12)
    exact_keys = ("l0", "exact_zero", "near_zero", "kurtosis", "n_params")
    keys = None if r["mode"] == "exact" else exact_keys
    pick = lambda d: d if keys is None else {k: d[k] for k in keys}  # noqa: E731
    assert_metrics(r["overall"], pick(reference(concat(t, list(t)))))
    mlp = [n for n in t if "mlp" in n]
    assert_metrics(r["by_module"]["mlp"], pick(reference(concat(t, mlp))))
    lay1 = [n for n in t if ".layers.1." in n]
    assert_metrics(r["by_layer"]["1"], pick(reference(concat(t, lay1))))
    assert set(r["by_module"]) == {"attention", "mlp", "norm", "embedding", "lm_head"}
    assert r["by_module"]["attention"]["n_tensors"] == 12 and r["by_module"]["norm"]["n_tensors"] == 7
    # per-tensor L0 uses the tensor's own max; the module table reports their mean.
    own = [reference(t[n])["l0"] for n in mlp]
    assert r["by_module"]["mlp"]["tensor_l0_mean"] == pytest.approx(np.mean(own))
    if r["mode"] == "hist":
        for key in ("gini", "top1_mass"):
            want = reference(concat(t, list(t)))[key]
            assert abs(r["overall"][key] - want) <= r["error_bounds"]["overall"][key] + 1e-12
    json.dumps(r)  # serialisable


def test_one_pass_hist_l0_is_bounded():
    x = sparse_vector(np.random.default_rng(3), 100_000, 0.2)
    r = sparsity_metrics(x, mode="hist", passes=1)
    assert r["passes"] == 1
    assert abs(r["overall"]["l0"] - reference(x)["l0"]) <= r["error_bounds"]["overall"]["l0"] + 1e-12


def test_depth_trend_slope_matches_polyfit():
    t = toy_model(np.random.default_rng(4), n_layers=4)
    r = sparsity_metrics(t)
    names = [n for n in t if "mlp" in n]
    layers = [int(n.split(".")[2]) for n in names]
    want = np.polyfit(layers, [reference(t[n])["l0"] for n in names], 1)[0]
    assert r["depth_trend"]["mlp"]["slope_per_layer"] == pytest.approx(want)
    assert want < 0  # denser in later layers by construction of toy_model


def write_sharded(tmp_path, t):
    from safetensors.numpy import save_file

    names = list(t)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: t[n] for n in part}, str(tmp_path / fn))
        weight_map.update({n: fn for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_safetensors_streamed_equals_in_memory(tmp_path):
    """Tensors read lazily from two shards (one open file at a time) give the in-memory result."""
    from safetensors import safe_open

    from unmerge_jax.sources import VirtualSource

    t = toy_model(np.random.default_rng(5))
    wm = write_sharded(tmp_path, t)
    reads = []

    def read(name):
        reads.append(name)
        with safe_open(str(tmp_path / wm[name]), framework="numpy") as f:
            return f.get_tensor(name)

    for mode in ("exact", "hist"):
        reads.clear()
        streamed = sparsity_metrics(VirtualSource({n: t[n].shape for n in wm}, read, label="shards"), mode=mode)
        in_mem = sparsity_metrics(t, mode=mode)
        for sec in ("overall", "by_module", "by_layer", "depth_trend"):
            assert streamed[sec] == in_mem[sec]
        assert len(reads) == len(t) * (2 if mode == "hist" else 1)  # hist: the exact-L0 second pass


def test_sharded_checkpoint_path_streamed_equals_in_memory(tmp_path):
    t = toy_model(np.random.default_rng(5))
    write_sharded(tmp_path, t)
    for mode in ("exact", "hist"):
        streamed = sparsity_metrics(str(tmp_path), mode=mode)
        # The reader lists tensors sorted by name; the same order in memory makes the sums identical.
        in_mem = sparsity_metrics(dict(sorted(t.items())), mode=mode)
        for sec in ("overall", "by_module", "by_layer"):
            assert streamed[sec] == in_mem[sec]
        assert streamed["dtypes"] == {"F32": in_mem["overall"]["n_params"]}


def test_model_dir_minus_base_equals_numpy_deltas_and_skips_nothing(tmp_path):
    """``target − base`` of two model directories: every base tensor counts (unchanged ones as
    zeros) and the result equals the metrics of the NumPy deltas."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(6)
    base = {n: rng.standard_normal(np.shape(v)).astype(np.float32) for n, v in toy_model(rng).items()}
    delta = toy_model(rng)
    for d, tensors in (("base", base), ("ft", {n: base[n] + delta[n] for n in base})):
        (tmp_path / d).mkdir()
        save_file(tensors, str(tmp_path / d / "model.safetensors"))
    got = sparsity_metrics(str(tmp_path / "ft"), base=str(tmp_path / "base"), mode="exact")
    want = sparsity_metrics({n: (base[n] + delta[n]) - base[n] for n in sorted(base)}, mode="exact")
    for sec in ("overall", "by_module", "by_layer"):
        assert got[sec] == want[sec], sec
    assert got["dtypes"] == {"F32": want["overall"]["n_params"]} and "ft" in got["source"] and "base" in got["source"]


def test_full_weights_without_a_base_are_a_clear_error(tmp_path):
    from unmerge_jax.sources import MemorySource

    with pytest.raises(UnmergeError, match="full model weights; pass base="):
        sparsity_metrics(MemorySource({"w": np.ones(3, np.float32)}, kind="weights"))


def test_gpt2_causal_mask_buffers_count_to_attention():
    from unmerge_jax.analysis.names import classify

    assert classify("transformer.h.0.attn.bias") == (0, "attn", "attention")
    assert classify("transformer.h.0.attn.masked_bias")[2] == "attention"
    assert classify("transformer.h.0.attn.c_attn.bias") == (0, "c_attn", "attention")
    assert classify("model.rotary_emb.inv_freq")[2] == "other"


def test_in_memory_inputs_are_read_in_place_and_never_written():
    from unmerge_jax.analysis.metrics import delta_source

    x = sparse_vector(np.random.default_rng(7), 10_000, 0.1)
    before = x.copy()
    view = delta_source({"t": x}).read("t")
    assert np.shares_memory(view, x) and not view.flags.writeable  # no copy per tensor
    sparsity_metrics({"t": x}, mode="hist")
    sparsity_metrics(x, mode="exact")
    np.testing.assert_array_equal(x, before)
