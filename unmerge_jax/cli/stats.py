"""``unmerge stats``: stream checkpoints once into a GramStats ``.npz`` for later sweeps."""

from __future__ import annotations

import argparse
from pathlib import Path

from unmerge_jax.cli.decompose import add_input_args, add_process_args, stats_kwargs
from unmerge_jax.cli.options import print_warnings

HELP = """Compute the sufficient statistics of a decomposition problem -- G = D'D, C = D'V, ||v||^2
and S bootstrap replicates, in float64 -- in one streaming pass over the checkpoints, and write
them (with provenance: inputs, tensors, mask, dtypes, names) to a .npz. `unmerge sweep --stats
FILE.npz` then runs any grid of solvers without reading weights again.

Inputs are those of `unmerge decompose` (model/adapter directories with --base, or arrays).

  unmerge stats --base ./base --dictionary ./lora-* --target ./merged --modules q,k,v,o \\
      --top-k 1000000 --seeds 20 --out stats.npz
  unmerge sweep --stats stats.npz --seeds 20

With --seeds 200 or more (the replicates presence decisions need) the same pass also accumulates
the merge-method signature sums (exact zeros, TIES consistency) into the file, so `unmerge
decompose --stats FILE.npz` gives the decisions, verdicts and JSON of a direct run without reading
weights again. They cost the TIES thresholds of every dictionary tensor and a kernel beside the
Gram kernel (tiny models: +6% full, +60% compressed; see docs/attribution.md); --no-signatures
leaves them out, --signatures forces them.

  unmerge stats --base ./base --dictionary ./ft-* --target ./merged --top-k 4000 --seeds 200 --out s.npz
  unmerge decompose --stats s.npz --json out.json

Several processes (jax.distributed): run the same command in each process with --coordinator
HOST:PORT --num-processes N --process-id I; each reads its share of the tensors, the partial
statistics (and signature sums) are summed, and process 0 writes the file. The file is written
atomically, and nothing is written when the input is bad.
"""


def register(sub) -> None:
    p = sub.add_parser("stats", help="stream checkpoints once into Gram statistics (.npz) for sweeps",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(p)
    p.add_argument("--out", type=Path, required=True, metavar="FILE.npz", help="statistics file to write")
    p.add_argument("--signatures", action=argparse.BooleanOptionalAction, default=None,
                   help="also accumulate the merge-method signature sums that presence decisions need (default: "
                        "with --seeds 200 or more, as `unmerge decompose` does)")
    add_process_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from unmerge_jax.pipeline import stats_file

    res, written = stats_file(args.base, args.dictionary, args.target, args.out, mask_out=args.save_mask,
                              coordinator=args.coordinator, num_processes=args.num_processes,
                              process_id=args.process_id, signatures=args.signatures, **stats_kwargs(args))
    s, prov = res.stats, res.provenance
    if written:
        print_warnings(res.warnings)
        print(f"wrote {args.out}: {s.n_atoms} dictionary entries x {s.n_targets} targets over {prov['n_rows']:,} rows"
              + (f" from {prov['n_tensors']} tensors" if "n_tensors" in prov else "")
              + (f", {s.n_seeds} bootstrap seeds" if s.n_seeds else "")
              + (", signature sums" if res.signatures is not None else ""))
    return 0
