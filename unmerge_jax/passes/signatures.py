"""Merge-method signature sums accumulated inside the checkpoint statistics pass.

:class:`SignatureAccumulator` is the one object the statistics pass (``passes.statistics``) calls
beside the Gram kernel: per staged block, :meth:`~SignatureAccumulator.add` runs the jit kernel
``kernels.signatures.signature_block_sums`` on the same device block (``D`` B × K, ``V`` B × T),
so the :class:`~unmerge_jax.attribution.signatures.SignatureStats` cost no second read of the
weights. The result equals ``attribution.signature_stats`` of the dense columns (``dense_columns``,
``groups=io.names.group_ids`` of the tensors) to float64 rounding.

The TIES sums need each tensor's trimming thresholds ``θ_k(ρ)`` — the k-th largest ``|d_k|`` of the
*whole* tensor (``attribution.trim_thresholds``). They come from the top-k mask pass, which reads
every dictionary tensor in full (``build_selection(..., densities=...)`` stores them in the
selection), or, for tensors it did not see (the full pass, a reused mask file), from the
statistics pass's own reading of the tensor before its rows are staged
(:meth:`~SignatureAccumulator.from_reading`).

On passes of more than :data:`TIES_MAX_ROWS` rows (a full model) the TIES sums take every s-th
unit of ``TIES_UNIT_ROWS`` rows (``ties_stride``; the zero sums take every row): they cost
O(P·T·K²) per row, the Gram statistics O(K·(K + T)).

The per-group Gram sums ``group_gram_g = Σ_{r ∈ g} d_r d_rᵀ``, ``group_cross_g = Σ_{r ∈ g} d_r v_rᵀ``
(g the (layer, module) group of the row's tensor, ``io.names.group_ids`` of the pass's
tensors in row order) follow the TIES row sampling: they take exactly the rows the TIES sums take
(every row when ``ties_stride`` is 1). The kernel sums them per tensor slot of a block and adds
each slot into its group's running ``(K, K + T)`` sums on the device.

Several processes (``jax.distributed``): each process reads whole tensors (a contiguous share,
``passes.mask.share``), so the thresholds it computes from its own reading are those of the whole
tensor, as in one process; the mask pass shares tensors by size and the statistics pass by kept
rows, so the mask pass's thresholds are exchanged first (:func:`gather_thresholds`: P × K numbers
per tensor). Each process accumulates the sums of its rows (with their global offsets, which fix
the TIES row units) on its local devices, and :func:`sum_over_processes` adds them up: they are
sums, so the total equals one process's to float64 rounding and the counts exactly.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unmerge_jax.attribution.signatures import (DENSITY_GRID, SignatureStats, _check_densities, trim_thresholds)
from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.names import group_ids
from unmerge_jax.kernels.signatures import TIES_UNIT_ROWS, signature_block_sums
from unmerge_jax.kernels.stats import row_mesh

MIN_TABLE = 8  # tensors per block's threshold table, padded to a power of two ≥ this (few programs)
# Rows the TIES sums take at most (about): above it they take every s-th unit of rows
# (kernels.signatures, TIES_UNIT_ROWS); the paper's compressed problems (1M rows) take them all.
TIES_MAX_ROWS = 1 << 20


def ties_stride(n_rows: int, max_rows: int | None = None) -> int:
    """Every how many ``TIES_UNIT_ROWS``-row units the TIES sums take for a pass of ``n_rows`` rows:
    1 up to ``max_rows`` (default :data:`TIES_MAX_ROWS`), then ``⌈n_rows / max_rows⌉``."""
    cap = TIES_MAX_ROWS if max_rows is None else int(max_rows)
    return max(1, -(-int(n_rows) // max(cap, TIES_UNIT_ROWS)))


def delta_thresholds(flats, base_flat, relative, densities) -> np.ndarray:
    """(P, K) trimming thresholds of one tensor from the pass's reading of it.

    Args:
      flats: K flat arrays of the dictionary sources (stored dtype; None = untouched, all zero).
      base_flat: the base's flat tensor (needed where ``relative``).
      relative: K bools: the source holds full weights (task vector = value − base, in float32,
        as the row kernel forms it).
      densities: (P,).
    """
    dens = _check_densities(densities)
    out = np.zeros((dens.size, len(flats)), np.float32)
    for j, (a, rel) in enumerate(zip(flats, relative)):
        if a is None:
            continue
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite values are named by the pass
            d = a.astype(np.float32) - base_flat.astype(np.float32) if rel else np.asarray(a, np.float32)
        out[:, j] = trim_thresholds([d], dens)[:, 0]  # the signed values: |d| is taken chunk by chunk
    return out


class SignatureAccumulator:
    """Running :class:`SignatureStats` of the blocks of one statistics pass.

    Args:
      selection: the pass's :class:`~unmerge_jax.passes.mask.Selection` (fixes the row layout).
      n_dict, n_targets: K and T.
      densities: the TIES densities of the sums.
      devices: the devices the pass shards rows over (default: this process's devices).
      thresholds: ``{tensor: (P, K)}`` known already (default: the selection's own, when the mask
        pass computed them at these densities); the others are given with :meth:`from_reading`
        before their rows are staged.
    """

    def __init__(self, selection, n_dict: int, n_targets: int, densities: Sequence[float] = DENSITY_GRID,
                 devices=None, thresholds: dict | None = None):
        self.densities = _check_densities(densities)
        self.n_dict, self.n_targets = int(n_dict), int(n_targets)
        self.mesh = row_mesh(jax.local_devices() if devices is None else devices)
        offsets = selection.offsets()
        self.names = [n for n in selection.names if selection.rows(n)]
        self.starts = np.asarray([offsets[n] for n in self.names], np.int64)
        self.groups = group_ids(self.names).astype(np.int32)  # per tensor, its (layer, module) group
        self.n_groups = int(self.groups.max()) + 1 if self.groups.size else 1
        if thresholds is None and selection.threshold_densities is not None and \
                np.array_equal(np.asarray(selection.threshold_densities, np.float64), self.densities):
            thresholds = selection.thresholds  # from the mask pass, at these densities
        self.thresholds = {n: np.asarray(t, np.float32) for n, t in (thresholds or {}).items()}
        self.total = None
        self.n_rows = 0
        self.ties_stride = ties_stride(selection.n_rows)
        self._pos = {n: (int(offsets[n]), int(selection.rows(n))) for n in self.names}

    def needs(self, name) -> bool:
        """Whether tensor ``name``'s thresholds must still be computed from the pass's reading.

        Not for a tensor none of whose rows the TIES sums take (``ties_stride`` > 1 and no sampled
        unit inside its rows): its thresholds are never compared with, so they are set to zero
        without reading the tensor whole — the sums are the same bits."""
        if name in self.thresholds:
            return False
        if not self._ties_takes(name):
            self.thresholds[name] = np.zeros((self.densities.size, self.n_dict), np.float32)
            return False
        return True

    def _ties_takes(self, name) -> bool:
        """Whether some global row of ``name`` lies in a unit the TIES sums take (``kernels.signatures``)."""
        pos = self._pos.get(name)
        if pos is None:
            return True
        start, rows = pos
        if self.ties_stride == 1 or rows == 0:
            return rows > 0
        first, last = start // TIES_UNIT_ROWS, (start + rows - 1) // TIES_UNIT_ROWS
        return (last // self.ties_stride) * self.ties_stride >= first

    def from_reading(self, name, flats, base_flat, relative) -> None:
        """Thresholds of ``name`` from its K dictionary arrays as read (see :func:`delta_thresholds`)."""
        self.thresholds[name] = delta_thresholds(flats, base_flat, relative, self.densities)

    def add(self, D, V, row_offset: int, n_valid: int) -> None:
        """Add the sums of the block of global rows ``row_offset … row_offset + n_valid``.

        ``D`` (B, K) and ``V`` (B, T) are the row kernel's device arrays (rows past ``n_valid``
        zero), B a multiple of the device count.
        """
        if n_valid <= 0:
            return
        first = int(np.searchsorted(self.starts, row_offset, side="right")) - 1
        stop = int(np.searchsorted(self.starts, row_offset + n_valid, side="left"))
        names = self.names[max(first, 0):stop]
        missing = [n for n in names if n not in self.thresholds]
        if missing:  # a bug of the caller, not of the input
            raise UnmergeError(f"signature statistics: no trimming thresholds for tensor {missing[0]}")
        rows = int(D.shape[0])
        size = max(MIN_TABLE, 1 << (len(names) - 1).bit_length())
        starts = np.full(size, rows, np.int64)
        starts[:len(names)] = np.maximum(self.starts[max(first, 0):stop] - row_offset, 0)
        table = np.zeros((size, self.densities.size, self.n_dict), np.float64)
        table[:len(names)] = np.stack([self.thresholds[n] for n in names])
        slot_group = np.zeros(size, np.int32)  # padding slots hold no rows: any group
        slot_group[:len(names)] = self.groups[max(first, 0):stop]
        self.total = signature_block_sums(D, V, jnp.asarray(starts), jnp.asarray(table), jnp.asarray(slot_group),
                                          mesh=self.mesh, n_groups=self.n_groups, row_offset=row_offset,
                                          ties_stride=self.ties_stride, total=self.total)
        self.n_rows += int(n_valid)

    def count(self, n_valid: int) -> None:
        """Count a block of ``n_valid`` rows that no dictionary source touches (``D = 0``): each of its
        rows is inactive and its TIES vector ``x`` and ``d_r [d_r, v_r]ᵀ`` are zero, so it adds nothing
        to any sum — only to the row count. The statistics pass calls this instead of :meth:`add` for such blocks."""
        self.n_rows += int(max(n_valid, 0))

    def result(self) -> SignatureStats:
        """The accumulated :class:`SignatureStats` (host float64 NumPy)."""
        k, t, p, g = self.n_dict, self.n_targets, self.densities.size, self.n_groups
        if self.total is None:
            parts = [np.float64(0), np.zeros(t), np.zeros((k, t)), np.zeros((p, t, 2 * k, 2 * k)), np.zeros((g, k, k + t))]
        else:
            parts = [np.asarray(x, np.float64) for x in self.total]
        n_active, zero_count, zero_energy, ties, groups = parts
        groups = groups[:g]  # the kernel pads the group axis (kernels.signatures.padded_groups)
        return SignatureStats(self.densities, np.float64(self.n_rows), np.float64(n_active), zero_count, zero_energy,
                              ties[:, :, :k, :k], ties[:, :, :k, k:], ties[:, :, k:, k:],
                              np.ascontiguousarray(groups[:, :, :k]), np.ascontiguousarray(groups[:, :, k:]))


def gather_thresholds(thresholds: dict, names, n_dict: int, densities) -> dict:
    """Every process's ``{tensor: (P, K)}`` trimming thresholds (``Selection.thresholds`` of the mask
    pass, which covers this process's share of ``names``), for every process: an all-gather of
    ``len(names) × P × K`` float32 numbers and a flag per tensor. A tensor no process computed stays
    missing (the statistics pass then computes it from its reading)."""
    from jax.experimental import multihost_utils as mu

    dens = _check_densities(densities)
    table = np.zeros((len(names), dens.size, int(n_dict)), np.float32)
    have = np.zeros(len(names), np.int32)
    for i, n in enumerate(names):
        if n in thresholds:
            table[i], have[i] = np.asarray(thresholds[n], np.float32), 1
    tables, haves = (np.asarray(x) for x in mu.process_allgather((table, have)))
    out = {}
    for i, n in enumerate(names):
        hit = np.flatnonzero(haves[:, i])
        if hit.size:  # exactly one process read the tensor whole in the mask pass
            out[n] = tables[hit[0], i]
    return out


def sum_over_processes(sig: SignatureStats) -> SignatureStats:
    """The sums of every ``jax.distributed`` process's :class:`SignatureStats`, added in process
    order (float64; every process gets the total), every field — the per-group sums included (every
    process has the same tensors, so the same groups). The density grids must agree."""
    from jax.experimental import multihost_utils as mu

    leaves = [np.asarray(x, np.float64) for x in sig]
    gathered = [np.asarray(g) for g in mu.process_allgather(leaves)]
    if not np.all(gathered[0] == gathered[0][:1]):
        raise UnmergeError(f"the processes accumulated signature sums at different TIES densities "
                           f"{gathered[0].tolist()}; give every process the same options")
    return SignatureStats(leaves[0], *(np.sum(g, axis=0) for g in gathered[1:]))
