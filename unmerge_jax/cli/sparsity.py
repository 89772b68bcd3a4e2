"""``unmerge sparsity``: streaming sparsity metrics of a task vector (the sparsity-scaling paper, §2.2)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HELP = """Measure how sparse a task vector is, one tensor at a time (never the whole model in memory).

TARGET is a fine-tuned model directory, a PEFT LoRA adapter directory or a .safetensors file;
with --base the task vector is TARGET - BASE over every base tensor (unchanged ones count as
zero); without --base TARGET's tensors are taken to be deltas already.

Reported overall, per module class (attention, mlp, norm, embedding, lm_head) and per layer:
  l0          fraction |d| < eps * max|d|   (eps = 0.01, max over the whole vector / group)
  exact_zero  fraction d == 0;  near_zero: fraction |d| <= atol (bf16 checkpoints hide tiny updates)
  gini        Hurley-Rickard Gini of |d|;  kurtosis: excess kurtosis of d
  top1_mass / top5_mass   share of the L1 norm in the largest 1% / 5% of entries
plus the per-class depth trend (slope of per-tensor L0 against layer index).
"""


def register(sub) -> None:
    p = sub.add_parser("sparsity", help="sparsity metrics of a task vector (L0, Gini, kurtosis, top-k mass)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="model/adapter directory or .safetensors file")
    p.add_argument("--base", help="base model directory (task vector = target - base)")
    p.add_argument("--eps", type=float, default=0.01, help="L0 threshold relative to max|d| (default 0.01)")
    p.add_argument("--atol", type=float, default=1e-5, help="near-zero threshold (default 1e-5)")
    p.add_argument("--mode", choices=("auto", "exact", "hist"), default="auto",
                   help="exact sorted values, log-histogram, or auto (exact until --exact-limit non-zeros)")
    p.add_argument("--exact-limit", type=int, default=1 << 26, help="non-zeros kept in exact mode (default 2^26)")
    p.add_argument("--one-pass", action="store_true", help="hist mode: skip the exact-L0 second pass (L0 bounded)")
    p.add_argument("--json", type=Path, help="write the full result (incl. per-tensor table) to this JSON file")
    p.set_defaults(func=run)


def _fmt(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def run(args) -> int:
    from unmerge_jax.analysis.metrics import METRIC_KEYS as keys
    from unmerge_jax.analysis.metrics import sparsity_metrics
    from unmerge_jax.analysis.report import write_json
    from unmerge_jax.io.atomic import check_output

    inputs = [args.target, args.base]
    if args.json:
        check_output(args.json, inputs)  # before the work: never over, inside or around an input
    r = sparsity_metrics(args.target, base=args.base, eps=args.eps, atol=args.atol, mode=args.mode,
                         exact_limit=args.exact_limit, passes=1 if args.one_pass else 2)
    print(f"{'group':<14}" + "".join(f"{k:>12}" for k in keys))
    print(f"{'overall':<14}" + "".join(f"{_fmt(r['overall'][k]):>12}" for k in keys))
    for cls, m in r["by_module"].items():
        print(f"{cls:<14}" + "".join(f"{_fmt(m[k]):>12}" for k in keys))
    for cls, t in r["depth_trend"].items():
        print(f"depth trend {cls}: per-tensor L0 slope {t['slope_per_layer']:+.3e} per layer")
    print(f"dtypes: {json.dumps(r['dtypes'])}; mode {r['mode']}"
          + (f"; hist half-widths {json.dumps(r['error_bounds'].get('overall', {}))}" if r["error_bounds"] else ""))
    if args.json:
        write_json(args.json, r, inputs=inputs)
        print(f"wrote {args.json}")
    return 0
