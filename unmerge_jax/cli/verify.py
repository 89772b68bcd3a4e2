"""``unmerge verify``: check a merged model against the recipe (mergekit YAML or model card) it claims."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unmerge_jax.cli.options import print_warnings, seed
from unmerge_jax.errors import UnmergeError

HELP = """Check a merged model against its recipe: decompose MODEL_DIR into the recipe's models (over
its base_model) and compare every claim of the recipe with what the weights show.

  unmerge verify recipe.yaml ./merged        # a mergekit YAML
  unmerge verify ./merged/README.md ./merged # the ```yaml block of a model card
  unmerge verify ./merged                    # MODEL_DIR's own README.md (as mergekit and `unmerge merge` write it)

The recipe's models may be model directories or PEFT LoRA adapter directories; they and the base
must be on disk (a missing one is an error naming its path). Claims checked:

  present:NAME   each listed model is decided present (a model listed with weight 0: absent);
                 'uncertain' does not confirm it
  weight:NAME    the claimed weight after the method's normalisation lies in the found weight's
                 bootstrap interval widened by --weight-tol: linear w/sum(w); task_arithmetic and
                 dare_linear lambda*w (divided by sum(w) with normalize); ties and dare_ties w/sum(w)
                 against the found weights over their sum (ties: the TIES-consistent weights)
  density        ties: the identified density within 0.05 of the claimed one (DARE: reported only)
  unexplained    no substantial content beyond the listed models (verdict 'known')
  method         the recipe's family equals the identified one: task_arithmetic/linear (the two
                 are indistinguishable: with weights summing to 1 they are one formula), ties, or
                 dare (dare_linear and dare_ties are not told apart)

Not checkable (stated, never failed): the method, weights and unexplained content of methods the
attribution does not model (ram, slerp, della, breadcrumbs, ...: presence is still checked);
negative weights; weights that vary per tensor (gradients, filter lists); ties without normalize
or with lambda != 1.

Exit status: 0 consistent (every checkable claim holds), 1 inconsistent (the failed claims are
named), 2 error. --json prints the verdicts as JSON (or writes them to FILE). The decisions come
from the attribution rules (docs/attribution.md), calibrated with 200 bootstrap replicates.
"""


def register(sub) -> None:
    p = sub.add_parser("verify", help="check a merged model against its recipe (mergekit YAML or model card)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", metavar="RECIPE",
                   help="mergekit YAML, a model card README.md, or MODEL_DIR alone (its README.md is read)")
    p.add_argument("model_dir", metavar="MODEL_DIR", nargs="?", help="the merged model directory")
    p.add_argument("--base", type=Path, help="base model directory (overrides the recipe's base_model)")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="print the verdicts as JSON instead of the table, or write them to FILE")
    s = p.add_argument_group("statistics")
    s.add_argument("--seeds", type=int, default=200,
                   help="bootstrap replicates, all in the same pass (default 200, what the rules were calibrated with)")
    s.add_argument("--seed", type=seed, default=0, help="bootstrap random seed, 0..2**32-1 (default 0)")
    s.add_argument("--top-k", type=int, dest="top_k", metavar="N",
                   help="keep the N entries with the largest max_i |d_i| (default: every entry)")
    s.add_argument("--scope", choices=("group", "global"), default="group",
                   help="top-k spread over (layer, module) groups (default) or global")
    s.add_argument("--modules", help="only these modules, e.g. q,k,v,o (default all)")
    s.add_argument("--weight-tol", type=float, default=None, dest="weight_tol", metavar="W",
                   help="absolute slack around a found weight's interval (default 0.02)")
    p.set_defaults(func=run)


def run(args) -> int:
    import math

    from unmerge_jax.verify import DEFAULT_TOLERANCE, format_report, verify_files

    tol = DEFAULT_TOLERANCE
    if args.weight_tol is not None:
        if not (math.isfinite(args.weight_tol) and args.weight_tol >= 0):
            raise UnmergeError(f"--weight-tol must be a finite number >= 0, got {args.weight_tol}")
        tol = tol._replace(weight_atol=float(args.weight_tol))
    json_file = None if args.json in (None, "-") else Path(args.json)
    report = verify_files(args.recipe, args.model_dir, base=args.base, seeds=args.seeds, key=args.seed,
                          top_k=args.top_k, scope=args.scope, modules=args.modules, tolerance=tol,
                          json_out=json_file)
    print_warnings(report.warnings)
    if args.json == "-":
        json.dump(report.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print("\n".join(format_report(report, str(args.model_dir or args.recipe))))
    return 0 if report.consistent else 1
