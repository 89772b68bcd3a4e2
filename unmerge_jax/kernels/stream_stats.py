"""Fused block kernel of the streaming statistics pass: staged checkpoint values → running statistics.

The checkpoint statistics pass (``unmerge_jax.passes.statistics``) packs the selected entries of
consecutive tensors into fixed-size blocks of B global rows, one staging row per input: row 0
holds the base's values, rows 1..K the dictionary's, rows K+1..K+T the targets'. A source given as
full fine-tuned weights is *relative* (its task vector is ``value − base``), a LoRA ``ΔW`` is not.
Applying the mask is a gather of the kept flat indices while staging, so a compressed pass moves
only the kept entries, never whole tensors.

:func:`staged_block_stats` is one jit program per (mesh, inputs, B, K, S, bootstrap layout, dtype)
that does all of a block's work where the block lies, in cache-sized chunks of ``CHUNK_ROWS``
rows along the staged layout (no transposed copy of the block): per chunk it forms the
task-vector entries in float32 (``src − base`` for relative sources) and adds the chunk's exact
float64 products

    G += D_cᵀ D_c,   C += D_cᵀ V_c,   ‖v‖² += Σ_r v_r²      (D_c: c × K, V_c: c × T)

— float32 × float32 is exact in float64, so only the float64 sums round — and, with S bootstrap
replicates, the weighted sums ``Σ_r w_sr (…)`` with Poisson(1) weights keyed by the global row's
resampling unit (``kernels.random.poisson1_weights``: bit-identical to the dense path). Non-finite
values are flagged per input from the block's own ``Σ d²`` and ``Σ v²`` (a NaN/Inf entry makes its
column's sum non-finite; reported by the driver as a one-line error naming tensor and file, never
raised inside jit). The running totals are donated and updated in place: one dispatch per block,
no per-block result buffers.
Rows are sharded over a 1-D device mesh with ``shard_map``; a ``psum`` adds the devices' sums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from unmerge_jax.kernels.random import poisson1_weights
from unmerge_jax.kernels.stats import CHUNK_ROWS, ROW_AXIS

GROUP_CHUNKS = 16  # chunks per batched product of the point statistics (a cache-sized float64 copy)


@functools.partial(jax.jit, static_argnames=("n_dict",))
def row_block(staged, relative, n_valid, *, n_dict: int):
    """Task-vector rows of one staged block in row layout, for kernels that need ``(D, V)`` themselves
    (the signature sums of ``passes.signatures``); the statistics use :func:`staged_block_stats`.

    Args:
      staged: (1 + K + T, B) float32: base values, then each source's values at the block's rows.
      relative: (K + T,) bool, True where the source holds full weights (subtract the base).
      n_valid: () int, rows of the block that are real (the rest is zeroed).
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


def _task_values(blk, relative):
    """Task-vector entries (K + T, c) float32 of a staged chunk ``blk`` (1 + K + T, c)."""
    base, src = blk[0], blk[1:]
    return jnp.where(relative[:, None], src - base[None, :], src)


def _point_stats(vals, *, n_dict: int, compute_dtype):
    """``(DᵀD, DᵀV, ‖v‖²)`` float64 of one chunk of task-vector entries (K + T, c), and ``v²``."""
    hi = jax.lax.Precision.HIGHEST
    v = vals.astype(compute_dtype)
    prod = jnp.matmul(v[:n_dict], v.T, precision=hi).astype(jnp.float64)  # (K, K + T): one product
    ysq = jnp.square(v[n_dict:])
    return (prod[:, :n_dict], prod[:, n_dict:], jnp.sum(ysq, axis=1).astype(jnp.float64)), ysq


def _chunk_point_stats(staged, relative, chunk: int, *, n_dict: int, compute_dtype):
    """Per-chunk ``(DᵀD, DᵀV, ‖v‖²)`` float64 ((n, K, K), (n, K, T), (n, T)) of a staged block
    (1 + K + T, n · chunk), chunk ``c`` holding rows ``c·chunk … (c + 1)·chunk − 1``: one product
    batched over the chunks, each a sum over its own rows as :func:`_point_stats` forms it."""
    hi = jax.lax.Precision.HIGHEST
    n = staged.shape[1] // chunk
    group = max(g for g in range(1, min(n, GROUP_CHUNKS) + 1) if n % g == 0)  # chunks per product

    def products(start):  # (group, K, K + T) and (group, T) of the chunks from row `start` on
        v = _task_values(jax.lax.dynamic_slice_in_dim(staged, start, group * chunk, axis=1), relative)
        v = v.astype(compute_dtype).reshape(v.shape[0], group, chunk)  # (K + T, group, chunk)
        prod = jax.lax.dot_general(v[:n_dict], v, (((2,), (2,)), ((1,), (1,))), precision=hi)
        return prod.astype(jnp.float64), jnp.sum(jnp.square(v[n_dict:]), axis=2).astype(jnp.float64).T

    # Groups of chunks in turn keep the float64 copies cache-sized on long blocks.
    prod, ysq = jax.lax.map(products, group * chunk * jnp.arange(n // group, dtype=jnp.int64))
    prod, ysq = prod.reshape((n,) + prod.shape[2:]), ysq.reshape((n,) + ysq.shape[2:])
    return prod[:, :, :n_dict], prod[:, :, n_dict:], ysq


def _row_weighted_stats(vals, ysq, w, *, n_dict: int, compute_dtype):
    """Replicates of one chunk with per-row weights ``w`` (S, c): ``Σ_r w_sr (…)`` in one product."""
    hi = jax.lax.Precision.HIGHEST
    v = vals.astype(compute_dtype)
    wc = w.astype(compute_dtype)
    s, c = w.shape
    if n_dict:
        dw = (wc[:, None, :] * v[None, :n_dict]).reshape(s * n_dict, c)  # [w_1 d, …, w_S d]
        bprod = jnp.matmul(dw, v.T, precision=hi).astype(jnp.float64).reshape(s, n_dict, -1)
    else:  # no dictionary column (a block of target rows alone)
        bprod = jnp.zeros((s, 0, v.shape[0]), jnp.float64)
    btsq = jnp.matmul(wc, ysq.T, precision=hi).astype(jnp.float64)  # (S, T)
    return bprod[:, :, :n_dict], bprod[:, :, n_dict:], btsq, jnp.sum(w, axis=1).astype(jnp.float64)


def _local_block(staged, relative, n_valid, row_offset, key, *, n_dict: int, n_seeds: int, compute_dtype,
                 boot_block: int, unit_chunks: bool):
    """Statistics of this device's rows of a staged block (1 + K + T, r) whose rows past ``n_valid``
    are zero (the driver zeroes a short block's tail: zero rows add nothing, so no chunk is masked)."""
    r = staged.shape[1]
    first = jax.lax.axis_index(ROW_AXIS).astype(jnp.int64) * r  # this device's first row in the block
    chunk = min(CHUNK_ROWS, r)
    n_full = r // chunk
    main = n_full * chunk
    kw = dict(n_dict=n_dict, compute_dtype=compute_dtype)

    def chunk_stats(start, size, with_seeds):
        vals = _task_values(jax.lax.dynamic_slice_in_dim(staged, start, size, axis=1), relative)
        point, ysq = _point_stats(vals, **kw)
        if not with_seeds:
            return point
        rows = first + start + jnp.arange(size, dtype=jnp.int64)
        w = poisson1_weights(key, (row_offset + rows) // boot_block, n_seeds) * (rows < n_valid)  # (S, c)
        return (*point, *_row_weighted_stats(vals, ysq, w, **kw))

    starts = chunk * jnp.arange(n_full, dtype=jnp.int64)
    if unit_chunks or not n_seeds:
        # Each chunk's point statistics at once, as one batched product over the block's chunks
        # (a free reshape of the staged layout; on XLA:CPU several times faster than a scan of
        # per-chunk products). Every chunk inside one resampling unit: weight them per replicate
        # after (one weight per chunk, not S more products).
        per = _chunk_point_stats(staged[:, :main], relative, chunk, **kw)
        if not n_seeds:
            total = tuple(jnp.sum(p, axis=0) for p in per)
            if main < r:  # a remainder shorter than one chunk
                total = tuple(x + y for x, y in zip(total, chunk_stats(jnp.int64(main), r - main, False)))
            return total
        g = first + starts
        w = poisson1_weights(key, (row_offset + g) // boot_block, n_seeds).astype(jnp.float64)  # (S, n_chunks)
        n_in = jnp.clip(n_valid - g, 0, chunk).astype(jnp.float64)
        return (*(jnp.sum(p, axis=0) for p in per), *(jnp.tensordot(w, p, axes=1) for p in per), w @ n_in)

    per_row = bool(n_seeds)
    shapes = jax.eval_shape(lambda: chunk_stats(jnp.int64(0), chunk, per_row))
    zeros = tuple(jnp.zeros(a.shape, a.dtype) for a in shapes)
    total = jax.lax.scan(lambda acc, start: (tuple(a + b for a, b in zip(acc, chunk_stats(start, chunk, per_row))),
                                             None), zeros, starts)[0]
    if main < r:  # a remainder shorter than one chunk (never with unit_chunks)
        total = tuple(x + y for x, y in zip(total, chunk_stats(jnp.int64(main), r - main, per_row)))
    return total


@functools.lru_cache(maxsize=None)
def _compiled(mesh: Mesh, n_dict: int, n_seeds: int, compute_dtype: str, boot_block: int, unit_chunks: bool,
              targets_only: bool = False):
    cdt = jnp.dtype(compute_dtype)

    def local(staged, relative, n_valid, row_offset, key):
        if targets_only:  # D = 0: the statistics of the base and target rows alone, with no dictionary column
            staged = jnp.concatenate([staged[:1], staged[1 + n_dict:]], axis=0)
            relative = relative[n_dict:]
        total = _local_block(staged, relative, n_valid, row_offset, key, n_dict=0 if targets_only else n_dict,
                             n_seeds=n_seeds, compute_dtype=cdt, boot_block=boot_block, unit_chunks=unit_chunks)
        return tuple(jax.lax.psum(t, ROW_AXIS) for t in total)

    n_out = 7 if n_seeds else 3
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(None, ROW_AXIS), P(), P(), P(), P()),
                            out_specs=tuple(P() for _ in range(n_out)), check_vma=False)

    def step(staged, relative, n_valid, row_offset, key, total):
        part = sharded(staged, relative, n_valid, row_offset, key)
        if targets_only:  # only ‖v‖², its replicates and the replicates' row counts change
            part = tuple(jnp.zeros_like(t) if i in (0, 1, 3, 4) else p
                         for i, (t, p) in enumerate(zip(total, [None, None, part[2], None, None, *part[5:]])))
        # A NaN/Inf entry makes its column's Σ d² (or Σ v²) non-finite, and a NaN/Inf base entry
        # every relative column's: per input, whether this block holds one (base first).
        col_sq = jnp.concatenate([jnp.diagonal(part[0]), part[2]])
        bad_src = ~jnp.isfinite(col_sq)
        bad_base = jnp.all(bad_src | ~relative) & jnp.any(relative & bad_src)
        bad = jnp.concatenate([bad_base[None], bad_src & ~(bad_base & relative)]).astype(jnp.int32)
        if targets_only:  # the dictionary's totals pass through untouched (adding zeros would change nothing)
            return tuple(a if i in (0, 1, 3, 4) else a + b for i, (a, b) in enumerate(zip(total, part))), bad
        return tuple(a + b for a, b in zip(total, part)), bad

    return jax.jit(step, donate_argnums=(5,))


def zero_totals(n_dict: int, n_targets: int, n_seeds: int) -> tuple:
    """The running totals :func:`staged_block_stats` starts from: ``(G, C, ‖v‖²)`` zeros, and with
    replicates ``(G_s, C_s, ‖v‖²_s, n_s)``, float64 on the default device."""
    k, t, s = n_dict, n_targets, n_seeds
    shapes = [(k, k), (k, t), (t,)] + ([(s, k, k), (s, k, t), (s, t), (s,)] if s else [])
    return tuple(jnp.zeros(sh, jnp.float64) for sh in shapes)


def staged_block_stats(staged, relative, n_valid, row_offset, key, total, *, mesh: Mesh, n_dict: int, n_seeds: int,
                       compute_dtype: str = "float64", boot_block: int = 1, unit_chunks: bool = False,
                       targets_only: bool = False):
    """Add one staged block's statistics to the running totals (one dispatch; ``total`` is donated).

    Args:
      staged: (1 + K + T, B) float32 (NumPy, 64-byte aligned to be read in place, or a JAX array
        sharded ``P(None, "rows")``): base values, then each source's values at the block's rows.
      relative: (K + T,) bool, True where the source holds full weights (subtract the base).
      n_valid: rows of the block that are real; the rest must be zero.
      row_offset: global index of the block's first row (fixes the bootstrap weights).
      key: ``jax.random`` key of the replicates (any key when ``n_seeds == 0``).
      total: the running totals (:func:`zero_totals` for the first block); donated — use the
        returned ones.
      mesh: 1-D device mesh with axis ``"rows"``; B must be a multiple of its size.
      n_dict: K. n_seeds: S. compute_dtype: product dtype (see ``kernels.stats.block_stats``).
      boot_block: rows per resampling unit. unit_chunks: every chunk inside one unit
        (``kernels.stats.chunks_inside_units``): the cheap replicate path.
      targets_only: the block's dictionary rows are all zero (no dictionary entry touches its
        tensors): only ``‖v‖²``, its replicates and ``n_s`` are added, from the base and target
        rows alone (the dictionary rows are not read); G and C and their replicates pass through.

    Returns:
      ``(total, bad)``: the updated totals (as :func:`zero_totals`), and (1 + K + T,) int32 flags
      of the inputs holding a non-finite value in this block (base first: flagged when every
      relative source is non-finite, the sources' flags then cleared).
    """
    fn = _compiled(mesh, int(n_dict), int(n_seeds), jnp.dtype(compute_dtype).name, int(boot_block) if n_seeds else 1,
                   bool(unit_chunks), bool(targets_only))
    return fn(staged, relative, np.int64(n_valid), np.int64(row_offset), key, tuple(total))


# ----------------------------------------------------------------------------------------------
# float32-only path: exact products as float32 pairs, double-float32 sums
# ----------------------------------------------------------------------------------------------
# For backends without fast float64 (TPUs have none). Each float32 x is split (Veltkamp, factor
# 2^12 + 1) into x = x_hi + x_lo with 12 significant bits each, so every partial product of two
# halves is exact in float32 and Dekker's TwoProduct gives x·y = p + e exactly (p = fl(x·y)), as
# the Ozaki scheme does for emulated float64 GEMM. Sums are double-float32 (an unevaluated
# float32 pair h + l, ~48 significant bits) formed by a pairwise tree of TwoSum additions, so the
# result agrees with the float64 path to ~1e-14 of the largest statistic. Totals are carried as
# (h, l) pairs; the driver adds each pair in float64 once, where float64 is native.
SPLIT = 4097.0  # 2^12 + 1


def _split(x):
    s = x * jnp.float32(SPLIT)
    hi = s - (s - x)
    return hi, x - hi


def _two_product(a, b):
    """``a·b = p + e`` exactly (float32, no FMA): Dekker's TwoProduct on Veltkamp halves."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


def _dd_add(ah, al, bh, bl):
    """Double-float32 sum ``(ah + al) + (bh + bl)``, renormalised (TwoSum, then FastTwoSum)."""
    s = ah + bh
    v = s - ah
    e = (ah - (s - v)) + (bh - v)
    e = e + (al + bl)
    h = s + e
    return h, e - (h - s)


def _dd_sum(h, l, axis: int):
    """Double-float32 sum of pairs ``(h, l)`` along ``axis`` by a pairwise tree of :func:`_dd_add`."""
    h, l = jnp.moveaxis(h, axis, 0), jnp.moveaxis(l, axis, 0)
    while h.shape[0] > 1:
        if h.shape[0] % 2:
            pad = [(0, 1)] + [(0, 0)] * (h.ndim - 1)
            h, l = jnp.pad(h, pad), jnp.pad(l, pad)
        m = h.shape[0] // 2
        h, l = _dd_add(h[:m], l[:m], h[m:], l[m:])
    return h[0], l[0]


def _pairs(n_dict: int, n_targets: int):
    """Static (I, J) indices of the products: DᵀD and DᵀV entries (row-major), then each v_t²."""
    n = n_dict + n_targets
    rows = [(i, j) for i in range(n_dict) for j in range(n)] + [(t, t) for t in range(n_dict, n)]
    return tuple(i for i, _ in rows), tuple(j for _, j in rows)


def _dd_scale(w, h, l):
    """``w·(h + l)`` as a pair for small non-negative integer weights ``w`` (float32, < 2^12)."""
    p = w * h
    hh, hl = _split(h)
    return p, ((w * hh - p) + w * hl) + w * l


def _local_block_x2(staged, relative, n_valid, row_offset, key, *, n_dict: int, n_seeds: int, boot_block: int,
                    unit_chunks: bool):
    """:func:`_local_block` in float32 only: every statistic as a (h, l) double-float32 pair of the
    flattened products (P = K·(K + T) + T,), replicates (S, P); ``n_s`` as a pair too."""
    r = staged.shape[1]
    n_targets = staged.shape[0] - 1 - n_dict
    first = jax.lax.axis_index(ROW_AXIS).astype(jnp.int32) * r
    chunk = min(CHUNK_ROWS, r)
    n_full = r // chunk
    main = n_full * chunk
    I, J = _pairs(n_dict, n_targets)
    I, J = jnp.asarray(I), jnp.asarray(J)

    def chunk_terms(start, size):
        vals = _task_values(jax.lax.dynamic_slice_in_dim(staged, start, size, axis=1), relative)
        return _two_product(vals[I], vals[J])  # (P, c) exact products as pairs

    def row_weights(start, size):
        rows = first + start + jnp.arange(size, dtype=jnp.int32)
        units = (row_offset + rows.astype(jnp.int64)) // boot_block
        return (poisson1_weights(key, units, n_seeds) * (rows < n_valid)).astype(jnp.float32)  # (S, c)

    def chunk_stats(start, size, per_row):
        p, e = chunk_terms(start, size)
        point = _dd_sum(p, e, 1)
        if not per_row:
            return point
        w = row_weights(start, size)
        wp, we = _dd_scale(w[:, None, :], p[None], e[None])  # (S, P, c)
        boot = _dd_sum(wp, we, 2)
        n = _dd_sum(w, jnp.zeros_like(w), 1)
        return (*point, *boot, *n)

    starts = chunk * jnp.arange(n_full, dtype=jnp.int32)
    if unit_chunks:
        ph, pl = jax.lax.scan(lambda c, s: (c, chunk_stats(s, chunk, False)), None, starts)[1]  # (n_chunks, P)
        g = first + starts
        w = poisson1_weights(key, (row_offset + g.astype(jnp.int64)) // boot_block, n_seeds).astype(jnp.float32)
        point = _dd_sum(ph, pl, 0)
        boot = _dd_sum(*_dd_scale(w[:, :, None], ph[None], pl[None]), 1)  # (S, P)
        n_in = jnp.clip(n_valid - g, 0, chunk).astype(jnp.float32)
        n = _dd_sum(*_dd_scale(w, n_in[None], jnp.zeros_like(w)), 1)
        return (*point, *boot, *n)

    per_row = bool(n_seeds)
    shapes = jax.eval_shape(lambda: chunk_stats(jnp.int32(0), chunk, per_row))
    zeros = tuple(jnp.zeros(a.shape, a.dtype) for a in shapes)

    def add(acc, start):
        part = chunk_stats(start, chunk, per_row)
        return tuple(x for k in range(0, len(acc), 2) for x in _dd_add(acc[k], acc[k + 1], part[k], part[k + 1])), None

    total = jax.lax.scan(add, zeros, starts)[0]
    if main < r:
        part = chunk_stats(jnp.int32(main), r - main, per_row)
        total = tuple(x for k in range(0, len(total), 2)
                      for x in _dd_add(total[k], total[k + 1], part[k], part[k + 1]))
    return total


def _dd_psum(pairs):
    """Exact-order double-float32 sum of (h, l) pairs over the devices of the row axis."""
    out = []
    for k in range(0, len(pairs), 2):
        h, l = jax.lax.all_gather(pairs[k], ROW_AXIS), jax.lax.all_gather(pairs[k + 1], ROW_AXIS)
        out.extend(_dd_sum(h, l, 0))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _compiled_x2(mesh: Mesh, n_dict: int, n_targets: int, n_seeds: int, boot_block: int, unit_chunks: bool):
    def local(staged, relative, n_valid, row_offset, key):
        return _dd_psum(_local_block_x2(staged, relative, n_valid, row_offset, key, n_dict=n_dict, n_seeds=n_seeds,
                                        boot_block=boot_block, unit_chunks=unit_chunks))

    n_out = 6 if n_seeds else 2
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(None, ROW_AXIS), P(), P(), P(), P()),
                            out_specs=tuple(P() for _ in range(n_out)), check_vma=False)
    n_in = n_dict + n_targets

    def step(staged, relative, n_valid, row_offset, key, total):
        part = sharded(staged, relative, n_valid, row_offset, key)
        h = part[0]
        col_sq = jnp.concatenate([h[: n_dict * n_in].reshape(n_dict, n_in)[jnp.arange(n_dict), jnp.arange(n_dict)],
                                  h[n_dict * n_in:]])
        bad_src = ~jnp.isfinite(col_sq)
        bad_base = jnp.all(bad_src | ~relative) & jnp.any(relative & bad_src)
        bad = jnp.concatenate([bad_base[None], bad_src & ~(bad_base & relative)]).astype(jnp.int32)
        new = tuple(x for k in range(0, len(total), 2) for x in _dd_add(total[k], total[k + 1], part[k], part[k + 1]))
        return new, bad

    return jax.jit(step, donate_argnums=(5,))


def zero_totals_x2(n_dict: int, n_targets: int, n_seeds: int) -> tuple:
    """Zero running totals of the float32-only path: (h, l) pairs of the P products, and with
    replicates of the (S, P) replicate products and the (S,) row-weight sums."""
    p = n_dict * (n_dict + n_targets) + n_targets
    shapes = [(p,)] + ([(n_seeds, p), (n_seeds,)] if n_seeds else [])
    return tuple(jnp.zeros(sh, jnp.float32) for sh in shapes for _ in range(2))


def staged_block_stats_x2(staged, relative, n_valid, row_offset, key, total, *, mesh: Mesh, n_dict: int,
                          n_seeds: int, boot_block: int = 1, unit_chunks: bool = False):
    """:func:`staged_block_stats` in float32 arithmetic only (exact products, double-float32 sums).

    Totals are :func:`zero_totals_x2` pairs; :func:`totals_x2_to_float64` turns them into the
    float64 statistics. Arguments and ``bad`` as :func:`staged_block_stats`.
    """
    n_targets = staged.shape[0] - 1 - int(n_dict)
    fn = _compiled_x2(mesh, int(n_dict), n_targets, int(n_seeds), int(boot_block) if n_seeds else 1,
                      bool(unit_chunks))
    return fn(staged, relative, np.int32(n_valid), np.int64(row_offset), key, tuple(total))


def totals_x2_to_float64(total, n_dict: int, n_targets: int, n_seeds: int) -> tuple:
    """The float64 ``(G, C, ‖v‖²[, G_s, C_s, ‖v‖²_s, n_s])`` of float32-only totals (host NumPy:
    each pair added once in float64)."""
    k, n = n_dict, n_dict + n_targets
    f = [np.asarray(total[i], np.float64) + np.asarray(total[i + 1], np.float64) for i in range(0, len(total), 2)]

    def split(prod):  # (..., P) → G (..., K, K), C (..., K, T), ‖v‖² (..., T)
        m = prod[..., : k * n].reshape(prod.shape[:-1] + (k, n))
        return m[..., :k], m[..., k:], prod[..., k * n:]

    out = split(f[0])
    if n_seeds:
        out = (*out, *split(f[1]), f[2])
    return out
