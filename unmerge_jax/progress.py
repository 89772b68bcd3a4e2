"""Progress bars for long passes (tensor streams, sweeps).

One place decides whether a bar is shown: on when stderr is a terminal, off when
``UNMERGE_PROGRESS=0`` (tests, CI logs) and forced on with ``UNMERGE_PROGRESS=1``.
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress_enabled(enabled: bool | None = None) -> bool:
    if enabled is not None:
        return enabled
    env = os.environ.get("UNMERGE_PROGRESS")
    if env is not None:
        return env not in ("0", "false", "no", "")
    return sys.stderr.isatty()


def progress(iterable=None, *, desc: str = "", total: int | None = None, unit: str = "tensor",
             enabled: bool | None = None):
    """Wrap ``iterable`` in a tqdm bar on stderr when progress is enabled (see module doc)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not progress_enabled(enabled),
                file=sys.stderr, dynamic_ncols=True, leave=False)
