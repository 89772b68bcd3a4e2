"""Generalized task arithmetic: ``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``,
``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``.

mergekit's ``GeneralizedTaskArithmeticMerge`` (mergekit 0.1.5 ``generalized_task_arithmetic.py``,
``sparsify.py``): for each model ``δ'_k = sparsify(δ_k)`` — its top-``density`` magnitudes
(``magnitude``, TIES: k = max(1, int(density·n)), ties at the k-th magnitude kept first by
position), a Bernoulli(``density``) keep-mask (``random``, DARE), the band of magnitudes below the
top ``gamma`` (``magnitude_outliers``, Model Breadcrumbs: ⌊density·n⌋ entries kept after the
⌊gamma·n⌋ largest, fewer dropped when both do not fit) or a Bernoulli keep-mask whose probability
rises with the magnitude's rank in its row from ``density − ε`` to ``density + ε``
(``della_magprune``, DELLA; chunks of whole rows), then the rescale rule
(``l1``: ‖δ_k‖₁ / ‖kept‖₁, skipped below 1e-7; ``inverse_density``: 1/density); untouched where
``density ≥ 1``. With ``u_k = w_k δ'_k``, no consensus gives ``m = Σ u_k``, ``D = Σ w_k``; the
``sum`` consensus (TIES) elects ``s = sign(Σ u_k)`` (ties → +) and keeps the agreeing terms,
``m = Σ u_k [sign u_k = s]``, ``D = Σ w_k [sign u_k = s]`` (``D = 0 → 1``). The merge is
``θ_base + λ · (m / D if normalize else m)``.

Statistics pass (``"tensor"``): TIES's exact k-th largest ``|δ_k|`` and per-chunk tie cuts
(``unmerge_jax.orderstats``); DARE ``l1``'s float64 L1 sums, keeping the drawn masks bit-packed
(K × n/8 bytes) so the apply pass does not draw them again (DELLA too); breadcrumbs' two exact
order statistics per model (the top ``keep_to`` and the top ``drop_to``) and their tie cuts.
DELLA's per-row ranks are found on the host per chunk (:func:`~unmerge_jax.orderstats.row_ranks`)
and passed to the kernels. Apply: :func:`~unmerge_jax.kernels.merge.gta_kernel`.

References: Task Arithmetic (arXiv:2212.04089), TIES-Merging (arXiv:2306.01708), DARE
(arXiv:2311.03099), Model Breadcrumbs (arXiv:2312.06795), DELLA-Merging (arXiv:2406.11617).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.kernels import merge as K
from unmerge_jax.merge.base import MergeMethod, Resolved, as_bool, as_float, check_name
from unmerge_jax.orderstats import abs_bits, row_ranks, select_ranks, tie_cuts, topk_counts

RESCALE_RULES = ("l1", "inverse_density")
_SHARED = {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False}
_PER_MODEL = {"weight": 1.0, "density": 1.0}


class GTATensorStats(NamedTuple):
    """Result of the statistics pass over one tensor's chunks.

    Attributes:
      stats: :class:`~unmerge_jax.kernels.merge.GTAStats` (K,) thresholds and L1 scales.
      cut: (n_chunks, K) int32 tie cut-off positions per chunk (magnitude).
      packed: per chunk, the (K, ⌈chunk/8⌉) bit-packed ``random`` masks the L1 pass drew, or None.
      cut_out: (n_chunks, K) int32 tie cut-offs of the dropped top set (``magnitude_outliers``), or None.
    """

    stats: K.GTAStats
    cut: np.ndarray
    packed: list
    cut_out: np.ndarray | None = None


def kernel_config(res: Resolved, deltas: bool, row_len: int | None = None) -> K.GTAConfig:
    """The kernel's static structure. Sparsification is skipped when every density is 1.
    ``row_len``: the chunks' row length, for the per-row ``della_magprune``."""
    opt = res.method.options
    sparsify = opt["sparsify"] if opt["sparsify"] and bool(np.any(res.density < 1.0)) else None
    return K.GTAConfig(sparsify=sparsify, rescale=res.shared.get("rescale") if sparsify else None,
                       consensus=opt["consensus"], normalize=res.shared["normalize"], deltas=deltas,
                       row_len=row_len if sparsify == "della_magprune" else None)


def outlier_ranks(density, gamma, n: int) -> tuple[np.ndarray, np.ndarray]:
    """mergekit ``magnitude_outliers`` as two ranks from the top (K,) int64 each: ``keep_to`` and
    ``drop_to``; a model keeps the entries ranked ``drop_to + 1 … keep_to`` by decreasing ``|δ|``.
    With ``target = ⌊density·n⌋``, ``n_top = ⌊gamma·n⌋``, ``n_bot = max(0, n − target − n_top)``
    (the smallest dropped): ``drop_to = n − n_bot − target``, ``keep_to = drop_to + target``."""
    target = np.asarray([int(d * n) for d in np.ravel(density)], np.int64)
    n_top = np.asarray([int(g * n) for g in np.ravel(gamma)], np.int64)
    n_bot = np.maximum(0, n - target - n_top)
    drop_to = n - n_bot - target
    return drop_to + target, drop_to


def _top_sets(chunks, ranks, want):
    """Thresholds and per-chunk tie cuts of each model's top-``ranks`` set (``ranks`` (K,) int64;
    0 or a model not in ``want``: the empty set, thr = 2³²−1, cut 0)."""
    k, n = chunks.k, chunks.n
    r = np.where(want, ranks, 0)
    thr = np.full(k, 0xFFFFFFFF, np.uint32)
    cut = np.zeros((len(chunks), k), np.int32)
    some = r > 0
    if not np.any(some):
        return thr, cut
    t, n_gt, ties = select_ranks(n, r[:, None], chunks.sampled_abs_bits, lambda: chunks.abs_bits(want=some))
    thr = np.where(some, t[:, 0], thr).astype(np.uint32)
    left = np.where(some, r - n_gt[:, 0], 0)
    cut = tie_cuts(left, np.where(some[:, None], ties[:, 0], 0), thr, chunks.chunk_abs_bits, chunks.sizes)
    return thr, cut


def l1_scale(before, after) -> np.ndarray:
    """mergekit's ``rescaled_masked_tensor`` from accumulated float64 sums: ``‖δ‖₁ / ‖kept‖₁``,
    1 where either is below ``RESCALE_EPS``; float32 (K,)."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    skip = (before < K.RESCALE_EPS) | (after < K.RESCALE_EPS)
    return np.where(skip, 1.0, before / np.where(skip, 1.0, after)).astype(np.float32)


def della_ranks(res: Resolved, chunks, inputs) -> np.ndarray:
    """(K, chunk) int32 row ranks of each model's ``|δ|`` in one chunk's (padded) ``inputs``
    (``della_magprune``; zeros for a model with density 1, which is not sparsified)."""
    base, tensors = inputs
    out = np.zeros((len(tensors), np.size(base)), np.int32)
    for i, t in enumerate(tensors):
        if res.density[i] < 1.0:
            out[i] = row_ranks(abs_bits(t if chunks.deltas else np.subtract(t, base)), chunks.row_len)
    return out


def _init_stats(k: int, res: Resolved | None = None) -> K.GTAStats:
    stats = K.GTAStats(np.zeros(k, np.uint32), np.zeros(k, np.int32), np.ones(k, np.float32))
    if res is not None and res.method.options["sparsify"] == "della_magprune":
        eps = np.asarray(res.columns["epsilon"], np.float64)
        stats = stats._replace(epsilon=eps.astype(np.float32),
                               p_low=(np.asarray(res.density, np.float64) - eps).astype(np.float32))
    return stats


def check(method: MergeMethod, shared: dict, weights: np.ndarray, density: np.ndarray, at: str) -> dict:
    """``normalize`` as a bool, ``rescale`` as None | ``"l1"`` | ``"inverse_density"`` (mergekit's
    ``true`` is ``l1``), ``lambda`` a number; weights may not sum to zero under ``normalize``."""
    out = dict(shared)
    out["normalize"] = as_bool("normalize", out["normalize"])
    if "rescale" in out:
        rule = out["rescale"]
        if rule in (None, False, "none", "false", "False"):
            out["rescale"] = None
        elif rule is True or rule in ("true", "True"):
            out["rescale"] = "l1"
        else:
            check_name("rescale rule", rule, (*RESCALE_RULES, True, False))
    if "lambda" in out:
        out["lambda"] = as_float("lambda", out["lambda"])
    if out["normalize"] and abs(weights.sum()) < K.WEIGHT_EPS:
        raise UnmergeError(f"weights {weights.tolist()} sum to zero but {method.name!r} normalises by their sum{at}; "
                           f"change the weights or set normalize: false")
    return out


def statistics(res: Resolved) -> str:
    cfg = kernel_config(res, True)
    needs = cfg.sparsify in ("magnitude", "magnitude_outliers") or (cfg.sparsify is not None and cfg.rescale == "l1")
    return "tensor" if needs else "none"


def rows(res: Resolved) -> bool:
    """DELLA ranks magnitudes within each row: its chunks hold whole rows."""
    return kernel_config(res, True).sparsify == "della_magprune"


def check_models(res: Resolved, at: str) -> None:
    """``gamma`` in [0, 1] (breadcrumbs); DELLA: ``density ± epsilon`` inside (0, 1) where
    ``density < 1`` (mergekit's rule), ``epsilon ≥ 0``."""
    for i, g in enumerate(res.columns.get("gamma", ())):
        if not 0.0 <= g <= 1.0:
            raise UnmergeError(f"gamma {g:g} of model {i} is outside [0, 1]{at}; use the fraction of largest "
                               f"magnitudes to drop, e.g. 0.01")
    for i, (e, d) in enumerate(zip(res.columns.get("epsilon", ()), res.density)):
        if e < 0 or (d < 1.0 and not (d + e < 1.0 and d - e > 0.0)):
            raise UnmergeError(f"epsilon {e:g} of model {i} with density {d:g}: density ± epsilon must lie inside "
                               f"(0, 1){at}; use a smaller epsilon")


def tensor_stats(res: Resolved, chunks, key) -> GTATensorStats:
    """TIES: each model's exact top-k threshold and tie cuts; DARE ``l1``: the L1 sums (and masks)."""
    cfg = kernel_config(res, chunks.deltas, chunks.row_len)
    k, n = chunks.k, chunks.n
    dens = np.asarray(res.density, np.float32)
    stats = _init_stats(k, res)
    # cut[c]: chunk c keeps the entries tied at the threshold before this position — the first
    # ones of the tensor by position, as many as top-k needs; known before the apply pass, so its
    # kernel is elementwise and its chunks independent.
    cut = np.zeros((len(chunks), k), np.int32)
    if cfg.sparsify == "magnitude":
        ranks = np.where(res.density < 1.0, topk_counts(res.density, n), 0)
        want = ranks > 0
        thr, n_gt, ties = select_ranks(n, ranks[:, None], chunks.sampled_abs_bits,
                                       lambda: chunks.abs_bits(want=want))
        stats = stats._replace(thr=thr[:, 0])
        cut = tie_cuts(ranks - n_gt[:, 0], ties[:, 0], thr[:, 0], chunks.chunk_abs_bits, chunks.sizes)
    cut_out = None
    if cfg.sparsify == "magnitude_outliers":
        # Kept: the top keep_to minus the top drop_to, each top set with ties first by position.
        keep_to, drop_to = outlier_ranks(res.density, res.columns["gamma"], n)
        want = res.density < 1.0
        thr_in, cut = _top_sets(chunks, keep_to, want)
        thr_out, cut_out = _top_sets(chunks, drop_to, want)
        stats = stats._replace(thr=thr_in, thr_out=thr_out, cut_out=np.zeros(k, np.int32))
    packed = [None] * len(chunks)
    if cfg.sparsify is not None and cfg.rescale == "l1":
        before, after = np.zeros(k), np.zeros(k)
        for c in range(len(chunks)):
            st = stats._replace(cut=cut[c]) if cut_out is None else stats._replace(cut=cut[c], cut_out=cut_out[c])
            inputs = chunks.inputs(c)
            ranks = della_ranks(res, chunks, inputs) if cfg.sparsify == "della_magprune" else None
            b1, a1, packed[c] = K.gta_l1_sums(*inputs, dens, st, chunks.start(c), key.seed, key.name, ranks, cfg=cfg)
            before += np.asarray(b1)
            after += np.asarray(a1)
        stats = stats._replace(scale=l1_scale(before, after))
    return GTATensorStats(stats, cut, packed, cut_out)


def apply(res: Resolved, chunks, stats: GTATensorStats | None, key) -> None:
    cfg = kernel_config(res, chunks.deltas, chunks.row_len)
    w = np.asarray(res.weights, np.float32)
    dens = np.asarray(res.density, np.float32)
    lam = np.float32(res.shared.get("lambda", 1.0))
    if stats is None:
        stats = GTATensorStats(_init_stats(chunks.k, res), np.zeros((len(chunks), chunks.k), np.int32),
                               [None] * len(chunks))
    packed = stats.packed
    for c in range(len(chunks)):
        st = stats.stats._replace(cut=stats.cut[c])
        if stats.cut_out is not None:
            st = st._replace(cut_out=stats.cut_out[c])
        inputs = chunks.inputs(c)
        ranks = della_ranks(res, chunks, inputs) if cfg.sparsify == "della_magprune" and packed[c] is None else None
        chunks.store(c, K.gta_kernel(*inputs, w, dens, lam, st, chunks.start(c), key.seed, key.name,
                                     packed[c], chunks.limit, ranks, cfg=cfg))
        packed[c] = None


def masks(res: Resolved, base, tensors, key, deltas: bool = True) -> np.ndarray:
    """(K, n) keep-masks of the method's sparsification on a whole tensor, drawn by
    :func:`~unmerge_jax.kernels.merge.keep_masks` (vmapped over the models): exactly what the
    chunked statistics and apply passes keep."""
    n = int(np.size(base))
    return np.asarray(K.draw_masks(np.asarray(base, np.float32), tuple(np.asarray(t, np.float32) for t in tensors),
                                   np.asarray(res.density, np.float32), topk_counts(res.density, n), key.seed,
                                   key.name, sparsify=res.method.options["sparsify"], deltas=deltas))


def merge_masked(res: Resolved, base, tensors, keep, *, deltas: bool = True):
    """The method on a whole tensor with the given (K, n) keep-masks instead of its own (parity
    tests: feed mergekit's formula and ours the same masks). Returns a JAX array."""
    cfg = kernel_config(res, deltas)._replace(sparsify=res.method.options["sparsify"])
    return K.gta_kernel_masked(base, tuple(tensors), np.asarray(res.weights, np.float32),
                               np.asarray(res.density, np.float32), np.float32(res.shared.get("lambda", 1.0)),
                               np.asarray(keep, bool), cfg=cfg)


def _method(name: str, sparsify: str | None, consensus: str | None, shared: dict, per_model: dict = _PER_MODEL,
            needs_base: bool = True) -> MergeMethod:
    sparse = sparsify is not None
    # Whole-tensor masks by keep_masks exist for magnitude and random; breadcrumbs' and DELLA's are
    # tested through their NumPy references (tests/test_merge_breadcrumbs.py, test_merge_della.py).
    masked = sparsify in ("magnitude", "random")
    extra = sparsify in ("magnitude_outliers", "della_magprune")
    return MergeMethod(name, shared, dict(per_model), needs_base, check, statistics, apply,
                       tensor_stats=tensor_stats if sparse else None, masks=masks if masked else None,
                       options={"sparsify": sparsify, "consensus": consensus},
                       rows=rows if sparsify == "della_magprune" else None,
                       check_models=check_models if extra else None)


# Defaults as mergekit 0.1.5 registers them (normalize, rescale per method).
# linear: Σ w θ / Σ w over full weights; a base, when given, is not averaged in.
LINEAR = _method("linear", None, None, {"normalize": True}, {"weight": 1.0}, needs_base=False)
TASK_ARITHMETIC = _method("task_arithmetic", None, None, {**_SHARED, "normalize": False, "rescale": False})
TIES = _method("ties", "magnitude", "sum", {**_SHARED, "normalize": True, "rescale": False})
DARE_LINEAR = _method("dare_linear", "random", None, {**_SHARED, "normalize": False, "rescale": True})
DARE_TIES = _method("dare_ties", "random", "sum", {**_SHARED, "normalize": False, "rescale": True})
# Model Breadcrumbs (arXiv:2312.06795): magnitude_outliers, per-model gamma (0.01).
BREADCRUMBS = _method("breadcrumbs", "magnitude_outliers", None, {**_SHARED, "normalize": False, "rescale": False},
                      {**_PER_MODEL, "gamma": 0.01})
BREADCRUMBS_TIES = _method("breadcrumbs_ties", "magnitude_outliers", "sum",
                           {**_SHARED, "normalize": False, "rescale": False}, {**_PER_MODEL, "gamma": 0.01})
# DELLA (arXiv:2406.11617): della_magprune, per-model epsilon (0.15); mergekit's rescale is l1.
DELLA = _method("della", "della_magprune", "sum", {**_SHARED, "normalize": True, "rescale": True},
                {**_PER_MODEL, "epsilon": 0.15})
DELLA_LINEAR = _method("della_linear", "della_magprune", None, {**_SHARED, "normalize": False, "rescale": True},
                       {**_PER_MODEL, "epsilon": 0.15})
