"""Per-tensor merge kernels: pure jit-compiled functions on the K task vectors of one tensor.

Every kernel works on one tensor — or one chunk of a flattened tensor — at a time and sees

* ``base`` — the base weights, shape ``S`` (zeros when a method merges full weights without a
  base, e.g. ``linear`` with no ``base_model``);
* ``tensors`` — a tuple of K arrays of shape ``S``: fine-tuned weights (``deltas=False``; the
  kernel forms ``δ_k = θ_k − θ_base`` itself, fused, so no stacked copy of the inputs is needed)
  or task vectors (``deltas=True``, e.g. LoRA ``B@A·α/r``);
* per-model arrays ``weights`` (K,), ``density`` (K,) / ``topk`` (K,), and per-tensor scalars.

Everything that fixes the program's structure (sparsification, consensus, rescale rule, RAM
selection rule) is a frozen hashable static argument, so one program is compiled per (config,
shape, dtype) and swept numbers (weights, densities, λ) reuse it. Randomness (DARE) comes from
the counter-based keys of ``unmerge_jax.kernels.random`` derived from ``(seed, tensor name,
model index)``, so a merge does not depend on the order in which tensors are visited or on
sharding.

The kernels here are the statistics and apply steps of the merge methods in
``unmerge_jax.merge.methods`` (one file per method family), which drive them chunk by chunk:
DARE's L1 sums and keep-masks (:func:`gta_l1_sums`), RAM's changed/overlap counts
(:func:`ram_counts`), and the elementwise apply kernels (:func:`gta_kernel`, :func:`ram_kernel`).
The order statistics a threshold needs (TIES's k-th largest ``|δ|``, the percentile RAM face's
percentile, the per-chunk tie cuts) are found on the host by ``unmerge_jax.orderstats`` and come
in as numbers (:class:`GTAStats`, ``thr``), so every apply kernel is elementwise and the chunked
result equals the whole-tensor one exactly.

Status, not exceptions: the apply kernels mark every entry whose inputs are not all finite, or
whose merged value is not below ``limit`` in magnitude (the largest float32 that the output dtype
can hold), as NaN (:func:`_flag_nonfinite`; elementwise, fused into the same loop). The caller
detects a NaN in the chunk with one NumPy ``max`` and names the culprit on the host — TIES's
trim and RAM's activity masks would otherwise absorb a NaN input silently.

Computation is float32 (the inputs' precision); L1 norms for DARE's ``l1`` rescale are
accumulated in float64. Semantics follow mergekit's ``generalized_task_arithmetic.py``,
``sparsify.py`` and ``ram.py`` (see ``docs/merge.md`` for each formula and where we differ).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unmerge_jax.kernels.random import bernoulli_at, model_keys

# Sparsifications whose keep-masks are random draws (keyed per entry by kernels.random).
_RANDOM = ("random", "della_magprune")

# mergekit's thresholds: rescaling skipped below this L1 norm; |Σw| below this is "zero".
RESCALE_EPS = 1e-7
WEIGHT_EPS = 1e-8


class GTAConfig(NamedTuple):
    """Static structure of a generalized-task-arithmetic merge (linear/TA/TIES/DARE)."""

    sparsify: str | None = None    # None | "magnitude" | "random" | "magnitude_outliers" | "della_magprune"
    rescale: str | None = None     # None | "l1" | "inverse_density"
    consensus: str | None = None   # None | "sum" | "count"
    normalize: bool = False
    deltas: bool = True            # tensors are task vectors (True) or fine-tuned weights
    row_len: int | None = None     # della_magprune: entries per row (chunks hold whole rows)


class RAMConfig(NamedTuple):
    """Static structure of a RAM merge (see :func:`ram_kernel`)."""

    rule: str = "epsilon"          # "epsilon" (|u| > ε, per-model λ) | "percentile" (|u| ≥ thr, one λ)
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


def _flag_nonfinite(merged, b, rows, limit):
    """``merged`` with NaN wherever the base, a task vector or the merged value itself is not finite,
    or ``|merged| ≥ limit`` (the output dtype would overflow; ``limit = +inf`` for float32, None
    for no check). One elementwise select in the kernel's loop: a non-finite ``δ`` that the method
    drops (TIES's trim, RAM's activity mask, DARE's mask) still marks its entry."""
    if limit is None:
        return merged
    ok = jnp.abs(merged) < jnp.asarray(limit, jnp.float32)
    for x in (b, *rows):
        ok = ok & jnp.isfinite(x)
    return jnp.where(ok, merged, jnp.float32(jnp.nan))


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
    # magnitude_outliers: the top entries dropped first, as (thr_out, cut_out) like (thr, cut):
    # keep the top-(thr, cut) entries that are not in the top-(thr_out, cut_out).
    thr_out: jax.Array | np.ndarray | None = None
    cut_out: jax.Array | np.ndarray | None = None
    epsilon: jax.Array | np.ndarray | None = None   # della_magprune: (K,) float32 ε
    p_low: jax.Array | np.ndarray | None = None     # della_magprune: (K,) float32 density − ε


def della_probs(ranks, p_low, epsilon, row_len: int):
    """DELLA's (mergekit ``della_magprune``) keep probabilities, float32: with ``ranks`` the
    0-based ascending rank ``r − 1`` of each ``|δ|`` within its row of ``row_len`` entries (as
    :func:`~unmerge_jax.orderstats.row_ranks` finds them), ``p = (density − ε) + (r − 1)/(L − 1)·2ε``
    — ``density − ε`` for a row's smallest magnitude, ``density + ε`` for its largest — in float32
    as mergekit (``p_low = density − ε``, the float64 difference rounded); a row of one entry
    (mergekit fails there) gets ``p = density``."""
    r = ranks.astype(jnp.float32)
    norm = r / jnp.float32(row_len - 1) if row_len > 1 else jnp.full_like(r, 0.5)
    return p_low.astype(jnp.float32) + (norm * 2.0) * epsilon.astype(jnp.float32)


def _in_top(bits, thr, cut, pos):
    """Entries in a model's top k, given as ``|δ| > thr`` or ``|δ| = thr`` before position ``cut``."""
    thr = jnp.asarray(thr, jnp.uint32)
    return (bits > thr) | ((bits == thr) & (pos < jnp.asarray(cut, jnp.int32)))


def _keep(rows, density, stats, start, keys, sparsify, packed=None, row_len=None, ranks=None):
    """Keep-masks of one chunk (a list of K rows). Magnitude: ``|δ| > thr``, and ``|δ| = thr``
    before position ``cut`` (the host finds where the k-th kept tie lies, so this is elementwise —
    no rank count or cumsum in the kernel); ``magnitude_outliers``: in that top set and not in the
    top ``(thr_out, cut_out)`` set; ``della_magprune``: Bernoulli(:func:`della_probs`).
    ``packed``: the chunk's random masks as drawn by :func:`gta_l1_sums`; ``ranks``: (K, n) int32
    row ranks of ``|δ|`` (``della_magprune``)."""
    c = rows[0].shape[0]
    if sparsify in ("random", "della_magprune"):
        if packed is not None:
            return [jnp.unpackbits(packed[i], count=c).astype(bool) for i in range(len(rows))]
        if sparsify == "della_magprune":
            return [bernoulli_at(keys[i], della_probs(ranks[i], stats.p_low[i], stats.epsilon[i], row_len), start, c)
                    for i, d in enumerate(rows)]
        return [bernoulli_at(keys[i], density[i], start, c) for i in range(len(rows))]
    pos = jax.lax.iota(jnp.int32, c)
    kept = []
    for i, d in enumerate(rows):
        bits = jax.lax.bitcast_convert_type(jnp.abs(d), jnp.uint32)
        top = _in_top(bits, stats.thr[i], stats.cut[i], pos)
        if sparsify == "magnitude_outliers":
            top = top & ~_in_top(bits, stats.thr_out[i], stats.cut_out[i], pos)
        kept.append(top)
    return kept


def keep_mask(d, density, topk, key, sparsify: str):
    """One model's whole-tensor keep-mask, (n,) bool: its top-``topk`` magnitudes of ``d`` (n,)
    (exactly, ties by position; ``density`` unused) or Bernoulli(``density``) keyed by ``key``
    (``topk`` unused)."""
    if sparsify == "magnitude":
        return _topk_mask(jnp.abs(d), topk)
    return bernoulli_at(key, density.astype(jnp.float32), 0, d.shape[0])


def keep_masks(d, density, topk, keys, sparsify: str):
    """(K, n) boolean keep-masks of whole tensors: :func:`keep_mask` vmapped over the K models
    (``d`` (K, n), ``density`` (K,), ``topk`` (K,), ``keys`` (K, 2))."""
    return jax.vmap(partial(keep_mask, sparsify=sparsify))(d, density, topk, keys)


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
def gta_kernel(base, tensors, weights, density, lam, stats: GTAStats, start, seed, nhash, packed=None, limit=None,
               ranks=None, *, cfg: GTAConfig):
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
      limit: optional float32 scalar: entries with a non-finite input or ``|θ| ≥ limit`` come
        out NaN (:func:`_flag_nonfinite`); None: no check.
      ranks: ``della_magprune`` without ``packed``: (K, n) int32 0-based ranks of each ``|δ_k|``
        within its row of ``cfg.row_len`` entries (:func:`~unmerge_jax.orderstats.row_ranks`).
    Returns:
      float32 array of shape ``S``.
    """
    rows, b = _task_vectors(base, tensors, cfg.deltas)
    deltas = rows
    if cfg.sparsify is not None:
        keys = model_keys(seed, nhash, len(rows)) if cfg.sparsify in _RANDOM else None
        kept = _keep(rows, density, stats, start, keys, cfg.sparsify, packed, cfg.row_len, ranks)
        rows = _apply_rule(rows, kept, density, stats.scale, cfg.rescale)
    return _flag_nonfinite(_mix(b, rows, weights, lam, cfg), b, deltas, limit).reshape(base.shape)


@partial(jax.jit, static_argnames=("cfg",))
def gta_l1_sums(base, tensors, density, stats: GTAStats, start, seed, nhash, ranks=None, *, cfg: GTAConfig):
    """Statistics pass of the ``l1`` rescale on one chunk: float64 ``Σ|δ_k|`` and ``Σ|kept δ_k|``
    (K,) each, and — for ``random`` masks — the (K, ⌈n/8⌉) bit-packed masks drawn (``None`` for magnitude masks, which are cheaper
    to recompute from the threshold than to store)."""
    rows, _ = _task_vectors(base, tensors, cfg.deltas)
    keys = model_keys(seed, nhash, len(rows)) if cfg.sparsify in _RANDOM else None
    kept = _keep(rows, density, stats, start, keys, cfg.sparsify, row_len=cfg.row_len, ranks=ranks)
    packed = None
    if cfg.sparsify in _RANDOM:
        # The sums read the masks back from the packed bits: XLA duplicates an elementwise producer
        # into each consumer's fusion, so two consumers of the draw ran threefry twice (9.9 against
        # 4.6 ns per entry here).
        packed = jax.lax.optimization_barrier(jnp.stack([jnp.packbits(m) for m in kept]))
        kept = _keep(rows, density, stats, start, keys, cfg.sparsify, packed, cfg.row_len)
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


@partial(jax.jit, static_argnames=("cfg",))
def ram_kernel(base, tensors, weights, lambdas, eps, thr, limit=None, *, cfg: RAMConfig):
    """RAM on one tensor or chunk; ``u_k = w_k δ_k`` (weights default to 1).

    * ``cfg.rule = "percentile"``: active ``a_k = |u_k| ≥ thr_k``, where ``thr_k`` is a
      per-tensor threshold (the ``q``-th percentile of ``|u_k|``, found on the host by
      ``unmerge_jax.orderstats``); ``c = Σ a_k``; ``c ≥ 2`` → ``(1/K) Σ_k u_k`` (plain mean over
      all K); ``c = 1`` → ``λ · u_j`` of the active model (λ = ``lambdas[0]``); else 0.
    * ``cfg.rule = "epsilon"``: active ``a_k = |u_k| > ε``; ``c ≥ 2`` → ``Σ a_k u_k / c`` (mean
      over the *active* models); ``c = 1`` → ``λ_j u_j`` with the per-model ``lambdas`` (K,);
      else 0. The faces of this rule differ only in where λ comes from (1; a whole-model or a
      tensor-local count of :func:`ram_counts`).

    Args:
      base, tensors: as the module docstring. weights, lambdas: (K,) float. eps: scalar ε.
      thr: (K,) float32 thresholds (``percentile`` rule; ignored otherwise).
      limit: optional float32 scalar, as :func:`gta_kernel`'s (non-finite inputs or ``|θ| ≥
        limit`` → NaN).
    Returns:
      float32 array of shape ``S``.
    """
    rows, b = _task_vectors(base, tensors, cfg.deltas)
    k = len(rows)
    u = [d * weights[i].astype(jnp.float32) for i, d in enumerate(rows)]   # unstacked: one fused loop

    def total(xs):
        return sum(xs[1:], xs[0])

    if cfg.rule == "percentile":
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
    return _flag_nonfinite(b + merged, b, rows, limit).reshape(base.shape)

