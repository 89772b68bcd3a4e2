"""Tiny merges made by the merge engine, for the attribution tests (built once per pytest session).

A tiny Qwen2 base (``tests/_tiny_models.qwen``), five dense fine-tunes (every entry moved by
0.01·N(0, 1), seeded): ``d0 … d3`` form the dictionary, ``x`` stays outside it; and the targets of
:data:`MERGES`, merged by ``unmerge_jax.merge`` (mergekit's schema and defaults, DARE seed 7).
Needs torch and transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

DICT = ["d0", "d1", "d2", "d3"]
# target: (merge method, [(model, weight)], parameters, expected verdict, present, method, density)
MERGES = {
    "ties_d0_d1": ("ties", [("d0", 0.6), ("d1", 0.4)], {"density": 0.5}, "known", {"d0", "d1"}, "ties", 0.5),
    "dare_d1_d2": ("dare_linear", [("d1", 0.5), ("d2", 0.5)], {"density": 0.5}, "known", {"d1", "d2"}, "dare", None),
    "ta_d0_d3": ("task_arithmetic", [("d0", 0.5), ("d3", 0.5)], {}, "known", {"d0", "d3"}, "task_arithmetic", None),
    "linear_d2_x": ("linear", [("d2", 0.5), ("x", 0.5)], {}, "mixed", {"d2"}, None, None),
    "x": (None, None, None, "unknown", set(), None, None),
}
_MARK = "tiny_merges.json"


def _dense_fine_tune(seed):
    import torch

    from tests._tiny_models import qwen

    m = qwen(0)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return m


def tiny_merges(root) -> Path:
    """Build (once) the models and merges under ``root``; returns ``root``."""
    root = Path(root)
    if (root / _MARK).exists():
        return root
    from tests._tiny_models import _quiet, qwen
    from unmerge_jax import merge

    _quiet()
    root.mkdir(parents=True, exist_ok=True)
    qwen(0).save_pretrained(root / "base", max_shard_size="60KB")
    for i, name in enumerate(DICT + ["x"]):
        _dense_fine_tune(500 + i).save_pretrained(root / name)
    for target, (method, models, params, *_) in MERGES.items():
        if method is None:
            continue
        cfg = {"merge_method": method, "base_model": str(root / "base"), "dtype": "float32",
               "models": [{"model": str(root / m), "parameters": {"weight": w, **params}} for m, w in models]}
        merge(cfg, root / target, seed=7)
    (root / _MARK).write_text(json.dumps(sorted(MERGES)))
    return root


def entries(root):
    """``(dictionary, targets)`` as ``NAME=DIR`` strings."""
    return [f"{n}={root / n}" for n in DICT], [f"{t}={root / t}" for t in MERGES]
