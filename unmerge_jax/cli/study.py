"""``unmerge study``: regenerate the tables and figures of the sparsity-scaling paper."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unmerge_jax.cli.options import seed

HELP = """Regenerate a study of the sparsity-scaling / RAM paper ("Does Sparsity Persist?") into --out DIR as Markdown, CSV and
JSON tables plus PNG figures:

  merge-quality  Table 2, Figures 2-3: cosine to the oracle (sum of task vectors) and mean per-agent
                 fidelity of simple averaging, TIES, DARE and every RAM face, sparsity 60-97%, K agents
  scaling-law    Table 1, Figures 1 and 5: measured metrics of simulated vectors 1B-405B, the fit
                 s(N) = 1 - a N^-b with R^2 and bootstrap CIs, inter-agent overlap
  memory         Table 4, Figure 6: naive vs streaming peak memory from real shapes, plus measured
                 peak RSS of streaming merges at small scale; --param virtual=true also merges virtual
                 models of the real shapes by row blocks (--param virtual_sizes=70B,7B, virtual_layers=1,
                 virtual_method=ties|ram; minutes per size) and measures their peak RSS
  anatomy        Table 3, Figure 4: per-module / per-depth L0 of a simulated Llama-3-70B (or of a
                 real task vector with --target/--base)

Extra study parameters: --param key=value (JSON values), e.g. --param trials=3 --param d=65536.
"""


def register(sub) -> None:
    p = sub.add_parser("study", help="regenerate the sparsity-scaling paper's tables and figures", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=("merge-quality", "scaling-law", "memory", "anatomy"))
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--seed", type=seed, default=0, help="random seed, 0..2**32-1 (default 0)")
    p.add_argument("--target", help="anatomy: a real model/adapter directory instead of the simulation")
    p.add_argument("--base", help="anatomy: base model of --target")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="extra study parameter")
    p.set_defaults(func=run)


def _params(items):
    from unmerge_jax.errors import UnmergeError

    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep:
            raise UnmergeError(f"--param {item!r} is not KEY=VALUE")
        try:
            out[key.replace("-", "_")] = json.loads(val)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = val
    return out


def run(args) -> int:
    from unmerge_jax.analysis.studies import run_study

    params = {"seed": args.seed, **_params(args.param)}
    if args.name == "memory":
        params.pop("seed")
    if args.target:
        params.update(target=args.target, base=args.base)
    run_study(args.name, args.out, force=args.force, **params)
    files = sorted(p.name for p in Path(args.out).iterdir())
    print(f"wrote {args.out}: {', '.join(files)}")
    return 0
