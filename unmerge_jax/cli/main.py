"""``unmerge`` entry point.

Each sub-command lives in its own module of this package and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func=run`` where
``run(args) -> int``. The CLI holds no logic the library lacks: ``run`` calls public
``unmerge_jax`` functions and prints their results.

What a user sees on bad input (docs/errors.md): one line ``error: ...`` on stderr and exit
status 2 — for an argument argparse refuses, an :class:`~unmerge_jax.errors.UnmergeError`, or an
``OSError`` escaping a command (a file that cannot be read or written, named with what to do).
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
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
    "convert",
    "sparsity",
    "simulate",
    "study",
    "experiment",
    "verify",
)


class Parser(argparse.ArgumentParser):
    """argparse with the one-line error contract: ``error: <message> (see `unmerge CMD --help`)``,
    exit status 2, no usage block. Sub-command parsers are of this class too."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def os_error_line(err: OSError) -> str:
    """The one line for an ``OSError`` that escaped a command: the path(s), the cause, what to do."""
    from unmerge_jax.io.atomic import os_error

    path = err.filename if err.filename is not None else None
    if path is None:
        return f"{err.strerror or err}; check the paths given and the free space"
    if err.filename2 is not None:
        path = f"{err.filename} -> {err.filename2}"
    if err.errno in (errno.EACCES, errno.EPERM, errno.ENOENT):
        return f"cannot access {path}: {err.strerror.lower()} — check that it exists and that you may read (inputs) " \
               f"or write (outputs) it"
    return str(os_error(err, path, "access"))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {' '.join(str(message).split())}\n"


def main(argv=None) -> int:
    import warnings

    from unmerge_jax.compile_cache import enable_compilation_cache

    enable_compilation_cache()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    shown = warnings.formatwarning
    warnings.formatwarning = _one_line_warning  # a library warning is one `warning:` line, as ours are
    try:
        return int(args.func(args) or 0)
    except UnmergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file the library did not anticipate: still one line, naming it
        print(f"error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = shown


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
