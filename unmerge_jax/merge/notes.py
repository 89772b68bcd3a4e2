"""One-line run-time notes where a merge follows mergekit 0.1.5 in a way a user could be surprised
by (e.g. a per-model ``weight`` that mergekit's ``model_stock`` ignores). Each distinct note is
printed once per process, to stderr, as ``note: ...``."""

from __future__ import annotations

import sys

_SEEN: set[str] = set()


def note_once(message: str) -> None:
    """Print ``note: message`` to stderr the first time this message is given."""
    if message in _SEEN:
        return
    _SEEN.add(message)
    print(f"note: {message}", file=sys.stderr)
