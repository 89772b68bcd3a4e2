"""The ``passthrough`` kernel: one input copied, optionally scaled (mergekit's ``passthrough``)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


@partial(jax.jit, static_argnames=("deltas",))
def passthrough_kernel(base, tensors, scale, limit=None, *, deltas: bool = True):
    """``θ = scale · θ_1`` of the first input (``θ_1 = base + δ_1`` when ``deltas``, else the
    input's weights). Entries where any input is non-finite or ``|θ| ≥ limit`` come out NaN (the
    caller names them), as in ``kernels.merge``.

    Args:
      base: base chunk (zeros when merging full weights), any shape ``S``.
      tensors: a tuple of arrays of shape ``S`` (only the first is read).
      scale: float scalar. limit: optional float32 scalar bound.
    Returns:
      float32 array of shape ``S``.
    """
    b = base.astype(jnp.float32)
    t = tensors[0].astype(jnp.float32)
    theta = b + t if deltas else t
    merged = theta * jnp.asarray(scale, jnp.float32)
    if limit is None:
        return merged
    # Every input is checked, the ones not passed through too (as the other kernels mark inputs
    # their method drops).
    ok = (jnp.abs(merged) < jnp.asarray(limit, jnp.float32)) & jnp.isfinite(b)
    for x in tensors:
        ok = ok & jnp.isfinite(x.astype(jnp.float32))
    return jnp.where(ok, merged, jnp.float32(jnp.nan))
