"""Exact order statistics of streamed arrays on the host: top-k thresholds, tie cuts, percentiles.

A merge method with a per-tensor threshold (TIES's k-th largest ``|δ_k|``, the percentile RAM
face's ``q``-th percentile of ``|w_k δ_k|``) needs order statistics of K tensors that it sees
one chunk at a time. Everything here works on the uint32 bit patterns of non-negative float32
values (:func:`abs_bits`), which are monotone in the value, so no sort and no tensor-sized
temporary is needed:

* :func:`select_ranks` — the driver: brackets each wanted rank from a fixed sample
  (:func:`sample_index`, :func:`bracket`), selects inside the bracket in one pass
  (:func:`select_largest_bracketed`), and falls back to the two-pass radix selection
  (:func:`select_largest`) plus a tie-count pass (:func:`tie_counts`) when the bracket misses or
  heavy ties overflow it. Any bracket gives the exact result; a miss only costs time.
* :func:`topk_counts` — mergekit's ``k = max(1, int(density · n))``.
* :func:`tie_cuts` — where each chunk stops keeping entries tied at the threshold, so that the
  first ones of the tensor by position complete the top k and the apply kernel stays elementwise.
* :func:`order_keys` — order-preserving uint32 keys of float32 values of any sign (for order
  statistics of signed values with the same selection functions).
* :func:`percentile_ranks`, :func:`percentile_from_order` — NumPy's linear-interpolation
  percentile from two order statistics, rounded so that ``x ≥ thr`` in float32 is exactly
  ``x ≥ np.percentile(x, q)`` in float64.

All functions are plain NumPy; the jit-compiled kernels that consume their results are in
``unmerge_jax.kernels.merge``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

DIGIT = 16          # bits per radix digit of the selection passes (two digits cover float32)
SAMPLE = 1 << 16    # entries per model drawn to bracket an order statistic before the exact pass
BRACKET_Z = 6.0     # half-width of the bracket in standard deviations of the sample's rank


def abs_bits(x) -> np.ndarray:
    """The uint32 bit patterns of ``|x|`` (float32, NumPy): for non-negative floats the pattern is
    monotone in the value (NaN above +inf, as in a sort), so order statistics can be found on it."""
    return np.abs(np.asarray(x, np.float32)).view(np.uint32)


def topk_counts(density, numel: int) -> np.ndarray:
    """mergekit's ``magnitude`` sparsification keeps ``k = max(1, int(density · numel))`` entries;
    ``density ≥ 1`` keeps all ``numel``. Returns (K,) int64."""
    return np.asarray([max(1, int(float(d) * numel)) if d < 1 else numel for d in np.ravel(density)], dtype=np.int64)


def select_largest(passes: Callable[[], Iterable], ranks) -> tuple[np.ndarray, np.ndarray]:
    """Exact order statistics of K streamed uint32 arrays without sorting them.

    ``passes()`` returns a fresh iterator over the chunks of the K arrays (each item a sequence
    of K 1-D uint32 arrays, ``None`` for a model without wanted ranks); it is called twice. Pass 1
    histograms the top :data:`DIGIT` bits of every model (``2^16`` counts), which fixes the top
    digit of each wanted value; pass 2 histograms the low digit of the entries sharing that top
    digit. The state is those histograms: O(K) memory independent of the tensor, no sort.

    Args:
      passes: chunk iterator factory, as above.
      ranks: (K, R) int, 1-based ranks from the top (``r = 1`` the largest); ``≤ 0`` = not wanted.
    Returns:
      ``thr`` (K, R) uint32: the ``r``-th largest value; ``n_gt`` (K, R) int64: how many entries
      are strictly larger (so ``r − n_gt`` entries equal to ``thr`` complete the top ``r``).
    """
    ranks = np.atleast_2d(np.asarray(ranks, np.int64))
    k_models, n_ranks = ranks.shape
    nb = 1 << DIGIT
    want = [bool(np.any(ranks[m] > 0)) for m in range(k_models)]
    hist = np.zeros((k_models, nb), np.int64)
    for bits in passes():
        for m, b in enumerate(bits):
            if want[m]:
                hist[m] += np.bincount(b >> DIGIT, minlength=nb)
    top = np.zeros((k_models, n_ranks), np.int64)
    above = np.zeros((k_models, n_ranks), np.int64)
    rest = np.zeros((k_models, n_ranks), np.int64)
    for m in range(k_models):
        if not want[m]:
            continue
        suf = np.cumsum(hist[m, ::-1])[::-1]            # suf[h] = #(top digit ≥ h)
        for j in range(n_ranks):
            r = min(int(ranks[m, j]), int(suf[0]))
            if r <= 0:
                continue
            h = int(np.count_nonzero(suf >= r)) - 1     # suf is non-increasing
            top[m, j], above[m, j] = h, (suf[h + 1] if h + 1 < nb else 0)
            rest[m, j] = r - above[m, j]
    buckets = [sorted({int(top[m, j]) for j in range(n_ranks) if rest[m, j] > 0}) for m in range(k_models)]
    low = {(m, h): np.zeros(nb, np.int64) for m in range(k_models) for h in buckets[m]}
    if low:
        for bits in passes():
            for m, b in enumerate(bits):
                if not buckets[m]:
                    continue
                hi = b >> DIGIT
                for h in buckets[m]:
                    low[m, h] += np.bincount(b[hi == h] & (nb - 1), minlength=nb)
    thr = np.zeros((k_models, n_ranks), np.uint32)
    n_gt = np.zeros((k_models, n_ranks), np.int64)
    for m in range(k_models):
        for j in range(n_ranks):
            if rest[m, j] <= 0:
                continue
            h = int(top[m, j])
            suf = np.cumsum(low[m, h][::-1])[::-1]
            lo = int(np.count_nonzero(suf >= rest[m, j])) - 1
            thr[m, j] = np.uint32((h << DIGIT) | lo)
            n_gt[m, j] = above[m, j] + (suf[lo + 1] if lo + 1 < nb else 0)
    return thr, n_gt


def sample_index(n: int, m: int = SAMPLE) -> np.ndarray | None:
    """Sorted positions of a fixed pseudo-random sample of ``m`` of ``n`` entries (seeded by ``n``,
    so the same for every model and run), or ``None`` when ``n ≤ 4m`` (then the exact pass just
    keeps every value)."""
    if n <= 4 * m:
        return None
    return np.sort(np.random.default_rng(n).integers(0, n, m))


def bracket(sample: np.ndarray | None, n: int, ranks) -> tuple[np.uint32, np.uint32]:
    """Bit patterns ``lo ≤ hi`` that hold the ``ranks``-th largest (1-based) of ``n`` values with
    probability ≈ 1 − 1e-9, from a uniform sample of them: the sample's order statistics
    ``BRACKET_Z`` binomial standard deviations either side of each rank. ``(0, 2³²−1)`` without a
    sample. Any bracket gives exact results: a miss only costs the radix fallback."""
    top = np.uint32(0xFFFFFFFF)
    ranks = [int(r) for r in np.ravel(ranks) if r > 0]
    if sample is None or not ranks:
        return np.uint32(0), top
    srt = np.sort(sample)[::-1]
    m = srt.size
    pos = [(r / n * m, BRACKET_Z * np.sqrt(m * (r / n) * (1 - r / n)) + 3) for r in ranks]
    i_hi = min(int(np.floor(p - d)) for p, d in pos)
    i_lo = max(int(np.ceil(p + d)) for p, d in pos)
    hi = srt[i_hi] if i_hi >= 0 else top
    lo = srt[i_lo] if i_lo < m else np.uint32(0)
    return np.uint32(lo), np.uint32(hi)


def select_largest_bracketed(chunks: Iterable, ranks, brackets, caps):
    """Exact order statistics of K streamed uint32 arrays in **one** pass, given a bracket per model.

    For every chunk it counts the entries above ``hi`` and keeps the values in ``[lo, hi]`` (a
    few percent of them with a sampled :func:`bracket`); the wanted ranks are then selected among
    the kept values. This replaces :func:`select_largest`'s two histogram passes (≈ 3.5 ns per entry
    and model in ``np.bincount``, which casts to int64) by compares and a compress (≈ 1 ns).

    Args:
      chunks: iterator over the chunks, each a sequence of K 1-D uint32 arrays.
      ranks: (K, R) 1-based ranks from the top; ``≤ 0`` = not wanted.
      brackets: K ``(lo, hi)`` pairs (:func:`bracket`).
      caps: (K,) most values to keep per model; beyond that the pass gives up (heavy ties).
    Returns:
      ``(thr, n_gt, ties)`` as :func:`select_largest` plus ``ties`` (K, R, n_chunks) int64: how many
      entries of each chunk equal ``thr``; or ``None`` when a rank fell outside its bracket or a cap
      was exceeded (the caller then falls back to :func:`select_largest`).
    """
    ranks = np.atleast_2d(np.asarray(ranks, np.int64))
    k_models, n_ranks = ranks.shape
    want = [bool(np.any(ranks[m] > 0)) for m in range(k_models)]
    above = np.zeros(k_models, np.int64)
    kept: list[list[np.ndarray]] = [[] for _ in range(k_models)]
    size = np.zeros(k_models, np.int64)
    n_chunks = 0
    scratch_u, scratch_b = np.empty(0, np.uint32), np.empty(0, bool)   # reused: no page faults per chunk
    for bits in chunks:
        n_chunks += 1
        for m, x in enumerate(bits):
            if not want[m]:
                continue
            if scratch_u.size < x.size:
                scratch_u, scratch_b = np.empty(x.size, np.uint32), np.empty(x.size, bool)
            u, flag = scratch_u[:x.size], scratch_b[:x.size]
            lo, hi = brackets[m]
            above[m] += np.count_nonzero(np.greater(x, hi, out=flag))
            if lo == 0 and hi == 0xFFFFFFFF:
                v = np.array(x, copy=True)
            else:   # uint32 wrap-around: one compare for lo ≤ x ≤ hi
                v = np.compress(np.less_equal(np.subtract(x, lo, out=u), hi - lo, out=flag), x)   # 0.4 vs 0.5 ns for x[flag]
            kept[m].append(v)
            size[m] += v.size
            if size[m] > caps[m]:
                return None
    thr = np.zeros((k_models, n_ranks), np.uint32)
    n_gt = np.zeros((k_models, n_ranks), np.int64)
    ties = np.zeros((k_models, n_ranks, n_chunks), np.int64)
    for m in range(k_models):
        if not want[m]:
            continue
        vals = np.concatenate(kept[m]) if kept[m] else np.zeros(0, np.uint32)
        for j in range(n_ranks):
            r = int(ranks[m, j])
            if r <= 0:
                continue
            r = min(r, int(above[m] + vals.size)) if brackets[m][0] == 0 else r   # rank > n: the smallest
            rr = r - int(above[m])
            if not 1 <= rr <= vals.size:
                return None
            t = np.partition(vals, vals.size - rr)[vals.size - rr]
            thr[m, j] = t
            n_gt[m, j] = above[m] + np.count_nonzero(vals > t)
            ties[m, j] = [np.count_nonzero(v == t) for v in kept[m]]
    return thr, n_gt, ties


def tie_counts(chunks: Iterable, thr) -> np.ndarray:
    """(K, n_chunks) int64: entries of each chunk equal to ``thr[k]`` (after :func:`select_largest`)."""
    return np.asarray([[0 if x is None else np.count_nonzero(x == thr[m]) for m, x in enumerate(bits)]
                       for bits in chunks], np.int64).reshape(-1, len(thr)).T


def select_ranks(n: int, ranks, sampled: Callable[[int, np.ndarray], np.ndarray],
                 passes: Callable[[], Iterable]):
    """``(thr, n_gt, ties)`` of :func:`select_largest_bracketed` for K streamed arrays of ``n`` values.

    One pass over the chunks inside a bracket from a sample of the values; the radix selection
    (two passes) and a tie-count pass when the bracket misses or heavy ties overflow its cap
    (≈ 4× the values expected in the bracket, at most ``n/16``).

    Args:
      n: entries per array.
      ranks: (K, R) 1-based ranks from the top; ``≤ 0`` = not wanted.
      sampled: ``sampled(k, idx)`` → uint32 bits of model ``k``'s values at positions ``idx``.
      passes: ``passes()`` → a fresh iterator over the chunks, each a sequence of K uint32 arrays
        (``None`` for a model without wanted ranks).
    Returns:
      ``thr`` (K, R) uint32, ``n_gt`` (K, R) int64, ``ties`` (K, R, n_chunks) int64.
    """
    ranks = np.atleast_2d(np.asarray(ranks, np.int64))
    want = np.any(ranks > 0, axis=1)
    idx = sample_index(n)
    brackets, caps = [], []
    for i in range(ranks.shape[0]):
        if idx is None or not want[i]:
            brackets.append(bracket(None, n, ranks[i]))
            caps.append(n)
            continue
        s_bits = sampled(i, idx)
        lo, hi = bracket(s_bits, n, ranks[i])
        brackets.append((lo, hi))
        expect = n * np.count_nonzero((s_bits - lo) <= (hi - lo)) / idx.size
        caps.append(int(min(4 * expect + 4096, max(n // 16, 4096))))
    got = select_largest_bracketed(passes(), ranks, brackets, caps)
    if got is not None:
        return got
    thr, n_gt = select_largest(passes, ranks)
    ties = np.stack([tie_counts(passes(), thr[:, j]) for j in range(ranks.shape[1])], axis=1)
    return thr, n_gt, ties


def tie_cuts(left, ties, thr, chunk_bits: Callable[[int, int], np.ndarray], sizes) -> np.ndarray:
    """(n_chunks, K) int32 positions: chunk ``c`` keeps its entries equal to ``thr[k]`` that lie
    before ``cut[c, k]``, so that the ``left[k]`` first such entries of the tensor are kept.

    Args:
      left: (K,) tied entries still needed to complete each model's top k (``k − n_gt``).
      ties: (K, n_chunks) entries of each chunk equal to ``thr``.
      thr: (K,) uint32 thresholds.
      chunk_bits: ``chunk_bits(c, k)`` → model ``k``'s bits in chunk ``c``; read only for the
        chunk (at most one per model) that keeps some but not all of its ties.
      sizes: (n_chunks,) entries per chunk.
    """
    sizes = np.asarray(sizes)
    earlier = np.cumsum(ties, axis=1) - ties                    # ties in the chunks before
    keep = np.clip(np.asarray(left)[:, None] - earlier, 0, ties)
    cut = np.where(keep == ties, sizes[None, :], 0).astype(np.int32)   # all of them, or none
    for m, c in zip(*np.nonzero((keep > 0) & (keep < ties))):
        cut[m, c] = np.flatnonzero(chunk_bits(c, m) == thr[m])[keep[m, c] - 1] + 1
    return cut.T.copy()


def percentile_ranks(n: int, q: float):
    """Where the linear-interpolation ``q``-th percentile of ``n`` values lies: position
    ``pos = (q/100)·(n−1)`` (float64, as NumPy); returns the 1-based ranks *from the top* of the
    values at ``floor(pos)`` and ``ceil(pos)`` (ascending order) and the fraction ``pos − floor``."""
    pos = float(q) / 100.0 * (n - 1)
    low, high = (int(min(max(x, 0), n - 1)) for x in (np.floor(pos), np.ceil(pos)))
    return (n - low, n - high), pos - np.floor(pos)


def percentile_from_order(lo_v, hi_v, frac) -> np.ndarray:
    """The percentile ``lo + (hi − lo)·frac`` in float64, rounded *up* to float32, so that for
    float32 ``x``, ``x ≥ thr`` exactly when ``x ≥`` the float64 percentile (NumPy's
    ``np.percentile``, the reference of the percentile RAM face's masks). ``jnp.percentile``
    interpolates in float32 and its last bit depends on how XLA fuses it, so it is not the
    definition."""
    lo = np.asarray(lo_v, np.float32).astype(np.float64)
    hi = np.asarray(hi_v, np.float32).astype(np.float64)
    t = np.where(frac == 0.0, lo, lo + (hi - lo) * frac)
    t32 = t.astype(np.float32)
    return np.where(t32.astype(np.float64) < t, np.nextafter(t32, np.float32(np.inf)), t32).astype(np.float32)


def row_ranks(bits: np.ndarray, row_len: int) -> np.ndarray:
    """0-based ascending ranks of uint32 bit patterns (of ``|x|``, so the order of the values)
    within each row of ``row_len`` entries, ties by position (the earlier entry ranks lower): the
    order of a stable ascending argsort, inverted. ``bits`` (n,) with ``n`` a multiple of
    ``row_len``; returns (n,) int32. One sort of ``(bits << 32) | position`` keys (unique, so no
    stable sort is needed; ≈ 15 ns per entry here) and one scatter."""
    bits = np.asarray(bits, np.uint32).reshape(-1, row_len)
    n_rows = bits.shape[0]
    pos = np.arange(row_len, dtype=np.uint64)
    keys = (bits.astype(np.uint64) << np.uint64(32)) | pos[None, :]
    keys.sort(axis=1)
    order = (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)
    order += (np.arange(n_rows, dtype=np.intp) * row_len)[:, None]
    ranks = np.empty(n_rows * row_len, np.int32)
    ranks[order.reshape(-1)] = np.tile(np.arange(row_len, dtype=np.int32), n_rows)
    return ranks


def order_keys(x, inverse: bool = False) -> np.ndarray:
    """Order-preserving uint32 keys of float32 values of any sign (``inverse``: keys back to float32).

    A non-negative float's bit pattern gets the top bit set, a negative one's is inverted, so that
    key order is value order (−0 just below +0; NaN with the sign bit clear above +inf). The
    selection functions here then find order statistics of signed values (arcee_fusion's
    importances, which a rounded negative KL can make negative)."""
    if inverse:
        k = np.asarray(x, np.uint32)
        return np.where(k >> 31, k & np.uint32(0x7FFFFFFF), ~k).astype(np.uint32).view(np.float32)
    b = np.asarray(x, np.float32).view(np.uint32)
    return np.where(b >> 31, ~b, b | np.uint32(0x80000000)).astype(np.uint32)
