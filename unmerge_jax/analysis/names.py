"""The anatomy's module classes of a tensor name: ``parse_tensor_name``'s classes mapped onto the
five the sparsity anatomy reports (attention, mlp, norm, embedding, lm_head; anything else is
"other").

The parser (layer index, leaf module, class) is :func:`unmerge_jax.io.names.parse_tensor_name`;
this module only maps its classes. The projection classes (``attention_q`` … ``attention_qkv``)
are "attention"; a block's causal-mask buffers (GPT-2's ``attn.bias``), which the parser leaves
"other" so that ``--modules attn`` does not select them, count to the attention module holding
them.
"""

from __future__ import annotations

import functools

from unmerge_jax.io.names import parse_tensor_name

CLASSES = ("attention", "mlp", "norm", "embedding", "lm_head", "other")

#: ``parse_tensor_name`` module class → anatomy class (absent: "other").
ANATOMY_CLASS = {
    "attention_q": "attention", "attention_k": "attention", "attention_v": "attention", "attention_o": "attention",
    "attention_qkv": "attention", "attention": "attention", "mlp": "mlp", "norm": "norm", "embedding": "embedding",
    "lm_head": "lm_head",
}


@functools.lru_cache(maxsize=None)
def classify(name: str) -> tuple:
    """``(layer or None, module, module_class)`` of a tensor name; ``module_class`` is one of
    :data:`CLASSES`."""
    t = parse_tensor_name(name)
    cls = "attention" if t.causal_mask else ANATOMY_CLASS.get(t.module_class, "other")
    return t.layer, t.module, cls
