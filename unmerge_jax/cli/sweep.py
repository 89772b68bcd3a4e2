"""``unmerge sweep``: run the paper's decomposition grid (or your own) over every target and seed."""

from __future__ import annotations

import argparse
from pathlib import Path

from unmerge_jax.cli.options import print_warnings, seed

HELP = """Run a vectorised grid of decompositions: every target x method x parameter x bootstrap seed,
one compiled call per method family.

Inputs are either statistics written by `unmerge stats` (--stats FILE.npz; sweeps then never read
weights again) or dense arrays (--dictionary D --targets V, each .npy (rows x columns) or
.safetensors (one tensor per atom/target)).

The paper grid: OMP k=1..8; Lasso alpha in {1e-8,1e-7,1e-6}; Ridge alpha in {1e-8,1e-6,1e-4,1e-2};
ElasticNet l1_ratio in {0.1,0.5,0.9} x alpha in {1e-8,1e-6,1e-4}; NNLS; dot threshold in {0.01,0.05,0.1}.
Lasso/ElasticNet use scikit-learn's (1/2n) objective, Ridge has no 1/n.

Bootstrap seeds reweight rows with Poisson(1) draws, one per resampling unit: single rows up to
819,199 rows, blocks of 4,096 consecutive rows from 819,200 (neighbouring parameters are
dependent, and whole-chunk units make the replicates nearly free); --bootstrap-block overrides.
"""


def register(sub) -> None:
    p = sub.add_parser("sweep", help="grid of decompositions over all targets and seeds", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("inputs (give --stats, or --dictionary and --targets)")
    src.add_argument("--stats", type=Path, help="GramStats .npz from `unmerge stats`")
    src.add_argument("--dictionary", type=Path, help="dictionary array (.npy rows x atoms, or .safetensors)")
    src.add_argument("--targets", type=Path, help="target array (.npy rows x targets, or .safetensors)")
    p.add_argument("--grid", default="paper", help="'paper' or a JSON file {method: {param: [values]}} (default: paper)")
    p.add_argument("--methods", help="comma-separated subset of methods (default: all in the grid)")
    p.add_argument("--seeds", type=int, default=3, help="bootstrap replicates per run (default 3; 0 = full data once)")
    p.add_argument("--seed", type=seed, default=0, help="bootstrap random seed, 0..2**32-1 (default 0)")
    p.add_argument("--bootstrap-block", type=int, default=None, metavar="ROWS", dest="bootstrap_block",
                   help="rows per bootstrap resampling unit with --dictionary/--targets: 1 = single rows; default "
                        "4096 consecutive rows once that leaves >= 200 units (819,200 rows), else 1")
    p.add_argument("--truth", type=Path, help=".npy (targets x atoms) true weights: adds precision/recall/perfect match")
    p.add_argument("--by", default="method", help="comma-separated columns to summarise by (default: method)")
    p.add_argument("--out", type=Path, help="write every run to this CSV")
    p.add_argument("--json", type=Path, help="write the summary table as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from unmerge_jax.pipeline import sweep_files

    table, summary = sweep_files(stats=args.stats, dictionary=args.dictionary, targets=args.targets, grid=args.grid,
                                 methods=args.methods.split(",") if args.methods is not None else None, seeds=args.seeds,
                                 key=args.seed, bootstrap_block=args.bootstrap_block, truth=args.truth,
                                 by=args.by.split(","), runs_out=args.out, summary_out=args.json)
    print_warnings(table.attrs.get("warnings"))
    print(f"{len(table)} runs ({table.target.nunique()} targets x {table.groupby(['method', 'params']).ngroups} "
          f"configurations x {max(1, args.seeds)} seed(s))\n")
    print(summary.markdown)
    return 0
