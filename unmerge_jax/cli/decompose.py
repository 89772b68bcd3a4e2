"""``unmerge decompose``: which dictionary task vectors make up each target, with what weight."""

from __future__ import annotations

import argparse
from pathlib import Path

from unmerge_jax.cli.options import print_warnings, seed
from unmerge_jax.errors import UnmergeError
from unmerge_jax.staging import BLOCK_ROWS

HELP = """Decompose target models into a dictionary of known fine-tunes: for every target, which
entries it holds (present / absent / uncertain), how it was merged, how much of it no entry
explains, and the coefficients a with v ~ sum_i a_i d_i, where d_i = fine-tune_i - base and
v = target - base.

Checkpoints (--base given): every --dictionary/--target entry is a Hugging Face model directory
(model.safetensors or sharded with model.safetensors.index.json; fp32/fp16/bf16) or a PEFT LoRA
adapter directory (delta = B@A*alpha/r). Name an entry with NAME=DIR (default: the directory's
basename). The weights are streamed once, tensor by tensor, into float64 Gram statistics
(peak memory ~ (1+K+T) x the largest tensor), then solved in K dimensions.

  unmerge decompose --base ./Qwen2.5-7B --dictionary math=./lora-math code=./lora-code \\
      --target ./merged-model --modules q,k,v,o --top-k 1000000 --json out.json

Compression (paper 3.4): --top-k N keeps the N entries with the largest M = max_i |d_i|, spread
uniformly over (layer, module) groups (--scope group) or over the whole model (--scope global);
--full (the default) keeps every entry. Targets are compressed with the dictionary's indices;
--save-mask writes them, --mask reuses them.

Arrays (no --base): --dictionary D.npy --target V.npy (.npy rows x columns, or .safetensors with
one flattened tensor per atom/target).

Output per target: a verdict line, then per entry the coefficient with its bootstrap
confidence interval and the fraction of replicates selecting it, its energy share, its
method-aware weight and its decision; and the fit: reconstruction error 1 - max(0, cos(v, Da))^2
and unexplained energy fraction ||v - Da||^2 / ||v||^2.

  target merged: KNOWN -- TIES (confidence 1.00, density 0.50); 0% unexplained by the dictionary;
  present: math, code

Verdicts (docs/attribution.md has the rules and their calibration):
  known    the present entries explain the target under the identified merge method;
  mixed    some entries are present, but part of the target is content no entry explains;
  unknown  no entry is present: the target is not made of this dictionary.
Decisions: present (the entry's energy share -- how much worse the fit gets without it -- is
above the chance level of this dictionary even at the low end of its bootstrap interval),
uncertain (only its high end is), absent. Merge method: task arithmetic / linear (the same
formula when the weights sum to 1, reported together), TIES (trimmed, sign-elected entries) or
DARE (dropped and rescaled entries), with a density and a confidence (decades by which the
deciding statistic clears its threshold, capped at 1; not a probability). For a TIES target
the weights are the TIES-consistent ones (summing to 1, as mergekit normalises them); otherwise
NNLS refitted on the present entries. --merge-method (and --density) skips identification.
The rules were calibrated with 200 bootstrap replicates, the default --seeds; with fewer the
report gives the fit only (a warning says so). The decisions use NNLS energy shares whatever
--method fits the coefficients.

--json FILE writes {"targets": [{"target", "coefficients": {name: value}, "recon_error",
"unexplained", "verdict", "present": [names], "method": {"name", "confidence", "density"},
"unknown_share", "decisions", "shares", "weights", ...}], "warnings": [...], ...}.
From a statistics file: --stats FILE.npz (written by `unmerge stats` or --stats-out) instead of
--base/--dictionary/--target reads no weights and gives the report the pass that wrote it gives
(same decisions, verdicts and JSON). The decisions need the file's signature sums, which `unmerge
stats` writes from --seeds 200 on; asking a file without them (and 200 replicates) for decisions
is a one-line error; a file with fewer replicates gives the fit only. Pass options (--seeds,
--top-k, --mask, ...) cannot be given with --stats: the file fixed them.

Several processes (jax.distributed, checkpoints): run the same command in each process with
--coordinator HOST:PORT --num-processes N --process-id I; each reads its share of the tensors,
the statistics and signature sums are summed, and process 0 prints and writes the outputs.

Bad input stops with a one-line error (exit 2)
and writes nothing; outputs may not be, or lie inside, an input. Where the answer is ambiguous
a `warning:` line goes to stderr (and into "warnings"): two entries that are the same task
vector (the weight is split between them), an all-zero entry, a target equal to the base
(nothing to decompose: its cosine and errors are NaN / null, not a perfect fit).
See docs/errors.md.
"""


def add_input_args(p, seeds: int = 0) -> None:
    """The input options shared by `unmerge decompose` and `unmerge stats` (``seeds``: the default --seeds)."""
    g = p.add_argument_group("inputs")
    g.add_argument("--base", help="base model directory the dictionary and targets were fine-tuned from "
                                  "(omit for array inputs)")
    g.add_argument("--dictionary", nargs="+", default=[], metavar="[NAME=]PATH",
                   help="dictionary entries: model/adapter directories (or .npy/.safetensors arrays without --base)")
    g.add_argument("--target", "--targets", dest="target", nargs="+", default=[], metavar="[NAME=]PATH",
                   help="targets to decompose (same forms as --dictionary)")
    c = p.add_argument_group("selection and compression (checkpoints only)")
    c.add_argument("--modules", help="only these modules, e.g. q,k,v,o (tokens: q k v o qkv gate up down, attn mlp "
                                     "norm embed lm_head other, all; default all)")
    x = c.add_mutually_exclusive_group()
    x.add_argument("--top-k", type=int, dest="top_k", metavar="N",
                   help="keep the N entries with the largest max_i |d_i| (paper: 1000000 over q,k,v,o)")
    x.add_argument("--full", action="store_true", help="keep every entry (the default)")
    x.add_argument("--mask", type=Path, help="reuse a mask written by --save-mask (same base)")
    c.add_argument("--scope", choices=("group", "global"), default="group",
                   help="top-k spread uniformly over (layer, module) groups (default) or global")
    c.add_argument("--save-mask", type=Path, metavar="FILE.npz", help="write the selected indices (after success)")
    b = p.add_argument_group("statistics")
    # None = not given (a statistics file fixes them: `decompose --stats` refuses them); stats_kwargs fills defaults
    b.add_argument("--seeds", type=int, default=None,
                   help=f"bootstrap replicates S, all in the same pass (default {seeds})")
    b.add_argument("--seed", type=seed, default=None, help="bootstrap random seed, 0..2**32-1 (default 0)")
    p.set_defaults(default_seeds=seeds)
    b.add_argument("--block-rows", type=int, default=None, help=f"rows per staged block (default {BLOCK_ROWS})")
    b.add_argument("--bootstrap-block", type=int, default=None, metavar="ROWS", dest="bootstrap_block",
                   help="rows per bootstrap resampling unit: 1 = resample single parameters; default 4096 "
                        "consecutive parameters once that leaves >= 200 units (819,200 rows), else 1")


def stats_kwargs(args) -> dict:
    kw = dict(top_k=args.top_k, scope=args.scope, modules=args.modules, mask=args.mask,
              seeds=args.default_seeds if args.seeds is None else args.seeds, key=0 if args.seed is None else args.seed)
    if args.block_rows is not None:
        kw["block_rows"] = args.block_rows
    if args.bootstrap_block is not None:
        kw["bootstrap_block"] = args.bootstrap_block
    return kw


def given_pass_options(args) -> dict:
    """The statistics-pass options given on the command line (None = left out), for ``--stats``."""
    return dict(top_k=args.top_k, scope=args.scope, modules=args.modules, mask=args.mask, seeds=args.seeds,
                key=args.seed, block_rows=args.block_rows, bootstrap_block=args.bootstrap_block)


def add_process_args(p) -> None:
    """``--coordinator``, ``--num-processes``, ``--process-id`` (``jax.distributed``)."""
    d = p.add_argument_group("several processes (jax.distributed)")
    d.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator")
    d.add_argument("--num-processes", type=int, help="number of processes")
    d.add_argument("--process-id", type=int, help="this process's index (0 writes the output)")


def _parse_params(items) -> dict:
    out = {}
    for it in items or []:
        k, eq, v = it.partition("=")
        if not eq or not k:
            raise UnmergeError(f"--param {it!r}: write NAME=VALUE, e.g. alpha=1e-6")
        low = v.strip().lower()
        if low in ("true", "false"):
            out[k] = low == "true"
        else:
            try:
                out[k] = int(v) if low.lstrip("-").isdigit() else float(v)
            except ValueError:
                out[k] = v
    return out


def register(sub) -> None:
    from unmerge_jax.attribution import CALIBRATED_SEEDS
    from unmerge_jax.pipeline import MERGE_METHOD_CHOICES
    from unmerge_jax.solvers import SOLVERS

    p = sub.add_parser("decompose", help="decompose models/adapters (or arrays) into a dictionary of task vectors",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(p, seeds=CALIBRATED_SEEDS)
    a = p.add_argument_group("attribution")
    a.add_argument("--merge-method", dest="merge_method", choices=MERGE_METHOD_CHOICES,
                   help="the merge method, if known: skip identifying it (task_arithmetic and linear are one model)")
    a.add_argument("--density", type=float, help="with --merge-method ties or dare: the merge's density "
                                                 "(TIES: one of 0.1, 0.2, ..., 0.9)")
    s = p.add_argument_group("solver and output")
    s.add_argument("--method", default="nnls", help=f"solver: {', '.join(sorted(SOLVERS))} (default nnls)")
    s.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="solver parameter (scikit-learn names), e.g. alpha=1e-6, n_nonzero_coefs=2; repeatable")
    s.add_argument("--ci", type=float, default=0.95, help="bootstrap confidence level (default 0.95)")
    s.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    s.add_argument("--stats-out", type=Path, metavar="FILE.npz",
                   help="also write the statistics, with the signature sums (as `unmerge stats`)")
    p.add_argument("--stats", type=Path, metavar="FILE.npz",
                   help="decompose a statistics file of `unmerge stats` or --stats-out instead of models (no "
                        "weights read; presence decisions need its signature sums and 200 replicates)")
    add_process_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from unmerge_jax.pipeline import decompose_files
    from unmerge_jax.report import format_report

    report = decompose_files(args.base, args.dictionary, args.target, args.method, params=_parse_params(args.param),
                             ci=args.ci, json_out=args.json, stats_out=args.stats_out, mask_out=args.save_mask,
                             merge_method=args.merge_method, density=args.density, stats=args.stats,
                             coordinator=args.coordinator, num_processes=args.num_processes,
                             process_id=args.process_id,
                             **(given_pass_options(args) if args.stats is not None else stats_kwargs(args)))
    if args.process_id not in (None, 0):
        return 0  # process 0 prints (every process holds the same report)
    print_warnings(report["warnings"])
    print(format_report(report))
    return 0
