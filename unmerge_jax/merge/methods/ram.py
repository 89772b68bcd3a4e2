"""Reinforced Agent Merging (RAM, arXiv:2601.13572): ``ram`` and ``ramplus_tl``, every face.

With ``u_k = w_k δ_k`` (weights default to 1), an entry is *active* in model k by the face's rule,
``c`` counts the models active there; shared entries (``c ≥ 2``) are averaged, unique ones
(``c = 1``) are kept, scaled by λ, and entries no model changed stay at the base. The faces
(:data:`FACES`, selected by the ``face`` parameter of ``ram``; ``ramplus_tl`` is the
``tensor_local`` face) differ in the rule and in where λ comes from:

* ``active_mean`` (mergekit's ``ram``; aliases ``mergekit``, ``arm``): active ``|u_k| > ε``;
  shared → mean over the *active* models; unique → ``u_j``.
* ``percentile`` (the sparsity-scaling RAM study's definition; alias ``seed003``): active
  ``|u_k| ≥`` the ``q``-th percentile of ``|u_k|`` in this tensor (linear interpolation, q = 90);
  shared → plain mean over all K; unique → ``λ·u_j`` (λ = ``lambda``, 1.5).
* ``overlap_changed`` (alias ``arm-r``): as ``active_mean``, unique → ``λ_j u_j`` with
  ``λ_j = 1 + (r−1)·clip(overlap_j / changed_j, 0, 1)`` counted over the **whole model**.
* ``overlap_unique`` (the RAM authors' released face; aliases ``arm-r-v2``, ``authors``): as
  ``overlap_changed`` with ``ρ_j = overlap_j / (changed_j − overlap_j)``, ``λ_j = 1 + (r−1)·min(1, ρ_j)``.
  r = 1.0 is RAM, 1.2 RAM+.
* ``tensor_local`` (mergekit's ``ramplus_tl``): as ``active_mean``, unique → ``λ_k u_k`` with
  ``λ_k = 1 + r·clip(shared_k / max(unique_k, ε), 0, α)`` from this tensor's counts (r = 0.1, α = 0.2).

``weighted`` (default true) applies the per-model ``weight``; mergekit 0.1.5's ``ram`` and
``ramplus_tl`` take no weight, so a mergekit YAML for the mergekit faces runs with ``weighted:
false`` unless it says otherwise (``merge.config``), and the weights it lists are ignored, as in mergekit.

``changed_k = #{|u_k| > ε}``, ``overlap_k = #{changed in k and in ≥ 1 other model}``. Statistics:
``percentile`` and ``tensor_local`` make a per-tensor pass (two order statistics; the counts),
``overlap_*`` a whole-model counting pass, ``active_mean`` none. Apply:
:func:`~unmerge_jax.kernels.merge.ram_kernel`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.kernels import merge as K
from unmerge_jax.merge.base import MergeMethod, Resolved, as_bool, as_float, check_name
from unmerge_jax.orderstats import percentile_from_order, percentile_ranks, select_ranks


class Face(NamedTuple):
    """One RAM face: the kernel's activity ``rule`` (``"epsilon"`` | ``"percentile"``), the
    statistics pass it needs, its default ``r`` and a one-line summary."""

    rule: str
    statistics: str
    r: float
    summary: str


FACES = {
    "active_mean": Face("epsilon", "none", 1.0,
                        "active |u| > eps; shared -> mean over the active models; unique -> u (mergekit ram)"),
    "percentile": Face("percentile", "tensor", 1.0,
                       "active |u| >= the q-th percentile per tensor (q 90); shared -> mean over K; unique -> lambda*u "
                       "(lambda 1.5)"),
    "overlap_changed": Face("epsilon", "model", 1.0,
                            "as active_mean; unique -> lambda_j*u, lambda_j = 1 + (r-1)*clip(overlap/changed, 0, 1) "
                            "over the whole model"),
    "overlap_unique": Face("epsilon", "model", 1.0,
                           "as active_mean; unique -> lambda_j*u, lambda_j = 1 + (r-1)*min(1, overlap/unique) over "
                           "the whole model (RAM authors; r 1.0 RAM, 1.2 RAM+)"),
    "tensor_local": Face("epsilon", "tensor", 0.1,
                         "as active_mean; unique -> lambda_k*u, lambda_k = 1 + r*clip(shared/unique, 0, alpha) in "
                         "this tensor (mergekit ramplus_tl)"),
}
# Accepted older names of the faces: the RAM authors' code names, the study's file id, mergekit's.
ALIASES = {"mergekit": "active_mean", "arm": "active_mean", "seed003": "percentile", "arm-r": "overlap_changed",
           "arm-r-v2": "overlap_unique", "authors": "overlap_unique"}
RAM_FACES = (*FACES, *ALIASES)   # every accepted face name


def canonical_face(face: str) -> str:
    """The :data:`FACES` name of ``face`` (an alias or a canonical name)."""
    check_name("RAM face", face, RAM_FACES)
    return ALIASES.get(face, face)


class RAMStats(NamedTuple):
    """Per-tensor inputs of the apply kernel: ``lambdas`` (K,) float32, ``thr`` (K,) float32."""

    lambdas: np.ndarray
    thr: np.ndarray


def ram_lambdas(face: str, r: float, changed, overlap) -> np.ndarray:
    """Per-model unique-region scales of the whole-model faces from whole-model counts, float64 (K,).

    ``active_mean``: 1. ``overlap_changed``: ``1 + (r−1)·clip(overlap/changed, 0, 1)``.
    ``overlap_unique``: ``1 + (r−1)·min(1, overlap/(changed − overlap))`` — where a model's every
    change overlaps (``changed = overlap > 0``) the authors' code divides by zero; we take ρ = ∞ →
    λ = r. A model that changed nothing gets ρ = 0. ``r < 1`` is raised to 1, as in the authors' code.
    """
    face = canonical_face(face)
    changed = np.asarray(changed, dtype=np.float64)
    overlap = np.asarray(overlap, dtype=np.float64)
    r = max(float(r), 1.0)
    if face == "active_mean":
        return np.ones_like(changed)
    with np.errstate(divide="ignore", invalid="ignore"):
        if face == "overlap_changed":
            rho = np.where(changed > 0, overlap / np.where(changed > 0, changed, 1.0), 0.0)
        else:
            uniq = changed - overlap
            rho = np.where(changed == 0, 0.0, np.where(uniq > 0, overlap / np.where(uniq > 0, uniq, 1.0), np.inf))
    return 1.0 + (r - 1.0) * np.clip(rho, 0.0, 1.0)


def tensor_local_lambdas(changed, overlap, eps, r, alpha) -> np.ndarray:
    """mergekit ``ramplus_tl``: ``λ_k = 1 + r·clip(shared_k / max(unique_k, ε), 0, α)`` from one
    tensor's counts (``shared = overlap``, ``unique = changed − overlap``), float32 (K,)."""
    f32 = np.float32
    shared = np.asarray(overlap).astype(f32)
    unique = (np.asarray(changed) - np.asarray(overlap)).astype(f32)
    rho = shared / np.maximum(unique, f32(eps))
    return (f32(1.0) + f32(r) * np.clip(rho, f32(0.0), f32(alpha))).astype(f32)


def check(method: MergeMethod, shared: dict, weights: np.ndarray, density: np.ndarray, at: str) -> dict:
    """``face`` → its canonical name; ``epsilon``, ``alpha``, ``lambda``, ``q``, ``r`` finite
    float32 numbers (``r`` defaults by face); ``epsilon`` and ``alpha`` ≥ 0, ``q`` in [0, 100]."""
    out = dict(shared)
    out["face"] = canonical_face(out["face"])
    out["weighted"] = as_bool("weighted", out.get("weighted", True))
    for n in ("epsilon", "alpha", "lambda", "q"):
        if n in out:
            out[n] = as_float(n, out[n], minimum=0.0 if n in ("epsilon", "alpha") else None)
    if out.get("r") is None:
        out["r"] = FACES[out["face"]].r
    out["r"] = as_float("r", out["r"])
    if "q" in out and not 0.0 <= out["q"] <= 100.0:
        raise UnmergeError(f"percentile q={out['q']} is outside [0, 100]{at}")
    return out


def statistics(res: Resolved) -> str:
    return FACES[res.shared["face"]].statistics


def model_weights(res: Resolved) -> np.ndarray:
    """The (K,) float32 weights ``w_k`` of ``u_k = w_k δ_k``: the per-model weights, or ones when
    ``weighted`` is false (mergekit's ``ram``/``ramplus_tl`` take no weight)."""
    if not res.shared.get("weighted", True):
        return np.ones(len(res.weights), np.float32)
    return np.asarray(res.weights, np.float32)


def count(res: Resolved, chunks) -> np.ndarray:
    """(2, K) int64 ``[changed, overlap]`` of this tensor (additive over tensors), over the
    unpadded chunks."""
    w = model_weights(res)
    eps = np.float32(res.shared["epsilon"])
    changed, overlap = np.zeros(chunks.k, np.int64), np.zeros(chunks.k, np.int64)
    for c in range(len(chunks)):
        ch, ov = K.ram_counts(*chunks.raw(c), w, eps, deltas=chunks.deltas)
        changed += np.asarray(ch)
        overlap += np.asarray(ov)
    return np.stack([changed, overlap])


def finish(res: Resolved, totals) -> np.ndarray:
    changed, overlap = np.broadcast_to(np.asarray(totals, np.int64), (2, len(res.weights)))
    return ram_lambdas(res.shared["face"], res.shared["r"], changed, overlap)


def tensor_stats(res: Resolved, chunks, key) -> RAMStats:
    """``percentile``: each model's threshold from two order statistics of ``|u_k|``;
    ``tensor_local``: λ from this tensor's counts."""
    sh, k, n = res.shared, chunks.k, chunks.n
    thr = np.zeros(k, np.float32)
    if sh["face"] == "tensor_local":
        changed, overlap = count(res, chunks)
        return RAMStats(tensor_local_lambdas(changed, overlap, sh["epsilon"], sh["r"], sh["alpha"]), thr)
    w = model_weights(res)
    if n:
        (r_lo, r_hi), frac = percentile_ranks(n, sh.get("q", 90.0))
        t, _, _ = select_ranks(n, np.tile([r_lo, r_hi], (k, 1)), lambda i, idx: chunks.sampled_abs_bits(i, idx, w),
                               lambda: chunks.abs_bits(w))
        thr = percentile_from_order(t[:, 0].view(np.float32), t[:, 1].view(np.float32), frac)
    return RAMStats(np.full((k,), sh.get("lambda", 1.5), np.float32), thr)


def apply(res: Resolved, chunks, stats, key) -> None:
    """``stats``: None (λ = 1), a :class:`RAMStats`, or the (K,) λ of the whole-model pass."""
    k = chunks.k
    if stats is None:
        stats = RAMStats(np.ones((k,), np.float32), np.zeros(k, np.float32))
    elif not isinstance(stats, RAMStats):
        stats = RAMStats(np.asarray(stats, np.float32), np.zeros(k, np.float32))
    cfg = K.RAMConfig(rule=FACES[res.shared["face"]].rule, deltas=chunks.deltas)
    w = model_weights(res)
    eps = np.float32(res.shared["epsilon"])
    for c in range(len(chunks)):
        chunks.store(c, K.ram_kernel(*chunks.inputs(c), w, stats.lambdas, eps, stats.thr, chunks.limit, cfg=cfg))


def _method(name: str, shared: dict) -> MergeMethod:
    return MergeMethod(name, shared, {"weight": 1.0}, True, check, statistics, apply,
                       tensor_stats=tensor_stats, count=count, finish=finish)


# mergekit 0.1.5: ram (epsilon 1e-5), ramplus_tl (r 0.1, alpha 0.2, epsilon 1e-5); the other
# parameters select and tune our further faces, and ``weighted`` applies the per-model weights.
RAM = _method("ram", {"face": "active_mean", "epsilon": 1e-5, "r": None, "alpha": 0.2, "lambda": 1.5, "q": 90.0,
                      "weighted": True})
RAMPLUS_TL = _method("ramplus_tl", {"face": "tensor_local", "epsilon": 1e-5, "r": 0.1, "alpha": 0.2, "weighted": True})
# The faces that are mergekit's own methods (no per-model weight there).
MERGEKIT_FACES = {"ram": "active_mean", "ramplus_tl": "tensor_local"}
