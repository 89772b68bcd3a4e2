"""TIES-aware decomposition: the weights that make a target a TIES merge of dictionary entries.

A TIES merge (trim to density ρ, elect signs, disjoint weighted mean, scale λ) is not linear in
the task vectors, so least squares on them misreads it: where a strong and a weak task vector are
both kept and agree, the mean lies *between* them, so the weak one looks like it pulls the fit
the wrong way and NNLS gives it 0. But every row satisfies ``Σ_k w_k x_kr = 0`` with
``x_kr = e_kr (λ d_kr − v_r)`` (see :mod:`unmerge_jax.attribution.signatures`), linear in w. With
``Q(λ) = λ² A − λ (B + Bᵀ) + C`` (``A, B, C`` = ``ties_dd, ties_dv, ties_vv`` of one target and
density), the TIES weights solve

    min_w  wᵀ Q(λ) w   subject to  w ≥ 0,  Σ_k w_k = 1

(the scale of w cancels in the disjoint mean; mergekit's TIES normalises the weights too), and

    q = wᵀ Q(λ) w / wᵀ C w

is the *TIES-unexplained share*: the share of the (count-weighted) target that no TIES merge of
these entries at this density produces (0 up to float32 rounding for a true TIES merge of
dictionary entries). λ is 1 in mergekit unless set; with ``lam=None`` it is re-estimated, for
fixed w, as ``wᵀ B̃ w / wᵀ A w`` (``B̃`` the symmetric part of B), alternating with w.

The simplex-constrained QP is solved exactly by a batched primal active-set method
(:func:`simplex_qp`), over targets, densities and left-out entries at once. (A penalty on
``Σw = 1`` handed to the engine's FISTA NNLS converges too, but ``Q`` is nearly singular exactly
when the fit is good, and FISTA then needs ~10⁴ steps.)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class TiesFit(NamedTuple):
    """TIES-consistent weights. Leading axes as the inputs' (e.g. (P, T) or (P, T, K+1)).

    Attributes:
      weights: (..., K) non-negative, summing to 1.
      lam: (...) the scale λ used.
      unexplained: (...) q, the TIES-unexplained share in [0, 1].
    """

    weights: np.ndarray
    lam: np.ndarray
    unexplained: np.ndarray


def simplex_qp(Q, exclude=None, *, tol: float = 1e-12, max_iter: int | None = None):
    """``argmin_{w ≥ 0, Σw = 1} wᵀQw`` for a batch of PSD (B, K, K), by a primal active-set method.

    Lawson–Hanson's scheme with the equality constraint kept exactly: from the best vertex, add the
    entry whose gradient ``(Qw)_k`` is most below the support's common value ``wᵀQw`` (the KKT
    multiplier), solve ``[Q_P 1; 1ᵀ 0][z; ν] = [0; 1]`` on the support P, and step back to the
    boundary (dropping the entry that hits 0) when z leaves the simplex. Every lane runs the same
    iterations with finished lanes frozen, so a batch is a handful of batched (K+1)² solves; the
    result is exact (no step size, no penalty), whatever the conditioning of Q.

    Args:
      Q: (B, K, K) symmetric PSD.
      exclude: optional (B, K) bool, entries held at 0.
      tol: optimality tolerance on ``(Qw)_k − wᵀQw ≥ −tol·max_k Q_kk``.
      max_iter: iteration cap (default ``6K + 10``).

    Returns:
      ``(w (B, K), converged (B,))``.
    """
    Q = np.asarray(Q, np.float64)
    b, k, _ = Q.shape
    allowed = np.ones((b, k), bool) if exclude is None else ~np.asarray(exclude, bool)
    diag = np.diagonal(Q, axis1=1, axis2=2)
    scale = np.maximum(np.max(np.abs(diag), axis=1), np.finfo(np.float64).tiny)
    lanes = np.arange(b)
    first = np.argmin(np.where(allowed, diag, np.inf), axis=1)
    support = np.zeros((b, k), bool)
    support[lanes, first] = True
    w = support.astype(np.float64)
    need_add = np.ones(b, bool)
    done = ~allowed.any(axis=1)
    eye = np.eye(k)
    for _ in range(max_iter if max_iter is not None else 6 * k + 10):
        g = np.einsum("bkl,bl->bk", Q, w)
        lam = np.sum(w * g, axis=1)
        viol = np.where(support | ~allowed, np.inf, g - lam[:, None])
        cand = np.argmin(viol, axis=1)
        optimal = viol[lanes, cand] >= -tol * scale
        done |= need_add & optimal
        if done.all():
            break
        add = need_add & ~done
        support[lanes[add], cand[add]] = True
        # Equality-constrained minimum on the support (off-support rows: identity, z = 0).
        m = np.zeros((b, k + 1, k + 1))
        pp = support[:, :, None] & support[:, None, :]
        m[:, :k, :k] = np.where(pp, Q, 0.0) + eye * (~support)[:, :, None]
        m[:, :k, :k] += eye * (support * 1e-14 * scale[:, None])[:, :, None]  # singular only for duplicate entries
        m[:, :k, k] = support
        m[:, k, :k] = support
        rhs = np.zeros((b, k + 1))
        rhs[:, k] = 1.0
        z = np.linalg.solve(m, rhs[:, :, None])[:, :k, 0]
        z = np.where(support, z, 0.0)
        bad = support & (z <= 0)
        feasible = ~bad.any(axis=1)
        live = ~done
        take = live & feasible
        w = np.where(take[:, None], z, w)
        step = live & ~feasible
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(bad, w / np.where(bad, w - z, 1.0), np.inf)
        alpha = np.clip(np.min(ratio, axis=1), 0.0, 1.0)
        moved = w + alpha[:, None] * (z - w)
        w = np.where(step[:, None], moved, w)
        drop = step[:, None] & support & (w <= 1e-15)
        # The entry that set alpha leaves the support (guards against rounding keeping it).
        hit = np.argmin(ratio, axis=1)
        drop[lanes[step], hit[step]] = True
        support &= ~drop
        w = np.where(support, np.maximum(w, 0.0), 0.0)
        w = w / np.maximum(w.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
        need_add = np.where(live, feasible, need_add)
    return w, done


def _quad(w, M):
    return np.einsum("...k,...kl,...l->...", w, M, w)


def ties_fit(dd, dv, vv, *, lam: float | None = 1.0, exclude=None, n_lambda_steps: int = 50) -> TiesFit:
    """TIES-consistent weights of targets from their TIES-consistency sums.

    Args:
      dd, dv, vv: (..., K, K) ``ties_dd``, ``ties_dv``, ``ties_vv`` (any leading axes, e.g. (P, T)).
      lam: the merge's λ, or None to estimate it (alternating with w, at most ``n_lambda_steps``
        times, until λ moves by less than 1e-12).
      exclude: optional (..., K) bool: entries forced to 0 (left-out refits).

    Returns:
      :class:`TiesFit`.
    """
    dd, dv, vv = (np.asarray(x, np.float64) for x in (dd, dv, vv))
    lead, k = dd.shape[:-2], dd.shape[-1]
    A, B, C = (x.reshape(-1, k, k) for x in (dd, dv, vv))
    Bs = 0.5 * (B + B.transpose(0, 2, 1))
    ex = None if exclude is None else np.broadcast_to(np.asarray(exclude, bool), lead + (k,)).reshape(-1, k)
    lam_arr = np.full(A.shape[0], 1.0 if lam is None else float(lam))
    steps = 1 if lam is not None else max(1, int(n_lambda_steps))
    for step in range(steps):
        Q = lam_arr[:, None, None] ** 2 * A - 2.0 * lam_arr[:, None, None] * Bs + C
        w, _ = simplex_qp(Q, ex)
        if lam is None:
            den = _quad(w, A)
            new = np.where(den > 0, _quad(w, Bs) / np.where(den > 0, den, 1.0), 1.0)
            moved = np.max(np.abs(new - lam_arr)) if new.size else 0.0
            lam_arr = new
            if moved <= 1e-12:
                break
    Q = lam_arr[:, None, None] ** 2 * A - 2.0 * lam_arr[:, None, None] * Bs + C
    den = _quad(w, C)
    q = np.where(den > 0, np.clip(_quad(w, Q) / np.where(den > 0, den, 1.0), 0.0, 1.0), 1.0)
    return TiesFit(w.reshape(lead + (k,)), lam_arr.reshape(lead), q.reshape(lead))


def ties_drop_shares(dd, dv, vv, *, lam: float | None = 1.0) -> tuple[TiesFit, np.ndarray]:
    """The TIES fit and each entry's share: the rise of q when that entry is left out and refitted.

    Args:
      dd, dv, vv: (..., K, K).
    Returns:
      ``(fit, shares)``: the full :class:`TiesFit` (leading axes ``...``) and (..., K) shares
      ``q(without k) − q`` (≥ 0 up to solver tolerance; 0 for entries the fit does not use).
    """
    dd, dv, vv = (np.asarray(x, np.float64) for x in (dd, dv, vv))
    k = dd.shape[-1]
    # Variant 0 is the full fit, variant j+1 leaves entry j out.
    ex = np.concatenate([np.zeros((1, k), bool), np.eye(k, dtype=bool)])
    rep = lambda x: np.broadcast_to(x[..., None, :, :], x.shape[:-2] + (k + 1, k, k))
    fit = ties_fit(rep(dd), rep(dv), rep(vv), lam=lam, exclude=ex)
    full = TiesFit(fit.weights[..., 0, :], fit.lam[..., 0], fit.unexplained[..., 0])
    shares = np.maximum(fit.unexplained[..., 1:] - full.unexplained[..., None], 0.0)
    shares = np.where(full.weights > 0, shares, 0.0)
    return full, shares
