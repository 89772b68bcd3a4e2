"""Argument types shared by the sub-commands (not a command itself).

A value argparse refuses here is one line, ``error: unmerge CMD: argument --seed: ...`` (see
``cli/main.py``'s :class:`~unmerge_jax.cli.main.Parser`); the library checks the same ranges
for callers that do not go through the CLI.
"""

from __future__ import annotations

import argparse
import sys

from unmerge_jax.errors import UnmergeError
from unmerge_jax.stats import SEED_LIMIT, check_seed


def seed(text: str) -> int:
    """A random seed: a whole number in ``0 .. 2**32 - 1`` (a larger one is refused, never folded)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give a seed in 0..{SEED_LIMIT - 1}") from None
    try:
        return check_seed(value)
    except UnmergeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def print_warnings(messages) -> None:
    """Each message as one ``warning: ...`` line on stderr (the result is still printed)."""
    for m in messages or ():
        print(f"warning: {m}", file=sys.stderr)
