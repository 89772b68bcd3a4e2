"""Benchmark: attribution decisions calibrated on some seeds, reported on others.

For each seed of the ``synthetic`` preset (and, with ``--tiny-seeds``, of the ``tiny`` preset, whose
LoRA adapters must train or be cached) the experiment's 72 targets are merged by the engine, and
one pass per variant (compressed to the preset's top-k, and full) yields the Gram statistics with
``--boot`` bootstrap replicates and the signature sums. Then:

* ``calibration`` — :func:`unmerge_jax.attribution.calibrate.calibrate` on the calibration seeds
  (default: the library's record ``rules.CALIBRATION``, synthetic 0–4, tiny 0–6, small 3), and whether it
  reproduces the library's :data:`DEFAULT_RULES`;
* ``holdout`` — the library's rules on the other seeds (default synthetic 5–11 and the tiny and small
  seeds of ``rules.HELD_OUT``, tiny 7–8 and small 4–5; ``--tiny-seeds "" --small-seeds ""`` for synthetic only): the
  figures of :data:`~unmerge_jax.attribution.calibrate.TARGETS` per variant, every error, and the
  paper-faithful support (``|a| > 1e-8``) of plain NNLS beside them;
* ``ties_aware`` — on known TIES targets of the hold-out seeds: plain NNLS, NNLS on the trimmed
  dictionary entries at the merge's density, and the TIES-consistent weights (support, weights);
* ``timing`` — seconds per step (statistics pass, signature pass, decisions).

Writes ``bench/results/attribution.json``.

Usage: ``python bench/attribution.py [--calibration 0-4] [--calibration-tiny 0-6] [--calibration-small 3] [--holdout 5-11] [--tiny-seeds 7,8] [--small-seeds 4,5] [--cache DIR] [--small-cache DIR] [--boot 200]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

import unmerge_jax
from unmerge_jax.attribution import DEFAULT_RULES, PRESENT, attribute, trim_thresholds
from unmerge_jax.attribution.calibrate import (Problem, calibrate, columns, merge_target, rules_dict, score,
                                               summarize)
from unmerge_jax.attribution.rules import CALIBRATION, HELD_OUT
from unmerge_jax.attribution.signatures import DENSITY_GRID, signature_stats
from unmerge_jax.experiment.presets import get_preset
from unmerge_jax.experiment.targets import make_targets, truth_matrix
from unmerge_jax.io.names import group_ids

OUT = Path(__file__).resolve().parent / "results" / "attribution.json"


def seeds_arg(text: str) -> list[int]:
    out = []
    for part in filter(None, text.split(",")):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def deltas_for(preset: str, seed: int, cache: Path | None):
    p = get_preset(preset)
    names = list(p.dictionary) + list(p.outside)
    if p.source == "synthetic":
        from unmerge_jax.experiment.synthetic import synthetic_deltas

        return p, synthetic_deltas(names, p.synthetic, seed)
    from unmerge_jax.experiment.pipeline import build_dictionary

    return p, build_dictionary(p, seed, cache or Path("unmerge-experiment/cache"), {})


def build(preset: str, seed: int, boot: int, cache, timing: dict):
    """Problems of one seed (both variants) and the raw rows the TIES-aware comparison needs."""
    p, deltas = deltas_for(preset, seed, cache)
    specs = make_targets(p.dictionary, p.outside, per_category=p.per_category, seed=seed)
    atoms = [deltas[t] for t in p.dictionary]
    names = sorted(atoms[0])
    t0 = time.perf_counter()
    merged = [merge_target(s, deltas) for s in specs]
    timing.setdefault("merge", []).append(time.perf_counter() - t0)
    thr = np.stack([trim_thresholds([a[n] for a in atoms], DENSITY_GRID) for n in names])
    problems, rows = [], {}
    for variant in ("compressed", "full"):
        mask = unmerge_jax.topk_mask(atoms, p.top_k) if variant == "compressed" else None
        D, V = columns(atoms, names, mask), columns(merged, names, mask)
        sizes = [int(mask[n].sum()) if mask is not None else atoms[0][n].size for n in names]
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        t0 = time.perf_counter()
        stats = unmerge_jax.gram_stats(D, V, seeds=boot, key=seed)
        t1 = time.perf_counter()
        sig = signature_stats(D, V, list(zip(bounds[:-1], bounds[1:])), thr, groups=group_ids(names))
        t2 = time.perf_counter()
        timing.setdefault(f"gram_stats ({variant}, {boot} replicates)", []).append(t1 - t0)
        timing.setdefault(f"signature_stats ({variant})", []).append(t2 - t1)
        problems.append(Problem(f"{preset}/seed{seed}/{variant}", stats, sig, specs, truth_matrix(specs, p.dictionary),
                                tuple(p.dictionary), tuple(s.name for s in specs)))
        rows[variant] = (D, V, mask, names, atoms)
    return problems, rows


def support_metrics(coef, truth):
    """precision, recall, perfect match of ``coef > 1e-8`` and the max error of the normalised weights."""
    sel, tr = coef > 1e-8, truth > 0
    tp = np.count_nonzero(sel & tr)
    prec = tp / sel.sum() if sel.any() else 0.0
    norm = lambda x: x / x.sum() if x.sum() > 0 else x
    return {"precision": prec, "recall": tp / tr.sum(), "perfect_match": float(np.array_equal(sel, tr)),
            "weight_error": float(np.max(np.abs(norm(coef) - norm(truth))))}


def ties_aware(problem: Problem, rows, at) -> list[dict]:
    D, V, mask, names, atoms = rows
    out = []
    for t, s in enumerate(problem.specs):
        if s.category != "known" or s.merge_method != "ties":
            continue
        truth = problem.truth[t]
        G, c = problem.stats.gram, problem.stats.cross[:, t]
        plain, _ = unmerge_jax.attribution.nnls_active_set(G[None], c[None])
        rho = s.params["density"]
        trimmed = []
        for n in names:
            stack = np.stack([a[n].reshape(-1) for a in atoms])
            th = trim_thresholds(stack, (rho,))[0]
            kept = np.where(np.abs(stack) >= th[:, None], stack, 0.0)
            trimmed.append(kept[:, mask[n].reshape(-1)] if mask is not None else kept)
        Tm = np.concatenate(trimmed, axis=1).T.astype(np.float64)
        tr_coef, _ = unmerge_jax.attribution.nnls_active_set((Tm.T @ Tm)[None], (Tm.T @ V[:, t].astype(np.float64))[None])
        ties_w = np.where(at.decision[t] == PRESENT, at.weights[t], 0.0)
        out.append({"problem": problem.name, "target": s.name,
                    "plain_nnls": support_metrics(plain[0], truth), "trimmed_nnls": support_metrics(tr_coef[0], truth),
                    "ties_consistent": support_metrics(ties_w, truth), "identified_density": float(at.density[t])})
    return out


def is_error(r) -> bool:
    """A wrong verdict, a known target's present set not exactly the truth, or a wrong method on a
    known target with two or more entries."""
    known = r["category"] == "known"
    return (r["predicted_category"] != r["category"] or (known and not r["perfect_match"])
            or (known and r["n_dictionary"] >= 2 and not r["method_correct"]))


def mean_metrics(items, key):
    return {m: float(np.mean([i[key][m] for i in items])) for m in ("precision", "recall", "perfect_match", "weight_error")}


def paper_support(problem: Problem, at) -> dict:
    """Plain NNLS support ``|a| > 1e-8`` (the paper-faithful rule) on the same problem."""
    rows = []
    for t, s in enumerate(problem.specs):
        if s.category == "unknown":
            continue
        m = support_metrics(at.coef[t], problem.truth[t])
        rows.append((s.category, s.merge_method, m))
    out = {f"known_{mm}": mean_metrics([{"m": r[2]} for r in rows if r[0] == "known" and r[1] == mm], "m")
           for mm in ("task_arithmetic", "linear", "ties", "dare")}
    out["mixed"] = mean_metrics([{"m": r[2]} for r in rows if r[0] == "mixed"], "m")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cal_tiny = ",".join(map(str, CALIBRATION["presets"]["tiny"]))
    ap.add_argument("--calibration", default=",".join(map(str, CALIBRATION["presets"]["synthetic"])),
                    help="synthetic seeds to calibrate on (default: the library's calibration record)")
    ap.add_argument("--calibration-tiny", default=cal_tiny,
                    help=f"tiny-preset seeds to calibrate on (default {cal_tiny}, the library's record; "
                         "trains or reuses adapters)")
    cal_small = ",".join(map(str, CALIBRATION["presets"].get("small", ())))
    ap.add_argument("--calibration-small", default=cal_small,
                    help=f"small-preset seeds to calibrate on (default {cal_small}, the library's record)")
    ap.add_argument("--holdout", default="5-11")
    ap.add_argument("--tiny-seeds", default=",".join(map(str, HELD_OUT["tiny"])),
                    help="tiny-preset seeds to report (default: the library's held-out seeds)")
    ap.add_argument("--small-seeds", default=",".join(map(str, HELD_OUT.get("small", ()))),
                    help="small-preset seeds to report (default: the library's held-out seeds)")
    ap.add_argument("--cache", type=Path, default=None, help="model cache of the tiny preset")
    ap.add_argument("--small-cache", type=Path, default=None, help="model cache of the small preset")
    ap.add_argument("--boot", type=int, default=200)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    timing: dict = {}
    result = {"platform": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                           "jax": jax.__version__}, "boot_replicates": args.boot}

    cal = []
    for seed in seeds_arg(args.calibration):
        cal += build("synthetic", seed, args.boot, args.cache, timing)[0]
    for seed in seeds_arg(args.calibration_tiny):
        cal += build("tiny", seed, args.boot, args.cache, timing)[0]
    for seed in seeds_arg(args.calibration_small):
        cal += build("small", seed, args.boot, args.small_cache, timing)[0]
    t0 = time.perf_counter()
    rules, report = calibrate(cal)
    timing["calibrate"] = [time.perf_counter() - t0]
    result["calibration"] = {"seeds": seeds_arg(args.calibration), "tiny_seeds": seeds_arg(args.calibration_tiny),
                             "small_seeds": seeds_arg(args.calibration_small),
                             "rules": rules_dict(rules), "splits": report,
                             "reproduces_default_rules": rules == DEFAULT_RULES,
                             "default_rules": rules_dict(DEFAULT_RULES)}
    print("calibrated:", rules, "(= DEFAULT_RULES)" if rules == DEFAULT_RULES else "(differs from DEFAULT_RULES)")

    holdout = {"synthetic": seeds_arg(args.holdout), "tiny": seeds_arg(args.tiny_seeds),
               "small": seeds_arg(args.small_seeds)}
    result["holdout"] = {}
    ties_rows = []
    for preset, seeds in holdout.items():
        per_variant = {"compressed": [], "full": []}
        paper = {"compressed": [], "full": []}
        for seed in seeds:
            problems, rows = build(preset, seed, args.boot, args.small_cache if preset == "small" else args.cache, timing)
            for p, variant in zip(problems, ("compressed", "full")):
                t0 = time.perf_counter()
                at = attribute(p.stats, p.signatures, atom_names=p.atom_names, target_names=p.target_names)
                timing.setdefault(f"attribute ({variant})", []).append(time.perf_counter() - t0)
                per_variant[variant] += score(p, attribution=at)
                paper[variant].append(paper_support(p, at))
                if preset == "synthetic":
                    ties_rows += ties_aware(p, rows[variant], at)
        for variant, rows_v in per_variant.items():
            if not rows_v:
                continue
            s = summarize(rows_v)
            errors = [r for r in rows_v if is_error(r)]
            paper_mean = {k: {m: float(np.mean([x[k][m] for x in paper[variant]])) for m in paper[variant][0][k]}
                          for k in paper[variant][0]}
            result["holdout"][f"{preset}/{variant}"] = {"seeds": seeds, "summary": s, "paper_support_nnls": paper_mean,
                                                         "errors": errors}
            print(f"{preset}/{variant}:", {k: round(v, 3) for k, v in s.items() if isinstance(v, float)},
                  "missed:", [k for k, ok in s["met"].items() if not ok])
    result["ties_aware"] = {
        variant: {key: mean_metrics([r for r in ties_rows if r["problem"].endswith(variant)], key)
                  for key in ("plain_nnls", "trimmed_nnls", "ties_consistent")}
        for variant in ("compressed", "full")}
    result["ties_aware"]["n_targets"] = len(ties_rows)
    print("ties-aware:", json.dumps(result["ties_aware"], indent=1))
    result["timing"] = {k: {"mean_s": float(np.mean(v)), "n": len(v)} for k, v in timing.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
