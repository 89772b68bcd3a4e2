"""The UNMERGE experiment end to end: dictionary → 72 merged targets → compression → one statistics
pass per variant → paper-grid sweep × seeds → runs.csv, the paper's Tables 1–6, figures, report.

Every numerical stage is the engine's own: merges by ``unmerge_jax.merge_tensors`` (ΔW space),
adapters and compression by the checkpoint I/O, statistics by ``unmerge_jax.gram_stats``, solvers
and metrics by ``unmerge_jax.sweep``, tables by ``unmerge_jax.summarize``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from unmerge_jax.errors import UnmergeError
from unmerge_jax.experiment import engine
from unmerge_jax.experiment.presets import Preset, get_preset
from unmerge_jax.experiment.targets import TargetSpec, make_targets, truth_matrix
from unmerge_jax.analysis.report import write_json
from unmerge_jax.io.atomic import check_output, os_error
from unmerge_jax.io.names import group_ids
from unmerge_jax.progress import progress

RUN_COLUMNS = ["variant", "target", "category", "merge_method", "tasks", "algorithm", "params", "seed",
               "recon_error", "precision", "recall", "sparsity", "perfect_match", "weight_error", "cosine",
               "unexplained", "converged", "coef"]


class ExperimentResult(NamedTuple):
    """What :func:`run_experiment` produced.

    Attributes:
      out: output directory.
      runs: one row per (variant, target, algorithm, params, seed) — the content of ``runs.csv``.
      tables: ``{table name: markdown}`` (the content of ``tables.md``).
      targets: the target specifications.
      timings: seconds per stage.
      attributions: ``{variant: VariantAttribution}`` (decisions, scores, the Must-show figures).
    """

    out: Path
    runs: pd.DataFrame
    tables: dict
    targets: list
    timings: dict
    attributions: dict


def build_dictionary(p: Preset, seed: int, cache: Path, timings: dict) -> dict[str, dict[str, np.ndarray]]:
    """``{task: {tensor: ΔW}}`` for every dictionary and outside task of the preset."""
    names = list(p.dictionary) + list(p.outside)
    if p.source == "synthetic":
        from unmerge_jax.experiment.synthetic import synthetic_deltas

        return synthetic_deltas(names, p.synthetic, seed)
    if p.source != "lora":
        raise UnmergeError(f"preset {p.name}: unknown source {p.source!r} (use 'lora' or 'synthetic')")
    from unmerge_jax.experiment import models

    t0 = time.perf_counter()
    base = models.build_base(cache, p.model, p.train, seed)
    timings["base"] = time.perf_counter() - t0
    deltas = {}
    t0 = time.perf_counter()
    for i, name in enumerate(progress(names, desc="LoRA adapters", unit="task")):
        adapter = models.train_adapter(cache, base, name, p.ranks[i % len(p.ranks)], p.train, seed)
        deltas[name] = engine.adapter_deltas(adapter)
    timings["adapters"] = time.perf_counter() - t0
    return deltas


def merge_targets(specs: list[TargetSpec], deltas: dict) -> dict[str, dict[str, np.ndarray]]:
    return {s.name: engine.merge_deltas(s.engine_method, [deltas[t] for t in s.tasks], s.weights, seed=s.seed, **s.params)
            for s in progress(specs, desc="merging targets", unit="target")}


def columns(vectors: list[dict[str, np.ndarray]], names: list[str], mask: dict | None) -> np.ndarray:
    """(n, len(vectors)) float32 matrix: each vector's tensors (masked if given) concatenated in ``names`` order."""
    def flat(v):
        return np.concatenate([(v[n].reshape(-1)[mask[n].reshape(-1)] if mask is not None else v[n].reshape(-1))
                               for n in names])
    return np.stack([flat(v) for v in vectors], axis=1).astype(np.float32)


def decompose_variant(variant: str, p: Preset, seed: int, atoms: list, targets: list, names: list, mask,
                      specs: list[TargetSpec], thresholds: np.ndarray, timings: dict, rules=None):
    """One statistics pass (all targets, all bootstrap replicates), the sweep and the attribution for one variant.

    The Gram pass computes ``max(p.seeds, p.boot)`` replicates at once; the sweep uses the first
    ``p.seeds`` of them (as the paper's 3 seeds), the attribution all of them. The signature sums
    are one more sweep over the same in-memory columns (no other read of the task vectors).

    Returns:
      ``(runs of this variant, VariantAttribution)``.
    """
    import unmerge_jax
    from unmerge_jax.attribution import DEFAULT_RULES
    from unmerge_jax.experiment import attribution as attr

    D = columns(atoms, names, mask)
    V = columns(targets, names, mask)
    truth = truth_matrix(specs, p.dictionary)
    t0 = time.perf_counter()
    stats = unmerge_jax.gram_stats(D, V, seeds=max(p.seeds, p.boot), key=seed)
    t1 = time.perf_counter()
    table = unmerge_jax.sweep(stats, grid=p.grid, seeds=p.seeds, truth=truth,
                              target_names=[s.name for s in specs], atom_names=list(p.dictionary))
    t2 = time.perf_counter()
    va = attr.attribute_variant(variant, stats, D, V, attr.segments(atoms, names, mask), thresholds, specs, truth,
                                p.dictionary, rules=DEFAULT_RULES if rules is None else rules,
                                groups=group_ids(names))
    t3 = time.perf_counter()
    timings[f"gram pass, {max(p.seeds, p.boot)} replicates ({variant})"] = t1 - t0
    timings[f"sweep ({variant})"] = t2 - t1
    timings[f"signatures + attribution ({variant})"] = t3 - t2
    by_name = {s.name: s for s in specs}
    table.insert(0, "variant", variant)
    table["category"] = table["target"].map(lambda t: by_name[t].category)
    table["merge_method"] = table["target"].map(lambda t: by_name[t].merge_method)
    table["tasks"] = table["target"].map(lambda t: "+".join(by_name[t].tasks))
    table = table.rename(columns={"method": "algorithm"})
    table["coef"] = table["coef"].map(lambda c: " ".join(f"{x:.6g}" for x in c))
    table = attr.add_present_columns(table, attr.attribution_frame(variant, va))
    table.attrs["n_rows"] = int(D.shape[0])
    # Lasso's scale: every coefficient is zero for α ≥ α_max = max_k |d_kᵀv| / n (sklearn objective).
    amax = np.max(np.abs(np.asarray(stats.cross)), axis=0) / float(stats.n_rows)
    table.attrs["alpha_max"] = {"min": float(amax.min()), "median": float(np.median(amax)), "max": float(amax.max())}
    return table, va


def run_experiment(preset="synthetic", out="unmerge-experiment", *, seed: int = 0, cache=None,
                   rules=None) -> ExperimentResult:
    """Run a preset end to end and write its outputs to ``out``.

    Args:
      preset: ``"tiny"`` (trained LoRA adapters on a tiny Qwen2, ~minutes), ``"synthetic"``
        (random low-rank task vectors, < 1 minute), ``"reduced"`` (the test's small version), or a
        :class:`~unmerge_jax.experiment.presets.Preset`.
      out: output directory (created; files in it are replaced atomically).
      seed: seeds the base model, adapters, target draws, merges and bootstrap replicates.
      cache: directory for trained models (default ``out/cache``); keyed by config hash, so a
        re-run with the same preset and seed reuses them.
      rules: attribution thresholds (default :data:`unmerge_jax.attribution.DEFAULT_RULES`).

    Returns:
      :class:`ExperimentResult`. Files: ``runs.csv``, ``attribution.csv``, ``attribution.json``, ``tables.md``, ``table*.csv``,
      ``targets.json``, ``fig_recon_error.png``, ``fig_precision_recall.png``, ``report.md``,
      ``timing.json``.
    """
    from unmerge_jax.experiment import attribution as attr
    from unmerge_jax.experiment.report import write_outputs

    p = get_preset(preset)
    out = Path(out)
    cache = Path(cache) if cache is not None else out / "cache"
    for d in (out, cache):  # before the work: a directory path, writable (files in them are replaced)
        check_output(d, directory=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise os_error(err, out, "create the directory") from None
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    deltas = build_dictionary(p, seed, cache, timings)
    specs = make_targets(p.dictionary, p.outside, per_category=p.per_category, seed=seed)
    t0 = time.perf_counter()
    merged = merge_targets(specs, deltas)
    timings["merge"] = time.perf_counter() - t0

    names = sorted(deltas[p.dictionary[0]])
    atoms = [deltas[t] for t in p.dictionary]
    targets = [merged[s.name] for s in specs]
    t0 = time.perf_counter()
    mask = engine.topk_mask(atoms, p.top_k)
    timings["compress"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    thresholds = attr.tensor_thresholds(atoms, names)  # from the whole dictionary tensors, for both variants
    timings["trim thresholds"] = time.perf_counter() - t0
    variants = [("compressed", mask)] + ([("full", None)] if p.full else [])
    frames, n_rows, alpha_max, attributions = [], {}, {}, {}
    for variant, m in variants:
        t0 = time.perf_counter()
        frame, attributions[variant] = decompose_variant(variant, p, seed, atoms, targets, names, m, specs, thresholds,
                                                         timings, rules)
        n_rows[variant] = frame.attrs["n_rows"]
        alpha_max[variant] = frame.attrs["alpha_max"]
        frames.append(frame)
        timings[f"stats+sweep+attribution ({variant})"] = time.perf_counter() - t0
    runs = pd.concat(frames, ignore_index=True)
    lead = RUN_COLUMNS + attr.PRESENT_COLUMNS
    runs = runs[lead + [c for c in runs.columns if c not in lead]]

    t0 = time.perf_counter()
    meta = {"preset": p.name, "seed": seed, "source": p.source, "dictionary": list(p.dictionary),
            "outside": list(p.outside), "n_targets": len(specs), "top_k": p.top_k, "rows": n_rows, "alpha_max": alpha_max,
            "seeds": p.seeds, "boot": max(p.seeds, p.boot), "preset_config": _jsonable(dataclasses.asdict(p))}
    tables = write_outputs(out, runs, specs, meta, attributions)
    timings["report"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    write_json(out / "timing.json", {**timings, "cpu_count": os.cpu_count()})
    return ExperimentResult(out, runs, tables, specs, timings, attributions)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))
