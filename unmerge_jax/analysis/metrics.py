"""Streaming sparsity metrics of a task vector (the sparsity-scaling paper, §2.2), overall, per module class, per layer.

Metrics (N = number of entries of the whole vector, unchanged tensors included, x = |δ|):

* ``l0`` — fraction with ``|δ_i| < ε·max_j|δ_j|`` (ε = 0.01, max over the *whole* vector; for a
  group, over the group). An all-zero vector has ``l0 = 1`` (nothing changed).
* ``exact_zero`` — fraction ``δ_i == 0``; ``near_zero`` — fraction ``|δ_i| ≤ atol``. Stored bf16
  weights make updates below ~2⁻⁸·|θ| vanish, so ``dtypes`` reports the stored dtypes.
* ``gini`` — Hurley–Rickard: x ascending, ``1 − 2 Σ_k (x_(k)/‖x‖₁)(N − k + ½)/N``.
* ``kurtosis`` — excess (Fisher) kurtosis of the signed δ, population moments: ``n·M4/M2² − 3``.
* ``top1_mass`` / ``top5_mass`` — share of ‖x‖₁ held by the ``ceil(p·N)`` largest entries.

Gini, kurtosis and top-k mass of an all-zero vector are NaN (0/0); kurtosis of a constant is NaN.

Streaming scheme (one tensor in memory at a time):

* Moments, max, L1 and counts are per-tensor scalars merged exactly (Pébay's update).
* ``mode="exact"`` keeps the sorted *non-zero* |δ| of each tensor (zeros are only counted), so
  memory is 4 bytes per non-zero entry; groups merge the sorted runs (timsort) and compute Gini,
  top-k and L0 exactly. ``mode="hist"`` keeps a log-histogram of |δ| on float32 bit patterns
  (``hist_bits`` mantissa bits → relative bin width r = 2⁻ᵐ; groups use ``group_hist_bits``).
  Each value is known to lie in its bin [lo, hi), which gives a rigorous interval for Gini and
  top-k mass; we report its midpoint and the half-width in ``error_bounds`` (≤ r for Gini,
  ≤ r/2·top-mass for top-k). L0 stays exact with a second pass that counts ``|δ| < ε·max`` once
  the maxima are known (``passes=2``); with ``passes=1`` it is bounded by the count of the bin
  holding the threshold. ``mode="auto"`` starts exact and converts to the histogram once more
  than ``exact_limit`` non-zeros are held.

Inputs are read through the tensor sources of :mod:`unmerge_jax.sources` (:func:`delta_source`):
arrays and mappings as a ``MemorySource``, a model directory as ``target − base`` (``TaskVector``),
a checkpoint without a base as stored deltas. A tensor the source knows to be an all-zero delta
(a module a LoRA adapter does not adapt) is counted without being read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np

from unmerge_jax.analysis.names import classify
from unmerge_jax.errors import UnmergeError
from unmerge_jax.kernels import sparsity as K
from unmerge_jax.progress import progress
from unmerge_jax.sources import (DELTA, MemorySource, TaskVector, TensorSource, nonfinite_error, open_source,
                                 task_vector)

METRIC_KEYS = ("l0", "exact_zero", "near_zero", "gini", "kurtosis", "top1_mass", "top5_mass", "n_params")
TOP_FRACTIONS = {"top1_mass": 0.01, "top5_mass": 0.05}


# ----------------------------------------------------------------------------------------------
# the input as a tensor source of deltas
# ----------------------------------------------------------------------------------------------
def delta_source(obj, base=None) -> TensorSource:
    """The task vector to measure, as a :class:`~unmerge_jax.sources.TensorSource` of deltas.

    Args:
      obj: an array (one tensor named ``"delta"``), a ``{name: array}`` mapping, a model or LoRA
        adapter directory or ``.safetensors`` file, or a tensor source.
      base: the base model. With it the task vector is ``obj − base`` over every base tensor
        (:func:`~unmerge_jax.sources.task_vector`; tensors a LoRA adapter does not touch are
        all-zero deltas). Without it ``obj``'s tensors are the deltas (a checkpoint opens with
        ``kind="delta"``).

    Raises:
      UnmergeError: the input cannot be read, or it holds full model weights and no base is given.
    """
    if base is not None:
        return task_vector(base, obj)
    if isinstance(obj, TensorSource):
        src = obj
    elif isinstance(obj, (str, Path)):
        src = open_source(obj, kind=DELTA)
    elif isinstance(obj, Mapping):
        src = MemorySource(obj, DELTA, "dict of arrays", copy=False)
    elif hasattr(obj, "shape") and hasattr(obj, "dtype"):
        src = MemorySource({"delta": obj}, DELTA, "array", copy=False)
    else:
        src = open_source(obj, kind=DELTA)  # the one-line error for anything else
    if src.kind != DELTA:
        raise UnmergeError(f"{src.label} holds full model weights; pass base=... (the model it was fine-tuned from) "
                           f"to measure its task vector")
    return src


def _label(src: TensorSource) -> str:
    return f"{src.source.label} − {src.base.label}" if isinstance(src, TaskVector) else src.label


# ----------------------------------------------------------------------------------------------
# one aggregation group
# ----------------------------------------------------------------------------------------------
class _Group:
    def __init__(self, bits):
        self.n = self.n_zero = self.n_atol = self.below = 0
        self.max_abs, self.l1 = 0.0, 0.0
        self.mom = (0, 0.0, 0.0, 0.0, 0.0)
        self.parts = []          # exact mode: sorted non-zero |δ| per tensor (float32)
        self.hist = None         # hist mode: counts per bin
        self.bits = bits
        self.tensor_l0 = []      # (layer, own-max L0) per tensor

    def add(self, s, nz_sorted, hist, hist_bits, l0_t, layer):
        self.n += s["n"]
        self.n_zero += s["n_zero"]
        self.n_atol += s["n_atol"]
        self.max_abs = max(self.max_abs, s["max_abs"])
        self.l1 += s["l1"]
        self.mom = K.merge_moments(self.mom, s["moments"])
        self.tensor_l0.append((layer, l0_t))
        if self.hist is None:
            self.parts.append(nz_sorted)
        else:
            self.hist += _coarsen(hist, hist_bits, self.bits)

    def to_hist(self):
        if self.hist is not None:
            return
        h = np.zeros(1 << (8 + self.bits), dtype=np.int64)
        h[0] = self.n - sum(p.size for p in self.parts)  # the zeros
        for p in self.parts:
            h += np.bincount(K.abs_bins(p, self.bits), minlength=h.size)
        self.hist, self.parts = h, []


def _coarsen(h, bits_from, bits_to):
    if bits_from == bits_to:
        return h
    return h.reshape(-1, 1 << (bits_from - bits_to)).sum(axis=1)


def _kurtosis(mom):
    n, _, m2, _, m4 = mom
    if n == 0 or m2 <= 0:
        return math.nan
    return n * m4 / (m2 * m2) - 3.0


def _gini_sorted(a, n_zero, l1):
    """Exact Hurley–Rickard Gini from ascending non-zero values plus ``n_zero`` zeros."""
    n = n_zero + a.size
    if l1 <= 0:
        return math.nan
    s = 0.0  # Σ_j j·a_j, j = 1-based rank among the non-zeros, chunked in float64
    step = 1 << 22
    for i in range(0, a.size, step):
        c = a[i:i + step].astype(np.float64)
        s += float(np.arange(i + 1, i + 1 + c.size, dtype=np.float64) @ c)
    rank_sum = n_zero * l1 + s  # Σ_k k·x_(k) over all N entries
    return 1.0 - 2.0 * ((n + 0.5) * l1 - rank_sum) / (n * l1)


def _top_k(n, frac):
    return max(1, int(math.ceil(frac * n - 1e-9)))


def _finish_exact(g, tau, eps):
    a = np.sort(np.concatenate(g.parts), kind="stable") if len(g.parts) > 1 else (
        g.parts[0] if g.parts else np.zeros(0, np.float32))
    l1 = float(a.sum(dtype=np.float64))
    out = {"l0": 1.0 if g.max_abs == 0 else (g.n_zero + int(np.searchsorted(a, tau, "left"))) / g.n,
           "gini": _gini_sorted(a, g.n_zero, l1)}
    for key, p in TOP_FRACTIONS.items():
        k = _top_k(g.n, p)
        out[key] = math.nan if l1 <= 0 else (1.0 if k >= a.size else float(a[a.size - k:].sum(dtype=np.float64)) / l1)
    return out, {}


def _finish_hist(g, tau, passes):
    h = g.hist
    bins = np.nonzero(h)[0]
    cnt = h[bins].astype(np.float64)
    lo, hi = K.bin_edges(bins, g.bits)
    hi = np.minimum(hi, g.max_abs)  # nothing exceeds the max (tightens the top bin)
    lo = np.minimum(lo, hi)
    n, l1 = g.n, g.l1
    out, bounds = {}, {}
    if g.max_abs == 0:
        out["l0"] = 1.0
    elif passes == 2:
        out["l0"] = g.below / n
    else:
        full = float(cnt[hi <= tau].sum())
        amb = float(cnt[(lo < tau) & (hi > tau)].sum())
        out["l0"] = (full + amb / 2) / n
        bounds["l0"] = amb / 2 / n
    if l1 <= 0:
        out.update(gini=math.nan, top1_mass=math.nan, top5_mass=math.nan)
        return out, bounds
    # Σ_k k over the ranks held by each bin: ranks C+1..C+c → c·C + c(c+1)/2.
    before = np.concatenate([[0.0], np.cumsum(cnt)[:-1]])
    ksum = cnt * before + cnt * (cnt + 1) / 2
    t_lo, t_hi = float(ksum @ lo), float(ksum @ hi)
    g_of = lambda t: 1.0 - 2.0 * ((n + 0.5) * l1 - t) / (n * l1)  # noqa: E731
    out["gini"] = (g_of(t_lo) + g_of(t_hi)) / 2
    bounds["gini"] = (g_of(t_hi) - g_of(t_lo)) / 2
    after = np.cumsum(cnt[::-1])[::-1]  # entries in this bin or above
    for key, p in TOP_FRACTIONS.items():
        k = _top_k(n, p)
        take = np.clip(k - (after - cnt), 0, cnt)
        m_lo, m_hi = min(float(take @ lo) / l1, 1.0), min(float(take @ hi) / l1, 1.0)
        out[key] = (m_lo + m_hi) / 2
        bounds[key] = (m_hi - m_lo) / 2
    return out, bounds


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def sparsity_metrics(delta_or_checkpoint, *, base=None, eps: float = 0.01, atol: float = 1e-5,
                     mode: str = "auto", passes: int = 2, exact_limit: int = 1 << 26, hist_bits: int = 12,
                     group_hist_bits: int = 10, per_tensor: bool = True, progress_bar: bool | None = None) -> dict:
    """Sparsity metrics of a task vector, streamed one tensor at a time.

    Args:
      delta_or_checkpoint: an array, a ``{name: array}`` dict, a model/adapter directory or
        ``.safetensors`` file, or a tensor source of deltas (see :func:`delta_source`).
      base: base model; when given, the target's task vector ``target − base`` is analysed
        over every base tensor (unchanged ones are all-zero deltas). Without it the target's
        tensors are taken to be deltas.
      eps: L0 threshold relative to the max |δ| (0.01 in the sparsity-scaling paper).
      atol: absolute threshold of ``near_zero`` (1e-5: the RAM authors' "changed" threshold).
      mode: ``"exact"``, ``"hist"`` or ``"auto"`` (see module doc); ``passes``: 2 = exact L0 in
        hist mode by re-reading, 1 = one pass with an L0 bound.
      exact_limit: non-zeros held in exact mode before ``auto`` switches to the histogram.
      hist_bits / group_hist_bits: mantissa bits of the overall / per-group histograms.
      per_tensor: include the per-tensor table (own-max L0, zero fractions, dtype, shape).

    Returns:
      dict with ``overall`` (``l0, exact_zero, near_zero, gini, kurtosis, top1_mass, top5_mass,
      n_params, max_abs``), ``by_module`` and ``by_layer`` (the same, plus ``n_tensors`` and the
      mean/std of the per-tensor L0), ``depth_trend`` (per module class: slope of the per-tensor
      L0 against layer index), ``dtypes`` (n_params per stored dtype), ``tensors``, ``mode``,
      ``error_bounds`` (half-widths in hist mode; empty when exact), ``eps``, ``atol``.

    Raises:
      UnmergeError: a tensor holds NaN/Inf, or the input cannot be read.
    """
    if mode not in ("auto", "exact", "hist"):
        raise UnmergeError(f"unknown sparsity mode {mode!r}; choose auto, exact or hist")
    _check_thresholds(eps, atol, exact_limit)
    if passes not in (1, 2):
        raise UnmergeError(f"passes must be 1 or 2, got {passes}")
    if not 0 < group_hist_bits <= hist_bits <= 20:
        raise UnmergeError("need 0 < group_hist_bits <= hist_bits <= 20")
    src = delta_source(delta_or_checkpoint, base)
    label = _label(src)
    if not src.names:
        raise UnmergeError(f"{label} has no tensors")
    hist_mode = mode == "hist"
    overall = _Group(hist_bits)
    mods, layers, tensors, dtypes, stored = {}, {}, {}, {}, 0
    if hist_mode:
        overall.hist = np.zeros(1 << (8 + hist_bits), np.int64)

    def group(d, key):
        if key not in d:
            d[key] = _Group(group_hist_bits)
            if hist_mode:
                d[key].hist = np.zeros(1 << (8 + group_hist_bits), np.int64)
        return d[key]

    info = {}
    for name in progress(src.names, desc="sparsity", enabled=progress_bar):
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowing difference is named below
            x = src.read(name) if src.touches(name) else None  # None: a known all-zero delta, not read
        shape = tuple(src.shape(name))
        n = int(np.prod(shape))
        if x is None:
            s = dict(n=n, max_abs=0.0, n_nonfinite=0, n_zero=n, n_atol=n, n_own_below=n, l1=0.0,
                     moments=(n, 0.0, 0.0, 0.0, 0.0))
        else:
            s = K.tensor_summary(x, eps, atol)
        if s["n_nonfinite"]:
            raise _nonfinite(src, name, x, s["n_nonfinite"])
        if n == 0:
            continue
        layer, module, cls = classify(name)
        info[name] = (layer, cls, n)
        dt = src.dtype(name)
        dtypes[dt] = dtypes.get(dt, 0) + n
        l0_t = 1.0 if s["max_abs"] == 0 else s["n_own_below"] / n
        if per_tensor:
            tensors[name] = dict(shape=list(shape), dtype=dt, module=module, module_class=cls, layer=layer,
                                 n_params=n, l0=l0_t, exact_zero=s["n_zero"] / n, near_zero=s["n_atol"] / n,
                                 max_abs=s["max_abs"])
        nz, h = None, None
        nzv = s.pop("nonzero", np.zeros(0, np.float32))
        if hist_mode:
            h = K.abs_histogram(nzv, hist_bits)
            h[0] += s["n_zero"]
        else:
            nz = np.sort(np.abs(nzv))
            stored += nz.size
        groups = [overall, group(mods, cls)] + ([group(layers, layer)] if layer is not None else [])
        for g in groups:
            g.add(s, nz, h, hist_bits, l0_t, layer)
        if not hist_mode and mode == "auto" and stored > exact_limit:
            hist_mode = True
            for g in [overall, *mods.values(), *layers.values()]:
                g.to_hist()

    n_pass = 1
    if hist_mode and passes == 2:  # exact L0: count |δ| < ε·max per group now the maxima are known
        n_pass = 2
        for name in progress(list(info), desc="sparsity (L0 pass)", enabled=progress_bar):
            layer, cls, n = info[name]
            gs = [overall, mods[cls]] + ([layers[layer]] if layer is not None else [])
            if not src.touches(name):
                for g in gs:
                    g.below += n
                continue
            x = src.read(name)
            counts = K.count_below(x, [K.threshold(eps, g.max_abs) for g in gs])
            for g, c in zip(gs, counts):
                g.below += int(c)

    bounds = {}

    def finish(g, label):
        tau = K.threshold(eps, g.max_abs)
        if g.hist is None:
            out, b = _finish_exact(g, tau, eps)
        else:
            out, b = _finish_hist(g, tau, passes)
        if b:
            bounds[label] = b
        res = dict(l0=out["l0"], exact_zero=g.n_zero / g.n, near_zero=g.n_atol / g.n, gini=out["gini"],
                   kurtosis=_kurtosis(g.mom), top1_mass=out["top1_mass"], top5_mass=out["top5_mass"],
                   n_params=g.n, max_abs=g.max_abs)
        l0s = np.array([v for _, v in g.tensor_l0])
        res.update(n_tensors=len(l0s), tensor_l0_mean=float(l0s.mean()), tensor_l0_std=float(l0s.std()))
        return res

    result = {
        "overall": finish(overall, "overall"),
        "by_module": {k: finish(g, f"module:{k}") for k, g in sorted(mods.items())},
        "by_layer": {str(k): finish(g, f"layer:{k}") for k, g in sorted(layers.items())},
        "depth_trend": depth_trend(mods),
        "dtypes": dtypes,
        "mode": "hist" if hist_mode else "exact",
        "passes": n_pass,
        "error_bounds": bounds,
        "eps": eps,
        "atol": atol,
        "source": label,
    }
    if per_tensor:
        result["tensors"] = tensors
    return result


def _check_thresholds(eps, atol, exact_limit) -> None:
    """``eps`` finite in [0, 1], ``atol`` finite ≥ 0, ``exact_limit`` a whole number ≥ 0 (one-line errors)."""
    def number(v):
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)

    if not (number(eps) and 0 <= eps <= 1):
        raise UnmergeError(f"--eps must be a finite fraction of max|d| in [0, 1] (the paper uses 0.01), got {eps}")
    if not (number(atol) and atol >= 0):
        raise UnmergeError(f"--atol must be a finite threshold >= 0, got {atol}")
    if isinstance(exact_limit, bool) or not isinstance(exact_limit, (int, np.integer)) or exact_limit < 0:
        raise UnmergeError(f"--exact-limit must be a whole number >= 0, got {exact_limit!r}")


def _nonfinite(src: TensorSource, name: str, x: np.ndarray, count: int) -> UnmergeError:
    """The one-line error for NaN/Inf in tensor ``name``: which input (the base or the fine-tuned
    side of a task vector), its file and the first index."""
    if isinstance(src, TaskVector):
        if src.relative:
            base = src.base.read(name)
            if not np.all(np.isfinite(base)):
                return nonfinite_error(repr(name), f"base {src.base.where(name)}", base, "holds NaN/Inf:")
        arr, _ = src.parts(name)
        if arr is not None and not np.all(np.isfinite(arr)):
            return nonfinite_error(repr(name), src.where(name), arr, "holds NaN/Inf:")
        if src.relative:  # finite weights whose difference from the base overflows float32
            return nonfinite_error(repr(name), f"the task vector {src.where(name)} minus the base", x,
                                   f"overflows float32 to NaN/Inf in {count} value(s):")
    return nonfinite_error(repr(name), src.where(name), x, f"holds {count} NaN/Inf value(s):")


def depth_trend(mods) -> dict:
    """Per module class: least-squares slope of per-tensor L0 against layer index (per layer)."""
    out = {}
    for cls, g in sorted(mods.items()):
        pts = np.array([(lay, v) for lay, v in g.tensor_l0 if lay is not None], dtype=np.float64)
        if len(pts) < 2 or np.ptp(pts[:, 0]) == 0:
            continue
        slope, intercept = np.polyfit(pts[:, 0], pts[:, 1], 1)
        out[cls] = {"slope_per_layer": float(slope), "intercept": float(intercept), "n_tensors": len(pts)}
    return out
