"""``unmerge convert``: rewrite a PyTorch ``.bin`` checkpoint directory as safetensors."""

from __future__ import annotations

import argparse
import math

from unmerge_jax.errors import UnmergeError

HELP = """Rewrite a model (or PEFT adapter) directory holding PyTorch .bin weights as safetensors, so
every other command can read it:

  unmerge convert ./old-model --out ./old-model-st

The engine never unpickles a checkpoint by itself (a pickle can run code). This command does it
once, explicitly, with torch.load(weights_only=True): PyTorch's restricted loader, which accepts
tensors and plain containers and refuses anything else. Reads pytorch_model.bin or the shards of
pytorch_model.bin.index.json (or adapter_model.bin), one shard at a time; writes the same tensor
names, shapes and dtypes as model.safetensors or size-capped shards plus an index, and copies
config.json, tokenizer and generation files. The output is written atomically; the input is
never modified, and an output inside or over it is refused.
"""


def register(sub) -> None:
    p = sub.add_parser("convert", help="rewrite a .bin checkpoint as safetensors (torch.load weights_only=True)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="directory holding pytorch_model.bin (or its shards and index)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--shard-size", type=float, default=5.0, help="maximum output shard size in GB (default 5)")
    p.set_defaults(func=run)


def run(args) -> int:
    from unmerge_jax.io.convert import convert_checkpoint

    shard_bytes = args.shard_size * 1e9
    if not (math.isfinite(shard_bytes) and shard_bytes > 0):
        raise UnmergeError(f"--shard-size must be a positive number of GB, got {args.shard_size}")
    res = convert_checkpoint(args.src, args.out, force=args.force, shard_bytes=max(1, int(shard_bytes)))
    print(f"converted {res.n_tensors} tensors ({res.bytes_written / 1e9:.3f} GB) from {', '.join(res.files)} into "
          f"{res.out}" + (f"; copied {', '.join(res.copied)}" if res.copied else ""))
    return 0
