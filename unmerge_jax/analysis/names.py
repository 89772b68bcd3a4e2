"""Module class and layer index of a tensor name, for the sparsity anatomy.

Uses ``unmerge_jax.io.names.parse_tensor_name`` when present (the checkpoint reader's parser) and
maps its module classes onto the five the seed-003 anatomy reports: attention, mlp, norm,
embedding, lm_head (anything else is "other").
"""

from __future__ import annotations

import functools
import re

CLASSES = ("attention", "mlp", "norm", "embedding", "lm_head", "other")

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_RULES = (
    ("lm_head", re.compile(r"lm_head|output\.weight$")),
    ("embedding", re.compile(r"embed|wte|wpe")),
    ("norm", re.compile(r"norm|ln_")),
    ("attention", re.compile(r"attn|attention|q_proj|k_proj|v_proj|o_proj")),
    ("mlp", re.compile(r"mlp|gate_proj|up_proj|down_proj|ffn|fc\d")),
)


def _own_parse(name: str):
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    base = re.sub(r"\.(weight|bias)$", "", name)
    module = base.rsplit(".", 1)[-1] if "." in base else base
    cls = next((c for c, rx in _RULES if rx.search(name)), "other")
    return layer, module, cls


def _map_class(cls: str) -> str:
    c = (cls or "").lower()
    for target, keys in (("lm_head", ("lm_head", "head", "output")), ("embedding", ("embed",)),
                         ("norm", ("norm",)), ("attention", ("attn", "attention")), ("mlp", ("mlp", "ffn"))):
        if any(k in c for k in keys):
            return target
    return "other"


@functools.lru_cache(maxsize=None)
def classify(name: str):
    """``(layer or None, module, module_class)`` of a tensor name."""
    layer, module, cls = _own_parse(name)
    try:
        from unmerge_jax.io.names import parse_tensor_name
    except ImportError:
        return layer, module, cls
    info = parse_tensor_name(name)
    theirs = _map_class(getattr(info, "module_class", None))
    return (info.layer if info.layer is not None else layer), (info.module or module), (
        theirs if theirs != "other" else cls)
