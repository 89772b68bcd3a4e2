"""Row-block kernel of the streaming statistics pass: staged checkpoint values → ``(D, V)`` rows.

The checkpoint statistics pass (``unmerge_jax.passes.statistics``) packs the selected entries of
consecutive tensors into fixed-size blocks of B global rows, one staging row per input: row 0
holds the base's values, rows 1..K the dictionary's, rows K+1..K+T the targets'. A source given as full fine-tuned
weights is *relative* (its task vector is ``value − base``), a LoRA ``ΔW`` is not. Applying the
mask is a gather of the kept flat indices while staging, so a compressed pass moves only the kept
entries, never whole tensors.

:func:`row_block` (jit, one program per (inputs, B, K, sharding)) forms the task-vector entries in
float32, zeroes the rows past the block's end, counts non-finite values per input (reported by
the driver as a one-line error naming tensor and file; never raised inside jit) and lays the
block out as ``D`` (B × K) and ``V`` (B × T). Rows are sharded over the devices when the staged
block is, so the statistics kernel (``kernels.stats.block_stats`` via
``unmerge_jax.stats.accumulate_block``) consumes the block where it lies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("n_dict",))
def row_block(staged, relative, n_valid, *, n_dict: int):
    """Task-vector rows of one staged block.

    Args:
      staged: (1 + K + T, B) float32: base values, then each source's values at the block's rows.
      relative: (K + T,) bool, True where the source holds full weights (subtract the base).
      n_valid: () int, rows of the block that are real (the rest is padding).
      n_dict: K (static).

    Returns:
      ``(D, V, bad)``: D (B, K) and V (B, T) float32 with padding rows zero, and ``bad`` (1 + K + T,)
      int32 counts of non-finite values among the real rows (base first; the base counts only
      when some source needs it).
    """
    base, src = staged[0], staged[1:]
    valid = jnp.arange(staged.shape[1]) < n_valid
    vals = jnp.where(relative[:, None], src - base[None, :], src)
    vals = jnp.where(valid[None, :], vals, jnp.float32(0))
    bad_src = jnp.sum(~jnp.isfinite(vals), axis=1, dtype=jnp.int32)
    bad_base = jnp.where(jnp.any(relative), jnp.sum(valid & ~jnp.isfinite(base), dtype=jnp.int32), 0)
    bad = jnp.concatenate([bad_base[None], bad_src])
    return vals[:n_dict].T, vals[n_dict:].T, bad
