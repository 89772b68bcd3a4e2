"""Per-block sufficient-statistics kernel: ``DᵀD``, ``DᵀV``, ``‖v‖²`` and bootstrap replicates.

One jit-compiled program per (rows, K, T, seeds, dtype, mesh) computes the float64 statistics of
a block of parameter rows. Rows are sharded over a 1-D device mesh with ``shard_map``; each device
reduces its rows and a ``psum`` adds the partial sums, so the result does not depend on the number
of devices (up to float64 summation order, ~1e-15 relative).

Bootstrap weights are Poisson(1) draws that depend only on ``(key, resampling unit, seed)``, where
a unit is ``row // boot_block`` for a global row index: not on the block or tensor boundaries, so
streaming a checkpoint tensor by tensor and computing the statistics of the dense concatenation
give the same replicates. ``boot_block = 1`` is the classic per-row bootstrap; a unit of
``CHUNK_ROWS`` rows lets the kernel weight each chunk's products once instead of recomputing
them per replicate (see ``unmerge_jax.stats.bootstrap_unit_rows``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unmerge_jax.kernels.random import poisson1_weights

ROW_AXIS = "rows"

def row_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of the default backend)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (ROW_AXIS,))


# Rows per scan step: the float64 copy of a chunk stays in cache, so the pass runs near the
# speed of a float32 GEMM instead of streaming a float64 copy of the whole block through memory
# (measured 0.09 s instead of 0.56 s for 1M×(8+72) rows on 2 CPU cores).
CHUNK_ROWS = 4096


def _chunk_stats(d, v, start, n_valid, row_offset, key, *, n_seeds: int, compute_dtype, boot_block: int = 1):
    """Statistics of one chunk of rows, float64 sums, replicates with per-row unit weights.

    ``start`` is the chunk's first row within the block, ``n_valid`` the block's valid rows (rows
    at or past it are padding and must be zero), ``row_offset`` the block's first global row.
    """
    hi = jax.lax.Precision.HIGHEST
    k = d.shape[1]
    x = d.astype(compute_dtype)
    xy = jnp.concatenate([x, v.astype(compute_dtype)], axis=1)  # (r, K+T): one GEMM, Gram and cross terms
    prod = jnp.matmul(x.T, xy, precision=hi).astype(jnp.float64)
    ysq = jnp.square(xy[:, k:])
    out = (prod[:, :k], prod[:, k:], jnp.sum(ysq, axis=0).astype(jnp.float64))
    if not n_seeds:
        return out
    local = start + jnp.arange(x.shape[0], dtype=jnp.int64)
    w = poisson1_weights(key, (row_offset + local) // boot_block, n_seeds) * (local < n_valid)  # (S, r)
    wc = w.astype(compute_dtype)
    # [w_1 x, …, w_S x]ᵀ [x y]: every replicate's products in one GEMM.
    xw = (wc[:, :, None] * x[None]).transpose(1, 0, 2).reshape(x.shape[0], -1)
    bprod = jnp.matmul(xw.T, xy, precision=hi).astype(jnp.float64).reshape(n_seeds, k, -1)
    btsq = jnp.matmul(wc, ysq, precision=hi).astype(jnp.float64)  # (S, T)
    return (*out, bprod[:, :, :k], bprod[:, :, k:], btsq, jnp.sum(w, axis=1).astype(jnp.float64))


def _block_totals(take, rows: int, first, *, n_valid, row_offset, key, n_seeds: int, compute_dtype, boot_block: int,
                  unit_chunks: bool):
    """Statistics of ``rows`` rows scanned in cache-sized chunks (no cross-device reduction).

    ``take(i, size)`` returns the (d, v) rows ``i … i+size`` of these rows; ``first`` is their first
    row within the block. Each chunk is sliced inside the scan (the scan copies every chunk into
    cache anyway), so nothing is padded or copied to a chunk multiple; a remainder (< one chunk)
    is one more smaller call. Row indices and the padding mask come from scalars, not arrays.

    With ``unit_chunks`` (every chunk inside one bootstrap unit) the scan emits each chunk's point
    statistics and the replicates are weighted sums of them after the loop: one weight per chunk,
    drawn for all chunks at once, instead of S more products per chunk.
    """
    kw = dict(n_valid=n_valid, row_offset=row_offset, key=key, compute_dtype=compute_dtype, boot_block=boot_block)
    chunk = min(CHUNK_ROWS, rows)
    n_full = rows // chunk
    main = n_full * chunk
    local = chunk * jnp.arange(n_full, dtype=jnp.int64)

    def stats_of(i, n_seeds):
        return _chunk_stats(*take(i, chunk), first + i, n_seeds=n_seeds, **kw)

    if unit_chunks and n_seeds:
        per = jax.lax.scan(lambda carry, i: (carry, stats_of(i, 0)), None, local)[1]  # each (n_chunks, ...)
        starts = first + local
        w = poisson1_weights(key, (row_offset + starts) // boot_block, n_seeds).astype(jnp.float64)  # (S, n_chunks)
        valid = jnp.clip(n_valid - starts, 0, chunk).astype(jnp.float64)
        total = (*(jnp.sum(p, axis=0) for p in per), *(jnp.tensordot(w, p, axes=1) for p in per), w @ valid)
    else:
        zeros = tuple(jnp.zeros(a.shape, a.dtype) for a in jax.eval_shape(lambda: stats_of(local[0], n_seeds)))
        total = jax.lax.scan(lambda acc, i: (tuple(a + b for a, b in zip(acc, stats_of(i, n_seeds))), None),
                             zeros, local)[0]
    if main < rows:  # never with unit_chunks: rows are then chunk multiples
        rest = _chunk_stats(*take(jnp.int64(main), rows - main), first + main, n_seeds=n_seeds, **kw)
        total = tuple(x + y for x, y in zip(total, rest))
    return total


def _local_stats(d, v, n_valid, row_offset, key, **static):
    """Statistics of this device's rows (no cross-device reduction): :func:`_block_totals`."""
    r = d.shape[0]
    first = jax.lax.axis_index(ROW_AXIS).astype(jnp.int64) * r  # this device's first row in the block
    chunk = min(CHUNK_ROWS, r)
    main = r - r % chunk
    # Whole chunks as a free reshape, indexed along its leading axis (the remainder is sliced).
    dm, vm = d[:main].reshape(-1, chunk, d.shape[1]), v[:main].reshape(-1, chunk, v.shape[1])

    def take(i, size):
        if size == chunk:
            return (jax.lax.dynamic_index_in_dim(dm, i // chunk, keepdims=False),
                    jax.lax.dynamic_index_in_dim(vm, i // chunk, keepdims=False))
        return d[main:], v[main:]

    return _block_totals(take, r, first, n_valid=n_valid, row_offset=row_offset, key=key, **static)


@functools.lru_cache(maxsize=None)
def _compiled_block_stats(mesh: Mesh, n_seeds: int, compute_dtype: str, boot_block: int, unit_chunks: bool):
    """jit(shard_map(local stats) + psum) for one mesh / seed count / dtype / bootstrap layout."""
    cdt = jnp.dtype(compute_dtype)

    def local(d, v, n_valid, row_offset, key):
        parts = _local_stats(d, v, n_valid, row_offset, key, n_seeds=n_seeds, compute_dtype=cdt,
                             boot_block=boot_block, unit_chunks=unit_chunks)
        return tuple(jax.lax.psum(p, ROW_AXIS) for p in parts)

    n_out = 7 if n_seeds else 3
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(ROW_AXIS), P(ROW_AXIS), P(), P(), P()),
        out_specs=tuple(P() for _ in range(n_out)),
        check_vma=False,
    )
    return jax.jit(sharded)


def _flat_local_stats(d_flat, d_shift, v_flat, v_shift, n_valid, row_offset, key, *, rows: int, **static):
    """:func:`_block_totals` of a block handed over as two flat buffers, each starting ``shift`` entries early.

    Each chunk is sliced out of the flat buffer inside the scan, so a misaligned host block needs
    no staging copy: the caller passes the aligned address at or before it.
    """
    k = (d_flat.shape[0] - FLAT_PAD[d_flat.dtype.itemsize]) // rows
    t = (v_flat.shape[0] - FLAT_PAD[v_flat.dtype.itemsize]) // rows

    def take(i, size):
        d = jax.lax.dynamic_slice(d_flat, (d_shift + i * k,), (size * k,)).reshape(size, k)
        v = jax.lax.dynamic_slice(v_flat, (v_shift + i * t,), (size * t,)).reshape(size, t)
        return d, v

    return _block_totals(take, rows, jnp.int64(0), n_valid=n_valid, row_offset=row_offset, key=key, **static)


# Entries a flat buffer carries beyond rows × columns, by item size: room for a shift of up to one
# alignment unit.
FLAT_PAD = {4: 16, 8: 8, 2: 32}


@functools.lru_cache(maxsize=None)
def _compiled_flat_stats(rows: int, n_seeds: int, compute_dtype: str, boot_block: int, unit_chunks: bool,
                         accumulate: bool):
    local = functools.partial(_flat_local_stats, rows=rows, n_seeds=n_seeds, compute_dtype=jnp.dtype(compute_dtype),
                              boot_block=boot_block, unit_chunks=unit_chunks)
    if not accumulate:
        return jax.jit(local)

    def add_to(d_flat, d_shift, v_flat, v_shift, n_valid, row_offset, key, total):
        part = local(d_flat, d_shift, v_flat, v_shift, n_valid, row_offset, key)
        return tuple(a + b for a, b in zip(total, part))

    # The running total is updated in place: no extra dispatch or buffer per block.
    return jax.jit(add_to, donate_argnums=(7,))


def flat_block_stats(d_flat, d_shift: int, v_flat, v_shift: int, *, rows: int, row_offset: int, n_seeds: int, key,
                     device, compute_dtype="float64", n_valid: int | None = None, boot_block: int = 1,
                     total=None, run=None):
    """``block_stats`` on one device for a block given as flat host buffers (zero-copy on CPU).

    Args:
      d_flat: 1-D buffer of ``rows·K + FLAT_PAD`` entries whose data starts on a 64-byte boundary;
        the block's (rows, K) row-major entries start at entry ``d_shift``.
      v_flat, v_shift: the same for the (rows, T) targets.
      rows: rows in the block (static: one program per block size).
      device: the device to run on.
      total: optional running sums (the float arrays of a previous call's result, in order, without
        ``n_rows``); they are added to inside the program and their buffers donated (do not reuse
        them).
      run: optional ``run(program, name, args, donate=positions)`` that calls the jitted program
        on ``args`` (the driver passes its compiled-program cache; ``name`` is stable and names
        the program's static configuration; ``donate`` the donated positions). Default: call it.
      Other arguments as :func:`block_stats`.

    Returns:
      as :func:`block_stats` (this block's sums plus ``total``; ``n_rows`` is this block's).
    """
    n_valid = rows if n_valid is None else int(n_valid)
    if key is None:
        key = jax.random.key(0)
    unit_chunks = chunks_inside_units(n_seeds, boot_block, int(row_offset), rows)
    fn = _compiled_flat_stats(rows, int(n_seeds), jnp.dtype(compute_dtype).name, boot_block if n_seeds else 1,
                              unit_chunks, total is not None)
    placed = device != jax.devices()[0] or jax.config.jax_default_device is not None
    if placed:
        # jit puts host arguments on the default device itself (faster than device_put); only
        # another device needs them placed explicitly.
        d_flat, v_flat = jax.device_put(d_flat, device), jax.device_put(v_flat, device)
    args = (d_flat, np.int64(d_shift), v_flat, np.int64(v_shift), np.int64(n_valid), np.int64(row_offset), key)
    if total is not None:
        args = (*args, tuple(total))
    if placed or run is None:
        out = fn(*args)
    else:  # on the default device, through the caller's runner (the driver's compiled-program cache)
        name = f"flat_block_stats:{rows}:{int(n_seeds)}:{jnp.dtype(compute_dtype).name}:{boot_block}:{unit_chunks}"
        out = run(fn, name + (":add" if total is not None else ""), args, donate=(7,) if total is not None else ())
    return (*out[:3], np.int64(n_valid), *out[3:])


def chunks_inside_units(n_seeds: int, boot_block: int, row_offset: int, device_rows: int) -> bool:
    """Whether every scan chunk of a block lies inside one bootstrap unit (the cheap replicate path).

    True when there are replicates, units are whole chunks (``boot_block`` a multiple of
    ``CHUNK_ROWS``) and both the block's first global row and each device's share of rows are
    chunk multiples, so chunk starts fall on chunk boundaries of the global row index.
    """
    return bool(n_seeds) and boot_block % CHUNK_ROWS == 0 and row_offset % CHUNK_ROWS == 0 \
        and device_rows % CHUNK_ROWS == 0


def block_stats(d, v, *, row_offset: int, n_seeds: int, key, mesh: Mesh, compute_dtype="float64",
                pad_to: int | None = None, n_valid: int | None = None, boot_block: int = 1):
    """Float64 statistics of one block of rows, rows sharded over ``mesh``.

    Args:
      d: (r, K) dictionary rows (any float dtype; NumPy or JAX). A C-contiguous NumPy block that
        is 64-byte aligned is used in place (zero-copy on CPU); see ``stats.gram_stats``.
      v: (r, T) target rows.
      row_offset: global index of the block's first row (fixes the bootstrap weights).
      n_seeds: number of Poisson(1) bootstrap replicates S (0 for none).
      key: ``jax.random`` key for the replicates (ignored when ``n_seeds == 0``).
      mesh: 1-D device mesh with axis ``"rows"``.
      compute_dtype: dtype of the block products. float64 (default) makes every product of
        float32 inputs exact and the sums accurate to ~1e-16·√r; float32 (HIGHEST precision)
        multiplies in float32 and sums each 4,096-row chunk's products in float64: about twice
        as fast on CPU and much faster on accelerators without fast float64, good to ~1e-7.
      pad_to: pad the block to this many rows (zero rows add nothing) so blocks of different
        sizes reuse one compiled program. Default: next multiple of the device count.
      n_valid: rows of ``d``/``v`` that hold data (default: all); the rest must be zero. Lets a
        caller hand over a zero-padded staging buffer without slicing it.
      boot_block: rows per bootstrap resampling unit (1 = per-row weights). When it is a multiple
        of ``CHUNK_ROWS`` and the block and every device's share start on a chunk boundary, each
        chunk's products are computed once and weighted per replicate (the replicates cost almost
        nothing); otherwise every row gets its unit's weight (same values, four products).

    Returns:
      tuple (gram (K,K), cross (K,T), target_sq (T,), n_rows) and, with seeds,
      (boot_gram (S,K,K), boot_cross (S,K,T), boot_target_sq (S,T), boot_n_rows (S,)).
    """
    r = d.shape[0]
    n_valid = r if n_valid is None else int(n_valid)
    n_dev = mesh.devices.size
    target = r if pad_to is None else max(pad_to, r)
    target = -(-target // n_dev) * n_dev
    d = np.asarray(d) if not isinstance(d, jax.Array) else d
    v = np.asarray(v) if not isinstance(v, jax.Array) else v
    if target != r:
        pad = target - r
        d = jnp.pad(d, ((0, pad), (0, 0))) if isinstance(d, jax.Array) else np.pad(d, ((0, pad), (0, 0)))
        v = jnp.pad(v, ((0, pad), (0, 0))) if isinstance(v, jax.Array) else np.pad(v, ((0, pad), (0, 0)))
    shard = NamedSharding(mesh, P(ROW_AXIS))
    d, v = jax.device_put(d, shard), jax.device_put(v, shard)
    if key is None:
        key = jax.random.key(0)
    boot_block = int(boot_block)
    if boot_block < 1:
        raise ValueError(f"boot_block must be >= 1, got {boot_block}")
    unit_chunks = chunks_inside_units(n_seeds, boot_block, int(row_offset), target // n_dev)
    fn = _compiled_block_stats(mesh, int(n_seeds), jnp.dtype(compute_dtype).name, boot_block if n_seeds else 1,
                               unit_chunks)
    out = fn(d, v, np.int64(n_valid), np.int64(row_offset), key)
    n_rows = np.int64(n_valid)
    return (*out[:3], n_rows, *out[3:])
