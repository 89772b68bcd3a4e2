"""Entries: the named dictionary and target inputs of ``unmerge decompose`` / ``unmerge stats``.

An entry is a name and a path: ``"DIR"`` (named by its basename), ``"NAME=DIR"``, a
``(name, path)`` pair or a ``{name: path}`` dict. The path is a model directory, a PEFT LoRA
adapter directory, or — for array inputs, without a base — a ``.npy``/``.safetensors`` array file.
:func:`open_entries` turns checkpoint entries into task vectors against the base
(:func:`unmerge_jax.sources.task_vector`), checked from headers only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from unmerge_jax.errors import UnmergeError
from unmerge_jax.sources import TaskVector, task_vector

ARRAY_SUFFIXES = (".npy", ".safetensors")


@dataclass(frozen=True)
class Entry:
    """A named dictionary/target input: a model directory, a PEFT LoRA adapter directory or an array file."""

    name: str
    path: Path


def split_spec(s: str) -> tuple[str, Path]:
    """``"name=DIR"`` → (name, DIR); ``"DIR"`` → (basename, DIR). A path containing '=' that exists wins."""
    head, eq, tail = s.partition("=")
    if eq and head and os.sep not in head and not Path(s).exists():
        return head, Path(tail)
    path = Path(s)
    return (path.resolve().name if path.name in ("", ".", "..") else path.name), path


def parse_entries(specs, what: str = "dictionary") -> list[Entry]:
    """``["DIR", "name=DIR", (name, DIR), Entry]`` (or a ``{name: DIR}`` dict) → entries.

    Names default to the directory's basename; they must be unique.
    """
    if isinstance(specs, dict):
        specs = list(specs.items())
    out = []
    for s in specs or []:
        if isinstance(s, Entry):
            out.append(s)
            continue
        if isinstance(s, (tuple, list)):
            name, path = str(s[0]), Path(s[1])
        else:
            name, path = split_spec(str(s))
        if not name:
            raise UnmergeError(f"empty name in {what} entry {s!r}; write NAME=DIR")
        out.append(Entry(name, path))
    if not out:
        raise UnmergeError(f"the {what} is empty; give at least one model or adapter directory")
    seen = {}
    for e in out:
        if e.name in seen:
            raise UnmergeError(f"two {what} entries are named {e.name!r} ({seen[e.name]} and {e.path}); name them "
                               f"with NAME=DIR")
        seen[e.name] = e.path
    return out


def entry_path(spec) -> Path:
    """The path of one entry spec (any form :func:`parse_entries` takes, but one entry)."""
    if isinstance(spec, Entry):
        return spec.path
    if isinstance(spec, (tuple, list)):
        return Path(spec[1])
    return split_spec(str(spec))[1]


def is_array_file(spec) -> bool:
    """Whether an entry names a ``.npy``/``.safetensors`` array file (not a model/adapter directory)."""
    path = entry_path(spec)
    return path.suffix in ARRAY_SUFFIXES and not path.is_dir()


def open_entries(base, dictionary, targets, check_names=None) -> tuple[list[Entry], list[Entry], list[TaskVector]]:
    """Parse the dictionary and target entries and open each as a task vector against ``base``.

    Args:
      base: the base source (see :func:`unmerge_jax.sources.task_vector`).
      dictionary, targets: entry specs (see :func:`parse_entries`).
      check_names: base tensors every full-weight entry must hold with the base's shape.

    Returns:
      ``(dictionary entries, target entries, task vectors)``: K + T task vectors, dictionary first.
    """
    d_entries = parse_entries(dictionary, "dictionary")
    t_entries = parse_entries(targets, "targets")
    tvs = [task_vector(base, e.path, e.name, check_names=check_names) for e in d_entries + t_entries]
    return d_entries, t_entries, tvs
