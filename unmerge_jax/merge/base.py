"""What a merge method is: :class:`MergeMethod`, the entry type of the ``MERGE_METHODS`` registry.

A method merges K inputs of one tensor. The generic code (``merge.tensor`` in memory,
``merge.driver`` streaming a model) knows nothing about any method: it resolves the parameters
with the entry's ``check``, asks ``statistics`` which pass the method needs, runs it, then
``apply``. One file per method family (``merge/methods/gta.py``, ``merge/methods/ram.py``) builds
the entries.

Statistics passes (``STATISTICS``):

* ``"none"`` — every merged entry depends only on that entry's inputs (linear, task arithmetic,
  TIES/DARE at density 1, DARE without the ``l1`` rescale, RAM with given λ);
* ``"tensor"`` — a pass over the chunks of the tensor first, whose state is O(K) numbers
  (thresholds, L1 sums, counts): ``tensor_stats(res, chunks, key)``;
* ``"model"`` — additive per-model counts over the *whole model* first (``count`` on every
  tensor, summed, then ``finish`` → (K,) per-model numbers); in memory a single tensor is the
  whole model.
"""

from __future__ import annotations

import difflib
import math
import reprlib
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.kernels.random import name_hash
from unmerge_jax.stats import check_seed   # one seed rule for every command: 32-bit, refused rather than folded

STATISTICS = ("none", "tensor", "model")


class MergeKey(NamedTuple):
    """The uint32 words keying a method's random draws for one tensor: ``(seed, crc32(name))``."""

    seed: np.uint32
    name: np.uint32


def merge_key(seed: int, name: str) -> MergeKey:
    return MergeKey(np.uint32(check_seed(seed)), np.uint32(name_hash(name)))


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
_REPR.maxlevel = 2


def short(value, limit: int = 80) -> str:
    """A bounded ``repr`` of a user-given value for error messages (at most ``limit`` characters):
    long strings and deep or wide containers (a YAML alias bomb) are cut without being expanded, so
    an error stays one short line."""
    r = _REPR.repr(value)
    return r if len(r) <= limit else f"{r[:limit // 2 - 2]}...{r[-(limit // 2 - 2):]}"


class Resolved(NamedTuple):
    """A method with every parameter checked and defaulted, for K models (one tensor).

    Attributes:
      method: the :class:`MergeMethod`.
      shared: method-wide parameters (all of ``method.shared``, normalised by ``method.check``).
      weights: (K,) float64 per-model weights.
      density: (K,) float64 per-model densities (ones for methods without ``density``).
      columns: every per-model parameter of the method by name, (K,) float64 each (``gamma``,
        ``epsilon``, ... besides ``weight`` and ``density``).
    """

    method: "MergeMethod"
    shared: dict
    weights: np.ndarray
    density: np.ndarray
    columns: Mapping[str, np.ndarray] = {}


class MergeMethod(NamedTuple):
    """One registered merge method: its parameters and its behaviour.

    Attributes:
      name: the mergekit name (``merge_method:``).
      shared: method-wide parameter defaults (mergekit 0.1.5's, plus ours where documented).
      per_model: per-input parameter defaults (``weight``, ``density``).
      needs_base: True when a ``base_model`` is required.
      check: ``check(method, shared, weights, density, at) -> shared`` — validate and normalise
        the method-wide parameters (``at`` is a context suffix for messages); raise
        :class:`UnmergeError` on bad values.
      statistics: ``statistics(res) -> "none" | "tensor" | "model"`` (see the module docstring).
      apply: ``apply(res, chunks, stats, key)`` — run the apply kernel chunk by chunk into
        ``chunks`` (a :class:`~unmerge_jax.merge.chunks.TensorChunks`) with ``chunks.limit``, so
        that non-finite inputs and outputs come out NaN and ``chunks.store`` refuses them;
        ``stats`` is the result of the statistics pass (None for ``"none"``).
      tensor_stats: ``tensor_stats(res, chunks, key) -> stats`` for ``"tensor"``.
      count: ``count(res, chunks) -> (C, K) int64`` additive whole-model counts for ``"model"``.
      finish: ``finish(res, totals) -> (K,) float64`` per-model numbers from the summed counts
        (``totals`` is 0 when no tensor was counted); these are the ``stats`` of ``apply``.
      masks: ``masks(res, base, tensors, key, deltas) -> (K, n) bool`` — the keep-masks the method
        applies to a whole tensor, vmapped over the models (None for methods without masks).
      rows: ``rows(res) -> bool`` — the method needs chunks of whole rows (see
        :class:`~unmerge_jax.merge.chunks.TensorChunks`); None: any chunking.
      options: the family's static structure of this method (GTA: ``sparsify``, ``consensus``).
      check_models: ``check_models(res, at)`` — validate the per-model columns of a resolved
        method (``res.columns``, e.g. ``gamma``, ``epsilon`` against ``density``); raise
        :class:`UnmergeError` on bad values. None: nothing beyond the number checks.
    """

    name: str
    shared: Mapping[str, Any]
    per_model: Mapping[str, float]
    needs_base: bool
    check: Callable
    statistics: Callable
    apply: Callable
    tensor_stats: Callable | None = None
    count: Callable | None = None
    finish: Callable | None = None
    masks: Callable | None = None
    rows: Callable | None = None
    options: Mapping[str, Any] = {}
    check_models: Callable | None = None

    def whole_rows(self, res: "Resolved") -> bool:
        """Whether the chunks of a tensor merged with ``res`` must hold whole rows."""
        return bool(self.rows is not None and self.rows(res))

    @property
    def params(self) -> tuple[str, ...]:
        """Every parameter name the method accepts, sorted."""
        return tuple(sorted({*self.shared, *self.per_model}))


def check_name(what: str, value, choices) -> None:
    """Refuse a name a user typed that is not one of ``choices``, in one short line: the value is
    quoted bounded (a non-string or a 100 kB string stays short), and a long list of choices (the
    merge-method registry) is replaced by the closest names and a pointer to ``--help``."""
    if isinstance(value, str) and value in choices:
        return
    names = sorted(map(str, choices))
    listed = ", ".join(names)
    if len(listed) > 160:   # the merge-method registry: keep the error one short line
        close = difflib.get_close_matches(value, names, n=3, cutoff=0.5) if isinstance(value, str) else []
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UnmergeError(f"unknown {what} {short(value)}; {hint}{len(names)} choices, listed by "
                           f"`unmerge merge --help`")
    raise UnmergeError(f"unknown {what} {short(value)}; choose one of: {listed}")


def as_bool(what: str, v) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise UnmergeError(f"parameter {what} must be true or false, got {short(v)}")


F32_MAX = float(np.finfo(np.float32).max)


def as_float(what: str, v, *, minimum: float | None = None) -> float:
    """A parameter as a finite float that fits float32 (the kernels compute in float32: a weight of
    1e308 would become inf there), optionally ``≥ minimum``; a one-line error otherwise."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating, str)):
        raise UnmergeError(f"parameter {what} must be a number, got {short(v)}")
    try:
        x = float(v)
    except (TypeError, ValueError, OverflowError):
        raise UnmergeError(f"parameter {what} must be a number, got {short(v)}") from None
    if not math.isfinite(x):
        raise UnmergeError(f"parameter {what} must be finite, got {short(v)}")
    if abs(x) > F32_MAX:
        raise UnmergeError(f"parameter {what} = {x:g} does not fit float32 (|x| ≤ {F32_MAX:.4g}), in which the merge "
                           f"computes; use a smaller value")
    if minimum is not None and x < minimum:
        raise UnmergeError(f"parameter {what} must be ≥ {minimum:g}, got {x:g}")
    return x
