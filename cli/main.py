"""``unmerge`` entry point.

Each sub-command lives in its own module of this package and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func=run`` where
``run(args) -> int``. The CLI holds no logic the library lacks: ``run`` calls public
``unmerge_jax`` functions and prints their results.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from unmerge_jax.errors import UnmergeError

# Order is the order in `unmerge --help`. Every module imports without the optional extras; a
# command that needs one says which (a one-line error naming the extra to install).
COMMAND_MODULES = (
    "demo",
    "decompose",
    "stats",
    "sweep",
    "merge",
    "sparsity",
    "simulate",
    "study",
    "experiment",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unmerge",
        description=(
            "unmerge_jax: decompose merged LLMs into known task vectors (NNLS, OMP, Lasso, "
            "ElasticNet, Ridge, dot product), merge task vectors (task arithmetic, linear, TIES, "
            "DARE, RAM) by streaming safetensors, and analyse task-vector sparsity. "
            "Start with `unmerge demo`."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"unmerge_jax.cli.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    from unmerge_jax.compile_cache import enable_compilation_cache

    enable_compilation_cache()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except UnmergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
