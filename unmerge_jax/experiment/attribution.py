"""The experiment's attribution: presence decisions, merge method and verdict for every target of a
variant, from the same pass's statistics, scored against the truth.

Per variant the experiment already holds the columns ``D`` (dictionary) and ``V`` (targets) in
memory for :func:`unmerge_jax.gram_stats`. The attribution adds, over the *same* columns, the
signature sums (:func:`~unmerge_jax.attribution.signatures.signature_stats`: exact zeros and the
TIES-consistency sums, one more sweep over the in-memory rows) with per-tensor trimming
thresholds from the whole dictionary tensors (:func:`tensor_thresholds`, computed once for both
variants), and reads the bootstrap replicates of the Gram pass (``Preset.boot`` of them; the sweep
uses its first ``Preset.seeds``). :func:`~unmerge_jax.attribution.attribute` then decides with the
library's rules; the truth is read only afterwards, to score (:func:`score_variant`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

from unmerge_jax.attribution import DEFAULT_RULES, attribute, signature_stats, trim_thresholds
from unmerge_jax.attribution.calibrate import TARGETS, Problem, score, summarize
from unmerge_jax.attribution.signatures import DENSITY_GRID

# Columns of attribution.csv, one row per (variant, target); `present` and `truth` are ';'-joined entry names.
ATTRIBUTION_COLUMNS = ["variant", "target", "category", "merge_method", "predicted_category", "predicted_method",
                       "present", "unexplained", "truth", "tasks", "precision", "recall", "perfect_match",
                       "method_correct", "method_confidence", "density", "unexplained_plain", "uncertain",
                       "coef", "coef_lo", "coef_hi"]
# Columns runs.csv gains: the present set's precision / recall / perfect match of the row's target
# (filled on the NNLS rows, whose coefficients the decisions start from; empty elsewhere).
PRESENT_COLUMNS = ["present_precision", "present_recall", "present_perfect_match"]


class VariantAttribution(NamedTuple):
    """Decisions and scores of one variant.

    Attributes:
      attribution: the :class:`~unmerge_jax.attribution.Attribution`.
      problem: the :class:`~unmerge_jax.attribution.calibrate.Problem` (statistics + truth).
      scores: one dict per target (:func:`~unmerge_jax.attribution.calibrate.score`).
      summary: the Must-show figures (:func:`~unmerge_jax.attribution.calibrate.summarize`).
    """

    attribution: object
    problem: Problem
    scores: list
    summary: dict


def tensor_thresholds(atoms: Sequence[dict], names: Sequence[str], densities: Sequence[float] = DENSITY_GRID) -> np.ndarray:
    """(n_tensors, P, K) TIES trimming thresholds, each from the whole dictionary tensor (not the kept rows)."""
    return np.stack([trim_thresholds([a[n] for a in atoms], densities) for n in names])


def segments(atoms: Sequence[dict], names: Sequence[str], mask) -> list[tuple[int, int]]:
    """The ``(start, stop)`` rows each tensor occupies in the columns built by ``pipeline.columns``."""
    sizes = [int(mask[n].sum()) if mask is not None else int(atoms[0][n].size) for n in names]
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def attribute_variant(variant: str, stats, D, V, segs, thresholds, specs, truth, dictionary, *,
                      rules=DEFAULT_RULES, densities: Sequence[float] = DENSITY_GRID,
                      groups=None) -> VariantAttribution:
    """Signature sums over ``D``/``V``, the decisions, and their scores against the truth.

    Args:
      variant: ``compressed`` / ``full`` (a label).
      stats: the variant's :class:`~unmerge_jax.GramStats` (with bootstrap replicates).
      D, V: (n, K), (n, T) the columns ``stats`` came from.
      segs: :func:`segments`. thresholds: :func:`tensor_thresholds`.
      specs: the T target specs; truth: (T, K) true weights (read only to score).
      dictionary: the K entry names.
      rules: decision thresholds.
      groups: per segment, its (layer, module) group (``io.names.group_ids``).
    """
    sig = signature_stats(D, V, segs, thresholds, densities, groups=groups)
    names = tuple(s.name for s in specs)
    at = attribute(stats, sig, rules=rules, atom_names=tuple(dictionary), target_names=names)
    problem = Problem(variant, stats, sig, list(specs), np.asarray(truth), tuple(dictionary), names)
    rows = score(problem, rules, attribution=at)
    return VariantAttribution(at, problem, rows, summarize(rows))


def attribution_frame(variant: str, va: VariantAttribution) -> pd.DataFrame:
    """attribution.csv rows of one variant (:data:`ATTRIBUTION_COLUMNS`)."""
    at = va.attribution
    fmt = lambda row: " ".join(f"{x:.6g}" for x in row)  # noqa: E731
    out = []
    for t, (spec, r) in enumerate(zip(va.problem.specs, va.scores)):
        out.append({"variant": variant, "target": spec.name, "category": spec.category, "merge_method": spec.merge_method,
                    "predicted_category": r["predicted_category"], "predicted_method": r["predicted_method"],
                    "present": r["present"], "unexplained": r["unexplained"], "truth": r["truth"],
                    "tasks": "+".join(spec.tasks), "precision": r["precision"], "recall": r["recall"],
                    "perfect_match": float(r["perfect_match"]), "method_correct": float(r["method_correct"]),
                    "method_confidence": float(at.method_confidence[t]), "density": r["density"],
                    "unexplained_plain": float(at.unexplained_plain[t]), "uncertain": r["uncertain"],
                    "coef": fmt(at.coef[t]), "coef_lo": fmt(at.coef_lo[t]), "coef_hi": fmt(at.coef_hi[t])})
    return pd.DataFrame(out, columns=ATTRIBUTION_COLUMNS)


def add_present_columns(table: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """``table`` (one variant's sweep rows) with :data:`PRESENT_COLUMNS` on its NNLS rows."""
    by_target = frame.set_index("target")
    nnls = (table["algorithm"] == "nnls").to_numpy()
    for col, src in zip(PRESENT_COLUMNS, ("precision", "recall", "perfect_match")):
        values = table["target"].map(by_target[src]).to_numpy(np.float64)
        table[col] = np.where(nnls, values, np.nan)
    return table


def error_kinds(missed: Sequence[str]) -> set[str]:
    """Which errors explain the missed figures (keys of :data:`~unmerge_jax.attribution.calibrate.TARGETS`)."""
    kinds = set()
    for key in missed:
        if key.startswith("known_"):
            kinds.add("known_entries")
        elif key == "mixed_recall":
            kinds.add("mixed_missed")
        elif key == "mixed_precision":
            kinds.add("mixed_false")
        elif key == "category_accuracy":
            kinds.add("category")
        elif key.startswith("method_"):
            kinds.add("method")
    return kinds


def errors(va: VariantAttribution, kinds: set[str] | None = None, limit: int = 12) -> list[dict]:
    """Targets with an error of the given kinds (default all: ``known_entries``, ``mixed_missed``,
    ``mixed_false``, ``category``, ``method``) and the statistics that decided it."""
    at, rules = va.attribution, va.attribution.rules
    kinds = {"known_entries", "mixed_missed", "mixed_false", "category", "method"} if kinds is None else set(kinds)
    out = []
    for t, (spec, r) in enumerate(zip(va.problem.specs, va.scores)):
        truth = va.problem.truth[t] > 0
        pred = at.decision[t] == 1
        wrong_entries, found = [], set()
        for k, name in enumerate(at.atom_names):
            if truth[k] == pred[k] or spec.category == "unknown":
                continue
            kind = "known_entries" if spec.category == "known" else ("mixed_missed" if truth[k] else "mixed_false")
            if kind in kinds:
                found.add(kind)
                ratio = float(at.share_lo[t, k] / at.floor[t, k]) if at.floor[t, k] > 0 else float("nan")
                wrong_entries.append(f"{'missed' if truth[k] else 'false'} {name} (w={va.problem.truth[t, k]:.2f}, "
                                     f"L/φ={ratio:.2g})")
        if "category" in kinds and r["predicted_category"] != spec.category:
            found.add("category")
        if "method" in kinds and spec.category == "known" and r["n_dictionary"] >= 2 and not r["method_correct"]:
            found.add("method")
        if not found:
            continue
        m = str(at.method[t])
        if "category" in found and spec.category == "unknown" and r["present"]:
            wrong_entries.append(f"present {r['present'].replace(';', ', ')}")
        out.append({"target": spec.name, "category": spec.category, "merge_method": spec.merge_method,
                    "kinds": sorted(found), "entries": "; ".join(wrong_entries),
                    "predicted_category": r["predicted_category"], "predicted_method": r["predicted_method"],
                    "U": float(at.unexplained[t]), "known_threshold": float(rules.known(m)),
                    "ties_ratio": float(at.evidence["ties_ratio"][t]), "zero_count": int(at.evidence["zero_count"][t])})
    return out[:limit] if limit else out


def figures(summary: dict) -> list[tuple[str, float, float]]:
    """``(figure, value, target)`` for every Must-show figure, in report order."""
    return [(k, float(summary[k]), float(v)) for k, v in TARGETS.items()]


__all__ = ["ATTRIBUTION_COLUMNS", "PRESENT_COLUMNS", "VariantAttribution", "add_present_columns", "attribute_variant",
           "attribution_frame", "error_kinds", "errors", "figures", "segments", "tensor_thresholds"]
