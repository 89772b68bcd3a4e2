"""``passthrough``: the input tensor copied unchanged or scaled (mergekit 0.1.5's ``passthrough``).

``θ = scale · θ_1``, ``scale`` a per-input parameter (default 1: a copy), typically given with a
``filter`` at the slice level (e.g. ``o_proj`` and ``down_proj`` at 0.5). mergekit's layer-stacking
merges (``slices`` with one source each, :mod:`unmerge_jax.merge.slices`) use it. A config gives
it exactly one input (mergekit's contract, checked by ``merge.config``); called in memory with
several, it passes the first through. A base is not an input; ``weight`` is accepted and has no
effect (one input). Apply: :func:`~unmerge_jax.kernels.merge_passthrough.passthrough_kernel`.
"""

from __future__ import annotations

import numpy as np

from unmerge_jax.kernels import merge_passthrough as KP
from unmerge_jax.merge.base import MergeMethod, Resolved, as_float


def check(method: MergeMethod, shared: dict, weights: np.ndarray, density: np.ndarray, at: str) -> dict:
    """``scale`` (the first input's) a finite float32 number."""
    out = dict(shared)
    scale = np.ravel(np.asarray(out.get("scale", 1.0), dtype=object))
    out["scale"] = as_float("scale", scale[0] if scale.size else 1.0)
    return out


def statistics(res: Resolved) -> str:
    return "none"


def apply(res: Resolved, chunks, stats, key) -> None:
    scale = np.float32(res.shared["scale"])
    for c in range(len(chunks)):
        base, tensors = chunks.inputs(c)
        chunks.store(c, KP.passthrough_kernel(base, tensors, scale, chunks.limit, deltas=chunks.deltas))


PASSTHROUGH = MergeMethod("passthrough", {}, {"weight": 1.0, "scale": 1.0}, False, check, statistics, apply)
