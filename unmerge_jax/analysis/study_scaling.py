"""Scaling-law study (the sparsity-scaling paper's Table 1, Figures 1 and 5).

Protocol (§2.6): the *set* sparsity at size N comes from the law through the RAM paper's two
points (0.85 at 3B, 0.90 at 7B); K agents' task vectors of length ``d`` are simulated with it;
the metrics are *measured* on them (5 trials per size); the law is fitted to the measured L0.
The vectors are d entries long, not N: nobody generates 405B numbers per trial. That matters:
L0 thresholds at 1% of the *max*, and the max of more log-normals is larger, so measured L0 grows
with d at fixed set sparsity — the ``l0_vs_length`` table shows it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unmerge_jax.analysis.metrics import sparsity_metrics
from unmerge_jax.analysis.overlap import inter_agent
from unmerge_jax.analysis.report import figure, mean_std, save_figure, write_json, write_table
from unmerge_jax.analysis.scaling import fit_scaling_law, law
from unmerge_jax.analysis.simulator import calibrated_sparsity, simulate_trials
from unmerge_jax.progress import progress

PAPER_SIZES = (1, 3, 7, 8, 14, 32, 70, 100, 200, 405)
# The sparsity-scaling paper's Table 1: L0 mean, L0 std, Gini mean, Gini std, kurtosis, top-1% mass.
PAPER_TABLE1 = {
    1: (0.9139, 0.0224, 0.9268, 0.0038, 792.6, 0.3998), 3: (0.9609, 0.0099, 0.9584, 0.0021, 1876.7, 0.5143),
    7: (0.9630, 0.0064, 0.9685, 0.0026, 1300.7, 0.5663), 8: (0.9828, 0.0067, 0.9714, 0.0025, 6688.9, 0.5922),
    14: (0.9778, 0.0037, 0.9786, 0.0025, 2340.5, 0.6548), 32: (0.9895, 0.0025, 0.9852, 0.0016, 6965.6, 0.7399),
    70: (0.9944, 0.0013, 0.9909, 0.0029, 13020.8, 0.8540), 100: (0.9947, 0.0029, 0.9895, 0.0026, 30586.5, 0.8220),
    200: (0.9954, 0.0025, 0.9935, 0.0020, 16120.6, 0.9150), 405: (0.9970, 0.0012, 0.9940, 0.0020, 39018.9, 0.9272),
}
PAPER_FIT = {"a": 0.085, "b": 0.587, "r2": 0.965}


def scaling_law_study(out, *, sizes=PAPER_SIZES, trials: int = 5, d: int = 1 << 20, n_agents: int = 3,
                      shared: float = 0.2, seed: int = 0, n_boot: int = 1000, lengths=(10_000, 100_000, 1 << 20)):
    """Run the study and write ``table1``, ``scaling_fit``, ``inter_agent``, ``l0_vs_length`` and
    ``fig1_scaling.png`` / ``fig5_inter_agent.png`` into ``out``. Returns the results dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_trial, rows, inter_rows = [], [], []
    for i, size in enumerate(progress(sizes, desc="scaling-law sizes", unit="size")):
        s_set = float(calibrated_sparsity(size))
        x = np.asarray(simulate_trials(seed * 1000 + i, trials, d, n_agents, s_set, shared=shared))
        ms, ov = [], []
        for t in range(trials):
            m = sparsity_metrics(x[t, 0], mode="exact", per_tensor=False)["overall"]
            ms.append(m)
            ov.append(inter_agent(x[t]))
            per_trial.append({"size_b": size, "trial": t, "set_sparsity": s_set, **{k: m[k] for k in (
                "l0", "gini", "kurtosis", "top1_mass", "top5_mass")}})
        row = {"size_b": size, "set_sparsity": s_set}
        for key in ("l0", "gini", "kurtosis", "top1_mass", "top5_mass"):
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([m[key] for m in ms])
        if size in PAPER_TABLE1:
            p = PAPER_TABLE1[size]
            row.update(paper_l0=p[0], paper_l0_std=p[1], paper_gini=p[2], paper_kurtosis=p[4], paper_top1=p[5])
        rows.append(row)
        inter_rows.append({"size_b": size, **{k: mean_std([o[k] for o in ov])[0] for k in (
            "mean_jaccard", "mean_cosine", "shared_fraction", "unique_fraction")}})
    n = np.array([r["size_b"] for r in per_trial], dtype=float)
    fit = fit_scaling_law(n, [r["l0"] for r in per_trial], n_boot=n_boot, seed=seed)
    fit_gini = fit_scaling_law(n, [r["gini"] for r in per_trial], n_boot=0)
    fit_rows = [
        {"fit": "ours: measured L0", "a": fit.a, "b": fit.b, "r2_trials": fit.r2, "r2_means": fit.r2_means,
         "a_ci": f"[{fit.a_ci[0]:.4g}, {fit.a_ci[1]:.4g}]", "b_ci": f"[{fit.b_ci[0]:.4g}, {fit.b_ci[1]:.4g}]",
         **{f"s({int(k)}B)": f"{v[0]:.4f} [{v[1]:.4f}, {v[2]:.4f}]" for k, v in fit.predictions.items()}},
        {"fit": "ours: measured Gini", "a": fit_gini.a, "b": fit_gini.b, "r2_trials": fit_gini.r2,
         "r2_means": fit_gini.r2_means},
        {"fit": "paper", "a": PAPER_FIT["a"], "b": PAPER_FIT["b"], "r2_trials": float("nan"),
         "r2_means": PAPER_FIT["r2"], **{f"s({k}B)": f"{law(k, PAPER_FIT['a'], PAPER_FIT['b']):.4f}"
                                          for k in (70, 100, 405)}},
    ]
    len_rows = _l0_vs_length(lengths, seed, trials)
    write_table(out, "table1", rows, title=f"Table 1 — measured sparsity metrics (d = {d}, {trials} trials)")
    write_table(out, "scaling_fit", fit_rows, title="Scaling-law fit s(N) = 1 − a·N^(−b)")
    write_table(out, "inter_agent", inter_rows, title=f"Inter-agent overlap ({n_agents} agents)")
    write_table(out, "l0_vs_length", len_rows, title="Measured L0 vs vector length at set sparsity 0.90")
    write_json(out / "trials.json", per_trial)
    _plot_scaling(out / "fig1_scaling.png", rows, fit)
    _plot_inter(out / "fig5_inter_agent.png", inter_rows)
    return {"table1": rows, "fit": fit.asdict(), "inter_agent": inter_rows, "l0_vs_length": len_rows}


def _l0_vs_length(lengths, seed, trials):
    rows = []
    for d in lengths:
        x = np.asarray(simulate_trials(seed + 77, trials, int(d), 1, 0.90))
        l0 = [sparsity_metrics(x[t, 0], mode="exact", per_tensor=False)["overall"]["l0"] for t in range(trials)]
        m, s = mean_std(l0)
        rows.append({"length": int(d), "set_sparsity": 0.90, "l0_mean": m, "l0_std": s})
    return rows


def _plot_scaling(path, rows, fit):
    fig, (a1, a2) = figure()
    n = np.array([r["size_b"] for r in rows], dtype=float)
    grid = np.geomspace(n.min(), n.max(), 200)
    a1.errorbar(n, [r["l0_mean"] for r in rows], yerr=[r["l0_std"] for r in rows], fmt="o", label="measured L0 (ours)")
    a1.plot(grid, law(grid, fit.a, fit.b), "-", label=f"fit 1−{fit.a:.3f}·N^-{fit.b:.3f} (R²={fit.r2:.3f})")
    a1.plot(grid, law(grid, PAPER_FIT["a"], PAPER_FIT["b"]), "--", label="paper fit 1−0.085·N^-0.587")
    a1.plot(n, [r["set_sparsity"] for r in rows], "x:", label="set sparsity (calibrated law)")
    a1.plot([3, 7], [0.85, 0.90], "*", color="gold", ms=14, mec="k", label="RAM calibration points")
    pn = [k for k in PAPER_TABLE1]
    a1.plot(pn, [PAPER_TABLE1[k][0] for k in pn], "s", mfc="none", label="paper Table 1 L0")
    a1.set(xscale="log", xlabel="model size N (B params)", ylabel="L0 sparsity", title="(a) L0 sparsity vs scale")
    a1.legend(fontsize=7)
    a2.errorbar(n, [r["gini_mean"] for r in rows], yerr=[r["gini_std"] for r in rows], fmt="o-", label="ours")
    a2.plot(pn, [PAPER_TABLE1[k][2] for k in pn], "s--", mfc="none", label="paper")
    a2.set(xscale="log", xlabel="model size N (B params)", ylabel="Gini", title="(b) Gini vs scale")
    a2.legend(fontsize=8)
    save_figure(fig, path)


def _plot_inter(path, rows):
    fig, (a1, a2) = figure()
    n = [r["size_b"] for r in rows]
    a1.plot(n, [r["mean_jaccard"] for r in rows], "o-", label="mean pairwise Jaccard")
    a1.plot(n, [r["mean_cosine"] for r in rows], "s-", label="mean pairwise cosine")
    a1.set(xscale="log", xlabel="model size N (B)", title="(a) inter-agent similarity")
    a1.legend(fontsize=8)
    a2.plot(n, [r["shared_fraction"] for r in rows], "o-", label="shared (≥2 agents)")
    a2.plot(n, [r["unique_fraction"] for r in rows], "s-", label="unique (1 agent)")
    a2.set(xscale="log", xlabel="model size N (B)", ylabel="fraction of active union", title="(b) shared vs unique")
    a2.legend(fontsize=8)
    save_figure(fig, path)
