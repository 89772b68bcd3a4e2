"""The decomposition report: per-target coefficients, fit, bootstrap CIs — as JSON and as tables.

:func:`decomposition_report` solves every target of a :class:`~unmerge_jax.stats.GramStats`
with one solver (``unmerge_jax.solve``) and, when the statistics hold S bootstrap replicates,
each replicate too: the ``ci`` interval of a coefficient is the central quantile range of its S
replicate values, ``selected`` the fraction of replicates with ``|a_k| > support_tol``.
:func:`format_report` renders the report as the plain-text tables ``unmerge decompose`` prints.

:func:`add_attribution` adds the decisions of :func:`unmerge_jax.attribution.attribute` to each
target of a report: the verdict (known / mixed / unknown), the ``present`` entries, the identified
``method`` (name, confidence, density), the share no dictionary entry explains (``unknown_share``),
and per entry its decision, energy share and method-aware weight (TIES: the TIES-consistent
weights, which sum to 1; otherwise the NNLS refit on the present entries).

Where the answer is ambiguous, :func:`stats_warnings` says so from the statistics alone (the
report's ``warnings``; the CLI prints them as ``warning:`` lines on stderr):

* two dictionary entries with ``|cos(d_i, d_j)| ≥ 1 − DUPLICATE_TOL`` (``G_ij / √(G_ii G_jj)``)
  are the same task vector up to scale: the weight of that direction is split between them;
* an entry with ``G_kk = 0`` is all zero (it equals the base on the rows used);
* a target with ``‖v‖² = 0`` equals the base: nothing to decompose. Its ``cosine``,
  ``recon_error`` and ``unexplained`` are NaN (``null`` in JSON) with a ``note``, never the
  perfect fit ``cos = 1`` a solver reports for ``v = 0``.
"""

from __future__ import annotations

import json
import math

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.solve import solve_with_replicates
from unmerge_jax.stats import GramStats


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and np.ndim(x) == 0:
        return x.item()
    if hasattr(x, "tolist"):
        return np.asarray(x).tolist()
    return x


DUPLICATE_TOL = 1e-6  # |cos| between two dictionary entries at or above 1 − this: the same task vector
ZERO_TARGET = "the target equals the base: nothing to decompose"


def _names(names, n: int) -> list[str]:
    return list(names) if names is not None else [str(i) for i in range(n)]


def zero_targets(stats: GramStats) -> np.ndarray:
    """(T,) bool: targets whose task vector is zero on every row (``‖v‖² = 0``)."""
    return np.asarray(stats.target_sq, np.float64).reshape(-1) <= 0


def stats_warnings(stats: GramStats, atom_names=None, target_names=None, *, tol: float = DUPLICATE_TOL) -> list[str]:
    """One-line warnings where a decomposition of ``stats`` is ambiguous, from ``G`` and ``‖v‖²`` only.

    Args:
      stats: the statistics (only ``gram``, ``target_sq`` and ``n_rows`` are read).
      atom_names, target_names: names for the messages (default: indices).
      tol: two entries with ``|G_ij| / √(G_ii G_jj) ≥ 1 − tol`` are reported as the same task vector.

    Returns:
      the messages: duplicate entries (both named, the weight split between them), all-zero
      entries, targets equal to the base.
    """
    atom_names = _names(atom_names, stats.n_atoms)
    target_names = _names(target_names, stats.n_targets)
    gram = np.asarray(stats.gram, np.float64)
    diag = np.diagonal(gram).copy()
    rows = f"{int(np.asarray(stats.n_rows)):,}"
    out = []
    for k in np.flatnonzero(diag <= 0):
        out.append(f"dictionary entry {atom_names[k]} is all zero (it equals the base on the {rows} rows used): it "
                   f"explains nothing and its coefficient means nothing — drop it or check its path")
    live = np.flatnonzero(diag > 0)
    scale = np.sqrt(diag[live])
    cos = gram[np.ix_(live, live)] / scale[:, None] / scale[None, :]
    for a in range(len(live)):
        for b in range(a + 1, len(live)):
            c = float(cos[a, b])
            if abs(c) < 1 - tol:
                continue
            i, j = atom_names[live[a]], atom_names[live[b]]
            if c > 0:
                out.append(f"dictionary entries {i} and {j} are the same task vector (cosine {c:.6f} between them): "
                           f"the weight of that direction is split between them, so neither coefficient alone "
                           f"means anything — keep one of them")
            else:
                out.append(f"dictionary entries {i} and {j} are the same task vector with opposite signs (cosine "
                           f"{c:.6f}): their coefficients are not identifiable — keep one of them")
    for t in np.flatnonzero(zero_targets(stats)):
        out.append(f"{ZERO_TARGET} (target {target_names[t]} has a zero task vector on the {rows} rows used); its "
                   f"cosine and errors are reported as NaN, not as a fit")
    return out


def decomposition_report(stats: GramStats, atom_names, target_names, method: str = "nnls", *, ci: float = 0.95,
                         support_tol: float = 1e-8, **params) -> dict:
    """Coefficients of every target (± bootstrap CI when ``stats`` holds replicates), JSON-ready.

    Returns ``{"method", "params", "n_rows", "n_atoms", "n_seeds", "warnings": [messages of
    :func:`stats_warnings`], "targets": [{"target", "coefficients": {atom: value}, "recon_error",
    "unexplained", "cosine", "converged", "n_iter", and with seeds "ci": {atom: [lo, hi]},
    "selected": {atom: fraction of replicates}}]}``. A target equal to the base has NaN
    ``recon_error``, ``unexplained`` and ``cosine`` and a ``note`` saying so.
    """
    if not (isinstance(ci, (int, float, np.floating)) and 0 < ci < 1):
        raise UnmergeError(f"ci must be in (0, 1), got {ci}")
    atom_names = _names(atom_names, stats.n_atoms)
    target_names = _names(target_names, stats.n_targets)
    if len(atom_names) != stats.n_atoms or len(target_names) != stats.n_targets:
        raise UnmergeError(f"{len(atom_names)} atom / {len(target_names)} target names for statistics of "
                           f"{stats.n_atoms} atoms and {stats.n_targets} targets")
    point, boot = solve_with_replicates(stats, method, **params)  # one compiled call for both
    zero = zero_targets(stats)
    out = []
    for t, tname in enumerate(target_names):
        row = {"target": tname,
               "coefficients": {a: float(point.coef[t, k]) for k, a in enumerate(atom_names)},
               "recon_error": float(point.recon_error[t]), "unexplained": float(point.unexplained[t]),
               "cosine": float(point.cosine[t]), "converged": bool(point.converged[t]), "n_iter": int(point.n_iter[t])}
        if boot is not None:
            c = np.asarray(boot.coef)[:, t, :]  # (S, K)
            lo, hi = np.quantile(c, [(1 - ci) / 2, 1 - (1 - ci) / 2], axis=0)
            row["ci"] = {a: [float(lo[k]), float(hi[k])] for k, a in enumerate(atom_names)}
            row["selected"] = {a: float(np.mean(np.abs(c[:, k]) > support_tol)) for k, a in enumerate(atom_names)}
            row["recon_error_boot"] = [float(x) for x in np.quantile(np.asarray(boot.recon_error)[:, t],
                                                                       [(1 - ci) / 2, 1 - (1 - ci) / 2])]
        if zero[t]:  # v = 0: there is no fit to measure (a solver's cos = 1 would read as a perfect fit)
            row.update(recon_error=math.nan, unexplained=math.nan, cosine=math.nan, note=ZERO_TARGET)
            if "recon_error_boot" in row:
                row["recon_error_boot"] = [math.nan, math.nan]
        out.append(row)
    return {"method": point.method, "params": _plain(point.params), "n_rows": int(np.asarray(stats.n_rows)),
            "n_atoms": stats.n_atoms, "n_seeds": stats.n_seeds, "ci_level": ci if stats.n_seeds else None,
            "warnings": stats_warnings(stats, atom_names, target_names), "targets": out}


def _strict(x):
    """NaN/Inf → None (strict JSON), recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    return x


METHOD_LABELS = {"task_arithmetic": "task arithmetic / linear", "ties": "TIES", "dare": "DARE"}


def add_attribution(report: dict, attribution) -> dict:
    """Add the decisions of an :class:`~unmerge_jax.attribution.Attribution` to ``report`` (in place).

    Per target (matched by name): ``verdict``, ``present`` (names), ``method`` ``{name, confidence,
    density}``, ``unknown_share`` (U: the share the present entries do not explain under the
    identified method), ``weight_sum``, and per entry ``decisions`` (present / absent / uncertain),
    ``shares`` (the decision statistic: left-out energy share) and ``weights`` (method-aware:
    TIES-consistent for a TIES target, else the NNLS refit on the present entries). A target equal
    to the base gets ``verdict`` None and no method (nothing to attribute). Top level:
    ``attribution`` ``{"rules": the thresholds used}``. Every existing key is kept.
    """
    records = {r["target"]: r for r in attribution.records()}
    for row in report["targets"]:
        rec = records[row["target"]]
        entries = {e["name"]: e for e in rec["entries"]}
        if row.get("note") == ZERO_TARGET:
            row.update(verdict=None, present=[], method=None, unknown_share=None, weight_sum=None,
                       decisions={a: None for a in entries}, shares={a: None for a in entries},
                       weights={a: None for a in entries})
            continue
        row.update(verdict=rec["verdict"], present=rec["present"], method=rec["method"],
                   unknown_share=rec["unexplained"], weight_sum=rec["weight_sum"],
                   decisions={a: e["decision"] for a, e in entries.items()},
                   shares={a: e["share"] for a, e in entries.items()},
                   weights={a: e["weight"] for a, e in entries.items()})
    report["attribution"] = {"rules": dict(attribution.rules._asdict())}
    return report


def no_attribution(report: dict, reason: str) -> dict:
    """Mark every target of ``report`` undecided (``verdict``/``method`` None, ``present`` []) and add
    ``reason`` to its warnings: the fit is reported, no decision is made."""
    for row in report["targets"]:
        row.update(verdict=None, present=[], method=None)
    report["warnings"].append(reason)
    report["attribution"] = None
    return report


def report_json(report: dict) -> str:
    """The report as strict JSON (NaN/Inf written as ``null``; other values JSON lacks as strings)."""
    return json.dumps(_strict(report), indent=2, default=str)


def format_report(report: dict) -> str:
    """Plain-text tables of :func:`decomposition_report`, one per target."""
    lines = [f"method {report['method']} on {report['n_rows']:,} parameter rows, {report['n_atoms']} dictionary "
             f"entries" + (f", {report['n_seeds']} bootstrap seeds" if report["n_seeds"] else "")]
    for row in report["targets"]:
        lines.append("")
        decided = row.get("verdict") is not None
        if decided:
            lines.append(verdict_line(row))
        if row.get("note"):
            lines.append(f"target {row['target']}: {row['note']} (no fit to report)")
        else:
            lines.append(f"{'  fit' if decided else 'target ' + row['target'] + ':'} recon error "
                         f"{row['recon_error']:.3e}, unexplained energy "
                         f"{row['unexplained']:.3e} ({100 * row['unexplained']:.4g}%), cos {row['cosine']:.6f}"
                         + ("" if row["converged"] else "  [NOT CONVERGED]"))
        width = max(len("entry"), *(len(a) for a in row["coefficients"]))
        pct = f"{100 * report['ci_level']:g}% CI" if report.get("ci_level") else None
        head = f"  {'entry':<{width}}  {'coefficient':>12}" + (f"  {pct:>25}  {'selected':>8}" if pct else "")
        if decided:
            head += f"  {'share':>9}  {'weight':>9}  decision"
        lines.append(head)
        lines.append("  " + "-" * (len(head) - 2))
        for a, v in row["coefficients"].items():
            s = f"  {a:<{width}}  {v:>12.6f}"
            if pct:
                lo, hi = row["ci"][a]
                s += f"  {f'[{lo:.6f}, {hi:.6f}]':>25}  {row['selected'][a]:>8.0%}"
            if decided:
                s += f"  {100 * row['shares'][a]:>8.3g}%  {row['weights'][a]:>9.4f}  {row['decisions'][a]}"
            lines.append(s)
    return "\n".join(lines)


def verdict_line(row: dict) -> str:
    """``target NAME: VERDICT — METHOD (confidence c[, density ρ]); unexplained U%; present: …``."""
    m = row["method"]
    if row["verdict"] == "unknown":  # nothing present: no merge of these entries to identify
        return f"target {row['target']}: UNKNOWN — no dictionary entry is present; 100% unexplained by the dictionary"
    method = METHOD_LABELS.get(m["name"], m["name"])
    extra = f", density {m['density']:.2f}" if m.get("density") is not None else ""
    present = ", ".join(row["present"]) or "none"
    return (f"target {row['target']}: {row['verdict'].upper()} — {method} (confidence {m['confidence']:.2f}{extra}); "
            f"{100 * row['unknown_share']:.3g}% unexplained by the dictionary; present: {present}")
