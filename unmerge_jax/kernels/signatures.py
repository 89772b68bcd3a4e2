"""Row-block kernel of the merge-method signature sums (exact zeros, TIES consistency).

The sums and their meaning are defined in ``unmerge_jax.attribution.signatures`` (NumPy reference
``signature_block``). This kernel computes them for one staged block of the checkpoint statistics
pass, on the device block the Gram kernel reads, rows sharded over a 1-D mesh with ``shard_map``
and a ``psum`` of the per-device partial sums. Per row ``r`` (float64 from the float32 rows)::

    active_r      = any_k d_kr ≠ 0
    zero_rt       = active_r ∧ v_rt = 0
    e_rtk(ρ)      = [|d_kr| ≥ θ_k(ρ)] ∧ ([sign d_kr = sign v_rt] ∨ v_rt = 0)
    x_rt(ρ)       = [e_rt ∘ d_r,  e_rt v_rt]                     (2K,)
    M_t(ρ)       += x_rt x_rtᵀ                                    (2K, 2K)

so ``ties_dd = M[:K, :K]``, ``ties_dv = M[:K, K:]``, ``ties_vv = M[K:, K:]``. The thresholds
``θ_k(ρ)`` are per tensor; a block spans tensors, so it carries a small table of the thresholds
of the tensors it holds and their first rows, and each row looks its tensor up (``searchsorted``).

**Per-group Gram sums.** Over the same rows as the TIES sums, per tensor slot ``s`` of the table::

    N_s          += Σ_{r in slot s} d_r [d_r, v_r]ᵀ               (K, K + T)

a one-hot of the rows' slots times ``d``, then one matmul. Rows are in order, so a chunk's rows
lie in a few consecutive slots: the one-hot spans the :data:`WINDOW_SLOTS` slots from the chunk's
first row's (all S only when the chunk spans more), so the cost does not grow with S. After the
cross-device sum each slot's ``N_s`` is added to its tensor group's ``M_g`` by a per-slot group
table (``group_gram = M[:, :, :K]``, ``group_cross = M[:, :, K:]``). The group axis is padded to a
power of two ≥ :data:`MIN_GROUPS` (few programs over models); padding slots hold no rows, so
their sums are zero whatever group they map to.

Padding rows (past the block's valid rows) are zero in ``D`` and ``V``; such a row is inactive and
its ``x`` is zero, so it adds nothing — the kernel needs no row count.

**Row units of the TIES sums.** The zero sums cost O(K·T) per row, the TIES sums O(P·T·K²): on a
full 7B model that is hours. With ``ties_stride`` s > 1 the TIES sums take only the rows of every
s-th unit of ``TIES_UNIT_ROWS`` consecutive global rows (unit ``row // TIES_UNIT_ROWS ≡ 0 mod s``),
and a chunk without such rows skips them and the per-group sums (``lax.cond``), which take the
same rows: a pure function of the global row index,
so the sums do not depend on blocks, chunks or devices. The TIES equations hold row by row, so
the weights they give are unchanged, and the shares they give are ratios over the same rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from unmerge_jax.kernels.stats import ROW_AXIS

# Rows per scan step: the (rows, T, 2K) float64 masked copies stay a few MiB.
SIG_CHUNK_ROWS = 512
# Consecutive global rows per unit of the TIES-sum row sampling (a multiple of SIG_CHUNK_ROWS).
TIES_UNIT_ROWS = 4096
# Tensor groups of the per-group sums, padded to a power of two ≥ this (few compiled programs).
MIN_GROUPS = 8
# Tensor slots a chunk's per-slot sums cover when its rows lie in that many consecutive slots.
WINDOW_SLOTS = 4


def padded_groups(n_groups: int) -> int:
    """Rows of the running per-group array for ``n_groups`` tensor groups: a power of two ≥ MIN_GROUPS."""
    return max(MIN_GROUPS, 1 << (max(int(n_groups), 1) - 1).bit_length())


def _chunk_sums(d, v, rows, starts, table, row_offset, ties_stride):
    """Signature sums of one chunk: d (c, K), v (c, T), rows (c,) block-row indices."""
    hi = jax.lax.Precision.HIGHEST
    dn = d.astype(jnp.float64)
    vn = v.astype(jnp.float64)
    seg = jnp.searchsorted(starts, rows, side="right") - 1              # (c,) tensor of each row
    thr = table[jnp.clip(seg, 0, table.shape[0] - 1)]                   # (c, P, K)
    active = jnp.any(dn != 0, axis=1)
    zero = ((vn == 0) & active[:, None]).astype(jnp.float64)            # (c, T)
    n_active = jnp.sum(active, dtype=jnp.float64)
    zero_count = jnp.sum(zero, axis=0)
    zero_energy = jnp.matmul(jnp.square(dn).T, zero, precision=hi)      # (K, T)
    agree = (jnp.sign(dn)[:, None, :] == jnp.sign(vn)[:, :, None]) | (vn == 0)[:, :, None]  # (c, T, K)
    absd = jnp.abs(dn)
    use = ((row_offset + rows) // TIES_UNIT_ROWS) % ties_stride == 0      # (c,) rows of the TIES sums
    agree = agree & use[:, None, None]

    def at_density(thr_p):                                              # (c, K) thresholds of one density
        e = agree & (absd >= thr_p)[:, None, :]
        x = jnp.concatenate([jnp.where(e, dn[:, None, :], 0.0), jnp.where(e, vn[:, :, None], 0.0)], axis=-1)
        return jnp.einsum("rti,rtj->tij", x, x, precision=hi)          # (T, 2K, 2K)

    right = jnp.concatenate([dn, vn], axis=1)                           # (c, K + T)

    def slot_sums(first, n):                                            # (n, K, K + T): slots first … first + n − 1
        hot = ((seg[:, None] - first == jnp.arange(n)) & use[:, None]).astype(jnp.float64)  # (c, n) one-hot
        left = (hot[:, :, None] * dn[:, None, :]).reshape(-1, n * d.shape[1])            # (c, n·K)
        return jnp.matmul(left.T, right, precision=hi).reshape(n, d.shape[1], -1)

    def per_slot():                                                     # (S, K, K + T) slot Gram sums
        s = table.shape[0]
        if s <= WINDOW_SLOTS:
            return slot_sums(0, s)
        # Rows are in order, so a chunk's slots are seg[0] … seg[-1], mostly one or two: sum over a
        # window of WINDOW_SLOTS slots from seg[0] (cost independent of S), else over all S.
        first = seg[0]

        def window():
            out = jnp.zeros((s + WINDOW_SLOTS,) + slot_shape[1:], jnp.float64)
            at = (first.astype(jnp.int32), jnp.int32(0), jnp.int32(0))
            return jax.lax.dynamic_update_slice(out, slot_sums(first, WINDOW_SLOTS), at)[:s]

        return jax.lax.cond(seg[-1] - first < WINDOW_SLOTS, window, lambda: slot_sums(0, s))

    # A loop over the densities (one body in the program, one density's copies alive at a time),
    # skipped with the slot sums for a chunk without sampled rows.
    shape = (table.shape[1], v.shape[1], 2 * d.shape[1], 2 * d.shape[1])
    slot_shape = (table.shape[0], d.shape[1], d.shape[1] + v.shape[1])
    ties, slots = jax.lax.cond(jnp.any(use), lambda: (jax.lax.map(at_density, jnp.swapaxes(thr, 0, 1)), per_slot()),
                               lambda: (jnp.zeros(shape, jnp.float64), jnp.zeros(slot_shape, jnp.float64)))
    return n_active, zero_count, zero_energy, ties, slots               # ties (P, T, 2K, 2K), slots (S, K, K + T)


def _local_sums(d, v, starts, table, row_offset, ties_stride):
    """Sums over this device's rows, scanned in chunks (no cross-device reduction)."""
    r = d.shape[0]
    first = jax.lax.axis_index(ROW_AXIS).astype(jnp.int64) * r
    chunk = min(SIG_CHUNK_ROWS, r)
    main = r - r % chunk
    dm = d[:main].reshape(-1, chunk, d.shape[1])
    vm = v[:main].reshape(-1, chunk, v.shape[1])
    local = jnp.arange(chunk, dtype=jnp.int64)

    def body(acc, i):
        part = _chunk_sums(dm[i], vm[i], first + i * chunk + local, starts, table, row_offset, ties_stride)
        return tuple(a + b for a, b in zip(acc, part)), None

    shapes = jax.eval_shape(lambda: _chunk_sums(dm[0], vm[0], local, starts, table, row_offset, ties_stride))
    zeros = tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)
    total = jax.lax.scan(body, zeros, jnp.arange(main // chunk))[0]
    if main < r:
        rest = _chunk_sums(d[main:], v[main:], first + main + jnp.arange(r - main, dtype=jnp.int64), starts, table,
                           row_offset, ties_stride)
        total = tuple(a + b for a, b in zip(total, rest))
    return total


@functools.lru_cache(maxsize=None)
def _compiled(mesh: Mesh):
    def local(d, v, starts, table, row_offset, ties_stride):
        return tuple(jax.lax.psum(x, ROW_AXIS) for x in _local_sums(d, v, starts, table, row_offset, ties_stride))

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(ROW_AXIS), P(ROW_AXIS), P(), P(), P(), P()),
                            out_specs=(P(), P(), P(), P(), P()), check_vma=False)

    def to_groups(groups, slot_group, *args):
        """The block's sums, its slot sums added into the running per-group array ``groups``."""
        *sums, slots = sharded(*args)
        return (*sums, groups.at[slot_group].add(slots))

    def plain(slot_group, *args, n_groups):
        k, t = args[0].shape[1], args[1].shape[1]
        return to_groups(jnp.zeros((n_groups, k, k + t), jnp.float64), slot_group, *args)

    def add_to(total, slot_group, *args):
        *sums, groups = to_groups(total[-1], slot_group, *args)
        return (*(a + b for a, b in zip(total[:-1], sums)), groups)

    # The running sums are updated in place (donated): no extra buffer per block.
    return jax.jit(plain, static_argnames=("n_groups",)), jax.jit(add_to, donate_argnums=(0,))


def signature_block_sums(d, v, starts, table, slot_group=None, *, mesh: Mesh, n_groups: int = 1, row_offset: int = 0,
                         ties_stride: int = 1, total=None):
    """Float64 signature sums of one block of rows, rows sharded over ``mesh``.

    Args:
      d: (B, K) dictionary rows, B a multiple of the mesh size (rows past the valid ones zero).
      v: (B, T) target rows.
      starts: (S,) int64 first block row of each tensor in the block, increasing; entries past
        the block's tensors are padding (any value ≥ B).
      table: (S, P, K) float64 trimming thresholds ``θ_k(ρ_p)`` of each of those tensors.
      slot_group: (S,) int32 tensor group of each of those tensors, in ``0 … n_groups − 1``
        (padding entries: any group; default all 0).
      mesh: 1-D device mesh with axis ``"rows"``.
      n_groups: G, the tensor groups of the whole pass (the group axis is :func:`padded_groups`).
      row_offset: global index of the block's first row (fixes the TIES row units).
      ties_stride: the TIES sums take the rows of every ``ties_stride``-th unit (module docstring).
      total: optional running sums (a previous call's result), added to and donated.

    Returns:
      ``(n_active (), zero_count (T,), zero_energy (K, T), ties (P, T, 2K, 2K),
      groups (padded_groups(G), K, K + T))`` float64; group rows ``≥ G`` are zero.
    """
    plain, add_to = _compiled(mesh)
    if slot_group is None:
        slot_group = np.zeros(np.shape(starts)[0], np.int32)
    args = (slot_group, d, v, starts, table, np.int64(row_offset), np.int64(ties_stride))
    if total is None:
        return plain(*args, n_groups=padded_groups(n_groups))
    return add_to(tuple(total), *args)
