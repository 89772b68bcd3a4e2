"""``unmerge merge``: merge models/adapters from a mergekit-style YAML config, streaming."""

from __future__ import annotations

import argparse
import math
import sys

from unmerge_jax.cli.options import seed
from unmerge_jax.errors import UnmergeError
from unmerge_jax.merge import MERGE_METHODS
from unmerge_jax.merge.methods.ram import ALIASES, FACES

HELP = """Merge fine-tuned models or PEFT LoRA adapters into a new model directory, one tensor at a
time, tensors above 4 Mi entries by row blocks (peak memory bounded by the blocks and K, not by
the model or the largest tensor), from a config in mergekit's YAML schema:

  merge_method: ties            # one of the methods below
  base_model: ./base
  models:
    - model: ./math             # a model directory or a PEFT LoRA adapter directory (merged as B@A*alpha/r)
      parameters: {{weight: 0.5, density: 0.5}}
    - model: ./code
      parameters: {{weight: 0.5, density: 0.5}}
  parameters: {{normalize: true}} # method-wide; values may be gradients or [{{filter: mlp, value: ...}}, ...]
  dtype: bfloat16
  tokenizer_source: union       # optional: base | union | DIR; or a tokenizer: block; chat_template: chatml

A model may also be MODEL+LORA (the adapter applied on the fly), for models and base_model. Layer
stacking: slices: [{{sources: [{{model: ./a, layer_range: [0, 16]}}]}}, ...] with merge_method:
passthrough (or any method per slice, the base among each slice's sources). .bin checkpoints:
convert them first with `unmerge convert DIR --out NEW_DIR`.

Methods (parameters, defaults):
{methods}

RAM faces (merge_method: ram, parameters: {{face: ...}}; default {default_face}):
{faces}

mergekit's semantics are kept where they surprise, with a note printed: ram/ramplus_tl ignore a
per-model weight (parameters: {{weighted: true}} applies it); linear with a base_model averages the
base in with its weight; dtype: bfloat16 is merged in float32 unless --compute-dtype bfloat16.

DARE's masks are keyed by (--seed, tensor name). Output: sharded safetensors + index, config.json
(dtype updated), tokenizer and generation files (not those linked from outside the model), the
resolved config, and a README.md model card in mergekit's layout (read back by `unmerge verify`).
With tokenizer settings the embedding and lm_head rows of every input are aligned
to the output tokenizer (as mergekit does), which is saved in place of the base's. Existing outputs are kept unless --force; an output that is, lies inside or
contains an input is refused, and so are NaN/Inf inputs and merged values the output dtype cannot
hold.
"""


def _help() -> str:
    methods = []
    for name, m in MERGE_METHODS.items():
        defaults = {**m.per_model, **{k: v for k, v in m.shared.items() if v is not None}}
        defaults.update({k: None for k in m.options.get("required", ())})   # no default: must be given
        methods.append(f"  {name:<17}" + ", ".join(f"{k}={'required' if v is None else v}"
                                                    for k, v in sorted(defaults.items())))
    faces = []
    for name, face in FACES.items():
        aliases = [a for a, c in ALIASES.items() if c == name]
        faces.append(f"  {name}" + (f" (also {', '.join(aliases)})" if aliases else "") + f": {face.summary}")
    return HELP.format(methods="\n".join(methods), faces="\n".join(faces),
                       default_face=MERGE_METHODS["ram"].shared["face"])


def register(sub) -> None:
    p = sub.add_parser("merge", help=f"merge models/LoRA adapters by streaming ({', '.join(MERGE_METHODS)})",
                       description=_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="merge config (mergekit YAML schema)")
    p.add_argument("--out", required=True, help="output model directory (must not exist unless --force)")
    p.add_argument("--seed", type=seed, default=0,
                   help="seed for DARE's random masks, 0 to 2**32-1 (default 0)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="output dtype (default: the config's out_dtype/dtype, else the base's)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=None,
                   help="arithmetic dtype (default float32: inputs of any dtype merged in float32 and rounded once "
                        "on output); bfloat16 reproduces mergekit's dtype: bfloat16 merge bit for bit (linear, "
                        "task_arithmetic, ties, passthrough, slerp, nuslerp, multislerp, breadcrumbs, "
                        "breadcrumbs_ties, model_stock, ram, ramplus_tl, sce, nearswap, arcee_fusion, karcher; not "
                        "DARE, DELLA: random masks); needs PyTorch")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--shard-size", type=float, default=5.0, help="maximum output shard size in GB (default 5)")
    p.add_argument("--overlap", action="store_true",
                   help="read/compute the next tensor while writing the previous one (more memory)")
    p.set_defaults(func=run)


def run(args) -> int:
    from unmerge_jax import merge

    shard_bytes = args.shard_size * 1e9
    if not (math.isfinite(shard_bytes) and shard_bytes > 0):
        raise UnmergeError(f"--shard-size must be a positive number of GB, got {args.shard_size}")
    res = merge(args.config, args.out, seed=args.seed, force=args.force, dtype=args.dtype,
                shard_bytes=max(1, int(shard_bytes)), overlap=args.overlap, compute_dtype=args.compute_dtype)
    if res.skipped:
        print(f"note: not copied (links to files outside the model directory): {', '.join(res.skipped)}",
              file=sys.stderr)
    for note in res.notes:
        print(f"note: {note}", file=sys.stderr)
    from unmerge_jax.merge.methods.karcher import summary

    converged = summary(res.diagnostics)
    if converged:
        print(converged)
    lam = f"; RAM lambdas {[round(x, 4) for x in res.lambdas]}" if res.lambdas else ""
    print(f"merged {res.n_merged} of {res.n_tensors} tensors ({res.bytes_written / 1e9:.3f} GB) into {res.out} "
          f"in {res.seconds:.1f} s{lam}")
    return 0
