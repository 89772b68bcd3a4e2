"""The decomposition report: per-target coefficients, fit, bootstrap CIs — as JSON and as tables.

:func:`decomposition_report` solves every target of a :class:`~unmerge_jax.stats.GramStats`
with one solver (``unmerge_jax.solve``) and, when the statistics hold S bootstrap replicates,
each replicate too: the ``ci`` interval of a coefficient is the central quantile range of its S
replicate values, ``selected`` the fraction of replicates with ``|a_k| > support_tol``.
:func:`format_report` renders the report as the plain-text tables ``unmerge decompose`` prints.
"""

from __future__ import annotations

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.solve import solve
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


def decomposition_report(stats: GramStats, atom_names, target_names, method: str = "nnls", *, ci: float = 0.95,
                         support_tol: float = 1e-8, **params) -> dict:
    """Coefficients of every target (± bootstrap CI when ``stats`` holds replicates), JSON-ready.

    Returns ``{"method", "params", "n_rows", "n_atoms", "n_seeds", "targets": [{"target",
    "coefficients": {atom: value}, "recon_error", "unexplained", "cosine", "converged", "n_iter",
    and with seeds "ci": {atom: [lo, hi]}, "selected": {atom: fraction of replicates}}]}``.
    """
    if not 0 < ci < 1:
        raise UnmergeError(f"ci must be in (0, 1), got {ci}")
    atom_names = list(atom_names) if atom_names is not None else [str(i) for i in range(stats.n_atoms)]
    target_names = list(target_names) if target_names is not None else [str(i) for i in range(stats.n_targets)]
    if len(atom_names) != stats.n_atoms or len(target_names) != stats.n_targets:
        raise UnmergeError(f"{len(atom_names)} atom / {len(target_names)} target names for statistics of "
                           f"{stats.n_atoms} atoms and {stats.n_targets} targets")
    point = solve(stats, method, bootstrap=False, **params)
    boot = solve(stats, method, bootstrap=True, **params) if stats.n_seeds else None
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
        out.append(row)
    return {"method": point.method, "params": _plain(point.params), "n_rows": int(np.asarray(stats.n_rows)),
            "n_atoms": stats.n_atoms, "n_seeds": stats.n_seeds, "ci_level": ci if stats.n_seeds else None,
            "targets": out}


def format_report(report: dict) -> str:
    """Plain-text tables of :func:`decomposition_report`, one per target."""
    lines = [f"method {report['method']} on {report['n_rows']:,} parameter rows, {report['n_atoms']} dictionary "
             f"entries" + (f", {report['n_seeds']} bootstrap seeds" if report["n_seeds"] else "")]
    for row in report["targets"]:
        lines.append("")
        lines.append(f"target {row['target']}: recon error {row['recon_error']:.3e}, unexplained energy "
                     f"{row['unexplained']:.3e} ({100 * row['unexplained']:.4g}%), cos {row['cosine']:.6f}"
                     + ("" if row["converged"] else "  [NOT CONVERGED]"))
        width = max(len("entry"), *(len(a) for a in row["coefficients"]))
        pct = f"{100 * report['ci_level']:g}% CI" if report.get("ci_level") else None
        head = f"  {'entry':<{width}}  {'coefficient':>12}" + (f"  {pct:>25}  {'selected':>8}" if pct else "")
        lines.append(head)
        lines.append("  " + "-" * (len(head) - 2))
        for a, v in row["coefficients"].items():
            s = f"  {a:<{width}}  {v:>12.6f}"
            if pct:
                lo, hi = row["ci"][a]
                s += f"  {f'[{lo:.6f}, {hi:.6f}]':>25}  {row['selected'][a]:>8.0%}"
            lines.append(s)
    return "\n".join(lines)
