"""Layer-wise sparsity anatomy (the sparsity-scaling paper's Table 3, Figure 4) of a simulated 70B-class model — or of
a real task vector.

Simulated: every one of the 723 tensors of Llama-3-70B (real shapes, from the meta-device
config) gets its own task vector, streamed one tensor at a time through
:func:`~unmerge_jax.analysis.metrics.sparsity_metrics`; each tensor is capped at
``max_elements`` entries (a full 70B run is ~70·10⁹ draws). Two sparsity profiles are run: flat
(same set sparsity everywhere) and paper-like (attention sparser than MLP, norms densest, deeper
sparser). A module/depth pattern in a simulation is whatever the profile put there — plus one
real effect: the per-tensor L0 uses the tensor's own max, which grows with the tensor's size.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from unmerge_jax.analysis.architectures import tensor_shapes
from unmerge_jax.analysis.metrics import sparsity_metrics
from unmerge_jax.analysis.names import classify
from unmerge_jax.analysis.report import figure, save_figure, write_json, write_table
from unmerge_jax.analysis.simulator import PROFILES, calibrated_sparsity, simulate_agents
from unmerge_jax.sources import VirtualSource

# The sparsity-scaling paper's Table 3 (70B, 80 layers): mean L0, std L0, count.
PAPER_TABLE3 = {"attention": (0.9688, 0.0105, 320), "mlp": (0.9454, 0.0154, 240), "norm": (0.8798, 0.0345, 161),
                "embedding": (0.9741, 0.0, 1), "lm_head": (0.9182, 0.0, 1), "overall": (0.9412, 0.0397, 723)}


def simulated_source(arch: str, sparsity: float, *, profile: str = "flat", max_elements: int | None = 1 << 16,
                     seed: int = 0) -> VirtualSource:
    """One simulated agent's task vector over ``arch`` as a :class:`~unmerge_jax.sources.VirtualSource`:
    tensor i (flat, at most ``max_elements`` entries) is generated on demand from
    ``fold_in(key(seed), i)``, so nothing is held and a re-read gives the same values."""
    shapes = list(tensor_shapes(arch))
    prof = PROFILES[profile]
    n_layers = 1 + max(layer for layer in (classify(n)[0] for n, _ in shapes) if layer is not None)
    index = {n: i for i, (n, _) in enumerate(shapes)}
    key = jax.random.key(seed)
    sizes = {n: int(np.prod(s)) if max_elements is None else min(int(np.prod(s)), max_elements) for n, s in shapes}

    def generate(n):
        s = prof.sparsity(sparsity, n, n_layers)
        return np.asarray(simulate_agents(jax.random.fold_in(key, index[n]), sizes[n], 1, s))[0]

    return VirtualSource({n: (d,) for n, d in sizes.items()}, generate, label=f"simulated {arch} ({profile} profile)")


def anatomy_table(result: dict) -> list:
    """Table-3 rows from a :func:`sparsity_metrics` result: per-tensor L0 mean/std/count per class."""
    rows = []
    for cls, m in result["by_module"].items():
        r = {"module": cls, "mean_l0": m["tensor_l0_mean"], "std_l0": m["tensor_l0_std"], "count": m["n_tensors"],
             "pooled_l0": m["l0"], "gini": m["gini"],
             "depth_slope_per_layer": result["depth_trend"].get(cls, {}).get("slope_per_layer", float("nan"))}
        if cls in PAPER_TABLE3:
            r.update(paper_mean_l0=PAPER_TABLE3[cls][0], paper_std_l0=PAPER_TABLE3[cls][1], paper_count=PAPER_TABLE3[cls][2])
        rows.append(r)
    l0 = np.array([t["l0"] for t in result["tensors"].values()])
    rows.append({"module": "overall", "mean_l0": float(l0.mean()), "std_l0": float(l0.std()), "count": int(l0.size),
                 "pooled_l0": result["overall"]["l0"], "gini": result["overall"]["gini"],
                 "depth_slope_per_layer": float("nan"), "paper_mean_l0": PAPER_TABLE3["overall"][0],
                 "paper_std_l0": PAPER_TABLE3["overall"][1], "paper_count": PAPER_TABLE3["overall"][2]})
    return rows


def anatomy_study(out, *, arch: str = "llama-3-70b", sparsity: float | None = None, profiles=("flat", "paper-like"),
                  max_elements: int | None = 1 << 16, seed: int = 0, target=None, base=None):
    """Write ``table3_<profile>`` and ``fig4_anatomy_<profile>.png`` (and the full metrics JSON).

    With ``target`` (and ``base``) the anatomy of that real task vector is reported instead.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if sparsity is None:
        sparsity = float(calibrated_sparsity(70.0))
    runs = {"real": sparsity_metrics(target, base=base)} if target is not None else {
        p: sparsity_metrics(simulated_source(arch, sparsity, profile=p, max_elements=max_elements, seed=seed))
        for p in profiles}
    tables = {}
    for label, res in runs.items():
        rows = anatomy_table(res)
        tables[label] = rows
        what = res["source"]
        write_table(out, f"table3_{label}", rows, title=f"Table 3 — per-module L0, {what}, set sparsity "
                    f"{sparsity:.4f}, ≤{max_elements} entries/tensor", floatfmt=".4g")
        write_json(out / f"anatomy_{label}.json", {k: v for k, v in res.items() if k != "tensors"})
        _plot(out / f"fig4_anatomy_{label}.png", res, what)
    return tables


def _plot(path, res, title):
    fig, (a1, a2) = figure()
    classes = list(res["by_module"])
    means = [res["by_module"][c]["tensor_l0_mean"] for c in classes]
    stds = [res["by_module"][c]["tensor_l0_std"] for c in classes]
    a1.bar(classes, means, yerr=stds, capsize=3, label="ours")
    a1.plot([c for c in classes if c in PAPER_TABLE3], [PAPER_TABLE3[c][0] for c in classes if c in PAPER_TABLE3],
            "D", color="k", label="paper Table 3")
    lo = min(min(means) - max(stds + [0]), 0.85)
    a1.set(ylim=(lo, 1.0), ylabel="mean per-tensor L0", title=f"(a) by module — {title}")
    a1.tick_params(axis="x", labelsize=8)
    a1.legend(fontsize=8)
    for cls in ("attention", "mlp"):
        pts = [(t["layer"], t["l0"]) for t in res["tensors"].values() if t["module_class"] == cls and t["layer"] is not None]
        if not pts:
            continue
        layers = sorted({p[0] for p in pts})
        per = [np.mean([v for lay, v in pts if lay == x]) for x in layers]
        slope = res["depth_trend"].get(cls, {}).get("slope_per_layer", float("nan"))
        a2.plot(layers, per, ".-", label=f"{cls} (slope {slope:.2e}/layer)")
    a2.set(xlabel="layer", ylabel="mean per-tensor L0", title="(b) L0 vs depth")
    a2.legend(fontsize=8)
    save_figure(fig, path)
