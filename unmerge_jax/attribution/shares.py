"""Energy shares in Gram space: how much of a target each dictionary entry explains on its own.

The share of entry k is the rise in the NNLS residual when k is left out and the others refitted,
relative to the target's energy:

    share_k = ( min_{a ≥ 0, a_k = 0} ‖v − Da‖²  −  min_{a ≥ 0} ‖v − Da‖² ) / ‖v‖²

with ``‖v − Da‖² = ‖v‖² − 2cᵀa + aᵀGa``: K + 1 NNLS problems per target, all in Gram space (no
pass over the weights). Unlike a coefficient, a share is small for an entry whose contribution
the others can stand in for (a direction every fine-tune of one base shares), and large for an
entry that carries something only it has.

**Null ratio.** How large can the share of an *absent* entry be? Treat each dictionary entry
``d_j`` in turn as a target made of something outside the rest of the dictionary, and fit it with
the others: the largest share entry k gets, relative to what stays unexplained,

    r_k = max_{j ≠ k}  share_k(d_j | D∖j) / unexplained(d_j | D∖j),

is the chance projection of a fine-tune of this family onto entry k, per unit of unexplained
energy. The largest ratio of an entry with a close relative in the dictionary is the share it
takes of that relative; the decisions use the **chance ratio** (:func:`chance_ratio`), the second
largest, never below the dictionary's median of the largest. It comes from ``G`` alone and sets the scale of the presence thresholds
(:mod:`unmerge_jax.attribution.rules`): it is ~3× larger on a 2,048-row compressed problem than on
the 49,152 rows it came from, as chance correlations are.

NNLS here is solved exactly by a batched active-set method (:func:`nnls_active_set`, Lawson and
Hanson's algorithm with every lane of a batch stepping together), so the hundreds of thousands
of small left-out problems of a bootstrap cost a few batched K×K solves; for a positive definite
``G`` the NNLS solution is unique, so it equals the engine's ``nnls`` solver to its tolerance.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Used when the dictionary has a single entry (no entry to hold out): the largest null ratio
# measured on the synthetic preset's compressed problems, rounded up.
R_NULL_SINGLE = 0.05


class Shares(NamedTuple):
    """NNLS fit and left-out shares. Leading axes: (T,) or (S, T) with replicates.

    Attributes:
      coef: (..., K) NNLS coefficients.
      unexplained: (...) ``‖v − Da‖² / ‖v‖²``.
      shares: (..., K) left-out energy shares (≥ 0; 0 where the coefficient is 0).
    """

    coef: np.ndarray
    unexplained: np.ndarray
    shares: np.ndarray


def nnls_active_set(gram, cross, *, allowed=None, tol: float = 1e-12, max_iter: int | None = None):
    """``argmin_{a ≥ 0} aᵀGa − 2cᵀa`` for a batch, exactly (Lawson–Hanson active set).

    Every lane adds the entry with the largest positive gradient ``(c − Ga)_j``, solves
    ``G_PP z = c_P`` on its support P, and steps back to the boundary when z has a non-positive
    entry, dropping it; lanes that finished are frozen. A batch runs ≲ 3K iterations of one
    batched solve.

    Args:
      gram: (B, K, K) symmetric PSD. cross: (B, K).
      allowed: optional (B, K) bool; entries not allowed stay 0.
      tol: stop when ``max_j (c − Ga)_j ≤ tol · max(|c|, diag G · max a)``.
      max_iter: iteration cap (default ``6K + 10``).

    Returns:
      ``(a (B, K), converged (B,))``.
    """
    G = np.asarray(gram, np.float64)
    c = np.asarray(cross, np.float64)
    b, k = c.shape
    allowed = np.ones((b, k), bool) if allowed is None else np.asarray(allowed, bool)
    scale = np.maximum(np.max(np.abs(c), axis=1), np.finfo(np.float64).tiny)
    dscale = np.maximum(np.max(np.abs(np.diagonal(G, axis1=1, axis2=2)), axis=1), np.finfo(np.float64).tiny)
    a = np.zeros((b, k))
    support = np.zeros((b, k), bool)
    need_add = np.ones(b, bool)
    done = np.zeros(b, bool)
    eye = np.eye(k)
    live = np.arange(b)
    for _ in range(max_iter if max_iter is not None else 6 * k + 10):
        # Only the lanes still running are touched (most finish within a few steps).
        Gl, cl, al, sl = G[live], c[live], a[live], support[live]
        rows = np.arange(live.size)
        grad = cl - np.einsum("bkl,bl->bk", Gl, al)
        cand_val = np.where(sl | ~allowed[live], -np.inf, grad)
        cand = np.argmax(cand_val, axis=1)
        optimal = need_add[live] & (cand_val[rows, cand] <= tol * scale[live])
        done[live[optimal]] = True
        keep = ~optimal
        live, Gl, cl, al, sl, cand, rows = live[keep], Gl[keep], cl[keep], al[keep], sl[keep], cand[keep], rows[:keep.sum()]
        if live.size == 0:
            break
        add = need_add[live]
        sl[rows[add], cand[add]] = True
        pp = sl[:, :, None] & sl[:, None, :]
        m = np.where(pp, Gl, 0.0) + eye * (~sl)[:, :, None]
        m += eye * (sl * 1e-13 * dscale[live][:, None])[:, :, None]  # singular only for duplicate entries
        z = np.linalg.solve(m, np.where(sl, cl, 0.0)[:, :, None])[:, :, 0]
        z = np.where(sl, z, 0.0)
        bad = sl & (z <= 0)
        feasible = ~bad.any(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(bad, al / np.where(bad, al - z, 1.0), np.inf)
        alpha = np.clip(np.min(ratio, axis=1), 0.0, 1.0)
        al = np.where(feasible[:, None], z, al + alpha[:, None] * (z - al))
        hit = np.argmin(ratio, axis=1)
        drop = (~feasible)[:, None] & sl & (al <= 0)
        drop[rows[~feasible], hit[~feasible]] = True
        sl &= ~drop
        a[live] = np.where(sl, np.maximum(al, 0.0), 0.0)
        support[live] = sl
        need_add[live] = feasible
    return a, done


def _residual(gram, cross, target_sq, a):
    return np.maximum(target_sq - 2.0 * np.sum(cross * a, axis=-1) + np.einsum("...k,...kl,...l->...", a, gram, a), 0.0)


def fit_subset(gram, cross, target_sq, allowed) -> tuple[np.ndarray, np.ndarray]:
    """NNLS restricted to the entries ``allowed`` and its unexplained share.

    Args:
      gram: (K, K) or (S, K, K). cross: (K, T) or (S, K, T). target_sq: (T,) or (S, T).
      allowed: (T, K) or (S, T, K) bool.
    Returns:
      ``(coef (…, T, K), unexplained (…, T))``.
    """
    gram, cross, target_sq = (np.asarray(x, np.float64) for x in (gram, cross, target_sq))
    single = gram.ndim == 2
    if single:
        gram, cross, target_sq = gram[None], cross[None], target_sq[None]
    s, k, t = cross.shape
    allowed = np.broadcast_to(np.asarray(allowed, bool), (s, t, k))
    g = np.broadcast_to(gram[:, None], (s, t, k, k)).reshape(-1, k, k)
    c = np.swapaxes(cross, 1, 2).reshape(-1, k)
    a, _ = nnls_active_set(g, c, allowed=allowed.reshape(-1, k))
    a = a.reshape(s, t, k)
    vv = np.where(target_sq > 0, target_sq, 1.0)
    res = _residual(gram[:, None], np.swapaxes(cross, 1, 2), target_sq, a)
    unexpl = np.where(target_sq > 0, res / vv, 0.0)
    return (a[0], unexpl[0]) if single else (a, unexpl)


def drop_shares(gram, cross, target_sq) -> Shares:
    """NNLS coefficients, unexplained energy and left-out shares of every target.

    Args:
      gram: (K, K) or (S, K, K). cross: (K, T) or (S, K, T). target_sq: (T,) or (S, T).
    Returns:
      :class:`Shares` with leading axes (T,) or (S, T).
    """
    gram, cross, target_sq = (np.asarray(x, np.float64) for x in (gram, cross, target_sq))
    single = gram.ndim == 2
    if single:
        gram, cross, target_sq = gram[None], cross[None], target_sq[None]
    s, k, t = cross.shape
    # Variant 0: all entries; variant j + 1: entry j left out.
    allowed = np.concatenate([np.ones((1, k), bool), ~np.eye(k, dtype=bool)])          # (K+1, K)
    g = np.broadcast_to(gram[:, None, None], (s, k + 1, t, k, k)).reshape(-1, k, k)
    c = np.broadcast_to(np.swapaxes(cross, 1, 2)[:, None], (s, k + 1, t, k)).reshape(-1, k)
    al = np.broadcast_to(allowed[None, :, None], (s, k + 1, t, k)).reshape(-1, k)
    a, _ = nnls_active_set(g, c, allowed=al)
    a = a.reshape(s, k + 1, t, k)
    res = _residual(gram[:, None, None], np.swapaxes(cross, 1, 2)[:, None], target_sq[:, None], a)  # (S, K+1, T)
    vv = np.where(target_sq > 0, target_sq, 1.0)
    coef0 = a[:, 0]
    shares = np.maximum(res[:, 1:] - res[:, :1], 0.0) / vv[:, None]                    # (S, K, T)
    shares = np.where(coef0 > 0, np.swapaxes(shares, 1, 2), 0.0)
    out = Shares(coef0, np.where(target_sq > 0, res[:, 0] / vv, 0.0), shares)
    return Shares(*(x[0] for x in out)) if single else out


def null_ratio_matrix(gram) -> tuple[np.ndarray, np.ndarray]:
    """All held-out ratios ``R_kj = share_k(d_j | D∖j) / unexplained(d_j | D∖j)`` (``R_jj = 0``).

    Returns:
      ``(R (K, K), seen (K,))``: ``seen[k]`` is False for an entry no held-out fit with unexplained
      energy left uses (exactly dependent entries, or K = 1).
    """
    G = np.asarray(gram, np.float64)
    k = G.shape[0]
    R = np.zeros((k, k))
    seen = np.zeros(k, bool)
    for j in range(k if k >= 2 else 0):
        keep = [i for i in range(k) if i != j]
        sh = drop_shares(G[np.ix_(keep, keep)], G[keep, j][:, None], G[j, j][None])
        if sh.unexplained[0] > 1e-12:
            R[keep, j] = sh.shares[0] / sh.unexplained[0]
            seen[keep] = True
    return R, seen


def null_ratio(gram) -> np.ndarray:
    """Per-entry null ratios ``r_k`` of a dictionary (module docstring) from its Gram matrix (K, K).

    ``r_k = max_{j ≠ k} share_k(d_j | D∖j) / unexplained(d_j | D∖j)``: the largest share entry k
    takes of another entry held out as a target, per unit of that target's unexplained energy. An
    entry with a close relative in the dictionary (two fine-tunes on similar data) gets a large
    ``r_k`` and so a higher presence floor; the others keep the chance level.

    Returns:
      (K,) float64; :data:`R_NULL_SINGLE` for K = 1 (nothing to hold out), and for an entry that is
      never used by a held-out fit with unexplained energy left (exactly dependent entries).
    """
    R, seen = null_ratio_matrix(gram)
    return np.where(seen, R.max(axis=1, initial=0.0), R_NULL_SINGLE)


def chance_ratio(gram) -> np.ndarray:
    """Per-entry chance ratios: the null ratio without the entry's closest relative in the dictionary.

    ``r̃_k = max(R_k(2), median_k' max_j R_k'j)`` with ``R_k(2)`` the second largest of ``R_kj``
    over ``j`` (:func:`null_ratio_matrix`). The largest ratio of an entry with a close relative d_j
    in the dictionary is the share it takes of *that relative* held out — but d_j is in the
    dictionary and takes its own content back; what is left to chance is the projection of the
    other fine-tunes, so the second largest ratio, never below the dictionary's typical (median)
    null ratio. (:data:`R_NULL_SINGLE` for K ≤ 2 and never-used entries, as :func:`null_ratio`.)
    """
    R, seen = null_ratio_matrix(gram)
    k = R.shape[0]
    if k <= 2:
        return np.full(k, R_NULL_SINGLE)
    srt = np.sort(R, axis=1)
    typical = float(np.median(srt[:, -1]))
    return np.where(seen, np.maximum(srt[:, -2], typical), R_NULL_SINGLE)


def group_heterogeneity(group_gram, group_cross, coef) -> np.ndarray:
    """How far one coefficient per entry is from fitting every tensor group: η in [0, 1].

    With the other entries held at their coefficients ``a``, entry k's coefficient in group g is
    ``β_gk = (C_g[k] − Σ_{j≠k} a_j G_g[k, j]) / G_g[k, k]`` (the least-squares coefficient of d_k on
    the partial residual in that group's rows), and with weights ``w_g = G_g[k, k]``

        η_k = 1 − (Σ_g w_g β_gk)² / (Σ_g w_g · Σ_g w_g β_gk²),

    the share of what k explains group by group that one common coefficient does not (a weighted
    variance over a weighted mean square). Content merged from k enters every group k touches
    with one weight: η is near 0, raised only by what the residual projects onto k. A fine-tune
    outside the dictionary projects onto k with a coefficient that changes from group to group:
    η is large. Groups where k is zero do not count; with fewer than two such groups, or where k
    explains nothing (every β = 0), η is 0 (no evidence of heterogeneity).

    Args:
      group_gram: (G, K, K) per-group ``DᵀD``. group_cross: (G, K, T) per-group ``DᵀV``.
      coef: (T, K) coefficients of the whole fit (NNLS).
    Returns:
      (T, K) float64.
    """
    Gg = np.asarray(group_gram, np.float64)
    Cg = np.asarray(group_cross, np.float64)
    a = np.asarray(coef, np.float64)
    w = np.einsum("gkk->gk", Gg)                                          # (G, K)
    fit_others = np.einsum("gkj,tj->gtk", Gg, a) - w[:, None, :] * a[None]  # Σ_{j≠k} a_j G_g[k, j]
    part = np.transpose(Cg, (0, 2, 1)) - fit_others                       # (G, T, K) w·β
    with np.errstate(divide="ignore", invalid="ignore"):
        wb2 = np.where(w[:, None, :] > 0, part ** 2 / np.where(w > 0, w, 1.0)[:, None, :], 0.0)
    num = np.sum(part, axis=0) ** 2                                       # (Σ w β)²
    den = np.sum(w, axis=0)[None, :] * np.sum(wb2, axis=0)                # Σ w · Σ w β²
    n_groups = np.sum(w > 0, axis=0)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where((den > 0) & (n_groups >= 2), 1.0 - num / np.where(den > 0, den, 1.0), 0.0)
    return np.clip(h, 0.0, 1.0)
