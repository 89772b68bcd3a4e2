"""Checkpoint readers: tensor names, safetensors model dirs (sharded, fp32/fp16/bf16), PEFT LoRA
adapters, lazy task vectors, and one-line errors for bad files."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from unmerge_jax import UnmergeError
from unmerge_jax.io.names import module_filter, parse_tensor_name

# ---------------------------------------------------------------------------------------------
# names (no torch needed)
# ---------------------------------------------------------------------------------------------
LLAMA_LIKE = {  # Llama / Qwen2 / Mistral share this scheme (Qwen2 adds q/k/v biases)
    "model.embed_tokens.weight": (None, "embed_tokens", "embedding", "embed"),
    "model.layers.0.self_attn.q_proj.weight": (0, "q_proj", "attention_q", "q"),
    "model.layers.0.self_attn.q_proj.bias": (0, "q_proj", "attention_q", "q"),
    "model.layers.7.self_attn.k_proj.weight": (7, "k_proj", "attention_k", "k"),
    "model.layers.12.self_attn.v_proj.bias": (12, "v_proj", "attention_v", "v"),
    "model.layers.3.self_attn.o_proj.weight": (3, "o_proj", "attention_o", "o"),
    "model.layers.3.mlp.gate_proj.weight": (3, "gate_proj", "mlp", "gate"),
    "model.layers.3.mlp.up_proj.weight": (3, "up_proj", "mlp", "up"),
    "model.layers.3.mlp.down_proj.weight": (3, "down_proj", "mlp", "down"),
    "model.layers.3.input_layernorm.weight": (3, "input_layernorm", "norm", "norm"),
    "model.layers.3.post_attention_layernorm.weight": (3, "post_attention_layernorm", "norm", "norm"),
    "model.norm.weight": (None, "norm", "norm", "norm"),
    "lm_head.weight": (None, "lm_head", "lm_head", "lm_head"),
    "base_model.model.model.layers.1.self_attn.q_proj.weight": (1, "q_proj", "attention_q", "q"),
}
GPT2 = {
    "transformer.wte.weight": (None, "wte", "embedding", "embed"),
    "transformer.wpe.weight": (None, "wpe", "embedding", "embed"),
    "transformer.h.0.ln_1.weight": (0, "ln_1", "norm", "norm"),
    "transformer.h.0.attn.c_attn.weight": (0, "c_attn", "attention_qkv", "qkv"),
    "transformer.h.0.attn.c_attn.bias": (0, "c_attn", "attention_qkv", "qkv"),
    "transformer.h.1.attn.c_proj.weight": (1, "c_proj", "attention_o", "o"),
    "transformer.h.1.ln_2.bias": (1, "ln_2", "norm", "norm"),
    "transformer.h.1.mlp.c_fc.weight": (1, "c_fc", "mlp", "up"),
    "transformer.h.1.mlp.c_proj.weight": (1, "c_proj", "mlp", "down"),
    "transformer.ln_f.weight": (None, "ln_f", "norm", "norm"),
    "h.2.attn.c_attn.weight": (2, "c_attn", "attention_qkv", "qkv"),   # checkpoints without the prefix
    "h.2.attn.bias": (2, "attn", "other", "other"),                     # the causal-mask buffer
}


@pytest.mark.parametrize("name,want", list(LLAMA_LIKE.items()) + list(GPT2.items()))
def test_parse_tensor_name(name, want):
    info = parse_tensor_name(name)
    assert (info.layer, info.module, info.module_class, info.short) == want


def test_groups_separate_gpt2_c_proj_and_share_weight_with_bias():
    g = lambda n: parse_tensor_name(n).group
    assert g("transformer.h.1.attn.c_proj.weight") != g("transformer.h.1.mlp.c_proj.weight")
    assert g("model.layers.0.self_attn.q_proj.weight") == g("model.layers.0.self_attn.q_proj.bias")
    assert g("model.layers.0.self_attn.q_proj.weight") != g("model.layers.1.self_attn.q_proj.weight")


def test_analysis_classes_stay_compatible():
    from unmerge_jax.analysis.names import classify

    assert classify("model.layers.2.self_attn.k_proj.weight") == (2, "k_proj", "attention")
    assert classify("transformer.h.0.attn.c_attn.weight")[2] == "attention"
    assert classify("model.layers.2.mlp.up_proj.weight")[2] == "mlp"
    assert classify("model.embed_tokens.weight")[2] == "embedding"
    assert classify("lm_head.weight")[2] == "lm_head"
    assert classify("model.norm.weight")[2] == "norm"


def test_module_filter():
    names = list(LLAMA_LIKE) + list(GPT2)
    qkvo = [n for n in names if module_filter("q,k,v,o")(n)]
    assert sorted(parse_tensor_name(n).short for n in qkvo) == sorted(
        ["q", "q", "k", "v", "o", "q", "o"])  # GPT-2's fused c_attn is "qkv", not q
    assert all(module_filter("attn")(n) for n in qkvo)
    assert [n for n in names if module_filter("mlp")(n)] == [n for n in names if parse_tensor_name(n).module_class == "mlp"]
    assert module_filter(None)("anything") and module_filter("all")("x")
    assert module_filter(["q_proj"])("model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(UnmergeError, match="unknown module 'qq'"):
        module_filter("q,qq")


# ---------------------------------------------------------------------------------------------
# files (tiny transformers models)
# ---------------------------------------------------------------------------------------------
models = pytest.mark.models


@models
def test_sharded_checkpoint_reads_every_tensor(tiny):
    from tests._tiny_models import numpy_state
    from unmerge_jax.io.checkpoint import open_checkpoint

    ck = open_checkpoint(tiny["qwen"] / "base")
    ref = numpy_state(tiny["qwen"] / "base")
    assert len(ck.files) > 1 and ck.names == sorted(ref)
    assert ck.config["model_type"] == "qwen2"
    for n in ck.names:
        assert ck.dtype(n) == "F32" and ck.shape(n) == ref[n].shape
        got = ck.read(n)
        assert got.dtype == np.float32 and got.flags.writeable
        np.testing.assert_array_equal(got, ref[n])
    assert ck.file_of(ck.names[0]).name in ck.files
    single = open_checkpoint(tiny["llama"] / "base" / "model.safetensors")  # a bare file works too
    assert "model.layers.0.self_attn.q_proj.weight" in single.names


@models
@pytest.mark.parametrize("variant,tag", [("base_bf16", "BF16"), ("base_fp16", "F16")])
def test_half_precision_is_upcast_to_float32(tiny, variant, tag):
    import torch
    from safetensors.torch import load_file

    from unmerge_jax.io.checkpoint import open_checkpoint

    ck = open_checkpoint(tiny["qwen"] / variant)
    ref = load_file(str(tiny["qwen"] / variant / "model.safetensors"))
    for n in ck.names:
        assert ck.dtype(n) == tag
        np.testing.assert_array_equal(ck.read(n), ref[n].to(torch.float32).numpy())
    assert str(ck.read_raw(ck.names[0]).dtype) == {"BF16": "bfloat16", "F16": "float16"}[tag]


def test_to_float32_equals_the_reference_casts_for_every_bit_pattern():
    """The bf16 shift equals ml_dtypes' cast (and torch's) bit for bit on all 65,536 patterns, NaN
    payloads, infinities, subnormals and −0 included; fp16 and fp64 go through NumPy's cast."""
    import ml_dtypes

    from unmerge_jax.io.dtypes import to_float32

    pats = np.arange(1 << 16, dtype=np.uint16)
    bf = pats.view(ml_dtypes.bfloat16)
    got = to_float32(bf)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), bf.astype(np.float32).view(np.uint32))
    np.testing.assert_array_equal(got.view(np.uint32), pats.astype(np.uint32) << 16)
    out = np.full(2 * pats.size, 7.0, np.float32)[::2]  # a strided destination is written in place
    assert to_float32(bf, out) is out
    np.testing.assert_array_equal(out.view(np.uint32), got.view(np.uint32))
    half = pats.view(np.float16)
    np.testing.assert_array_equal(to_float32(half).view(np.uint32), half.astype(np.float32).view(np.uint32))
    wide = np.array([1e300, -1.5, np.nan], np.float64)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(to_float32(wide), wide.astype(np.float32))


@models
@pytest.mark.parametrize("family,name", [("qwen", "lora0"), ("qwen", "lora1"), ("qwen", "lora2"), ("llama", "lora0")])
def test_adapter_delta_equals_merge_and_unload(tiny, family, name):
    from tests._tiny_models import numpy_state
    from unmerge_jax.io.lora import is_adapter_dir, open_adapter

    root = tiny[family]
    ad = open_adapter(root / name)
    assert is_adapter_dir(root / name) and not is_adapter_dir(root / "base")
    cfg = json.loads((root / name / "adapter_config.json").read_text())
    base, merged = numpy_state(root / "base"), numpy_state(root / f"{name}_merged")
    assert len(ad.base_names) == 2 * 4 and all(n in base for n in ad.base_names)
    assert {parse_tensor_name(n).short for n in ad.base_names} == {"q", "k", "v", "o"}
    want_scale = cfg["lora_alpha"] / (np.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
    for n in ad.base_names:
        assert ad.scale(n) == pytest.approx(want_scale)
        d = ad.delta(n)
        assert d.dtype == np.float32 and np.abs(d).max() > 1e-3  # non-zero B
        np.testing.assert_allclose(d, merged[n] - base[n], rtol=0, atol=2e-6)


@models
def test_task_vectors_of_adapter_and_merged_model_agree(tiny):
    from unmerge_jax.io.checkpoint import open_checkpoint
    from unmerge_jax.sources import task_vector

    q = tiny["qwen"]
    base = open_checkpoint(q / "base")
    tv_a = task_vector(base, q / "lora0")          # an opened base ...
    tv_m = task_vector(str(q / "base"), q / "lora0_merged")  # ... or a path
    assert (tv_a.origin, tv_m.origin, tv_a.name) == ("adapter", "model", "lora0")
    assert tv_a.names == tv_m.names == base.names
    for n in base.names:
        a, m = tv_a.delta(n), tv_m.delta(n)
        assert a.shape == base.shape(n)
        if parse_tensor_name(n).short in ("q", "k", "v", "o") and parse_tensor_name(n).param == "weight":
            np.testing.assert_allclose(a, m, rtol=0, atol=2e-6)
        else:  # untouched by the adapter: exact zeros on both sides
            assert not a.any() and not m.any() and not tv_a.touches(n)
    ft = task_vector(base, q / "ft0")
    n = "model.layers.1.mlp.up_proj.weight"
    np.testing.assert_array_equal(ft.delta(n), ft.source.read(n) - base.read(n))


# ---------------------------------------------------------------------------------------------
# bad files: one line naming the file / tensor
# ---------------------------------------------------------------------------------------------
def _copy(tiny, tmp_path, src):
    dst = tmp_path / Path(src).name
    shutil.copytree(tiny["qwen"] / src, dst)
    return dst


def _truncate(p):
    f = sorted(p.glob("model-*.safetensors"))[1]
    f.write_bytes(f.read_bytes()[:-64])
    return f.name


def _garble(p):
    f = sorted(p.glob("model-*.safetensors"))[0]
    f.write_bytes(b"\xff" * 16 + f.read_bytes()[16:])
    return f.name


def _drop_shard(p):
    f = sorted(p.glob("model-*.safetensors"))[-1]
    f.unlink()
    return f.name


def _wrong_index(p):
    idx = p / "model.safetensors.index.json"
    j = json.loads(idx.read_text())
    name = sorted(j["weight_map"])[0]
    j["weight_map"]["model.layers.9.extra.weight"] = j["weight_map"][name]
    idx.write_text(json.dumps(j))
    return "model.layers.9.extra.weight"


def _empty(p):
    for f in list(p.iterdir()):
        f.unlink()
    return "holds no model.safetensors"


@models
@pytest.mark.parametrize("mutate,match", [
    (_truncate, "truncated or corrupt"),
    (_garble, "truncated or corrupt"),
    (_drop_shard, "is missing; download the missing shard"),
    (_wrong_index, "re-download that shard"),
    (_empty, "pass a Hugging Face model directory"),
])
def test_bad_checkpoint_files(tiny, tmp_path, mutate, match):
    from unmerge_jax.io.checkpoint import open_checkpoint

    p = _copy(tiny, tmp_path, "base")
    what = mutate(p)
    with pytest.raises(UnmergeError, match=match) as err:
        open_checkpoint(p)
    msg = str(err.value)
    assert "\n" not in msg and what in msg
    assert str(p) in msg


@models
def test_missing_paths_and_adapter_as_model(tiny, tmp_path):
    from unmerge_jax.io.checkpoint import open_checkpoint
    from unmerge_jax.sources import task_vector

    with pytest.raises(UnmergeError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(UnmergeError, match="is a PEFT LoRA adapter, not a model"):
        open_checkpoint(tiny["qwen"] / "lora0")
    with pytest.raises(UnmergeError, match="does not exist"):
        task_vector(tiny["qwen"] / "base", tmp_path / "nope")


@models
@pytest.mark.parametrize("source,match", [
    ("wide", r"wide has hidden_size = 32 in config.json but the base .* has 64"),
    ("lora_wide", r"lora_wide gives model\.layers\.0\.self_attn\.k_proj\.weight shape \(16, 32\).*different base"),
    ("lora_cousin", r"declares base_model_name_or_path .*cousin whose intermediate_size is 96"),
])
def test_architecture_and_adapter_base_checks(tiny, source, match):
    from unmerge_jax.sources import task_vector

    with pytest.raises(UnmergeError, match=match) as err:
        task_vector(tiny["qwen"] / "base", tiny["qwen"] / source)
    assert "\n" not in str(err.value)


@models
def test_missing_tensor_and_broken_adapter(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    from unmerge_jax.io.lora import open_adapter
    from unmerge_jax.sources import task_vector

    ft = _copy(tiny, tmp_path, "ft0")
    f = ft / "model.safetensors"
    t = load_file(str(f))
    del t["model.layers.1.mlp.down_proj.weight"]
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(UnmergeError, match=r"ft0 has no tensor model\.layers\.1\.mlp\.down_proj\.weight"):
        task_vector(tiny["qwen"] / "base", ft)
    # ... but a pass restricted to other tensors does not need it
    task_vector(tiny["qwen"] / "base", ft, check_names=["model.layers.0.self_attn.q_proj.weight"])

    ad = _copy(tiny, tmp_path, "lora0")
    f = ad / "adapter_model.safetensors"
    t = load_file(str(f))
    gone = next(k for k in t if "lora_B" in k)
    del t[gone]
    save_file(t, str(f))
    with pytest.raises(UnmergeError, match="has lora_A but no lora_B"):
        open_adapter(ad)
    t["base_model.model.lm_head.modules_to_save.default.weight"] = np.zeros((2, 2), np.float32)
    save_file(t, str(f))
    with pytest.raises(UnmergeError, match="not a LoRA factor"):
        open_adapter(ad)
