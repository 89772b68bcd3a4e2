"""One error type for bad input, and the checks every entry point shares.

Everything a user can get wrong (a shape, a NaN, a missing tensor, a bad parameter) is raised as
:class:`UnmergeError` with a one-line message that names the offending array/file/tensor and says
what to do. The CLI prints ``error: <message>`` and exits with status 2 instead of a traceback.
Checks run eagerly, outside ``jit``: inside compiled code we report status, we do not raise.
"""

from __future__ import annotations

import numpy as np


class UnmergeError(ValueError):
    """Bad input to the engine. ``str(err)`` is a single line meant for the user."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def check_finite(name: str, array) -> None:
    """Raise if ``array`` holds NaN or Inf; the message names the array and where."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "fc":
        return
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        n_bad = int(arr.size - np.count_nonzero(finite))
        kind = "NaN" if np.isnan(arr[tuple(bad)]) else "Inf"
        raise UnmergeError(
            f"{name} contains {n_bad} non-finite value(s) (first: {kind} at index {tuple(int(i) for i in bad)}); "
            f"clean or drop those entries before decomposing"
        )


def check_choice(what: str, value, choices) -> None:
    """Raise if ``value`` is not one of ``choices``, listing them."""
    if value not in choices:
        raise UnmergeError(f"unknown {what} {value!r}; choose one of: {', '.join(sorted(map(str, choices)))}")
