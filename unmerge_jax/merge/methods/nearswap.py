"""``nearswap`` (mergekit 0.1.5): take the other model's value where it is near the base's.

With ``a`` the base and ``b`` the one other model, per entry
``w = clip(t / max(|a − b|, 1e-6), 0, 1)`` and ``θ = w b + (1 − w) a``: entries within ``t`` of
each other become ``b``, farther ones move from ``a`` towards ``b`` by ``t`` (the step
``w |a − b| = t``). ``t`` (required, ≥ 0 in practice) may be a gradient over the layers.
Elementwise: no statistics pass (:func:`~unmerge_jax.kernels.merge_sphere.nearswap_kernel`).

Reference: mergekit's ``nearswap`` method (alchemonaut, QuartetAnemoi-70B-t0.0001).
"""

from __future__ import annotations

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.kernels import merge_sphere as S
from unmerge_jax.merge.base import MergeMethod, Resolved, as_float


def check(method, shared, weights, density, at):
    """``t`` required; exactly one model besides the base (per-model ``weight`` is ignored, as in mergekit)."""
    out = dict(shared)
    if out.get("t") is None:
        raise UnmergeError(f"merge method 'nearswap' needs parameter t (the distance below which the other model's "
                           f"value is taken, e.g. 0.0001){at}")
    out["t"] = as_float("t", out["t"])
    if len(weights) != 1:
        raise UnmergeError(f"merge method 'nearswap' merges the base with exactly one other model; got {len(weights)} "
                           f"model(s) besides the base{at}")
    return out


def apply(res: Resolved, chunks, stats, key) -> None:
    t = np.float32(res.shared["t"])
    for c in range(len(chunks)):
        chunks.store(c, S.nearswap_kernel(*chunks.inputs(c), t, chunks.limit, deltas=chunks.deltas))


NEARSWAP = MergeMethod("nearswap", {"t": None}, {"weight": 1.0}, True, check, lambda res: "none", apply,
                       options={"base_role": "endpoint", "required": ("t",), "ignores": ("weight",)})
