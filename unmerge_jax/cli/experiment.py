"""``unmerge experiment``: the UNMERGE paper's experiment end to end, written to --out DIR."""

from __future__ import annotations

import argparse
from pathlib import Path

from unmerge_jax.cli.options import seed

HELP = """Run the UNMERGE experiment end to end and write runs.csv, attribution.csv (per target: the entries
decided present, the identified merge method, the known/mixed/unknown verdict, the unexplained share),
tables.md (the paper's Tables 1-6, mean +- sample std), table*.csv, figures and report.md (every table and
the attribution figures beside the paper's) to --out DIR.

Presets:
  tiny       a tiny Qwen2 base built from a config and briefly pre-trained, 15 LoRA adapters (rank 8-32,
             alpha = r, q/k/v/o) trained with peft on 15 synthetic tasks (8 in the dictionary, 7 outside),
             72 merged targets (24 known / 24 mixed / 24 unknown over task arithmetic, linear, TIES, DARE),
             top-k compression and the full model, paper grid x 3 seeds. Needs torch/transformers/peft.
             Trained models are cached (keyed by config hash) in --cache (default DIR/cache).
  small      `tiny` 13x wider in attention: hidden 256 (8 heads, 2 KV heads), 327,680 q/k/v/o parameters
             (tiny: 24,576), compressed to 16,384 (tiny: 1,024); 600 pre-training and 200 LoRA steps.
             Same 15 tasks and 72 targets; about half an hour of training on 2 CPU cores, cached.
  synthetic  the same pipeline on random low-rank task vectors: no training, under a minute.
  reduced    a small version of `tiny` (used by the end-to-end test).

Re-running with the same --seed gives byte-identical tables.
"""


def register(sub) -> None:
    from unmerge_jax.experiment.presets import PRESETS

    p = sub.add_parser("experiment", help="the UNMERGE experiment end to end (tables 1-6, figures, report)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="experiment size (default: tiny)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--seed", type=seed, default=0, help="seed of models, targets, merges and bootstrap, 0..2**32-1 "
                                                         "(default 0)")
    p.add_argument("--cache", type=Path, help="directory for trained models (default: OUT/cache)")
    p.set_defaults(func=run)


def run(args) -> int:
    from unmerge_jax.experiment import run_experiment

    result = run_experiment(args.preset, args.out, seed=args.seed, cache=args.cache)
    print(result.tables.get("table2", ""))
    for variant, va in result.attributions.items():
        s = va.summary
        print(f"attribution ({variant}): known perfect match {s['known_perfect_match']:.2f}, mixed recall "
              f"{s['mixed_recall']:.2f} at precision {s['mixed_precision']:.2f}, category correct "
              f"{s['category_accuracy']:.2f}, method identified {s['method_accuracy_known_2plus']:.2f}")
    print(f"{len(result.runs)} runs; tables, figures and report in {result.out} "
          f"({result.timings['total']:.1f} s)")
    return 0
