"""Merge-method signatures: per-block statistics a single streaming pass can accumulate.

Beside the Gram statistics (``G = DᵀD``, ``C = DᵀV``, ``‖v‖²``), the decisions of
:mod:`unmerge_jax.attribution` read a few more sums over the parameter rows ``r``; each is a
function of one row block ``(D_block, V_block)`` and the sum of two disjoint row sets' values is
the value of their union (:func:`add_signatures`), so a pass accumulates them block by block.

**Exact zeros.** A merged target leaves an entry exactly at the base where every model it holds
was trimmed (TIES) or dropped (DARE); task arithmetic and linear merges of dense fine-tunes leave
none. Over the *active* rows (some dictionary entry ``d_kr ≠ 0``)::

    zero_count_t     = #{r active : v_rt = 0}                         (T,)
    zero_energy_kt   = Σ_{r active, v_rt = 0} d_kr²                   (K, T)

DARE drops entries whatever their size, so ``zero_energy_kt / G_kk ≈ zero_count_t / n_active``
for every entry; TIES trims the smallest magnitudes, so for the entries it holds that ratio is
far below the zero fraction.

**TIES consistency.** TIES (``normalize``, mergekit's default) sets every entry to the weighted
mean of the trimmed task vectors that agree with the elected sign, scaled by λ:
``v_r = λ Σ_k w_k e_kr d_kr / Σ_k w_k e_kr`` with ``e_kr = [|d_kr| ≥ θ_k(ρ)]·[sign d_kr = sign v_r]``
(``θ_k(ρ)`` the per-tensor trimming threshold of entry k at density ρ; the elected sign is the sign
of ``v_r`` itself wherever ``v_r ≠ 0``). Multiplying out, the true weights solve, row by row,

    Σ_k w_k x_kr = 0,    x_kr = e_kr (λ d_kr − v_r)

(where ``v_r = 0`` the mask is ``|d_kr| ≥ θ_k`` alone, so an entry kept there violates the
equation). So for each density ρ on a grid the pass accumulates, per target, three K×K sums of
the masked rows ``a_r = e_r ∘ d_r`` and ``b_r = e_r v_r``::

    ties_dd = Σ_r a_r a_rᵀ,   ties_dv = Σ_r a_r b_rᵀ,   ties_vv = Σ_r b_r b_rᵀ      (P, T, K, K)

and ``Q(λ) = λ² ties_dd − λ (ties_dv + ties_dvᵀ) + ties_vv`` is the Gram matrix of the equation
residuals ``X w``: ``wᵀQw = 0`` exactly for a TIES merge of the dictionary entries (up to float32
rounding), and ``wᵀQw / wᵀ ties_vv w`` is the share of the target that TIES of these entries at
this density cannot produce (:func:`unmerge_jax.attribution.ties.ties_fit`).

Thresholds ``θ_k(ρ)`` are per tensor and need the whole dictionary tensor, not the rows a
compressed problem keeps (:func:`trim_thresholds`): a pass gets them from the dictionary alone,
e.g. in the compression pass, which reads every dictionary tensor in full anyway.

**Per-group Gram sums.** Content merged from entry k enters every (layer, module) group the entry
touches with the same weight; an outside fine-tune that merely *projects* onto k does so with a
coefficient that changes from group to group. So the pass also keeps, per group g of tensors
(``io.names.parse_tensor_name(name).group``; one group for array inputs)::

    group_gram_g  = Σ_{r ∈ g} d_r d_rᵀ      (G, K, K)
    group_cross_g = Σ_{r ∈ g} d_r v_rᵀ      (G, K, T)

over the rows the TIES sums take (all rows up to ``TIES_MAX_ROWS``; K·(K + T) numbers per group),
from which :func:`group_heterogeneity` measures how far one coefficient per entry is from
fitting every group.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from unmerge_jax.errors import UnmergeError

# TIES densities the pass tests by default (mergekit recipes mostly use one of these).
DENSITY_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Rows per inner step: the (rows, T, K) float64 masked copies stay a few MiB.
_STEP_ROWS = 2048


class SignatureStats(NamedTuple):
    """Float64 method-signature sums over a set of rows (add two with :func:`add_signatures`).

    Attributes:
      densities: (P,) the TIES densities of the ``ties_*`` axes (equal in every part; not summed).
      n_rows: () rows seen.
      n_active: () rows where some dictionary entry is non-zero.
      zero_count: (T,) active rows where the target is exactly zero.
      zero_energy: (K, T) ``Σ d_kr²`` over those rows.
      ties_dd, ties_dv, ties_vv: (P, T, K, K) the TIES-consistency sums (module docstring).
      group_gram: (G, K, K) ``Σ d dᵀ`` over the rows of each tensor group (module docstring).
      group_cross: (G, K, T) ``Σ d vᵀ`` over the same rows.
    """

    densities: Any
    n_rows: Any
    n_active: Any
    zero_count: Any
    zero_energy: Any
    ties_dd: Any
    ties_dv: Any
    ties_vv: Any
    group_gram: Any
    group_cross: Any

    @property
    def n_groups(self) -> int:
        return int(np.shape(self.group_gram)[0])

    @property
    def n_atoms(self) -> int:
        return int(self.zero_energy.shape[0])

    @property
    def n_targets(self) -> int:
        return int(self.zero_count.shape[0])

    def select_targets(self, index) -> "SignatureStats":
        """Statistics restricted to targets ``index`` (int array or slice)."""
        t = np.arange(self.n_targets)[index]
        return self._replace(zero_count=np.asarray(self.zero_count)[t], zero_energy=np.asarray(self.zero_energy)[:, t],
                             ties_dd=np.asarray(self.ties_dd)[:, t], ties_dv=np.asarray(self.ties_dv)[:, t],
                             ties_vv=np.asarray(self.ties_vv)[:, t], group_cross=np.asarray(self.group_cross)[:, :, t])


def _check_densities(densities) -> np.ndarray:
    dens = np.asarray(densities, np.float64).reshape(-1)
    if dens.size == 0 or np.any(~(dens > 0)) or np.any(dens > 1):
        raise UnmergeError(f"TIES densities must be fractions in (0, 1], got {dens.tolist()}")
    return dens


def trim_thresholds(atoms, densities: Sequence[float] = DENSITY_GRID) -> np.ndarray:
    """Per-tensor TIES trimming thresholds of K dictionary entries at each density.

    mergekit's ``magnitude`` sparsification keeps the ``k = max(1, int(ρ · n))`` largest ``|d|`` of a
    tensor of n entries (ρ ≥ 1 keeps all); the threshold is the k-th largest ``|d|``, so an entry is
    kept iff ``|d| ≥ θ``. (mergekit breaks ties at θ by position; with continuous values a tie is
    one row, and a tie that matters costs that row's equation, nothing more.)

    Args:
      atoms: (K, n) or a sequence of K arrays: the K task vectors (signed, or already ``|d|``) of
        **one whole tensor** (any shape; flattened).
      densities: (P,) densities in (0, 1].

    Returns:
      (P, K) float32 thresholds.
    """
    dens = _check_densities(densities)
    rows = [np.asarray(a, np.float32).reshape(-1) for a in atoms]  # no copy of float32 input
    if not rows or rows[0].size == 0:
        raise UnmergeError("trim_thresholds needs K >= 1 non-empty task vectors of one tensor")
    n = rows[0].size
    if any(r.size != n for r in rows):
        raise UnmergeError(f"trim_thresholds: the task vectors of one tensor must have the same size, got "
                           f"{sorted({r.size for r in rows})}")
    out = np.zeros((dens.size, len(rows)), np.float32)
    ks = [max(1, int(float(p) * n)) if p < 1 else n for p in dens]
    for j, r in enumerate(rows):
        out[:, j] = _kth_largest_abs(r, ks)
    return out


SELECT_CHUNK = 1 << 20  # entries per step of the radix select (its temporaries stay this size)


def _kth_largest_abs(d: np.ndarray, ks) -> np.ndarray:
    """The k-th largest ``|d|`` of flat float32 ``d`` for each k, exactly, by a radix select.

    ``|d|``'s float32 bit pattern is ``d``'s with the sign bit cleared, and non-negative float32
    values order like those patterns (NaN above ∞), so one histogram of the top 16 bits finds the
    bucket holding each k-th largest; only that bucket's entries are then partitioned. Both scans
    go through ``d`` in chunks of :data:`SELECT_CHUNK` entries, so nothing tensor-sized is
    allocated (fresh memory costs a page fault per 4 KiB). Several times faster than
    ``np.partition`` on a whole tensor (what a full pass pays per dictionary entry and tensor).
    """
    bits = d.view(np.uint32)
    n = bits.size
    if n <= 1 << 16:  # small tensors: a partition is cheaper than the histogram
        part = np.partition(np.abs(d), sorted({n - k for k in ks}))
        return np.asarray([part[n - k] for k in ks], np.float32)
    step = min(n, SELECT_CHUNK)
    top = np.empty(step, np.uint32)

    def top_bits(lo):  # bits 16–30 of |d| for entries lo … lo + step − 1 (into the reused buffer)
        t = top[:min(step, n - lo)]
        np.bitwise_and(bits[lo:lo + step], np.uint32(0x7FFF0000), out=t)
        np.right_shift(t, np.uint32(16), out=t)
        return t

    hist = np.zeros(1 << 16, np.int64)
    for lo in range(0, n, step):
        hist += np.bincount(top_bits(lo), minlength=1 << 16)
    above = np.concatenate([np.cumsum(hist[::-1])[::-1][1:], [0]])   # entries in higher buckets
    buckets = [int(np.flatnonzero(above < k)[0]) for k in ks]         # the bucket of each k-th largest
    wanted = np.zeros(1 << 16, bool)
    wanted[buckets] = True
    cand, cand_top = [], []
    for lo in range(0, n, step):                                        # one more scan gathers all of them
        t = top_bits(lo)
        keep = wanted[t]
        cand.append(bits[lo:lo + step][keep] & np.uint32(0x7FFFFFFF))
        cand_top.append(t[keep])
    cand, cand_top = np.concatenate(cand).view(np.float32), np.concatenate(cand_top)
    out = np.empty(len(ks), np.float32)
    for i, (k, b) in enumerate(zip(ks, buckets)):
        sub = cand[cand_top == b]
        rank = k - int(above[b])                                        # its rank inside the bucket
        out[i] = np.partition(sub, sub.size - rank)[sub.size - rank]
    return out


def empty_signatures(n_atoms: int, n_targets: int, densities: Sequence[float] = DENSITY_GRID,
                     n_groups: int = 1) -> SignatureStats:
    """All-zero statistics over ``n_groups`` tensor groups (the start of an accumulation)."""
    dens = _check_densities(densities)
    p, t, k, g = dens.size, int(n_targets), int(n_atoms), int(n_groups)
    if g < 1:
        raise UnmergeError(f"signature statistics need at least one tensor group, got {g}")
    return SignatureStats(dens, np.float64(0), np.float64(0), np.zeros(t), np.zeros((k, t)),
                          np.zeros((p, t, k, k)), np.zeros((p, t, k, k)), np.zeros((p, t, k, k)),
                          np.zeros((g, k, k)), np.zeros((g, k, t)))


def signature_block(D_block, V_block, thresholds, densities: Sequence[float] = DENSITY_GRID, *,
                    groups=0, n_groups: int = 1) -> SignatureStats:
    """Signature statistics of one block of rows (sum blocks with :func:`add_signatures`).

    Args:
      D_block: (r, K) dictionary rows (float32 or float64).
      V_block: (r, T) or (r,) target rows.
      thresholds: (P, K) trimming thresholds of the tensor these rows belong to
        (:func:`trim_thresholds`), or (r, P, K) per row when the block spans tensors.
      densities: (P,) the densities the thresholds were computed at.
      groups: the tensor group of these rows (an int), or (r,) ints per row, in ``0 … n_groups − 1``.
      n_groups: G, the number of groups of the whole problem.

    Returns:
      :class:`SignatureStats` of these rows.
    """
    dens = _check_densities(densities)
    d = np.asarray(D_block)
    v = np.asarray(V_block)
    if v.ndim == 1:
        v = v[:, None]
    if d.ndim != 2 or v.ndim != 2 or d.shape[0] != v.shape[0]:
        raise UnmergeError(f"signature_block: D_block (r, K) and V_block (r, T) must have the same rows, got "
                           f"{d.shape} and {v.shape}")
    r, k = d.shape
    thr = np.asarray(thresholds, np.float64)
    if thr.shape not in ((dens.size, k), (r, dens.size, k)):
        raise UnmergeError(f"signature_block: thresholds must be (P, K) = ({dens.size}, {k}) or (rows, P, K), "
                           f"got {thr.shape}")
    grp = np.broadcast_to(np.asarray(groups, np.int64), (r,))
    if r and (grp.min() < 0 or grp.max() >= int(n_groups)):
        raise UnmergeError(f"signature_block: group ids must be in 0..{int(n_groups) - 1}, got {int(grp.min())}..{int(grp.max())}")
    out = empty_signatures(k, v.shape[1], dens, n_groups)
    dd, dv, vv = out.ties_dd, out.ties_dv, out.ties_vv
    gg, gc = out.group_gram, out.group_cross
    n_active, zc, ze = 0.0, out.zero_count, out.zero_energy
    for s in range(0, r, _STEP_ROWS):
        dn = d[s:s + _STEP_ROWS].astype(np.float64)
        vn = v[s:s + _STEP_ROWS].astype(np.float64)
        th = thr if thr.ndim == 2 else thr[s:s + _STEP_ROWS]
        for g in np.unique(grp[s:s + _STEP_ROWS]):
            rows_g = grp[s:s + _STEP_ROWS] == g
            gg[g] += dn[rows_g].T @ dn[rows_g]
            gc[g] += dn[rows_g].T @ vn[rows_g]
        active = np.any(dn != 0, axis=1)
        n_active += float(np.count_nonzero(active))
        zero = (vn == 0) & active[:, None]                                   # (r, T)
        zc += np.count_nonzero(zero, axis=0)
        ze += np.square(dn).T @ zero
        sd, sv = np.sign(dn), np.sign(vn)
        agree = (sd[:, None, :] == sv[:, :, None]) | (vn == 0)[:, :, None]   # (r, T, K)
        for p in range(dens.size):
            kept = np.abs(dn) >= (th[p] if th.ndim == 2 else th[:, p])       # (r, K)
            e = agree & kept[:, None, :]
            a = np.where(e, dn[:, None, :], 0.0).transpose(1, 2, 0)          # (T, K, r)
            b = (e * vn[:, :, None]).transpose(1, 0, 2)                       # (T, r, K)
            dd[p] += a @ a.transpose(0, 2, 1)
            dv[p] += a @ b
            vv[p] += b.transpose(0, 2, 1) @ b
    return out._replace(n_rows=np.float64(r), n_active=np.float64(n_active))


def add_signatures(a: SignatureStats, b: SignatureStats) -> SignatureStats:
    """Sum of two partial statistics over disjoint row sets (same K, T and densities)."""
    if not np.array_equal(np.asarray(a.densities), np.asarray(b.densities)) or \
            np.shape(a.ties_dd) != np.shape(b.ties_dd) or np.shape(a.group_cross) != np.shape(b.group_cross):
        raise UnmergeError(f"cannot add signature statistics of different shapes or densities: "
                           f"{np.shape(a.ties_dd)} at {list(a.densities)} vs {np.shape(b.ties_dd)} at {list(b.densities)}")
    return SignatureStats(a.densities, *(np.asarray(x) + np.asarray(y) for x, y in zip(a[1:], b[1:])))


def signature_stats(D, V, segments, thresholds, densities: Sequence[float] = DENSITY_GRID,
                    block_rows: int = 1 << 15, groups=None) -> SignatureStats:
    """Signature statistics of dense ``D`` (n, K) and ``V`` (n, T), tensor segment by segment.

    Args:
      D, V: the rows of the decomposition problem (as given to ``gram_stats``).
      segments: per tensor, the ``(start, stop)`` rows it occupies (in order, covering 0…n).
      thresholds: (n_segments, P, K) :func:`trim_thresholds` of each tensor's whole task vectors.
      densities: (P,).
      block_rows: rows per :func:`signature_block` call.
      groups: per segment, its tensor group ``0 … G − 1`` (default: one group).
    """
    D = np.asarray(D)
    V = np.asarray(V)
    if V.ndim == 1:
        V = V[:, None]
    thr = np.asarray(thresholds)
    segments = [(int(a), int(b)) for a, b in segments]
    if thr.ndim != 3 or thr.shape[0] != len(segments):
        raise UnmergeError(f"signature_stats: thresholds must be (n_segments={len(segments)}, P, K), got {thr.shape}")
    expect = 0
    for a, b in segments:
        if a != expect or b < a:
            raise UnmergeError(f"signature_stats: segments must tile the rows in order; got ({a}, {b}) after row {expect}")
        expect = b
    if expect != D.shape[0]:
        raise UnmergeError(f"signature_stats: segments cover {expect} rows but D has {D.shape[0]}")
    grp = np.zeros(len(segments), np.int64) if groups is None else np.asarray(groups, np.int64).reshape(-1)
    if grp.shape != (len(segments),) or (grp.size and grp.min() < 0):
        raise UnmergeError(f"signature_stats: groups must be one id >= 0 per segment ({len(segments)}), got {grp.tolist()}")
    n_groups = int(grp.max()) + 1 if grp.size else 1
    total = empty_signatures(D.shape[1], V.shape[1], densities, n_groups)
    for (a, b), th, g in zip(segments, thr, grp):
        for s in range(a, b, block_rows):
            e = min(b, s + block_rows)
            total = add_signatures(total, signature_block(D[s:e], V[s:e], th, densities, groups=g, n_groups=n_groups))
    return total

