"""Tensor names → (layer index, module, module class), and the ``--modules`` filter.

Covers the naming schemes of Llama / Qwen2 / Mistral (``model.layers.3.self_attn.q_proj.weight``),
GPT-2 (``transformer.h.3.attn.c_attn.weight``, fused q/k/v) and GPT-NeoX / Mixtral-style names,
with or without PEFT's ``base_model.model.`` prefix.

Module classes: ``attention_q``, ``attention_k``, ``attention_v``, ``attention_o``,
``attention_qkv`` (a fused projection), ``attention`` (any other attention tensor), ``mlp``,
``norm``, ``embedding``, ``lm_head``, ``other``.

Compression groups (paper §3.4) are ``(layer, path)``, where ``path`` is the module path inside the
layer (``self_attn.q_proj``): a weight and its bias share a group; GPT-2's ``attn.c_proj`` and
``mlp.c_proj`` do not.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Iterable, NamedTuple

import numpy as np

from unmerge_jax.errors import UnmergeError


class TensorName(NamedTuple):
    """What a tensor name says about the tensor.

    Attributes:
      name: the full tensor name.
      layer: transformer block index, or None outside the blocks.
      module: leaf module name (``q_proj``, ``c_attn``, ``embed_tokens``).
      path: module path inside the block, or after the model prefix outside (``self_attn.q_proj``).
      module_class: see the module docstring.
      short: the ``--modules`` token selecting it (q, k, v, o, qkv, gate, up, down, ...).
      param: ``weight``, ``bias`` or "" (other parameter names).
    """

    name: str
    layer: int | None
    module: str
    path: str
    module_class: str
    short: str
    param: str

    @property
    def group(self) -> tuple:
        """The compression group: ``(layer or -1, path)``."""
        return (-1 if self.layer is None else self.layer, self.path)

    @property
    def causal_mask(self) -> bool:
        """A block's causal-mask buffer (GPT-2's ``attn.bias`` / ``attn.masked_bias``), not a weight."""
        return self.layer is not None and (f"{self.path}.{self.param}" if self.param else self.path) in CAUSAL_MASKS


_PREFIXES = ("base_model.model.", "model.language_model.", "language_model.model.", "model.decoder.", "model.",
             "transformer.", "gpt_neox.", "decoder.")
_LAYER = re.compile(r"^(?:.*?\.)?(?:layers|h|blocks|layer)\.(\d+)\.(.+)$")
_PARAMS = ("weight", "bias")
#: What follows the block index in the names of GPT-2's causal-mask buffers (class "other").
CAUSAL_MASKS = ("attn.bias", "attn.masked_bias")

# Leaf module name → (class, short). Checked after the norm / attention / mlp context rules below.
_ATTN = {
    "q_proj": "q", "query": "q", "q": "q", "wq": "q",
    "k_proj": "k", "key": "k", "k": "k", "wk": "k",
    "v_proj": "v", "value": "v", "v": "v", "wv": "v",
    "o_proj": "o", "out_proj": "o", "dense": "o", "o": "o", "wo": "o", "c_proj": "o",
    "c_attn": "qkv", "qkv_proj": "qkv", "query_key_value": "qkv", "wqkv": "qkv", "qkv": "qkv",
}
_MLP = {
    "gate_proj": "gate", "w1": "gate", "gate_up_proj": "gate_up",
    "up_proj": "up", "c_fc": "up", "fc1": "up", "fc_in": "up", "dense_h_to_4h": "up", "w3": "up",
    "down_proj": "down", "fc2": "down", "fc_out": "down", "dense_4h_to_h": "down", "w2": "down", "c_proj": "down",
    "gate": "router", "router": "router",
}
_EMBED = ("embed_tokens", "wte", "wpe", "embed_in", "word_embeddings", "embed_positions", "tok_embeddings",
          "embeddings")
_HEAD = ("lm_head", "embed_out", "output", "score")
_CLASS_OF_SHORT = {"q": "attention_q", "k": "attention_k", "v": "attention_v", "o": "attention_o",
                   "qkv": "attention_qkv"}

#: ``--modules`` tokens that select a whole class family rather than one short name.
FAMILIES = {
    "attn": ("attention_q", "attention_k", "attention_v", "attention_o", "attention_qkv", "attention"),
    "attention": ("attention_q", "attention_k", "attention_v", "attention_o", "attention_qkv", "attention"),
    "mlp": ("mlp",), "norm": ("norm",), "embed": ("embedding",), "embedding": ("embedding",),
    "lm_head": ("lm_head",), "other": ("other",),
}
SHORTS = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up", "router")


def _strip(name: str) -> str:
    for p in _PREFIXES:
        if name.startswith(p):
            return _strip(name[len(p):])
    return name


def _split_param(rest: str) -> tuple[str, str]:
    head, _, last = rest.rpartition(".")
    if head and last in _PARAMS:
        return head, last
    return rest, ""


def _block_class(path: str, leaf: str) -> tuple[str, str]:
    parts = path.split(".")
    low = [p.lower() for p in parts]
    if "norm" in leaf.lower() or leaf.startswith("ln_") or leaf in ("ln", "ln1", "ln2"):
        return "norm", "norm"
    in_attn = any("attn" in p or "attention" in p for p in low[:-1])
    in_mlp = any(p in ("mlp", "feed_forward", "ffn", "block_sparse_moe", "experts", "moe") for p in low[:-1])
    if in_mlp and leaf.lower() in _MLP:
        return "mlp", _MLP[leaf.lower()]
    if leaf.lower() in _ATTN and (in_attn or leaf.lower() not in _MLP):
        short = _ATTN[leaf.lower()]
        return _CLASS_OF_SHORT[short], short
    if leaf.lower() in _MLP:
        return "mlp", _MLP[leaf.lower()]
    if in_attn or "attn" in leaf.lower() or "attention" in leaf.lower():
        return "attention", "attn"
    if in_mlp or "mlp" in leaf.lower():
        return "mlp", "mlp"
    return "other", "other"


@functools.lru_cache(maxsize=65536)
def parse_tensor_name(name: str) -> TensorName:
    """Parse one tensor name (see the module docstring); never raises."""
    m = _LAYER.match(name)
    if m:
        layer = int(m.group(1))
        path, param = _split_param(m.group(2))
        leaf = path.rsplit(".", 1)[-1]
        if m.group(2) in CAUSAL_MASKS:
            return TensorName(name, layer, leaf, path, "other", "other", param)  # GPT-2's causal-mask buffers
        cls, short = _block_class(path, leaf)
        return TensorName(name, layer, leaf, path, cls, short, param)
    path, param = _split_param(_strip(name))
    leaf = path.rsplit(".", 1)[-1]
    low = leaf.lower()
    if low in _HEAD or path.startswith("lm_head"):
        return TensorName(name, None, leaf, path, "lm_head", "lm_head", param)
    if low in _EMBED or "embed" in low:
        return TensorName(name, None, leaf, path, "embedding", "embed", param)
    if "norm" in low or low.startswith("ln_") or low == "ln_f":
        return TensorName(name, None, leaf, path, "norm", "norm", param)
    return TensorName(name, None, leaf, path, "other", "other", param)


def _tokens(modules) -> list[str]:
    if modules is None:
        return []
    if isinstance(modules, str):
        modules = modules.split(",")
    return [t.strip().lower() for t in modules if t and t.strip()]


def module_filter(modules) -> Callable[[str], bool]:
    """A predicate on tensor names for a ``--modules`` spec (``"q,k,v,o"``, a list, or None = all).

    Tokens: ``q k v o qkv gate up down gate_up router`` (one kind of projection), ``attn`` / ``mlp``
    / ``norm`` / ``embed`` / ``lm_head`` / ``other`` (a whole class), ``all``, or a leaf module name
    such as ``q_proj`` or ``c_attn``.
    """
    toks = _tokens(modules)
    if not toks or "all" in toks:
        return lambda name: True
    known = set(SHORTS) | set(FAMILIES) | {"all"}
    leaves = set(_ATTN) | set(_MLP) | set(_EMBED) | set(_HEAD)
    bad = [t for t in toks if t not in known and t not in leaves and not t.endswith("norm")]
    if bad:
        raise UnmergeError(f"unknown module {bad[0]!r} in --modules; use q,k,v,o,qkv,gate,up,down (projections), "
                           f"attn,mlp,norm,embed,lm_head,other (classes), all, or a module name such as q_proj")
    classes = {c for t in toks for c in FAMILIES.get(t, ())}
    shorts = {t for t in toks if t in SHORTS}
    names = {t for t in toks if t not in known}

    def keep(name: str) -> bool:
        info = parse_tensor_name(name)
        return info.module_class in classes or info.short in shorts or info.module.lower() in names

    return keep


def modules_label(modules) -> str:
    """Canonical text of a ``--modules`` spec for provenance (``"all"`` when unfiltered)."""
    toks = _tokens(modules)
    return "all" if not toks or "all" in toks else ",".join(toks)


def groups_of(names: Iterable[str]) -> dict[tuple, list[str]]:
    """``{group: [names in the given order]}`` with groups in order of first appearance."""
    out: dict[tuple, list[str]] = {}
    for n in names:
        out.setdefault(parse_tensor_name(n).group, []).append(n)
    return out


def group_ids(names: Iterable[str]) -> np.ndarray:
    """(len(names),) int64: per name, the index of its group in :func:`groups_of` (order of first
    appearance)."""
    index: dict[tuple, int] = {}
    return np.asarray([index.setdefault(parse_tensor_name(n).group, len(index)) for n in names], np.int64)
