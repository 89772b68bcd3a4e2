"""``attribute``: presence decisions, merge method, unknown content and a verdict for every target.

Everything is computed from one pass's statistics — :class:`~unmerge_jax.GramStats` (with
bootstrap replicates) and :class:`~unmerge_jax.attribution.signatures.SignatureStats` — by the rules
of :mod:`unmerge_jax.attribution.rules`; nothing reads the weights again, and the result is a
deterministic function of the statistics (so of the bootstrap seed).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from unmerge_jax.attribution.rules import DEFAULT_RULES, Rules
from unmerge_jax.attribution.shares import chance_ratio, drop_shares, fit_subset, group_heterogeneity, null_ratio
from unmerge_jax.attribution.signatures import SignatureStats
from unmerge_jax.attribution.ties import ties_drop_shares, ties_fit
from unmerge_jax.errors import UnmergeError

ABSENT, PRESENT, UNCERTAIN = 0, 1, 2
# Bootstrap replicates the rules were calibrated with (``calibrate``): the quantiles the presence
# decisions compare are only as good as that count; the commands refuse to decide with fewer.
CALIBRATED_SEEDS = 200
DECISIONS = ("absent", "present", "uncertain")
# Names a caller may give for the merge method, and the model the rules use for each.
METHOD_ALIASES = {"task_arithmetic": "task_arithmetic", "linear": "task_arithmetic", "ta": "task_arithmetic",
                  "ties": "ties", "dare": "dare", "dare_ties": "dare", "dare_linear": "dare"}


class Attribution(NamedTuple):
    """Decisions for T targets over K dictionary entries.

    Attributes:
      atom_names: K entry names. target_names: T target names.
      coef: (T, K) NNLS coefficients over all entries (the engine's plain decomposition).
      coef_lo, coef_hi: (T, K) their bootstrap interval (``rules.ci`` central coverage; NaN without
        replicates).
      weights: (T, K) the identified method's weights on the present entries (task arithmetic /
        DARE: NNLS refit on them; TIES: the TIES-consistent weights, summing to 1); 0 elsewhere.
      share: (T, K) the decision statistic's point value (left-out share in the method's model).
      share_lo, share_hi: (T, K) the values compared with the floor (see the rules).
      decision: (T, K) int: ``ABSENT`` 0, ``PRESENT`` 1, ``UNCERTAIN`` 2.
      floor: (T, K) the presence floors φ_k. gate: (T,) bool, some entry cleared the gate.
      method: (T,) ``task_arithmetic`` (= linear with weights summing to 1), ``ties`` or ``dare``.
      method_confidence: (T,) in [0, 1]: how far (in decades, capped at one) the deciding statistic
        clears its threshold; not a probability.
      density: (T,) the method's density (NaN for task arithmetic).
      weight_sum: (T,) Σ of ``weights`` (task arithmetic vs linear: linear normalises it to 1).
      unexplained: (T,) U, the share of the target the present entries do not explain under the
        identified method (rules §3). unexplained_plain: (T,) u (NNLS, all entries).
      category: (T,) ``known`` / ``mixed`` / ``unknown``.
      evidence: dict of (T,) arrays: ``ties_unexplained`` (q), ``ties_density`` (ρ̂),
        ``zero_fraction`` (f0), ``zero_count``, ``zero_energy_ratio``, ``ties_ratio`` (q/u),
        ``dare_noise`` (ν, 0 unless DARE), ``dare_noise_ratio`` (u / ν at the zeros' density ``1 − f0^{1/n}``:
        the DARE reading needs ≥ ``rules.dare_noise_min``), ``outside_share`` (O), ``gate_stat`` (the gate's statistic),
        ``explained_share`` (E), ``gate_heterogeneity`` (the smallest η of the entries that clear the
        share gate, 1 if none does); (T, K) ``heterogeneity`` (η per entry);
        (T, K) ``plain_share_lo`` (the NNLS shares' lower quantile), ``chance_scale`` (c, the floors'
        scale), ``gate_scale`` (the gate's); and ``r_null`` (K,), the ratio the rules used (the chance
        ratio unless ``robust_null=False``).
      rules: the :class:`Rules` used.
    """

    atom_names: tuple
    target_names: tuple
    coef: np.ndarray
    coef_lo: np.ndarray
    coef_hi: np.ndarray
    weights: np.ndarray
    share: np.ndarray
    share_lo: np.ndarray
    share_hi: np.ndarray
    decision: np.ndarray
    floor: np.ndarray
    gate: np.ndarray
    method: np.ndarray
    method_confidence: np.ndarray
    density: np.ndarray
    weight_sum: np.ndarray
    unexplained: np.ndarray
    unexplained_plain: np.ndarray
    category: np.ndarray
    evidence: dict
    rules: Any

    def present(self, t: int) -> list[str]:
        """Names of the entries decided present in target ``t``."""
        return [n for n, d in zip(self.atom_names, self.decision[t]) if d == PRESENT]

    def records(self) -> list[dict]:
        """One JSON-serialisable dict per target (the shape ``--json`` outputs use)."""
        out = []
        for t, name in enumerate(self.target_names):
            entries = [{"name": a, "coef": float(self.coef[t, k]), "ci": [_f(self.coef_lo[t, k]), _f(self.coef_hi[t, k])],
                        "weight": float(self.weights[t, k]), "share": float(self.share[t, k]),
                        "decision": DECISIONS[int(self.decision[t, k])]} for k, a in enumerate(self.atom_names)]
            out.append({"target": name, "verdict": str(self.category[t]), "present": self.present(t),
                        "method": {"name": str(self.method[t]), "confidence": float(self.method_confidence[t]),
                                   "density": _f(self.density[t])},
                        "unexplained": float(self.unexplained[t]), "weight_sum": float(self.weight_sum[t]),
                        "entries": entries})
        return out


def _f(x) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def _ratio(num, den) -> np.ndarray:
    """``num / den`` where ``den > 0``, ∞ elsewhere (float64; no division warnings)."""
    den = np.asarray(den, np.float64)
    return np.where(den > 0, np.asarray(num, np.float64) / np.where(den > 0, den, 1.0), np.inf)


def _margin(ratio) -> np.ndarray:
    """Decades by which a statistic clears its threshold (ratio ≥ 1 clears), in [0, 1]."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.clip(np.log10(np.maximum(np.asarray(ratio, np.float64), 1e-300)), 0.0, 1.0)


class Evidence(NamedTuple):
    """The rule-independent statistics of the decisions (the costly part: every bootstrap replicate's
    left-out shares, the null ratios, the TIES fits at every density), computed once per pass.

    Attributes:
      point: :class:`~unmerge_jax.attribution.shares.Shares` of the full data (T targets).
      share_lo, share_hi: (T, K) ``rules.lo`` / ``rules.hi`` bootstrap quantiles of the left-out shares
        (the point shares without replicates).
      coef_lo, coef_hi: (T, K) the coefficients' central ``rules.ci`` interval (NaN without replicates).
      r_null: (K,) :func:`~unmerge_jax.attribution.shares.null_ratio`; r_chance: (K,)
        :func:`~unmerge_jax.attribution.shares.chance_ratio`.
      ties_unexplained: (P, T) q at each density; ties_shares: (P, T, K) TIES left-out shares.
      zero_count, zero_fraction, zero_energy_ratio: (T,) exact-zero statistics.
      dare_density: (T,) ``1 − f0^{1/n}``, n the entries whose point share is ≥ ``rules.major`` of the largest.
      heterogeneity: (T, K) η, how far one coefficient per entry is from fitting every tensor group
        (:func:`~unmerge_jax.attribution.shares.group_heterogeneity` of the NNLS coefficients).
      settings: ``(lo, hi, ci, major)`` of the rules it was computed with.
    """

    point: Any
    share_lo: np.ndarray
    share_hi: np.ndarray
    coef_lo: np.ndarray
    coef_hi: np.ndarray
    r_null: np.ndarray
    r_chance: np.ndarray
    ties_unexplained: np.ndarray
    ties_shares: np.ndarray
    zero_count: np.ndarray
    zero_fraction: np.ndarray
    zero_energy_ratio: np.ndarray
    dare_density: np.ndarray
    heterogeneity: np.ndarray
    settings: tuple


def evidence(stats, signatures: SignatureStats, rules: Rules = DEFAULT_RULES) -> Evidence:
    """The statistics :func:`attribute` compares with its thresholds (none of which they depend on).

    Pass the result to ``attribute(..., precomputed=...)`` to decide under several rules without
    recomputing it (calibration does).
    """
    _check(stats, signatures)
    G = np.asarray(stats.gram, np.float64)
    C = np.asarray(stats.cross, np.float64)
    vv = np.asarray(stats.target_sq, np.float64)
    # Plain NNLS, left-out shares, and their bootstrap replicates.
    point = drop_shares(G, C, vv)
    if stats.n_seeds:
        boot = drop_shares(stats.boot_gram, stats.boot_cross, stats.boot_target_sq)
        s_lo = np.quantile(boot.shares, rules.lo, axis=0)
        s_hi = np.quantile(boot.shares, rules.hi, axis=0)
        half = (1.0 - rules.ci) / 2
        coef_lo = np.quantile(boot.coef, half, axis=0)
        coef_hi = np.quantile(boot.coef, 1.0 - half, axis=0)
    else:
        s_lo = s_hi = point.shares
        coef_lo = coef_hi = np.full_like(point.coef, np.nan)
    # TIES consistency at every density of the grid.
    tfit, tshares = ties_drop_shares(signatures.ties_dd, signatures.ties_dv, signatures.ties_vv)   # (P, T)
    zero_count = np.asarray(signatures.zero_count, np.float64)
    f0 = zero_count / max(float(signatures.n_active), 1.0)
    ze = np.asarray(signatures.zero_energy, np.float64)                                  # (K, T)
    a2 = point.coef ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        zero_energy_ratio = np.sum(a2 * ze.T, axis=1) / (f0 * np.sum(a2 * np.diag(G), axis=1))
    sh = point.shares
    major = (point.coef > 0) & (sh >= rules.major * np.max(sh, axis=1, keepdims=True))
    n_major = np.maximum(major.sum(axis=1), 1)
    rho = np.clip(1.0 - np.clip(f0, 0.0, 1.0) ** (1.0 / n_major), 1e-6, 1.0)
    hetero = group_heterogeneity(signatures.group_gram, signatures.group_cross, point.coef)
    return Evidence(point, s_lo, s_hi, coef_lo, coef_hi, null_ratio(G), chance_ratio(G), tfit.unexplained, tshares,
                    zero_count, f0, zero_energy_ratio, rho, hetero, _settings(rules))


def _settings(rules: Rules) -> tuple:
    return (rules.lo, rules.hi, rules.ci, rules.major)


def dare_noise(coef, gram, target_sq, density, cap=None) -> np.ndarray:
    """DARE's expected drop-and-rescale energy as a share of each target: ``(1/ρ − 1) Σ_k a_k² G_kk / ‖v‖²``.

    A DARE merge keeps each entry of ``w_k d_k`` with probability ρ and rescales it by 1/ρ, so it adds
    zero-mean noise of energy ``(1/ρ − 1) Σ_k w_k² ‖d_k‖²`` that no combination of the entries explains.

    Args:
      coef: (T, K) weights (NNLS coefficients stand in for w). gram: (K, K). target_sq: (T,).
      density: (T,) ρ. cap: optional (T,) upper bound (the unexplained share u: noise cannot exceed it).
    """
    rho = np.clip(np.asarray(density, np.float64), 1e-6, 1.0)
    vv = np.asarray(target_sq, np.float64)
    nu = (1.0 / rho - 1.0) * np.sum(np.asarray(coef, np.float64) ** 2 * np.diag(np.asarray(gram, np.float64)), axis=1)
    nu = nu / np.where(vv > 0, vv, 1.0)
    return nu if cap is None else np.minimum(nu, cap)


def explained_share(unexplained, outside) -> np.ndarray:
    """The share of a target's energy the dictionary explains, out of what is not the merge's own noise.

    ``E = (1 − u) / (1 − u + O)`` with u the NNLS unexplained share over all entries and O the
    outside share of the identified method (rules §2: u for task arithmetic, the TIES-unexplained
    q for TIES, ``u − noise_scale · ν`` for DARE): the NNLS fit explains ``1 − u``; of the ``u`` it
    leaves, only O is content from outside the dictionary (the rest is TIES's trimming and
    disjoint mean, or DARE's drop noise, which no linear fit explains but the dictionary made).
    1 for an exact fit (u = 0); 0 when nothing is explained.

    Args:
      unexplained: (T,) u in [0, 1]. outside: (T,) O in [0, 1].
    Returns:
      (T,) float64 in [0, 1].
    """
    u = np.clip(np.asarray(unexplained, np.float64), 0.0, 1.0)
    o = np.clip(np.asarray(outside, np.float64), 0.0, 1.0)
    den = (1.0 - u) + o
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (1.0 - u) / np.where(den > 0, den, 1.0), 0.0)


def _check(stats, sig: SignatureStats):
    from unmerge_jax.stats import GramStats

    if not isinstance(stats, GramStats):
        raise UnmergeError(f"attribute needs GramStats (from unmerge_jax.gram_stats), got {type(stats).__name__}")
    if not isinstance(sig, SignatureStats):
        raise UnmergeError(f"attribute needs SignatureStats (from attribution.signature_stats), got {type(sig).__name__}")
    k, t = np.shape(stats.cross)
    if sig.n_atoms != k or sig.n_targets != t:
        raise UnmergeError(f"the Gram statistics have K={k} entries and T={t} targets but the signature statistics "
                           f"have K={sig.n_atoms}, T={sig.n_targets}; compute both in the same pass")
    for name in ("gram", "cross", "target_sq"):
        if not np.all(np.isfinite(np.asarray(getattr(stats, name)))):
            raise UnmergeError(f"statistics field {name} holds NaN/Inf; the inputs they came from had non-finite values")


def attribute(stats, signatures: SignatureStats, *, rules: Rules = DEFAULT_RULES, method: str | None = None,
              density: float | None = None, atom_names: Sequence[str] | None = None,
              target_names: Sequence[str] | None = None, precomputed: Evidence | None = None) -> Attribution:
    """Decide, per target, which dictionary entries are present, the merge method and the verdict.

    Args:
      stats: :class:`~unmerge_jax.GramStats`; with bootstrap replicates (``seeds=S``, 200 is
        cheap) the presence decisions use their intervals, without them the point values.
      signatures: :class:`SignatureStats` of the same rows and targets.
      rules: thresholds (:class:`~unmerge_jax.attribution.rules.Rules`).
      method: the merge method if known (``task_arithmetic``, ``linear``, ``ties``, ``dare``,
        ``dare_ties``, ``dare_linear``) instead of identifying it; applies to every target.
      density: with ``method``: the merge's density (TIES: must be on the signature grid).
      atom_names, target_names: labels (default ``d0…``, ``t0…``).
      precomputed: :func:`evidence` of the same ``stats`` and ``signatures``, computed with this
        ``rules``' ``lo``/``hi``/``ci``/``major``, to skip recomputing it.

    Returns:
      :class:`Attribution`.
    """
    _check(stats, signatures)
    G = np.asarray(stats.gram, np.float64)
    C = np.asarray(stats.cross, np.float64)
    vv = np.asarray(stats.target_sq, np.float64)
    k, t = C.shape
    atom_names = tuple(atom_names) if atom_names is not None else tuple(f"d{i}" for i in range(k))
    target_names = tuple(target_names) if target_names is not None else tuple(f"t{i}" for i in range(t))
    if len(atom_names) != k or len(target_names) != t:
        raise UnmergeError(f"got {len(atom_names)} entry names and {len(target_names)} target names for "
                           f"K={k} entries and T={t} targets")
    forced = None if method is None else METHOD_ALIASES.get(str(method).lower())
    if method is not None and forced is None:
        raise UnmergeError(f"unknown merge method {method!r} for attribution; choose one of: {', '.join(sorted(METHOD_ALIASES))}")
    dens_grid = np.asarray(signatures.densities, np.float64)
    forced_p = None
    if density is not None:
        if forced is None:
            raise UnmergeError("a density needs the merge method too (method='ties' or 'dare')")
        if not 0 < float(density) <= 1:
            raise UnmergeError(f"density must be in (0, 1], got {density}")
        if forced == "ties":
            hit = np.flatnonzero(np.isclose(dens_grid, float(density), atol=1e-9))
            if not hit.size:
                raise UnmergeError(f"TIES density {density} is not on the signature grid {dens_grid.tolist()}; "
                                   f"accumulate the signatures with it in densities")
            forced_p = int(hit[0])

    ev = precomputed if precomputed is not None else evidence(stats, signatures, rules)
    if ev.settings != _settings(rules):
        raise UnmergeError(f"precomputed evidence was computed with (lo, hi, ci, major) = {ev.settings}, the rules "
                           f"have {_settings(rules)}; recompute it with these rules")
    point, u, s_lo, s_hi = ev.point, ev.point.unexplained, ev.share_lo, ev.share_hi
    tfit, tshares, f0, zero_count = ev.ties_unexplained, ev.ties_shares, ev.zero_fraction, ev.zero_count
    p_hat = np.argmin(tfit, axis=0) if forced_p is None else np.full(t, forced_p)
    q = tfit[p_hat, np.arange(t)]
    r_null = ev.r_chance if rules.robust_null else ev.r_null

    # 1. Method.
    zeros = zero_count > 0
    ratio = _ratio(q, u)
    is_ties = (ratio <= rules.ties_ratio) & (zeros | (ratio <= rules.ties_ratio_nozero))
    # Zeros are drops only if the target also holds the rescaling noise of that many drops (zeros
    # a bfloat16 merge rounds back to the base come with no such noise).
    nu_zeros = dare_noise(point.coef, G, vv, ev.dare_density)
    noise_ratio = _ratio(u, nu_zeros)
    drops = zeros & (noise_ratio >= rules.dare_noise_min)
    if forced is None:
        meth = np.where(is_ties, "ties", np.where(drops, "dare", "task_arithmetic"))
        conf = np.where(is_ties, _margin(rules.ties_ratio / np.maximum(ratio, 1e-300)), _margin(ratio / rules.ties_ratio))
        conf = np.where(meth == "dare", conf * np.minimum(1.0, zero_count / 20.0), conf)  # few zeros: weak evidence
        with np.errstate(divide="ignore", invalid="ignore"):  # dare_noise_min = 0: every zero a drop
            noise_margin = _margin(np.where(drops, noise_ratio / rules.dare_noise_min,
                                            rules.dare_noise_min / np.maximum(noise_ratio, 1e-300)))
        conf = np.where(zeros & ~is_ties, conf * noise_margin, conf)
    else:
        meth = np.full(t, forced)
        conf = np.ones(t)
    meth = meth.astype(object)
    is_dare = meth == "dare"

    # 2. Chance scale, gate and presence. DARE: the drop noise ν is not outside content; it takes
    # an absent entry's share at the rate of one direction among the n active rows.
    rho_d = ev.dare_density if not (forced == "dare" and density is not None) else np.full(t, float(density))
    nu = np.where(is_dare, dare_noise(point.coef, G, vv, rho_d, u), 0.0)
    U_out = np.where(meth == "ties", q, np.maximum(u - rules.noise_scale * nu, 0.0))
    n_act = max(float(signatures.n_active), 1.0)
    scale = U_out[:, None] * r_null[None, :] + (rules.noise_dare * nu / n_act)[:, None]      # (T, K)
    share = np.where((meth == "ties")[:, None], tshares[p_hat, np.arange(t)], point.shares)
    lo = np.where((meth == "ties")[:, None], share, s_lo)
    hi = np.where((meth == "ties")[:, None], 2.0 * share, s_hi)
    gate_level = np.array([rules.gate(m) for m in meth])
    if rules.ties_gate_on_ties:
        gate_lo, gate_scale = lo, scale
    else:
        gate_lo, gate_scale = s_lo, np.where((meth == "ties")[:, None], (u[:, None] * r_null[None, :]), scale)
    gate_ratio = (gate_lo - rules.eps) / np.maximum(gate_scale, 1e-300)                     # (T, K)
    gate_stat = np.max(gate_ratio, axis=1)
    # The gate's entry must also be consistent across tensor groups: the smallest heterogeneity
    # among the entries that clear the share gate (1 when none does).
    clears = gate_ratio > gate_level[:, None]
    gate_hetero = np.min(np.where(clears, ev.heterogeneity, 1.0), axis=1, initial=1.0)
    hetero_level = np.array([rules.hetero(m) for m in meth])
    explained = explained_share(u, U_out)
    explained_level = np.array([rules.explained(m) for m in meth])
    gate = (gate_stat > gate_level) & (gate_hetero <= hetero_level) & (explained > explained_level)
    floor = np.array([rules.floor(m) for m in meth])[:, None] * scale + rules.eps              # (T, K)
    present = gate[:, None] & (lo > floor)
    uncertain = ~present & (hi > floor)
    decision = np.where(present, PRESENT, np.where(uncertain, UNCERTAIN, ABSENT)).astype(np.int8)

    # 3. Unexplained share under the method, refitted on the present entries.
    coef_p, u_p = fit_subset(G, C, vv, present)
    U = u_p.copy()
    weights = coef_p.copy()
    dens_out = np.full(t, np.nan)
    tp = np.flatnonzero(meth == "ties")
    if tp.size:
        pp = p_hat[tp]
        fit = ties_fit(signatures.ties_dd[pp, tp], signatures.ties_dv[pp, tp], signatures.ties_vv[pp, tp],
                       exclude=~present[tp])
        has = present[tp].any(axis=1)
        weights[tp] = np.where(has[:, None], fit.weights, 0.0)
        U[tp] = np.where(has, fit.unexplained, 1.0)
        dens_out[tp] = dens_grid[pp]
    dp = np.flatnonzero(meth == "dare")
    if dp.size:
        sh = point.shares[dp]
        major = present[dp] & (sh >= rules.major * np.max(sh, axis=1, keepdims=True))
        n = np.maximum(major.sum(axis=1), 1)
        rho = np.full(dp.size, float(density)) if (forced == "dare" and density is not None) else \
            1.0 - np.clip(f0[dp], 0.0, 1.0) ** (1.0 / n)
        rho = np.clip(rho, 1e-6, 1.0)
        noise = (1.0 / rho - 1.0) * np.sum(np.where(present[dp], coef_p[dp] ** 2, 0.0) * np.diag(G), axis=1)
        U[dp] = u_p[dp] - noise / np.where(vv[dp] > 0, vv[dp], 1.0)
        dens_out[dp] = rho
    U = np.clip(U, 0.0, 1.0)
    U = np.where(present.any(axis=1), U, 1.0)

    # 4. Verdict.
    known_level = np.array([rules.known(m) for m in meth])
    category = np.where(~present.any(axis=1), "unknown", np.where(U <= known_level, "known", "mixed")).astype(object)

    ev_out = {"ties_unexplained": q, "ties_density": dens_grid[p_hat], "zero_fraction": f0, "zero_count": zero_count,
                "zero_energy_ratio": ev.zero_energy_ratio, "ties_ratio": ratio, "plain_share_lo": s_lo, "r_null": r_null,
                "dare_noise": nu, "dare_noise_ratio": noise_ratio, "outside_share": U_out, "chance_scale": scale, "gate_scale": gate_scale,
              "gate_stat": gate_stat, "explained_share": explained, "heterogeneity": ev.heterogeneity,
              "gate_heterogeneity": gate_hetero}
    return Attribution(atom_names, target_names, point.coef, ev.coef_lo, ev.coef_hi, weights, share, lo, hi, decision,
                       floor, gate, meth, conf, dens_out, weights.sum(axis=1), U, u, category, ev_out, rules)
