"""Tensor shapes of Llama- and Qwen2-style checkpoints, shared by the benchmarks that generate one."""


def llama_shapes(hidden, layers, vocab, inter):
    """``{tensor name: shape}`` of a Llama model (embeddings, lm_head, q/k/v/o, gated MLP, norms)."""
    return gqa_shapes({"hidden_size": hidden, "intermediate_size": inter, "vocab_size": vocab,
                       "num_attention_heads": 1, "num_key_value_heads": 1, "tie_word_embeddings": False,
                       "num_hidden_layers": layers})


def gqa_shapes(cfg: dict, layers: int | None = None, qkv_bias: bool = False) -> dict:
    """``{tensor name: shape}`` of a grouped-query-attention decoder (Llama-3, Qwen2) from its
    config: embeddings, lm_head unless tied, q/k/v (with biases when ``qkv_bias``), o, gated MLP,
    norms; the first ``layers`` layers only when given."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for i in range(cfg["num_hidden_layers"] if layers is None else layers):
        p = f"model.layers.{i}."
        for m, out in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            shapes[p + f"self_attn.{m}.weight"] = (out, h)
            if qkv_bias:
                shapes[p + f"self_attn.{m}.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    return shapes


def qwen2_shapes(cfg: dict) -> dict:
    """``{tensor name: shape}`` of a Qwen2 causal LM from its config (q/k/v biases)."""
    return gqa_shapes(cfg, qkv_bias=True)


# meta-llama/Meta-Llama-3-70B config.json (the fields that fix the tensor shapes).
LLAMA3_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
              "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}


def llama3_shapes(cfg: dict, layers: int | None = None) -> dict:
    """``{tensor name: shape}`` of a Llama-3 causal LM (grouped-query attention) from its config; the
    first ``layers`` layers only when given."""
    return gqa_shapes(cfg, layers)


def llama3_70b(layers: int | None = None) -> dict:
    """Llama-3-70B's tensor shapes (:data:`LLAMA3_70B`)."""
    return llama3_shapes(LLAMA3_70B, layers)
