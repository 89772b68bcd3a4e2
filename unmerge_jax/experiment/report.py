"""Outputs of the experiment: runs.csv, the paper's Tables 1–6 (mean ± sample std), our extra tables
(full vs compressed, Lasso per α), figures and a report that puts every table beside the paper's.

All numbers come from ``unmerge_jax.summarize`` over the sweep's runs; the only constants here are
the paper's published values (``PAPER``), quoted for comparison.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from unmerge_jax.analysis.report import figure, save_figure, write_json
from unmerge_jax.experiment.targets import CATEGORIES, MERGE_LABELS
from unmerge_jax.io.atomic import atomic_file
from unmerge_jax.sweep import METHOD_LABELS, mean_std_cells, summarize

ALGORITHMS = ("nnls", "omp", "ridge", "elastic_net", "dot", "lasso")  # the paper's row order
MERGES = ("task_arithmetic", "linear", "ties", "dare")  # Table 3 column order
MERGES_REV = MERGES[::-1]  # Tables 5 and 6 column order (DARE, TIES, Linear, Task Arithmetic)
LABELS = {**METHOD_LABELS, **MERGE_LABELS, **{c: c.capitalize() for c in CATEGORIES}}
FLOAT = "%.10g"

# The UNMERGE paper's published numbers (Qwen2.5-7B, rank-32 LoRA, 1M-parameter compression), as printed.
PAPER = {
    "table1": {"columns": ["Reconstruction Error", "Precision", "Sparsity"], "rows": {
        "nnls": ["0.45 ± 0.21", "0.44 ± 0.44", "6.1 ± 1.7"], "omp": ["0.45 ± 0.21", "0.39 ± 0.40", "6.7 ± 1.6"],
        "ridge": ["0.45 ± 0.21", "0.26 ± 0.24", "8.0 ± 0.0"], "elastic_net": ["0.46 ± 0.21", "0.32 ± 0.32", "7.3 ± 1.01"],
        "dot": ["0.49 ± 0.20", "0.26 ± 0.24", "7.6 ± 0.5"], "lasso": ["0.74 ± 0.26", "0.53 ± 0.50", "0.9 ± 1.0"]}},
    "table2": {"columns": ["Known", "Mixed", "Unknown"], "rows": {
        "recon_error": ["0.24 ± 0.13", "0.43 ± 0.13", "0.68 ± 0.09"], "precision": ["1.00 ± 0.00", "0.33 ± 0.25", "0.00 ± 0.00"],
        "recall": ["1.00 ± 0.00", "1.00 ± 0.00", "0.00 ± 0.00"], "perfect_match": ["1.00 ± 0.00", "0.04 ± 0.20", "0.00 ± 0.00"]}},
    "table3": {"columns": ["Task Arithmetic", "Linear", "TIES", "DARE"], "rows": {
        "nnls": ["0.09 ± 0.01", "0.17 ± 0.06", "0.28 ± 0.05", "0.43 ± 0.03"], "omp": ["0.09 ± 0.01", "0.17 ± 0.06", "0.28 ± 0.05", "0.43 ± 0.03"],
        "ridge": ["0.09 ± 0.01", "0.17 ± 0.06", "0.28 ± 0.05", "0.43 ± 0.03"], "elastic_net": ["0.10 ± 0.01", "0.18 ± 0.06", "0.29 ± 0.05", "0.43 ± 0.03"],
        "dot": ["0.15 ± 0.02", "0.23 ± 0.05", "0.35 ± 0.06", "0.46 ± 0.03"], "lasso": ["0.51 ± 0.25", "0.56 ± 0.23", "0.36 ± 0.08", "0.65 ± 0.07"]}},
    "table4": {"columns": ["Known", "Mixed", "Unknown"], "rows": {
        "nnls": ["0.24 ± 0.13", "0.43 ± 0.13", "0.68 ± 0.09"], "omp": ["0.24 ± 0.13", "0.43 ± 0.13", "0.68 ± 0.09"],
        "ridge": ["0.24 ± 0.13", "0.43 ± 0.13", "0.68 ± 0.09"], "elastic_net": ["0.25 ± 0.13", "0.44 ± 0.13", "0.68 ± 0.09"],
        "dot": ["0.30 ± 0.13", "0.49 ± 0.13", "0.69 ± 0.08"], "lasso": ["0.52 ± 0.20", "0.71 ± 0.22", "0.99 ± 0.03"]}},
    "table5": {"columns": ["DARE", "TIES", "Linear", "Task Arithmetic"], "rows": {
        "nnls": ["1.00 / 1.00"] * 4, "omp": ["1.00 / 1.00", "0.56 / 1.00", "1.00 / 1.00", "1.00 / 1.00"],
        "ridge": ["0.54 / 1.00"] * 4, "elastic_net": ["0.62 / 1.00", "0.87 / 1.00", "0.62 / 1.00", "0.62 / 1.00"],
        "dot": ["0.55 / 1.00", "0.54 / 1.00", "0.55 / 1.00", "0.55 / 1.00"], "lasso": ["1.00 / 0.40", "1.00 / 0.67", "0.83 / 0.36", "0.83 / 0.36"]}},
    "table6": {"columns": ["DARE", "TIES", "Linear", "Task Arithmetic"], "rows": {
        "nnls": ["4.33"] * 4, "omp": ["4.33", "7.67", "4.33", "4.33"], "ridge": ["8.00"] * 4,
        "elastic_net": ["7.00", "5.00", "7.00", "7.00"], "dot": ["7.83", "8.00", "7.83", "7.83"], "lasso": ["1.67", "2.83", "1.50", "1.50"]}},
}

TITLES = {
    "table1": "Table 1: Overall performance across all decomposition algorithms (all targets, grid points, seeds)",
    "table2": "Table 2: Performance by model category (NNLS)",
    "table3": "Table 3: Reconstruction error for known models by merging method",
    "table4": "Table 4: Reconstruction error by algorithm and model category",
    "table5": "Table 5: Precision / Recall by algorithm and merging method (known models)",
    "table6": "Table 6: Sparsity (active coefficients) by algorithm and merging method (known models)",
    "table7": "Table 7 (ours): full model vs compressed — NNLS by category",
    "table8": "Table 8 (ours): Lasso per α on known models (the paper's α grid)",
}


def _ordered(table: pd.DataFrame, col: str, order) -> pd.DataFrame:
    """Rows of ``table`` whose ``col`` is in ``order``, sorted by that order (stable)."""
    rank = {v: i for i, v in enumerate(order)}
    t = table[table[col].isin(rank)]
    return t.iloc[np.argsort(t[col].map(rank).to_numpy(), kind="stable")]


def _grid(table, rows: str, row_order, cols: str | None, col_order, metrics, *, digits=2):
    """summarize() → (numeric frame, {row: [cells in col_order]})."""
    t = _ordered(table, rows, row_order)
    if cols:
        t = _ordered(t, cols, col_order)
    frame = summarize(t, by=[rows], metrics=metrics, columns=cols).frame
    cells = {}
    for r in row_order:
        sub = frame[frame[rows] == r]
        if cols:
            cells[r] = [mean_std_cells(sub[sub[cols] == c].iloc[0], metrics, digits=digits) if (sub[cols] == c).any() else "–"
                        for c in col_order]
        elif len(sub):
            cells[r] = [mean_std_cells(sub.iloc[0], [m], digits=digits) for m in metrics]
    return frame, cells


def _markdown(header, cells, first="Algorithm") -> str:
    lines = ["| " + " | ".join([first, *header]) + " |", "|" + "---|" * (len(header) + 1)]
    lines += ["| " + " | ".join([LABELS.get(r, r), *v]) + " |" for r, v in cells.items()]
    return "\n".join(lines) + "\n"


def make_tables(runs: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, dict, list]]:
    """``{name: (numeric frame, {row: cells}, column headers)}`` for Tables 1–8."""
    comp = runs[runs["variant"] == "compressed"]
    known = comp[comp["category"] == "known"]
    nnls = comp[comp["algorithm"] == "nnls"]
    algs = [a for a in ALGORITHMS if a in set(comp["algorithm"])]
    cats = [c for c in CATEGORIES if c in set(comp["category"])]
    merges = [m for m in MERGES if m in set(comp["merge_method"])]
    merges_rev = [m for m in MERGES_REV if m in merges]
    out = {}
    metrics1 = ["recon_error", "precision", "sparsity"]
    f, c = _grid(comp, "algorithm", algs, None, None, metrics1)
    out["table1"] = (f, c, ["Reconstruction Error", "Precision", "Sparsity"])
    metrics2 = ["recon_error", "precision", "recall", "perfect_match"]
    f, cells = _grid(nnls, "category", cats, None, None, metrics2)
    transposed = {m: [cells[cat][i] for cat in cats] for i, m in enumerate(metrics2)}
    out["table2"] = (f, transposed, [LABELS[c] for c in cats])
    f, c = _grid(known, "algorithm", algs, "merge_method", merges, ["recon_error"])
    out["table3"] = (f, c, [LABELS[m] for m in merges])
    f, c = _grid(comp, "algorithm", algs, "category", cats, ["recon_error"])
    out["table4"] = (f, c, [LABELS[x] for x in cats])
    f, c = _grid(known, "algorithm", algs, "merge_method", merges_rev, ["precision", "recall"])
    out["table5"] = (f, c, [LABELS[m] for m in merges_rev])
    f, c = _grid(known, "algorithm", algs, "merge_method", merges_rev, ["sparsity"])
    out["table6"] = (f, c, [LABELS[m] for m in merges_rev])
    if "full" in set(runs["variant"]):
        rows = runs[runs["algorithm"] == "nnls"].assign(key=lambda d: d["category"] + " · " + d["variant"])
        order = [f"{c} · {v}" for c in cats for v in ("compressed", "full")]
        f, c = _grid(rows, "key", order, None, None, metrics2)
        out["table7"] = (f, c, ["Reconstruction Error", "Precision", "Recall", "Perfect Match"])
    lasso = known[known["algorithm"] == "lasso"]
    if len(lasso):
        order = sorted(set(lasso["params"]), key=lambda s: float(s.split("=")[-1]))
        f, c = _grid(lasso, "params", order, None, None, ["recon_error", "precision", "recall", "sparsity"])
        out["table8"] = (f, c, ["Reconstruction Error", "Precision", "Recall", "Sparsity"])
    return out


def tables_markdown(tables) -> dict[str, str]:
    first = {"table2": "Metric", "table7": "Category · variant", "table8": "Lasso α"}
    return {name: f"### {TITLES[name]}\n\n" + _markdown(header, cells, first.get(name, "Algorithm"))
            for name, (_, cells, header) in tables.items()}


def _figures(runs: pd.DataFrame, out: Path) -> list[Path]:
    comp = runs[runs["variant"] == "compressed"]
    algs = [a for a in ALGORITHMS if a in set(comp["algorithm"])]
    cats = [c for c in CATEGORIES if c in set(comp["category"])]
    merges = [m for m in MERGES if m in set(comp["merge_method"])]
    fig, (ax1, ax2) = figure(1, 2, size=(13, 4.5))
    _bars(ax1, comp, algs, "category", cats, "recon_error")
    ax1.set_title("Reconstruction error by algorithm × target category")
    _bars(ax2, comp[comp["category"] == "known"], algs, "merge_method", merges, "recon_error")
    ax2.set_title("Known targets: reconstruction error by merging method")
    paths = [save_figure(fig, out / "fig_recon_error.png")]
    fig, axes = figure(1, 2, size=(13, 4.5))
    for ax, cat in zip(axes, ("known", "mixed")):
        sub = comp[comp["category"] == cat].melt(id_vars=["algorithm"], value_vars=["precision", "recall"], var_name="metric")
        _bars(ax, sub, algs, "metric", ["precision", "recall"], "value")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{LABELS[cat]} targets: precision and recall")
    paths.append(save_figure(fig, out / "fig_precision_recall.png"))
    return paths


def _bars(ax, data, algs, hue, hues, value):
    width = 0.8 / max(len(hues), 1)
    x = np.arange(len(algs))
    for j, h in enumerate(hues):
        sub = data[data[hue] == h].groupby("algorithm")[value]
        mean = sub.mean().reindex(algs).to_numpy()
        sd = sub.std(ddof=1).reindex(algs).fillna(0.0).to_numpy()
        lower = np.minimum(sd, np.nan_to_num(mean))  # errors are ≥ 0: clip the lower whisker at zero
        ax.bar(x + (j - (len(hues) - 1) / 2) * width, mean, width, yerr=[lower, sd], capsize=2, label=LABELS.get(h, h))
    ax.set_xticks(x, [LABELS[a] for a in algs], rotation=20)
    ax.set_ylabel(value.replace("_", " "))
    ax.legend(fontsize=8)


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False, float_format=FLOAT)


def write_outputs(out: Path, runs: pd.DataFrame, specs, meta: dict, attributions: dict | None = None) -> dict[str, str]:
    """Write runs.csv, attribution.csv/.json, tables.md, table*.csv, targets.json, figures and report.md;
    returns the tables' markdown."""
    from unmerge_jax.experiment.attribution import attribution_frame, errors
    from unmerge_jax.experiment.narrative import report_markdown

    attributions = attributions or {}
    _write_csv(out / "runs.csv", runs)
    if attributions:
        _write_csv(out / "attribution.csv", pd.concat([attribution_frame(v, a) for v, a in attributions.items()],
                                                      ignore_index=True))
        rules = next(iter(attributions.values())).attribution.rules
        write_json(out / "attribution.json", {"rules": dict(rules._asdict()), "boot": meta.get("boot"),
                                              "summary": {v: a.summary for v, a in attributions.items()},
                                              "errors": {v: errors(a, limit=0) for v, a in attributions.items()}})
    tables = make_tables(runs)
    md = tables_markdown(tables)
    for name, (frame, _, _) in tables.items():
        _write_csv(out / f"{name}.csv", frame)
    _write_text(out / "tables.md", "\n".join(md.values()))
    write_json(out / "targets.json", [{"name": s.name, "category": s.category, "merge_method": s.merge_method,
                                       "engine_method": s.engine_method, "params": s.params, "tasks": list(s.tasks),
                                       "weights": list(s.weights), "seed": s.seed} for s in specs])
    write_json(out / "experiment.json", meta)
    try:
        import matplotlib  # noqa: F401  (the [plots] extra; tables and report need no plotting)
    except ImportError:
        print("note: matplotlib is not installed (pip install 'unmerge_jax[plots]'); figures skipped")
    else:
        _figures(runs, out)
    _write_text(out / "report.md", report_markdown(runs, tables, md, meta, attributions))
    return md
