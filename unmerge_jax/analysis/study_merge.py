"""Merge-quality study (the sparsity-scaling paper's Table 2, Figures 2–3) on simulated RL task vectors, using the
merge engine's own kernels (``unmerge_jax.merge_tensors``).

For K agents' simulated task vectors δ_k (exact sparsity s, 20% shared support), each method
merges them onto a zero base (so the merged weights *are* the merged task vector) and we report
  * ``cos``  — cosine to the oracle Σ_k δ_k (the paper's "Cos");
  * ``fid``  — mean per-agent fidelity mean_k cos(merged, δ_k) (the paper's "Fid");
  * ``rel_err`` — ‖merged − Σδ_k‖ / ‖Σδ_k‖, which cosine hides: averaging is parallel to the
    oracle (cos = 1 exactly) while shrinking every unique update by 1/K.
Averaged over ``trials`` seeds; DARE's randomness is keyed by the trial seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unmerge_jax.analysis.report import figure, mean_std, save_figure, write_json, write_table
from unmerge_jax.analysis.simulator import SHARED, simulate_trials, support_sizes
from unmerge_jax.errors import UnmergeError
from unmerge_jax.merge import merge_tensors
from unmerge_jax.progress import progress

SPARSITIES = (0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.93, 0.95, 0.97)
# The sparsity-scaling paper's Table 2 (3 agents): method → {s: (cos, fid)}.
PAPER_TABLE2 = {
    "Simple Avg": {0.80: (1.0000, 0.5753), 0.90: (1.0000, 0.5725), 0.95: (1.0000, 0.5778)},
    "TIES": {0.80: (0.9903, 0.5695), 0.90: (0.9916, 0.5672), 0.95: (0.9919, 0.5724)},
    "DARE": {0.80: (0.5082, 0.2933), 0.90: (0.2669, 0.1476), 0.95: (0.2087, 0.1099)},
    "RAM (percentile)": {0.80: (0.9135, 0.5315), 0.90: (1.0000, 0.5725), 0.95: (1.0000, 0.5778)},
}

# (label, method name in the merge registry, parameters). A method the registry lacks, or a
# parameter it rejects, is a one-line UnmergeError from the merge engine.
DEFAULT_METHODS = (
    ("Simple Avg", "linear", {}),
    ("Task Arithmetic (λ=1)", "task_arithmetic", {}),
    ("TIES", "ties", {"density": 0.2}),
    ("DARE", "dare_linear", {"density": 0.2}),
    ("DARE-TIES", "dare_ties", {"density": 0.2}),
    ("RAM (percentile)", "ram", {"face": "percentile"}),
    ("RAM (authors)", "ram", {"face": "authors", "r": 1.0}),
    ("RAM+ (authors)", "ram", {"face": "authors", "r": 1.2}),
    ("RAM (mergekit)", "ram", {"face": "mergekit"}),
    ("RAM+ TL (mergekit)", "ramplus_tl", {}),
)


def merge_quality(deltas, methods, merge_tensors, *, seed: int = 0) -> dict:
    """Cos / fidelity / relative error of each method on one ``(K, d)`` set of task vectors."""
    x = np.asarray(deltas, dtype=np.float32)
    k = x.shape[0]
    oracle = x.astype(np.float64).sum(axis=0)
    on = np.linalg.norm(oracle)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    base = np.zeros(x.shape[1], np.float32)
    out = {}
    for label, method, params in methods:
        p = dict(params)
        m = np.asarray(merge_tensors(method, base, list(x), [1.0] * k, **_with_seed(p, seed)), dtype=np.float64)
        m = m - base
        mn = np.linalg.norm(m)
        cos = float(m @ oracle / (mn * on)) if mn > 0 and on > 0 else 0.0
        fid = float(np.mean([(m @ x[j]) / (mn * norms[j]) if mn > 0 and norms[j] > 0 else 0.0 for j in range(k)]))
        out[label] = {"cos": cos, "fid": fid, "rel_err": float(np.linalg.norm(m - oracle) / on) if on > 0 else 0.0}
    return out


def _with_seed(params, seed):
    return {**params, "seed": seed} if "seed" not in params else params


def merge_quality_study(out, *, sparsities=SPARSITIES, agents=(2, 3, 5), d: int = 1 << 17, trials: int = 5,
                        seed: int = 0, methods=DEFAULT_METHODS, table_sparsities=(0.80, 0.90, 0.95)):
    """Write ``table2`` (K=3 at 80/90/95%), ``merge_quality_grid`` (every s, K, method),
    ``fig2_merge_quality.png`` and ``fig3_advantage.png``; returns the grid rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods, skipped = [tuple(m) for m in methods], []
    grid = []
    for k in progress(agents, desc="merge-quality agents", unit="K"):
        for i, s in enumerate(sparsities):
            try:
                support_sizes(d, k, float(s), SHARED)
            except UnmergeError as err:  # 20% shared + disjoint unique supports do not fit
                skipped.append({"agents": k, "sparsity": float(s), "reason": str(err)})
                continue
            x = np.asarray(simulate_trials(seed * 7919 + 31 * k + i, trials, d, k, float(s)))
            res = [merge_quality(x[t], methods, merge_tensors, seed=seed * 1000 + t) for t in range(trials)]
            for label, method, params in methods:
                row = {"agents": k, "sparsity": float(s), "method": label}
                for key in ("cos", "fid", "rel_err"):
                    row[key], row[f"{key}_std"] = mean_std([r[label][key] for r in res])
                grid.append(row)
    table = []
    for label, _, _ in methods:
        row = {"method": label}
        for s in table_sparsities:
            g = next((r for r in grid if r["agents"] == 3 and abs(r["sparsity"] - s) < 1e-9 and r["method"] == label), None)
            if g is None:
                continue
            pct = int(round(s * 100))
            row[f"cos@{pct}"], row[f"fid@{pct}"] = g["cos"], g["fid"]
            if label in PAPER_TABLE2 and s in PAPER_TABLE2[label]:
                row[f"paper_cos@{pct}"], row[f"paper_fid@{pct}"] = PAPER_TABLE2[label][s]
        table.append(row)
    write_table(out, "table2", table, title=f"Table 2 — merge quality, 3 agents, d = {d}, {trials} trials")
    write_table(out, "merge_quality_grid", grid, title="Merge quality over sparsity and K")
    write_json(out / "methods.json", {"used": [list(m) for m in methods], "skipped": skipped})
    _plot(out, grid, [m[0] for m in methods], table_sparsities)
    return {"table2": table, "grid": grid, "skipped": skipped}


def _plot(out, grid, labels, table_sparsities):
    g3 = [r for r in grid if r["agents"] == 3]
    fig, (a1, a2) = figure()
    w = 0.8 / max(len(labels), 1)
    xs = np.arange(len(table_sparsities))
    for j, lab in enumerate(labels):
        for ax, key in ((a1, "cos"), (a2, "fid")):
            vals = [next((r[key] for r in g3 if r["method"] == lab and abs(r["sparsity"] - s) < 1e-9), np.nan)
                    for s in table_sparsities]
            ax.bar(xs + (j - len(labels) / 2) * w + w / 2, vals, w, label=lab)
    for ax, t in ((a1, "cosine to oracle"), (a2, "mean per-agent fidelity")):
        ax.set(xticks=xs, xticklabels=[f"{int(s * 100)}%" for s in table_sparsities], title=f"{t} (3 agents)",
               xlabel="sparsity")
    a1.legend(fontsize=6)
    save_figure(fig, out / "fig2_merge_quality.png")

    fig, (a1, a2) = figure()
    for lab in labels:
        pts = sorted((r["sparsity"], r["cos"]) for r in g3 if r["method"] == lab)
        a1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=lab)
    a1.set(xlabel="sparsity", ylabel="cosine to oracle", title="(a) merge quality vs sparsity (3 agents)")
    a1.legend(fontsize=6)
    ram = [lab for lab in labels if lab.startswith("RAM")]
    for ref in ("Simple Avg", "TIES"):
        if ref not in labels:
            continue
        for lab in ram:
            rs = sorted((r["sparsity"], r["cos"]) for r in g3 if r["method"] == lab)
            bs = dict((r["sparsity"], r["cos"]) for r in g3 if r["method"] == ref)
            a2.plot([p[0] for p in rs], [p[1] - bs[p[0]] for p in rs], "o-", ms=3, label=f"{lab} − {ref}")
    a2.axvline(0.93, color="grey", ls=":", label="paper's predicted 70B sparsity")
    a2.axhline(0, color="k", lw=0.5)
    a2.set(xlabel="sparsity", ylabel="Δ cosine to oracle", title="(b) RAM advantage")
    a2.legend(fontsize=6)
    save_figure(fig, out / "fig3_advantage.png")
