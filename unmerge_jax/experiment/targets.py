"""Seeded target specifications: which tasks each merged model holds, how it was merged, with what weights.

Paper §3.3: 72 merged models — 24 *known* (2–5 dictionary tasks), 24 *mixed* (1–3 dictionary +
1–2 outside tasks), 24 *unknown* (outside tasks only) — each category spread evenly over task
arithmetic, TIES, DARE and linear, with uniform weights summing to 1. The paper does not give the
unknown targets' task count; we draw 2–5 like the known ones (capped by the outside pool).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from unmerge_jax.errors import UnmergeError

CATEGORIES = ("known", "mixed", "unknown")
# (label used in tables, engine method name, parameters). "DARE" is mergekit's dare_ties, the
# variant most public DARE merges use; densities follow common mergekit recipes (0.5).
MERGE_METHODS = {
    "task_arithmetic": ("task_arithmetic", {}),
    "linear": ("linear", {}),
    "ties": ("ties", {"density": 0.5}),
    "dare": ("dare_ties", {"density": 0.5}),
}
MERGE_LABELS = {"task_arithmetic": "Task Arithmetic", "linear": "Linear", "ties": "TIES", "dare": "DARE"}


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    name: str
    category: str
    merge_method: str  # key of MERGE_METHODS
    tasks: tuple[str, ...]
    weights: tuple[float, ...]
    seed: int  # the merge's own randomness (DARE drops)

    @property
    def engine_method(self) -> str:
        return MERGE_METHODS[self.merge_method][0]

    @property
    def params(self) -> dict:
        return dict(MERGE_METHODS[self.merge_method][1])


def _draw(rng, pool: Sequence[str], lo: int, hi: int) -> list[str]:
    hi = min(hi, len(pool))
    lo = min(lo, hi)
    n = int(rng.integers(lo, hi + 1))
    return sorted(rng.choice(list(pool), size=n, replace=False).tolist(), key=list(pool).index)


def make_targets(dictionary: Sequence[str], outside: Sequence[str], *, per_category: int = 24,
                 merge_methods: Sequence[str] = tuple(MERGE_METHODS), seed: int = 0,
                 categories: Sequence[str] = CATEGORIES) -> list[TargetSpec]:
    """``per_category`` targets per category, merge methods assigned round-robin (equal counts).

    Known: 2–5 dictionary tasks. Mixed: 1–3 dictionary + 1–2 outside. Unknown: 2–5 outside.
    Weights are uniform, ``1/len(tasks)``.
    """
    for m in merge_methods:
        if m not in MERGE_METHODS:
            raise UnmergeError(f"unknown merge method {m!r} for targets; choose from {', '.join(MERGE_METHODS)}")
    if "known" in categories and len(dictionary) < 2:
        raise UnmergeError("known targets need at least 2 dictionary tasks")
    if any(c in ("mixed", "unknown") for c in categories) and not outside:
        raise UnmergeError("mixed/unknown targets need at least one task outside the dictionary")
    rng = np.random.default_rng([seed, 72])
    specs = []
    for category in categories:
        for i in range(per_category):
            if category == "known":
                chosen = _draw(rng, dictionary, 2, 5)
            elif category == "mixed":
                chosen = _draw(rng, dictionary, 1, 3) + _draw(rng, outside, 1, 2)
            elif category == "unknown":
                chosen = _draw(rng, outside, 2, 5)
            else:
                raise UnmergeError(f"unknown target category {category!r}; choose from {', '.join(CATEGORIES)}")
            method = merge_methods[i % len(merge_methods)]
            w = 1.0 / len(chosen)
            specs.append(TargetSpec(f"{category}-{i:02d}-{method}", category, method, tuple(chosen),
                                    (w,) * len(chosen), int(rng.integers(0, 2**31 - 1))))
    return specs


def truth_matrix(specs: Sequence[TargetSpec], dictionary: Sequence[str]) -> np.ndarray:
    """(T, K) true weights of the dictionary atoms in each target (0 = absent; outside tasks drop out)."""
    index = {n: k for k, n in enumerate(dictionary)}
    out = np.zeros((len(specs), len(dictionary)))
    for t, s in enumerate(specs):
        for name, w in zip(s.tasks, s.weights):
            if name in index:
                out[t, index[name]] = w
    return out
