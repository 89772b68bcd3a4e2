"""Tensor shapes of real architectures, without allocating weights.

Sizes are the published ones, written in code (no hub access). :func:`tensor_shapes` lays the
tensors out as the Hugging Face Llama / Qwen2 models name and shape them; with
``use_transformers=True`` it instantiates the transformers model on the ``meta`` device instead
(no memory; needs the ``[models]`` extra) — the test checks that both give the same tensors.
"""

from __future__ import annotations

import functools

from unmerge_jax.errors import UnmergeError, check_choice

# name: (family, hidden, intermediate, layers, heads, kv_heads, vocab, tied embeddings)
ARCHITECTURES = {
    "llama-3.2-1b": ("llama", 2048, 8192, 16, 32, 8, 128256, True),
    "llama-3.2-3b": ("llama", 3072, 8192, 28, 24, 8, 128256, True),
    "llama-2-7b": ("llama", 4096, 11008, 32, 32, 32, 32000, False),
    "llama-3.1-8b": ("llama", 4096, 14336, 32, 32, 8, 128256, False),
    "llama-2-13b": ("llama", 5120, 13824, 40, 40, 40, 32000, False),
    "llama-3-70b": ("llama", 8192, 28672, 80, 64, 8, 128256, False),
    "llama-3.1-405b": ("llama", 16384, 53248, 126, 128, 8, 128256, False),
    "qwen2.5-0.5b": ("qwen2", 896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": ("qwen2", 1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-3b": ("qwen2", 2048, 11008, 36, 16, 2, 151936, True),
    "qwen2.5-7b": ("qwen2", 3584, 18944, 28, 28, 4, 152064, False),
    "qwen2.5-14b": ("qwen2", 5120, 13824, 48, 40, 8, 152064, False),
    "qwen2.5-32b": ("qwen2", 5120, 27648, 64, 40, 8, 152064, False),
    "qwen2.5-72b": ("qwen2", 8192, 29568, 80, 64, 8, 152064, False),
}

# The five sizes of the paper's memory table (Table 4) and the 70B anatomy model.
PAPER_MEMORY_ARCHS = {"3B": "llama-3.2-3b", "7B": "llama-2-7b", "13B": "llama-2-13b", "70B": "llama-3-70b",
                      "405B": "llama-3.1-405b"}


def _transformers():
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as err:
        raise UnmergeError(f"architecture shapes from transformers need torch and transformers "
                           f"(pip install 'unmerge_jax[models]'): {err}") from None
    return transformers


def hf_config(arch: str):
    """A ``transformers`` config object with the published sizes of ``arch``."""
    check_choice("architecture", arch, ARCHITECTURES)
    fam, h, inter, n_layers, heads, kv, vocab, tied = ARCHITECTURES[arch]
    transformers = _transformers()

    cls = transformers.LlamaConfig if fam == "llama" else transformers.Qwen2Config
    return cls(hidden_size=h, intermediate_size=inter, num_hidden_layers=n_layers, num_attention_heads=heads,
               num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied)


def _layout_shapes(arch):
    fam, h, inter, n_layers, heads, kv, vocab, tied = ARCHITECTURES[arch]
    hd = h // heads
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (heads * hd, h))]
        if fam == "qwen2":
            out += [(p + "self_attn.q_proj.bias", (heads * hd,))]
        out += [(p + "self_attn.k_proj.weight", (kv * hd, h))]
        if fam == "qwen2":
            out += [(p + "self_attn.k_proj.bias", (kv * hd,))]
        out += [(p + "self_attn.v_proj.weight", (kv * hd, h))]
        if fam == "qwen2":
            out += [(p + "self_attn.v_proj.bias", (kv * hd,))]
        out += [(p + "self_attn.o_proj.weight", (h, heads * hd)), (p + "mlp.gate_proj.weight", (inter, h)),
                (p + "mlp.up_proj.weight", (inter, h)), (p + "mlp.down_proj.weight", (h, inter)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,))]
    if not tied:
        out += [("lm_head.weight", (vocab, h))]
    return out


def _meta_shapes(arch):
    import torch

    transformers = _transformers()
    cfg = hf_config(arch)
    cls = transformers.LlamaForCausalLM if ARCHITECTURES[arch][0] == "llama" else transformers.Qwen2ForCausalLM
    with torch.device("meta"):
        model = cls(cfg)
    # named_parameters() drops a tied lm_head, as the safetensors files do.
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


@functools.lru_cache(maxsize=None)
def tensor_shapes(arch: str, *, use_transformers: bool = False) -> tuple:
    """``((name, shape), …)`` of every parameter tensor of ``arch`` (tied lm_head omitted), in the
    models' order: from the Llama/Qwen2 layout, or (``use_transformers=True``) from the
    transformers model instantiated on the meta device."""
    check_choice("architecture", arch, ARCHITECTURES)
    return tuple(_meta_shapes(arch) if use_transformers else _layout_shapes(arch))


def n_params(arch: str) -> int:
    return sum(_prod(s) for _, s in tensor_shapes(arch))


def _prod(shape):
    out = 1
    for s in shape:
        out *= int(s)
    return out


def resolve(arch_or_size: str) -> str:
    """Accept an architecture name or one of the paper's sizes ("70B")."""
    if arch_or_size in ARCHITECTURES:
        return arch_or_size
    if arch_or_size.upper() in PAPER_MEMORY_ARCHS:
        return PAPER_MEMORY_ARCHS[arch_or_size.upper()]
    raise UnmergeError(f"unknown architecture {arch_or_size!r}; choose one of: {', '.join(ARCHITECTURES)}")
