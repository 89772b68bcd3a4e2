"""Per-tensor merge kernels: pure jit-compiled functions on the K task vectors of one tensor.

Every kernel works on one tensor — or one chunk of a flattened tensor — at a time and sees

* ``base`` — the base weights, shape ``S`` (zeros when a method merges full weights without a
  base, e.g. ``linear`` with no ``base_model``);
* ``tensors`` — a tuple of K arrays of shape ``S``: fine-tuned weights (``deltas=False``; the
  kernel forms ``δ_k = θ_k − θ_base`` itself, fused, so no stacked copy of the inputs is needed)
  or task vectors (``deltas=True``, e.g. LoRA ``B@A·α/r``);
* per-model arrays ``weights`` (K,), ``density`` (K,) / ``topk`` (K,), and per-tensor scalars.

Everything that fixes the program's structure (sparsification, consensus, rescale rule, RAM
face) is a frozen hashable static argument, so one program is compiled per (config, shape,
dtype) and swept numbers (weights, densities, λ) reuse it. Randomness (DARE) comes from a
``jax.random`` key derived from ``(seed, tensor name, model index)`` by :func:`model_keys`, so a
merge does not depend on the order in which tensors are visited or on sharding.

Methods with a per-tensor statistic run in two passes over the chunks of a tensor (driven by
``unmerge_jax.merge.methods.run_kernel``): a statistics pass whose state is O(K) numbers — the
exact k-th largest ``|δ|`` of each model for TIES and the order statistics around seed 003's
percentile (:func:`select_largest_bracketed`: one pass inside a bracket from a sample of the
values; :func:`select_largest`, a two-pass radix selection over the float32 bit pattern, when the
bracket misses), DARE's L1 sums and keep-masks (:func:`gta_l1_sums`), RAM's tensor-local counts
(:func:`ram_counts`) — then the elementwise apply pass (:func:`gta_kernel`, :func:`ram_kernel`) on
the same chunks. Ties at TIES's threshold are kept first by position: the statistics pass counts
each chunk's ties, so the host knows before the apply pass up to which position each chunk keeps
them, and the chunked result equals the whole-tensor one exactly.

Computation is float32 (the inputs' precision); L1 norms for DARE's ``l1`` rescale are
accumulated in float64. Semantics follow mergekit's ``generalized_task_arithmetic.py``,
``sparsify.py`` and ``ram.py`` (see ``docs/merge.md`` for each formula and where we differ).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unmerge_jax.kernels.random import bernoulli_at, model_keys, name_hash  # noqa: F401  (name_hash: the driver's)

# mergekit's thresholds: rescaling skipped below this L1 norm; |Σw| below this is "zero".
RESCALE_EPS = 1e-7
WEIGHT_EPS = 1e-8
DIGIT = 16  # bits per radix digit of the selection passes (two digits cover float32)


class GTAConfig(NamedTuple):
    """Static structure of a generalized-task-arithmetic merge (linear/TA/TIES/DARE)."""

    sparsify: str | None = None    # None | "magnitude" | "random"
    rescale: str | None = None     # None | "l1" | "inverse_density"
    consensus: str | None = None   # None | "sum" | "count"
    normalize: bool = False
    deltas: bool = True            # tensors are task vectors (True) or fine-tuned weights


class RAMConfig(NamedTuple):
    """Static structure of a RAM merge (see :func:`ram_kernel`)."""

    face: str = "mergekit"         # "seed003" | "arm" (λ given) | "tensor_local" (λ from counts)
    deltas: bool = True


def _task_vectors(base, tensors, deltas: bool):
    """The K float32 task vectors, flattened, as a list of rows, and the flat base. Kept unstacked:
    with K static, the per-entry arithmetic of all K models then fuses into one loop over the
    entries (a stacked (K, n) array costs a copy, and XLA:CPU's reductions over its leading axis
    ran ~5× slower than the fused loop)."""
    b = base.reshape(-1).astype(jnp.float32)
    rows = [t.reshape(-1).astype(jnp.float32) for t in tensors]
    if not deltas:
        rows = [r - b for r in rows]
    return rows, b


def abs_bits(x) -> np.ndarray:
    """The uint32 bit patterns of ``|x|`` (float32, NumPy): for non-negative floats the pattern is
    monotone in the value (NaN above +inf, as in a sort), so order statistics can be found on it."""
    return np.abs(np.asarray(x, np.float32)).view(np.uint32)


def select_largest(passes: Callable[[], Iterable], ranks) -> tuple[np.ndarray, np.ndarray]:
    """Exact order statistics of K streamed uint32 arrays without sorting them.

    ``passes()`` returns a fresh iterator over the chunks of the K arrays (each item a sequence
    of K 1-D uint32 arrays); it is called twice. Pass 1 histograms the top :data:`DIGIT` bits of
    every model (``2^16`` counts), which fixes the top digit of each wanted value; pass 2
    histograms the low digit of the entries sharing that top digit. The state is those
    histograms: O(K) tensors-independent memory, no sort, no tensor-sized temporary.

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


SAMPLE = 1 << 16   # entries per model drawn to bracket an order statistic before the exact pass
BRACKET_Z = 6.0    # half-width of the bracket in standard deviations of the sample's rank


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
    ``np.percentile``, the reference of seed 003's masks). ``jnp.percentile`` interpolates in
    float32 and its last bit depends on how XLA fuses it, so it is not the definition."""
    lo = np.asarray(lo_v, np.float32).astype(np.float64)
    hi = np.asarray(hi_v, np.float32).astype(np.float64)
    t = np.where(frac == 0.0, lo, lo + (hi - lo) * frac)
    t32 = t.astype(np.float32)
    return np.where(t32.astype(np.float64) < t, np.nextafter(t32, np.float32(np.inf)), t32).astype(np.float32)


def _kth_largest_bits(bits, k):
    """In-jit bisection over the 32-bit pattern: the largest ``t`` with ``#(bits ≥ t) ≥ k``, i.e.
    the k-th largest entry (32 fused compare+count passes, no sort)."""
    def step(i, t):
        cand = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(jnp.sum(bits >= cand, dtype=jnp.int64) >= k, cand, t)

    return jax.lax.fori_loop(0, 32, step, jnp.uint32(0))


def _topk_mask(a, k):
    """Whole-tensor top-``k`` of ``a`` (1-D float32 ≥ 0), exactly ``k`` ones; ties at the k-th
    value broken by position (lowest index first) — the semantics :func:`gta_kernel` streams."""
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
    thr = _kth_largest_bits(bits, k)
    eq = bits == thr
    need = k - jnp.sum(bits > thr, dtype=jnp.int64)
    return (bits > thr) | (eq & (jnp.cumsum(eq, dtype=jnp.int64) <= need))


class GTAStats(NamedTuple):
    """Per-model statistics of one tensor for the chunked :func:`gta_kernel` (all (K,))."""

    thr: jax.Array | np.ndarray     # uint32 bits of the k-th largest |δ| (magnitude)
    cut: jax.Array | np.ndarray     # int32: of the entries equal to ``thr``, keep those before this
                                    # position of the chunk (0: none, chunk size: all)
    scale: jax.Array | np.ndarray   # float32 rescale of the kept entries (l1 rule; else 1)


def gta_stats_init(k: int) -> GTAStats:
    return GTAStats(np.zeros(k, np.uint32), np.zeros(k, np.int32), np.ones(k, np.float32))


def _keep(rows, density, stats, start, keys, sparsify, packed=None):
    """Keep-masks of one chunk (a list of K rows). Magnitude: ``|δ| > thr``, and ``|δ| = thr``
    before position ``cut`` (the host finds where the k-th kept tie lies, so this is elementwise —
    no rank count or cumsum in the kernel). ``packed``: the chunk's random masks as drawn by
    :func:`gta_l1_sums`."""
    c = rows[0].shape[0]
    if sparsify == "random":
        if packed is not None:
            return [jnp.unpackbits(packed[i], count=c).astype(bool) for i in range(len(rows))]
        return [bernoulli_at(keys[i], density[i], start, c) for i in range(len(rows))]
    pos = jax.lax.iota(jnp.int32, c)
    kept = []
    for i, d in enumerate(rows):
        bits = jax.lax.bitcast_convert_type(jnp.abs(d), jnp.uint32)
        thr = jnp.asarray(stats.thr[i], jnp.uint32)
        kept.append((bits > thr) | ((bits == thr) & (pos < jnp.asarray(stats.cut[i], jnp.int32))))
    return kept


def keep_masks(d, density, topk, keys, sparsify):
    """(K, n) boolean keep-masks of whole tensors: top-``topk[k]`` magnitudes (exactly, ties by
    position) or Bernoulli(``density[k]``)."""
    if sparsify == "magnitude":
        return jax.vmap(_topk_mask)(jnp.abs(d), topk)
    return jax.vmap(lambda key, p: bernoulli_at(key, p, 0, d.shape[1]))(keys, density.astype(jnp.float32))


@partial(jax.jit, static_argnames=("sparsify", "deltas"))
def draw_masks(base, tensors, density, topk, seed, nhash, *, sparsify: str, deltas: bool = True):
    """The (K, n) keep-masks :func:`gta_kernel` applies to this tensor (for tests/analysis)."""
    rows, _ = _task_vectors(base, tensors, deltas)
    return keep_masks(jnp.stack(rows), density, topk, model_keys(seed, nhash, len(rows)), sparsify)


def _apply_rule(rows, kept, density, scale, rule):
    out = []
    for i, (d, m) in enumerate(zip(rows, kept)):
        masked = jnp.where(m, d, 0.0)
        if rule == "inverse_density":
            masked = masked / density[i].astype(jnp.float32)
        elif rule == "l1":
            masked = masked * scale[i].astype(jnp.float32)
        # mergekit: density ≥ 1 returns the task vector untouched (no mask, no rescale).
        out.append(jnp.where(density[i] >= 1.0, d, masked))
    return out


def _l1_scale(before, after):
    """mergekit's ``rescaled_masked_tensor``: ‖δ‖₁ / ‖kept‖₁, skipped (1) below ``RESCALE_EPS``."""
    skip = (before < RESCALE_EPS) | (after < RESCALE_EPS)
    return jnp.where(skip, 1.0, before / jnp.where(skip, 1.0, after))


def _mix(b, rows, weights, lam, cfg: GTAConfig):
    w = [weights[i].astype(jnp.float32) for i in range(len(rows))]
    wd = [d * wi for d, wi in zip(rows, w)]
    if cfg.consensus is None:
        mixed = sum(wd[1:], wd[0])
        divisor = sum(w[1:], w[0])
    else:
        sign = [jnp.sign(x) for x in wd]
        votes = sum(wd[1:], wd[0]) if cfg.consensus == "sum" else sum(sign[1:], sign[0])
        majority = jnp.where(votes >= 0, 1.0, -1.0).astype(jnp.float32)   # ties elect +
        agree = [s_ == majority for s_ in sign]                           # zeros never agree
        mixed = sum((jnp.where(a, x, 0.0) for a, x in zip(agree[1:], wd[1:])), jnp.where(agree[0], wd[0], 0.0))
        divisor = sum((jnp.where(a, wi, 0.0) for a, wi in zip(agree[1:], w[1:])), jnp.where(agree[0], w[0], 0.0))
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    if cfg.normalize:
        mixed = mixed / divisor
    return b + mixed * lam.astype(jnp.float32)


@partial(jax.jit, static_argnames=("cfg",))
def gta_kernel(base, tensors, weights, density, lam, stats: GTAStats, start, seed, nhash, packed=None, *,
               cfg: GTAConfig):
    """Generalized task arithmetic on one tensor or chunk (mergekit's ``GeneralizedTaskArithmeticMerge``).

    ``δ'_k = sparsify(δ_k)`` (top-k magnitudes given by ``stats`` or Bernoulli(``density[k]``)
    keep, then the rescale rule; untouched where ``density[k] ≥ 1``), ``u_k = w_k δ'_k``. Without
    consensus ``m = Σ u_k`` and ``D = Σ w_k``; with consensus the sign ``s = sign(Σ u_k)``
    (``sum``; or of ``Σ sign(u_k)``, ``count``; ties → +) is elected and
    ``m = Σ u_k [sign u_k = s]``, ``D = Σ w_k [sign u_k = s]`` (``D = 0 → 1``). Returns
    ``θ_base + λ · (m / D if normalize else m)``.

    Args:
      base: base weights (a tensor or a chunk of one), any shape ``S``.
      tensors: tuple of K arrays of shape ``S`` (task vectors if ``cfg.deltas`` else weights).
      weights, density: (K,) float. lam: scalar λ.
      stats: the tensor's :class:`GTAStats` (threshold, tie cut-off in this chunk, l1 scale).
      start: int64 offset of this chunk in the flattened tensor (keys the random masks).
      seed, nhash: uint32 scalars keying ``random`` masks (:func:`model_keys`).
      packed: optional (K, ⌈n/8⌉) uint8 ``random`` keep-masks of this chunk, bit-packed, as
        :func:`gta_l1_sums` drew them (so the ``l1`` rule draws each mask once, not twice).
    Returns:
      float32 array of shape ``S``.
    """
    rows, b = _task_vectors(base, tensors, cfg.deltas)
    if cfg.sparsify is not None:
        keys = model_keys(seed, nhash, len(rows)) if cfg.sparsify == "random" else None
        kept = _keep(rows, density, stats, start, keys, cfg.sparsify, packed)
        rows = _apply_rule(rows, kept, density, stats.scale, cfg.rescale)
    return _mix(b, rows, weights, lam, cfg).reshape(base.shape)


@partial(jax.jit, static_argnames=("cfg",))
def gta_l1_sums(base, tensors, density, stats: GTAStats, start, seed, nhash, *, cfg: GTAConfig):
    """Statistics pass of the ``l1`` rescale on one chunk: float64 ``Σ|δ_k|`` and ``Σ|kept δ_k|``
    (K,) each, and — for ``random`` masks — the (K, ⌈n/8⌉) bit-packed masks drawn (``None`` for magnitude masks, which are cheaper
    to recompute from the threshold than to store)."""
    rows, _ = _task_vectors(base, tensors, cfg.deltas)
    keys = model_keys(seed, nhash, len(rows)) if cfg.sparsify == "random" else None
    kept = _keep(rows, density, stats, start, keys, cfg.sparsify)
    packed = None
    if cfg.sparsify == "random":
        # The sums read the masks back from the packed bits: XLA duplicates an elementwise producer
        # into each consumer's fusion, so two consumers of the draw ran threefry twice (9.9 against
        # 4.6 ns per entry here).
        packed = jax.lax.optimization_barrier(jnp.stack([jnp.packbits(m) for m in kept]))
        kept = _keep(rows, density, stats, start, keys, cfg.sparsify, packed)
    before = jnp.stack([jnp.sum(jnp.abs(d), dtype=jnp.float64) for d in rows])
    after = jnp.stack([jnp.sum(jnp.where(m, jnp.abs(d), 0.0), dtype=jnp.float64) for d, m in zip(rows, kept)])
    return before, after, packed


@partial(jax.jit, static_argnames=("cfg",))
def gta_kernel_masked(base, tensors, weights, density, lam, masks, *, cfg: GTAConfig):
    """:func:`gta_kernel` on a whole tensor with given (K, n) keep-masks instead of drawn ones
    (DARE/TIES parity tests)."""
    rows, b = _task_vectors(base, tensors, cfg.deltas)
    kept = [masks[i] for i in range(len(rows))]
    scale = jnp.ones(len(rows), jnp.float32)
    if cfg.rescale == "l1":
        scale = jnp.stack([_l1_scale(jnp.sum(jnp.abs(d), dtype=jnp.float64),
                                     jnp.sum(jnp.where(m, jnp.abs(d), 0.0), dtype=jnp.float64))
                           for d, m in zip(rows, kept)]).astype(jnp.float32)
    rows = _apply_rule(rows, kept, density, scale, cfg.rescale)
    return _mix(b, rows, weights, lam, cfg).reshape(base.shape)


def l1_scale(before, after) -> np.ndarray:
    """Host-side :func:`_l1_scale` on accumulated float64 sums → float32 (K,)."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    skip = (before < RESCALE_EPS) | (after < RESCALE_EPS)
    return np.where(skip, 1.0, before / np.where(skip, 1.0, after)).astype(np.float32)


def _ram_masks(u, eps):
    """Per-model active masks ``|u_k| > ε`` (a list) and the per-entry active count."""
    act = [jnp.abs(x) > eps for x in u]
    return act, sum((a.astype(jnp.int32) for a in act[1:]), act[0].astype(jnp.int32))


@partial(jax.jit, static_argnames=("deltas",))
def ram_counts(base, tensors, weights, eps, *, deltas: bool = True):
    """The RAM counting pass for one tensor or chunk: per model ``changed_k = #{|w_k δ_k| > ε}``
    and ``overlap_k = #{changed in k and in ≥ 1 other model}``, int64 (K,) each (additive over
    chunks)."""
    rows, _ = _task_vectors(base, tensors, deltas)
    act, c = _ram_masks([d * weights[i].astype(jnp.float32) for i, d in enumerate(rows)], eps)
    changed = jnp.stack([jnp.sum(a, dtype=jnp.int64) for a in act])
    overlap = jnp.stack([jnp.sum(a & (c >= 2), dtype=jnp.int64) for a in act])
    return changed, overlap


def tensor_local_lambdas(changed, overlap, eps, r, alpha) -> np.ndarray:
    """mergekit ``ramplus_tl``: ``λ_k = 1 + r·clip(shared_k / max(unique_k, ε), 0, α)`` from one
    tensor's counts (``shared = overlap``, ``unique = changed − overlap``), float32."""
    f32 = np.float32
    shared = np.asarray(overlap).astype(f32)
    unique = (np.asarray(changed) - np.asarray(overlap)).astype(f32)
    rho = shared / np.maximum(unique, f32(eps))
    return (f32(1.0) + f32(r) * np.clip(rho, f32(0.0), f32(alpha))).astype(f32)


@partial(jax.jit, static_argnames=("cfg",))
def ram_kernel(base, tensors, weights, lambdas, eps, thr, *, cfg: RAMConfig):
    """RAM on one tensor or chunk; ``u_k = w_k δ_k`` (weights default to 1).

    * ``seed003`` (seed 003 eq. 4–5): active ``a_k = |u_k| ≥ thr_k`` where ``thr_k`` is the
      ``q``-th percentile of ``|u_k|`` over the whole tensor (linear interpolation, from the
      statistics pass: :func:`select_largest`, :func:`percentile_ranks`); ``c = Σ a_k``;
      ``c ≥ 2`` → ``(1/K) Σ_k u_k`` (plain mean over all K); ``c = 1`` → ``λ · u_j`` of the active
      model (λ = ``lambdas[0]``, 1.5 in the paper); else 0.
    * ``arm`` (RAM authors / mergekit ``ram``): active ``a_k = |u_k| > ε``; ``c ≥ 2`` →
      ``Σ a_k u_k / c`` (mean over the *active* models); ``c = 1`` → ``λ_j u_j`` with the
      per-model ``lambdas`` (K,) (1 for ``arm``; from a whole-model counting pass for
      ``arm-r``/``arm-r-v2``); else 0.
    * ``tensor_local`` (mergekit ``ramplus_tl``): as ``arm``; ``lambdas`` come from this
      tensor's :func:`ram_counts` via :func:`tensor_local_lambdas`.
    """
    rows, b = _task_vectors(base, tensors, cfg.deltas)
    k = len(rows)
    u = [d * weights[i].astype(jnp.float32) for i, d in enumerate(rows)]   # unstacked: one fused loop

    def total(xs):
        return sum(xs[1:], xs[0])

    if cfg.face == "seed003":
        act = [jnp.abs(x) >= thr[i].astype(jnp.float32) for i, x in enumerate(u)]
        c = total([a.astype(jnp.int32) for a in act])
        shared = total(u) / jnp.float32(k)
        unique = lambdas[0].astype(jnp.float32) * total([jnp.where(a, x, 0.0) for a, x in zip(act, u)])
    else:
        act, c = _ram_masks(u, eps)
        ua = [jnp.where(a, x, 0.0) for a, x in zip(act, u)]
        shared = total(ua) / jnp.maximum(c, 1).astype(jnp.float32)
        unique = total([x * lambdas[i].astype(jnp.float32) for i, x in enumerate(ua)])
    merged = jnp.where(c >= 2, shared, jnp.where(c == 1, unique, 0.0))
    return (b + merged).reshape(base.shape)


def ram_lambdas(face: str, r: float, changed, overlap) -> np.ndarray:
    """Per-model unique-region scales of the RAM authors' faces from whole-model counts.

    ``arm``: 1. ``arm-r``: ``1 + (r−1)·clip(overlap/changed, 0, 1)``. ``arm-r-v2``:
    ``1 + (r−1)·min(1, overlap/(changed − overlap))`` — where a model's every change overlaps
    (``changed = overlap > 0``) the authors' code divides by zero; we take ρ = ∞ → λ = r.
    A model that changed nothing gets ρ = 0. ``r < 1`` is raised to 1, as in the authors' code.
    """
    changed = np.asarray(changed, dtype=np.float64)
    overlap = np.asarray(overlap, dtype=np.float64)
    r = max(float(r), 1.0)
    if face == "arm":
        return np.ones_like(changed)
    with np.errstate(divide="ignore", invalid="ignore"):
        if face == "arm-r":
            rho = np.where(changed > 0, overlap / np.where(changed > 0, changed, 1.0), 0.0)
        else:
            uniq = changed - overlap
            rho = np.where(changed == 0, 0.0, np.where(uniq > 0, overlap / np.where(uniq > 0, uniq, 1.0), np.inf))
    return 1.0 + (r - 1.0) * np.clip(rho, 0.0, 1.0)
