"""Calibrate the decision thresholds on some seeds, report them on others.

* :func:`problems_from_deltas` / :func:`synthetic_problems` — the experiment's 72 targets (known,
  mixed, unknown × task arithmetic, linear, TIES, DARE) merged by the engine's own
  ``merge_tensors``, compressed by its top-k rule (and uncompressed), with the statistics one
  pass produces: :class:`~unmerge_jax.GramStats` with bootstrap replicates and
  :class:`~unmerge_jax.attribution.signatures.SignatureStats`.
* :func:`score` / :func:`summarize` — the decisions against the truth, and the figures the
  decisions must reach (:data:`TARGETS`).
* :func:`calibrate` — thresholds from calibration problems: each one is put halfway (in log scale)
  between the two classes it separates, or where it makes the fewest weighted errors when they
  overlap (:func:`split`). The truth is used here and only here.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import numpy as np

from unmerge_jax.attribution.decide import PRESENT, attribute
from unmerge_jax.attribution.rules import DEFAULT_RULES, Rules
from unmerge_jax.attribution.signatures import DENSITY_GRID, signature_stats, trim_thresholds
from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.names import group_ids

# The figures the decisions must reach on hold-out seeds (known targets: per merge method).
TARGETS = {
    "known_precision_task_arithmetic": 1.0, "known_recall_task_arithmetic": 1.0,
    "known_precision_linear": 1.0, "known_recall_linear": 1.0,
    "known_precision_ties": 0.95, "known_recall_ties": 0.95,
    "known_precision_dare": 0.95, "known_recall_dare": 0.95,
    "known_perfect_match": 0.90, "mixed_recall": 0.95, "mixed_precision": 0.60,
    "category_accuracy": 0.90, "method_accuracy_known_2plus": 0.90,
}
# Unexplained shares below this count as rounding: the known/mixed split is placed no closer to an
# exact fit than this (float32 sums leave ~1e-14; this leaves room for coarser storage).
NOISE_SHARE = 1e-4
# Costs of the floors' errors: an error on a known target (the paper's claim: precision = recall
# = 1) outweighs any number of errors on mixed ones, where a miss costs 1 and a false entry 0.1
# (mixed targets need recall 0.95 but precision 0.6 only).
KNOWN_COST = 1000.0
MIXED_FP_COST = 0.1
# A target with dictionary content that fails the gate is one wrong verdict and every entry
# missed; an unknown target that passes it is one wrong verdict. A missed entry of a mixed target
# weighs 3 verdicts (mixed recall must reach 0.95 of ~50 entries, the verdicts 0.90 of 72 targets).
GATE_ENTRY_COST = 3.0
# Heterogeneities below this count as this much (an exact fit gives η ~ 1e-16; 1/η stays finite).
HETERO_FLOOR = 1e-6
# Weights of DARE's drop noise in its chance scale that calibration tries (rules.noise_dare).
NOISE_GRID = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0)
# DARE's noise scale: this quantile of u/ν over the known DARE calibration targets.
NOISE_QUANTILE = 0.75
# The model the rules use for each of the experiment's merge methods.
TRUE_MODEL = {"task_arithmetic": "task_arithmetic", "linear": "task_arithmetic", "ties": "ties", "dare": "dare"}


class Problem(NamedTuple):
    """One decomposition problem with its truth.

    Attributes:
      name: e.g. ``synthetic/seed5/compressed``.
      stats: GramStats (with replicates). signatures: SignatureStats.
      specs: the targets' ``TargetSpec`` (truth: category, merge method, tasks, weights).
      truth: (T, K) true weights of the dictionary entries.
      atom_names, target_names: labels.
    """

    name: str
    stats: object
    signatures: object
    specs: list
    truth: np.ndarray
    atom_names: tuple
    target_names: tuple

    def select(self, index) -> "Problem":
        idx = np.asarray(index, int)
        return self._replace(stats=self.stats.select_targets(idx), signatures=self.signatures.select_targets(idx),
                             specs=[self.specs[i] for i in idx], truth=self.truth[idx],
                             target_names=tuple(self.target_names[i] for i in idx))


def columns(vectors, names, mask):
    """(n, len(vectors)) float32: each ``{tensor: array}`` flattened over ``names`` (masked if given)."""
    def flat(v):
        return np.concatenate([(v[n].reshape(-1)[mask[n].reshape(-1)] if mask is not None else v[n].reshape(-1))
                               for n in names])
    return np.stack([flat(v) for v in vectors], axis=1).astype(np.float32)


def merge_target(spec, deltas: dict) -> dict:
    """``{tensor: merged ΔW}`` of one target spec, by ``unmerge_jax.merge_tensors`` in ΔW space."""
    from unmerge_jax import merge_tensors

    parts = [deltas[t] for t in spec.tasks]
    out = {}
    for name in parts[0]:
        stack = np.stack([p[name] for p in parts])
        out[name] = np.asarray(merge_tensors(spec.engine_method, np.zeros_like(stack[0]), stack, list(spec.weights),
                                             seed=spec.seed, name=name, **spec.params), np.float32)
    return out


def problems_from_deltas(deltas: dict, dictionary: Sequence[str], specs: list, *, top_k: int | None, seed: int,
                         label: str, boot_seeds: int = 200, densities: Sequence[float] = DENSITY_GRID,
                         variants: Iterable[str] = ("compressed", "full")) -> list[Problem]:
    """The statistics of one pass per variant for targets merged from ``deltas``.

    Args:
      deltas: ``{task: {tensor: ΔW}}`` for every dictionary and outside task.
      dictionary: the dictionary's task names (columns of D, in order).
      specs: target specifications (``unmerge_jax.experiment.targets.make_targets``).
      top_k: entries the compressed variant keeps (the engine's top-k rule on ``max_k |d_k|``).
      seed: bootstrap key. label: name prefix.
      boot_seeds: bootstrap replicates. densities: TIES densities of the signatures.
      variants: ``compressed`` and/or ``full``.
    """
    import unmerge_jax
    from unmerge_jax.experiment.targets import truth_matrix

    atoms = [deltas[t] for t in dictionary]
    names = sorted(atoms[0])
    merged = [merge_target(s, deltas) for s in specs]
    # Trimming thresholds come from the whole dictionary tensors, whatever rows a variant keeps.
    thr = np.stack([trim_thresholds([a[n] for a in atoms], densities) for n in names])
    out = []
    for variant in variants:
        if variant not in ("compressed", "full"):
            raise UnmergeError(f"unknown variant {variant!r}; use 'compressed' or 'full'")
        mask = unmerge_jax.topk_mask(atoms, top_k) if variant == "compressed" else None
        D, V = columns(atoms, names, mask), columns(merged, names, mask)
        rows = [int(mask[n].sum()) if mask is not None else atoms[0][n].size for n in names]
        bounds = np.concatenate([[0], np.cumsum(rows)])
        segments = list(zip(bounds[:-1], bounds[1:]))
        stats = unmerge_jax.gram_stats(D, V, seeds=boot_seeds, key=seed)
        sig = signature_stats(D, V, segments, thr, densities, groups=group_ids(names))
        out.append(Problem(f"{label}/seed{seed}/{variant}", stats, sig, list(specs), truth_matrix(specs, dictionary),
                           tuple(dictionary), tuple(s.name for s in specs)))
    return out


def synthetic_problems(seed: int, *, preset: str = "synthetic", boot_seeds: int = 200,
                       variants: Iterable[str] = ("compressed", "full")) -> list[Problem]:
    """:func:`problems_from_deltas` for an experiment preset whose dictionary needs no training
    (``synthetic``: random low-rank task vectors, seconds)."""
    from unmerge_jax.experiment.presets import get_preset
    from unmerge_jax.experiment.synthetic import synthetic_deltas
    from unmerge_jax.experiment.targets import make_targets

    p = get_preset(preset)
    if p.source != "synthetic":
        raise UnmergeError(f"preset {preset!r} trains LoRA adapters; build its deltas and call problems_from_deltas")
    deltas = synthetic_deltas(list(p.dictionary) + list(p.outside), p.synthetic, seed)
    specs = make_targets(p.dictionary, p.outside, per_category=p.per_category, seed=seed)
    return problems_from_deltas(deltas, p.dictionary, specs, top_k=p.top_k, seed=seed, label=preset,
                                boot_seeds=boot_seeds, variants=variants)


def score(problem: Problem, rules: Rules = DEFAULT_RULES, attribution=None) -> list[dict]:
    """One row per target: the decisions against the truth."""
    at = attribute(problem.stats, problem.signatures, rules=rules, atom_names=problem.atom_names,
                   target_names=problem.target_names) if attribution is None else attribution
    rows = []
    for t, spec in enumerate(problem.specs):
        truth = problem.truth[t] > 0
        pred = at.decision[t] == PRESENT
        tp = int(np.count_nonzero(truth & pred))
        prec = tp / pred.sum() if pred.any() else (1.0 if not truth.any() else 0.0)
        rec = tp / truth.sum() if truth.any() else 1.0
        rows.append({"problem": problem.name, "target": spec.name, "category": spec.category,
                     "merge_method": spec.merge_method, "n_dictionary": int(truth.sum()),
                     "precision": float(prec), "recall": float(rec), "perfect_match": bool(np.array_equal(truth, pred)),
                     "predicted_category": str(at.category[t]), "predicted_method": str(at.method[t]),
                     "method_correct": str(at.method[t]) == TRUE_MODEL[spec.merge_method],
                     "density": float(at.density[t]), "unexplained": float(at.unexplained[t]),
                     "uncertain": int(np.count_nonzero(at.decision[t] == 2)),
                     "present": ";".join(at.present(t)), "truth": ";".join(n for n, w in zip(problem.atom_names, truth) if w)})
    return rows


def summarize(rows: list[dict]) -> dict:
    """The :data:`TARGETS` figures (means over targets) and whether each is met."""
    def mean(sel, key):
        vals = [float(r[key]) for r in rows if sel(r)]
        return float(np.mean(vals)) if vals else float("nan")

    out = {}
    for m in ("task_arithmetic", "linear", "ties", "dare"):
        known_m = lambda r, m=m: r["category"] == "known" and r["merge_method"] == m
        out[f"known_precision_{m}"] = mean(known_m, "precision")
        out[f"known_recall_{m}"] = mean(known_m, "recall")
    out["known_perfect_match"] = mean(lambda r: r["category"] == "known", "perfect_match")
    out["mixed_recall"] = mean(lambda r: r["category"] == "mixed", "recall")
    out["mixed_precision"] = mean(lambda r: r["category"] == "mixed", "precision")
    out["category_accuracy"] = float(np.mean([r["predicted_category"] == r["category"] for r in rows]))
    out["method_accuracy_known_2plus"] = mean(lambda r: r["category"] == "known" and r["n_dictionary"] >= 2,
                                              "method_correct")
    out["uncertain_per_target"] = float(np.mean([r["uncertain"] for r in rows]))
    out["n_targets"] = len(rows)
    out["met"] = {k: bool(out[k] >= v - 1e-12) for k, v in TARGETS.items()}
    return out


def split(neg, pos, *, neg_cost=1.0, pos_cost=1.0) -> tuple[float, dict]:
    """A threshold ``τ`` with ``neg < τ ≤ pos`` as far as possible, and how well it separates.

    Separated classes (``max neg < min pos``): ``τ = √(max neg · min pos)``, halfway in log scale.
    Overlapping ones: the τ among the observed values that minimises ``Σ_{pos < τ} pos_cost +
    Σ_{neg ≥ τ} neg_cost`` (scalars or one cost per value), moved halfway (in log) to the next
    observed value below.

    Returns:
      ``(τ, info)``; info has ``max_neg``, ``min_pos``, ``errors`` (weighted count at τ) and
      ``margin`` (``min pos / max neg``; < 1 when they overlap).
    """
    neg = np.asarray(neg, np.float64).ravel()
    pos = np.asarray(pos, np.float64).ravel()
    cost_n = np.broadcast_to(np.asarray(neg_cost, np.float64), neg.shape)
    cost_p = np.broadcast_to(np.asarray(pos_cost, np.float64), pos.shape)
    keep, keep_p = np.isfinite(neg), np.isfinite(pos)
    neg, cost_n, pos, cost_p = neg[keep], cost_n[keep], pos[keep_p], cost_p[keep_p]
    tiny = 1e-300
    if not neg.size or not pos.size:
        raise UnmergeError("split needs values of both classes; give calibration problems that contain both")
    hi_neg, lo_pos = float(neg.max()), float(pos.min())
    if hi_neg < lo_pos:
        tau = _log_mid(hi_neg, lo_pos) if hi_neg > 0 else lo_pos / 2
        return tau, {"max_neg": hi_neg, "min_pos": lo_pos, "errors": 0.0, "margin": lo_pos / max(hi_neg, tiny)}
    cands = np.unique(np.concatenate([neg, pos]))
    cost = np.array([float(np.sum(cost_p[pos < c])) + float(np.sum(cost_n[neg >= c])) for c in cands])
    i = int(np.argmin(cost))
    below = cands[i - 1] if i > 0 else cands[i] / 2
    tau = _log_mid(below, cands[i])
    return tau, {"max_neg": hi_neg, "min_pos": lo_pos, "errors": float(cost[i]), "margin": lo_pos / max(hi_neg, tiny)}


def _log_mid(a: float, b: float) -> float:
    """√(ab), computed in logs (the product of two large statistics can overflow)."""
    return float(np.exp(0.5 * (np.log(max(a, 1e-300)) + np.log(max(b, 1e-300)))))


def _round(x: float) -> float:
    return float(f"{x:.2g}")


def _evidence(problems, rules):
    from unmerge_jax.attribution.decide import evidence

    return [evidence(p.stats, p.signatures, rules) for p in problems]


def _select_evidence(ev, idx):
    """Evidence restricted to targets ``idx`` (as ``Problem.select``)."""
    from unmerge_jax.attribution.shares import Shares

    pt = ev.point
    return ev._replace(point=Shares(pt.coef[idx], pt.unexplained[idx], pt.shares[idx]), share_lo=ev.share_lo[idx],
                       share_hi=ev.share_hi[idx], coef_lo=ev.coef_lo[idx], coef_hi=ev.coef_hi[idx],
                       ties_unexplained=ev.ties_unexplained[:, idx], ties_shares=ev.ties_shares[:, idx],
                       zero_count=ev.zero_count[idx], zero_fraction=ev.zero_fraction[idx],
                       zero_energy_ratio=ev.zero_energy_ratio[idx], dare_density=ev.dare_density[idx],
                       heterogeneity=ev.heterogeneity[idx])


def _by_model_ev(problems, evs, model):
    for p, ev in zip(problems, evs):
        idx = [i for i, s in enumerate(p.specs) if TRUE_MODEL[s.merge_method] == model]
        if idx:
            yield p.select(idx), _select_evidence(ev, np.asarray(idx))


def _presence_split(problems, evs, rules, model):
    """Gate and floor statistics of one model's targets, with the method given (truth read here)."""
    g_pos, g_neg, g_wp, e_pos, e_neg, e_w, e_wp = [], [], [], [], [], [], []
    for p, ev in _by_model_ev(problems, evs, model):
        at = attribute(p.stats, p.signatures, rules=rules, method=model, precomputed=ev)
        cs = at.evidence["chance_scale"]
        for t, s in enumerate(p.specs):
            g = float(at.evidence["gate_stat"][t])
            (g_neg if s.category == "unknown" else g_pos).append(g)
            if s.category == "unknown":
                continue
            n_true = int(np.count_nonzero(p.truth[t] > 0))
            g_wp.append(KNOWN_COST if s.category == "known" else 1.0 + GATE_ENTRY_COST * n_true)
            stat = at.share_lo[t] / np.maximum(cs[t], 1e-300)
            truth = p.truth[t] > 0
            e_pos.extend(stat[truth])
            e_neg.extend(stat[~truth])
            known = s.category == "known"
            e_wp.extend([KNOWN_COST if known else 1.0] * int(np.count_nonzero(truth)))
            e_w.extend([KNOWN_COST if known else MIXED_FP_COST] * int(np.count_nonzero(~truth)))
    return (g_neg, g_pos, g_wp), (e_neg, e_pos, e_w, e_wp)


def _gate_split(problems, evs, rules, model, key):
    """Gate statistic ``key`` (``explained_share`` or ``gate_heterogeneity``) of one model's targets
    that pass the gate under ``rules``, with the method given: unknown targets (negatives) against
    known and mixed ones (positives, with the gate's costs)."""
    neg, pos, wp = [], [], []
    for p, ev in _by_model_ev(problems, evs, model):
        at = attribute(p.stats, p.signatures, rules=rules, method=model, precomputed=ev)
        for t, s in enumerate(p.specs):
            if not at.gate[t]:
                continue
            e = float(at.evidence[key][t])
            if s.category == "unknown":
                neg.append(e)
                continue
            n_true = int(np.count_nonzero(p.truth[t] > 0))
            pos.append(e)
            wp.append(KNOWN_COST if s.category == "known" else 1.0 + GATE_ENTRY_COST * n_true)
    return neg, pos, wp


def calibrate(problems: Sequence[Problem], base: Rules = DEFAULT_RULES,
              noise_grid: Sequence[float] = NOISE_GRID, evidences: Sequence | None = None) -> tuple[Rules, dict]:
    """Thresholds from calibration problems (truth used), each by :func:`split`.

    1. ``ties_ratio``: ``q/u`` of TIES targets that hold dictionary entries (positives: below)
       against every task-arithmetic and DARE target.
    2. Per model m, with the method given: ``gate_m`` from ``max_k s_k^lo / c_k^gate`` of mixed and
       known targets against unknown ones; ``floor_m`` from the entry statistic ``L_k / c_k`` of
       present against absent entries of known and mixed targets (costs: :data:`KNOWN_COST`,
       :data:`MIXED_FP_COST`), ``c`` the chance scales of :mod:`~unmerge_jax.attribution.rules`.
       For DARE, ``noise_dare`` is the value of ``noise_grid`` whose gate and floor make the
       fewest weighted errors. Then ``hetero_m`` from the heterogeneity η of the gate's entry
       (:func:`~unmerge_jax.attribution.shares.group_heterogeneity`) of the targets that clear
       ``gate_m``: unknown (large η) against mixed and known (the gate's costs), split on 1/η;
       1 (off) when no unknown target clears ``gate_m``. Then ``explained_m`` from the explained share E
       (:func:`~unmerge_jax.attribution.decide.explained_share`) of the targets that clear
       ``gate_m`` and ``hetero_m``: unknown against mixed and known (the gate's costs); 0 when no
       unknown target clears them.
    3. ``known_m`` from U of known against mixed targets, with the thresholds of step 2; known
       values below :data:`NOISE_SHARE` count as that much.

    The rule-independent statistics (:func:`~unmerge_jax.attribution.decide.evidence`) are
    computed once per problem (or given as ``evidences``, one per problem, computed with ``base``).

    Returns:
      ``(rules, report)``: the new :class:`Rules` (2 significant digits) and, per threshold, the
      :func:`split` info.
    """
    report = {}
    rules = base
    evs = list(evidences) if evidences is not None else _evidence(problems, rules)
    # 1. TIES consistency ratio (rules-independent statistics).
    pos, neg = [], []
    for p, ev in zip(problems, evs):
        at = attribute(p.stats, p.signatures, rules=rules, precomputed=ev)
        for t, s in enumerate(p.specs):
            r = float(at.evidence["ties_ratio"][t])
            if s.merge_method == "ties" and s.category != "unknown":
                pos.append(r)
            elif s.merge_method != "ties":
                neg.append(r)
    # Here the positives lie *below*: split on 1/ratio.
    tau, info = split(1.0 / np.maximum(neg, 1e-300), 1.0 / np.maximum(pos, 1e-300))
    rules = rules._replace(ties_ratio=_round(1.0 / tau))
    report["ties_ratio"] = {**info, "value": rules.ties_ratio}

    # 2a. DARE's noise model: u / ν of known DARE targets (no outside content: all of u is drop noise).
    ratios = []
    for p, ev in _by_model_ev(problems, evs, "dare"):
        from unmerge_jax.attribution.decide import dare_noise

        nu = dare_noise(ev.point.coef, np.asarray(p.stats.gram), np.asarray(p.stats.target_sq), ev.dare_density)
        for t, s in enumerate(p.specs):
            if s.category == "known" and nu[t] > 0:
                ratios.append(float(ev.point.unexplained[t] / nu[t]))
    if ratios:
        rules = rules._replace(noise_scale=_round(float(np.quantile(ratios, NOISE_QUANTILE))))
        report["noise_scale"] = {"value": rules.noise_scale, "quantile": NOISE_QUANTILE, "n": len(ratios),
                                 "min": float(np.min(ratios)), "median": float(np.median(ratios)),
                                 "max": float(np.max(ratios))}

    # 2. Gates and floors, per model, with the method given.
    key = {"task_arithmetic": "ta", "ties": "ties", "dare": "dare"}
    for model in ("task_arithmetic", "ties", "dare"):
        best = None
        for noise in (noise_grid if model == "dare" else (rules.noise_dare,)):
            trial = rules._replace(noise_dare=float(noise))
            (g_neg, g_pos, g_wp), (e_neg, e_pos, e_w, e_wp) = _presence_split(problems, evs, trial, model)
            g_tau, g_info = split(g_neg, g_pos, pos_cost=g_wp)
            f_tau, f_info = split(e_neg, e_pos, neg_cost=e_w, pos_cost=e_wp)
            cost = g_info["errors"] + f_info["errors"]
            margin = min(g_info["margin"], f_info["margin"])
            if best is None or (cost, -margin) < (best[0], -best[1]):
                best = (cost, margin, noise, g_tau, g_info, f_tau, f_info)
        _, _, noise, g_tau, g_info, f_tau, f_info = best
        rules = rules._replace(**{f"gate_{key[model]}": _round(g_tau), f"floor_{key[model]}": _round(f_tau)})
        if model == "dare":
            rules = rules._replace(noise_dare=float(noise))
            report["noise_dare"] = {"value": float(noise), "grid": list(map(float, noise_grid))}
        report[f"gate_{key[model]}"] = {**g_info, "value": _round(g_tau)}
        report[f"floor_{key[model]}"] = {**f_info, "value": _round(f_tau)}
        # The heterogeneity gate, on the targets the share gate lets through: consistent entries
        # (small η) are the positives, so split on 1/η.
        h_neg, h_pos, h_wp = _gate_split(problems, evs, rules._replace(**{f"explained_{key[model]}": 0.0,
                                                                          f"hetero_{key[model]}": 1.0}),
                                         model, "gate_heterogeneity")
        if h_neg and h_pos:
            inv = lambda h: 1.0 / np.maximum(np.asarray(h, np.float64), HETERO_FLOOR)
            h_tau, h_info = split(inv(h_neg), inv(h_pos), pos_cost=h_wp)
            h_tau = min(_round(1.0 / h_tau), 1.0)
            h_info = {"min_unknown": 1.0 / h_info["max_neg"], "max_known_mixed": 1.0 / h_info["min_pos"],
                      "errors": h_info["errors"], "margin": h_info["margin"]}
        else:
            h_tau, h_info = 1.0, {"min_unknown": None, "max_known_mixed": max(h_pos, default=None), "errors": 0.0,
                                  "margin": None}
        rules = rules._replace(**{f"hetero_{key[model]}": h_tau})
        report[f"hetero_{key[model]}"] = {**h_info, "value": h_tau, "n_unknown_through_gate": len(h_neg)}
        # The explained-share gate, on the targets the share and heterogeneity gates let through.
        e_neg, e_pos, e_wp = _gate_split(problems, evs, rules._replace(**{f"explained_{key[model]}": 0.0}), model,
                                         "explained_share")
        if e_neg and e_pos:
            e_tau, e_info = split(e_neg, e_pos, pos_cost=e_wp)
            e_tau = _round(e_tau)
        else:
            e_tau, e_info = 0.0, {"max_neg": None, "min_pos": min(e_pos, default=None), "errors": 0.0, "margin": None}
        rules = rules._replace(**{f"explained_{key[model]}": e_tau})
        report[f"explained_{key[model]}"] = {**e_info, "value": e_tau, "n_unknown_through_gate": len(e_neg)}

    # 3. Known/mixed thresholds on U, with the new presence rules.
    for model in ("task_arithmetic", "ties", "dare"):
        k_neg, k_pos = [], []
        for p, ev in _by_model_ev(problems, evs, model):
            at = attribute(p.stats, p.signatures, rules=rules, method=model, precomputed=ev)
            for t, s in enumerate(p.specs):
                if s.category == "known":
                    k_neg.append(float(at.unexplained[t]))
                elif s.category == "mixed":
                    k_pos.append(float(at.unexplained[t]))
        tau, info = split(np.maximum(k_neg, NOISE_SHARE), k_pos)
        rules = rules._replace(**{f"known_{key[model]}": _round(tau)})
        report[f"known_{key[model]}"] = {**info, "value": _round(tau)}
    return rules, report


def rules_dict(rules: Rules) -> dict:
    """A JSON-serialisable dict of the rules."""
    return dict(rules._asdict())


def replace_rules(rules: Rules, **changes) -> Rules:
    """``rules`` with some thresholds changed (one-line error for an unknown name)."""
    unknown = sorted(set(changes) - set(Rules._fields))
    if unknown:
        raise UnmergeError(f"unknown rule {unknown[0]!r}; rules are: {', '.join(Rules._fields)}")
    return rules._replace(**changes)


__all__ = ["NOISE_GRID", "Problem", "TARGETS", "calibrate", "columns", "merge_target", "problems_from_deltas", "replace_rules", "rules_dict",
           "score", "split", "summarize", "synthetic_problems"]
