"""Merge-method registry and the in-memory entry point :func:`merge_tensors`.

``MERGE_METHODS`` maps a mergekit method name to a :class:`MethodSpec`: which kernel family, the
default of every parameter it accepts (``per_model`` ones may differ per input model), and
whether a base model is required. The CLI, the YAML config parser, the driver and the tests all
read it. Parameter checks happen here, eagerly, as one-line :class:`UnmergeError`s; the kernels
(``unmerge_jax.kernels.merge``) never raise.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from types import MappingProxyType

import jax.numpy as jnp
import numpy as np

from unmerge_jax.errors import UnmergeError, check_choice
from unmerge_jax.hostmem import aligned_empty
from unmerge_jax.kernels import merge as K

_GTA_SHARED = {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False}
_PER_MODEL = {"weight": 1.0, "density": 1.0}
RAM_FACES = ("mergekit", "seed003", "arm", "arm-r", "arm-r-v2", "authors", "tensor_local")
GLOBAL_FACES = ("arm-r", "arm-r-v2", "authors")   # need the whole-model counting pass
RESCALE_RULES = ("l1", "inverse_density")
CHUNK = 1 << 20  # elements per kernel call (4 MiB float32 per input)


_SCRATCH = threading.local()


def _scratch(key, nbytes: int) -> np.ndarray:
    """A per-thread aligned uint8 buffer of ``nbytes`` reused across tensors (``run_kernel``'s chunk
    scratch: fresh 4 MiB buffers per tensor page-faulted ≈ 60,000 times per TIES merge here)."""
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    buf = pool.get(key)
    if buf is None or buf.size < nbytes:
        buf = pool[key] = aligned_empty(nbytes)
    return buf[:nbytes]


@dataclass(frozen=True)
class MethodSpec:
    """One registered merge method.

    ``family`` is ``"gta"`` (linear, task arithmetic, TIES, DARE) or ``"ram"``; ``shared`` are
    the method-wide parameter defaults; ``per_model`` the per-input ones (``weight``,
    ``density``); ``sparsify``/``consensus`` fix the GTA kernel's structure.
    """

    name: str
    family: str
    shared: dict
    per_model: dict = field(default_factory=lambda: dict(_PER_MODEL))
    sparsify: str | None = None
    consensus: str | None = None
    needs_base: bool = True

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(sorted({*self.shared, *self.per_model}))


def _gta(name, sparsify, consensus, normalize, rescale):
    return MethodSpec(name, "gta", {**_GTA_SHARED, "normalize": normalize, "rescale": rescale},
                      sparsify=sparsify, consensus=consensus)


MERGE_METHODS = MappingProxyType({
    # mergekit linear: Σ w θ / Σ w over full weights; a base, when given, is not averaged in.
    "linear": MethodSpec("linear", "gta", {"normalize": True}, {"weight": 1.0}, needs_base=False),
    "task_arithmetic": _gta("task_arithmetic", None, None, False, False),
    "ties": _gta("ties", "magnitude", "sum", True, False),
    "dare_linear": _gta("dare_linear", "random", None, False, True),
    "dare_ties": _gta("dare_ties", "random", "sum", False, True),
    "ram": MethodSpec("ram", "ram", {"face": "mergekit", "epsilon": 1e-5, "r": None, "alpha": 0.2,
                                     "lambda": 1.5, "q": 90.0}, {"weight": 1.0}),
    "ramplus_tl": MethodSpec("ramplus_tl", "ram", {"face": "tensor_local", "epsilon": 1e-5, "r": 0.1,
                                                   "alpha": 0.2}, {"weight": 1.0}),
})


@dataclass(frozen=True)
class Resolved:
    """A method with every parameter checked and defaulted, for K models (one tensor)."""

    spec: MethodSpec
    shared: dict
    weights: np.ndarray   # (K,) float64
    density: np.ndarray   # (K,) float64


def get_method(method: str) -> MethodSpec:
    check_choice("merge method", method, MERGE_METHODS)
    return MERGE_METHODS[method]


def _as_bool(what, v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise UnmergeError(f"parameter {what} must be true or false, got {v!r}")


def _as_float(what, v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise UnmergeError(f"parameter {what} must be a number, got {v!r}") from None
    if not math.isfinite(x):
        raise UnmergeError(f"parameter {what} must be finite, got {v!r}")
    return x


def check_params(spec: MethodSpec, params: dict, where: str = "") -> None:
    """Raise on a parameter the method does not take (mergekit's spelling)."""
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        at = f" ({where})" if where else ""
        raise UnmergeError(f"unknown parameter {unknown[0]!r} for merge method {spec.name!r}{at}; "
                           f"it accepts: {', '.join(spec.params)}")


def resolve(method: str, k: int, shared: dict, per_model: list[dict] | None = None, where: str = "") -> Resolved:
    """Check and default one method's parameters for K models.

    Args:
      method: registered name. k: number of input models (≥ 1).
      shared: method-wide parameters; a per-model parameter given here applies to all models.
      per_model: K dicts of per-model parameters (``weight``, ``density``), overriding ``shared``.
      where: context for error messages (a tensor name or config path).
    """
    spec = get_method(method)
    at = f" ({where})" if where else ""
    if k < 1:
        raise UnmergeError(f"merge method {method!r} needs at least one model to merge{at}")
    per_model = per_model or [{} for _ in range(k)]
    check_params(spec, shared, where)
    for p in per_model:
        check_params(spec, p, where)
    out = dict(spec.shared)
    out.update({n: v for n, v in shared.items() if n in spec.shared})
    cols = {}
    for n, default in spec.per_model.items():
        col = []
        for i, p in enumerate(per_model):
            v = p.get(n, shared.get(n, default))
            col.append(_as_float(f"{n} of model {i}", v))
        cols[n] = np.asarray(col, dtype=np.float64)
    weights = cols["weight"]
    density = cols.get("density", np.ones(k))
    bad = [(i, d) for i, d in enumerate(density) if not 0.0 < d <= 1.0]
    if bad:
        raise UnmergeError(f"density {bad[0][1]} of model {bad[0][0]} is outside (0, 1]{at}; "
                           f"use a fraction of entries to keep, e.g. 0.5")
    if spec.family == "gta":
        out["normalize"] = _as_bool("normalize", out["normalize"])
        if "rescale" in out:
            rule = out["rescale"]
            if rule in (None, False, "none", "false", "False"):
                out["rescale"] = None
            elif rule is True or rule in ("true", "True"):
                out["rescale"] = "l1"
            else:
                check_choice("rescale rule", rule, ("l1", "inverse_density", True, False))
        if "lambda" in out:
            out["lambda"] = _as_float("lambda", out["lambda"])
        if out["normalize"] and abs(weights.sum()) < K.WEIGHT_EPS:
            raise UnmergeError(f"weights {weights.tolist()} sum to zero but {method!r} normalises by their sum{at}; "
                               f"change the weights or set normalize: false")
    else:
        check_choice("RAM face", out["face"], RAM_FACES)
        for n in ("epsilon", "alpha", "lambda", "q"):
            if n in out:
                out[n] = _as_float(n, out[n])
        if out.get("r") is None:
            out["r"] = 0.1 if out["face"] == "tensor_local" else 1.0
        out["r"] = _as_float("r", out["r"])
        if "q" in out and not 0.0 <= out["q"] <= 100.0:
            raise UnmergeError(f"percentile q={out['q']} is outside [0, 100]{at}")
    return Resolved(spec, out, weights, density)


def _topk(density: np.ndarray, numel: int) -> np.ndarray:
    # mergekit's magnitude(): k = max(1, int(density · numel)) (density ≥ 1 → untouched).
    return np.asarray([max(1, int(float(d) * numel)) if d < 1 else numel for d in density], dtype=np.int64)


def gta_config(res: Resolved, deltas: bool) -> K.GTAConfig:
    spec = res.spec
    sparsify = spec.sparsify if spec.sparsify and bool(np.any(res.density < 1.0)) else None
    return K.GTAConfig(sparsify=sparsify, rescale=res.shared.get("rescale") if sparsify else None,
                       consensus=spec.consensus, normalize=res.shared["normalize"], deltas=deltas)


def ram_config(res: Resolved, deltas: bool) -> K.RAMConfig:
    face = res.shared["face"]
    kind = "seed003" if face == "seed003" else "tensor_local" if face == "tensor_local" else "arm"
    return K.RAMConfig(face=kind, deltas=deltas)


def elementwise(res: Resolved) -> bool:
    """True when the merged value of an entry depends only on that entry's inputs (no per-tensor
    statistic: no top-k, L1 rescale, percentile or tensor-local count), so :func:`run_kernel` needs
    no statistics pass: linear, task arithmetic, TIES/DARE at density 1, and the RAM faces with
    given λ (mergekit ``ram``, ``arm``, ``arm-r``, ``arm-r-v2``)."""
    if res.spec.family == "gta":
        return gta_config(res, True).sparsify is None
    return res.shared["face"] not in ("seed003", "tensor_local")


def run_kernel(res: Resolved, base, tensors, *, seed: int = 0, name: str = "", deltas: bool = True,
               lambdas=None, masks=None, chunk: int = CHUNK, out: np.ndarray | None = None):
    """Run the resolved method on one tensor, streamed in chunks of ``chunk`` elements.

    Methods with a per-tensor statistic first make a statistics pass over the chunks whose state is
    O(K) numbers (TIES: exact k-th largest ``|δ|`` and per-chunk tie counts by
    :func:`~unmerge_jax.kernels.merge.select_largest_bracketed`, with the radix
    :func:`~unmerge_jax.kernels.merge.select_largest` as fallback; DARE ``l1``: float64 L1 sums,
    keeping the drawn masks bit-packed, K × n/8 bytes; RAM ``seed003``: the order statistics of its
    percentile; ``tensor_local``: counts); then every method runs its jit-compiled kernel chunk by
    chunk into ``out`` (the last chunk zero-padded to ``chunk`` entries, so each kernel compiles
    once). No float32 tensor-sized temporary is created besides ``out``, and the result does not
    depend on ``chunk``.

    Args:
      res: the resolved method. base, tensors: the base (shape ``S``) and K inputs (checked).
      deltas: ``tensors`` are task vectors (else fine-tuned weights; δ is formed per chunk).
      lambdas: per-model unique-region scales for the global RAM faces (from the counting pass).
      masks: (K, n) keep-masks to use instead of drawing them (DARE/TIES parity tests; whole tensor).
      out: float32 buffer of shape ``S`` for the result; may be ``base`` itself (the driver's case:
        the statistics pass reads the base before the apply pass overwrites it chunk by chunk).
    Returns:
      the merged float32 NumPy array (``out`` when given), or a JAX array when ``masks`` is given.
    """
    sh = res.shared
    k = len(tensors)
    w = np.asarray(res.weights, np.float32)
    if masks is not None:
        cfg = gta_config(res, deltas)._replace(sparsify=res.spec.sparsify)
        return K.gta_kernel_masked(base, tuple(tensors), w, np.asarray(res.density, np.float32),
                                   np.float32(sh.get("lambda", 1.0)), jnp.asarray(masks, bool), cfg=cfg)
    base = np.asarray(base, np.float32)
    flat_b = base.reshape(-1)
    rows = [np.asarray(t, np.float32).reshape(-1) for t in tensors]
    if out is None:
        out = aligned_empty(base.nbytes).view(np.float32).reshape(base.shape)
        out[...] = base
    flat_o = out.reshape(-1)
    n = flat_b.size
    chunk = max(1, int(chunk))
    slices = [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    pad = _Padded(k, chunk)

    def inputs(sl):
        return pad.inputs(flat_b, rows, sl)

    def store(sl, merged):
        flat_o[sl] = np.asarray(merged)[:sl.stop - sl.start]

    def delta_bits(scale=None, want=None):
        """Iterator over the chunks of the K models' ``|δ|`` (or ``|w δ|``) bit patterns (``None``
        for a model not in ``want``); one reused buffer per model."""
        bufs = [_scratch(("bits", i), 4 * min(chunk, n)).view(np.float32) for i in range(k)]
        for sl in slices:
            b = flat_b[sl]
            bits = []
            for i, r in enumerate(rows):
                if want is not None and not want[i]:
                    bits.append(None)
                    continue
                d = bufs[i][:sl.stop - sl.start]
                if deltas:
                    np.copyto(d, r[sl])
                else:
                    np.subtract(r[sl], b, out=d)
                if scale is not None:
                    np.multiply(d, scale[i], out=d)
                bits.append(np.abs(d, out=d).view(np.uint32))
            yield bits

    def chunk_bits(c, i):
        """Model ``i``'s unscaled ``|δ|`` bits in chunk ``c`` (as :func:`delta_bits`, one model)."""
        sl = slices[c]
        d = rows[i][sl] if deltas else rows[i][sl] - flat_b[sl]
        return K.abs_bits(d)

    def order_statistics(ranks, scale=None):
        """``(thr, n_gt, ties)`` of :func:`~unmerge_jax.kernels.merge.select_largest_bracketed` for
        (K, R) ranks: one pass over the chunks, bracketed from a sample; the radix selection (two
        passes) and a tie-count pass when the bracket misses or heavy ties overflow it."""
        want = np.any(ranks > 0, axis=1)
        idx = K.sample_index(n)
        brackets, caps = [], []
        for i, r in enumerate(rows):
            if idx is None or not want[i]:
                brackets.append(K.bracket(None, n, ranks[i]))
                caps.append(n)
                continue
            d = r[idx] if deltas else r[idx] - flat_b[idx]
            s_bits = K.abs_bits(d if scale is None else d * scale[i])
            lo, hi = K.bracket(s_bits, n, ranks[i])
            brackets.append((lo, hi))
            # ≈ 4× the values expected in the bracket, at most n/16: heavier ties use the radix passes.
            expect = n * np.count_nonzero((s_bits - lo) <= (hi - lo)) / idx.size
            caps.append(int(min(4 * expect + 4096, max(n // 16, 4096))))
        got = K.select_largest_bracketed(delta_bits(scale, want), ranks, brackets, caps)
        if got is not None:
            return got
        thr, n_gt = K.select_largest(lambda: delta_bits(scale, want), ranks)
        ties = np.stack([K.tie_counts(delta_bits(scale, want), thr[:, j]) for j in range(ranks.shape[1])], axis=1)
        return thr, n_gt, ties

    seed_u, nhash = np.uint32(int(seed) & 0xFFFFFFFF), np.uint32(K.name_hash(name))
    if res.spec.family == "gta":
        cfg = gta_config(res, deltas)
        dens = np.asarray(res.density, np.float32)
        lam = np.float32(sh.get("lambda", 1.0))
        stats = K.gta_stats_init(k)
        # cut[c]: chunk c keeps the entries tied at the threshold before this position — the
        # first ones of the tensor by position, as many as top-k needs; known before the apply
        # pass, so its kernel is elementwise and its chunks independent.
        cut = np.zeros((len(slices), k), np.int32)
        if cfg.sparsify == "magnitude":
            ranks = np.where(res.density < 1.0, _topk(res.density, n), 0)
            thr, n_gt, ties = order_statistics(ranks[:, None])
            stats = stats._replace(thr=thr[:, 0])
            cut = _tie_cuts(ranks - n_gt[:, 0], ties[:, 0], thr[:, 0], chunk_bits, slices)
        packed = [None] * len(slices)
        if cfg.sparsify is not None and cfg.rescale == "l1":
            before, after = np.zeros(k), np.zeros(k)
            for c, sl in enumerate(slices):
                b1, a1, packed[c] = K.gta_l1_sums(*inputs(sl), dens, stats._replace(cut=cut[c]), np.int64(sl.start),
                                                  seed_u, nhash, cfg=cfg)
                before += np.asarray(b1)
                after += np.asarray(a1)
            stats = stats._replace(scale=K.l1_scale(before, after))
        for c, sl in enumerate(slices):
            store(sl, K.gta_kernel(*inputs(sl), w, dens, lam, stats._replace(cut=cut[c]), np.int64(sl.start),
                                   seed_u, nhash, packed[c], cfg=cfg))
            packed[c] = None
        return out
    cfg = ram_config(res, deltas)
    face = sh["face"]
    eps = np.float32(sh["epsilon"])
    thr = np.zeros(k, np.float32)
    if cfg.face == "seed003":
        lam = np.full((k,), sh["lambda"], np.float32)
        if n:
            (r_lo, r_hi), lw_hw = K.percentile_ranks(n, sh.get("q", 90.0))
            t, _, _ = order_statistics(np.tile([r_lo, r_hi], (k, 1)), w)
            thr = K.percentile_from_order(t[:, 0].view(np.float32), t[:, 1].view(np.float32), lw_hw)
    elif face in GLOBAL_FACES or cfg.face == "tensor_local":
        if lambdas is None:  # in memory: this tensor is the whole model (global faces)
            changed, overlap = np.zeros(k, np.int64), np.zeros(k, np.int64)
            for sl in slices:
                c, o = K.ram_counts(flat_b[sl], tuple(r[sl] for r in rows), w, eps, deltas=deltas)
                changed += np.asarray(c)
                overlap += np.asarray(o)
            if cfg.face == "tensor_local":
                lambdas = K.tensor_local_lambdas(changed, overlap, eps, sh["r"], sh["alpha"])
            else:
                lambdas = K.ram_lambdas(_authors_face(face), sh["r"], changed, overlap)
        lam = np.asarray(lambdas, np.float32)
    else:  # mergekit ``ram`` / ``arm``: λ = 1
        lam = np.ones((k,), np.float32)
    for sl in slices:
        store(sl, K.ram_kernel(*inputs(sl), w, lam, eps, thr, cfg=cfg))
    return out


def _tie_cuts(left, ties, thr, chunk_bits, slices) -> np.ndarray:
    """(n_chunks, K) int32 positions: chunk ``c`` keeps its entries equal to ``thr[k]`` that lie
    before ``cut[c, k]``, so that the ``left[k]`` first such entries of the tensor are kept.

    ``ties`` (K, n_chunks) counts them per chunk; only a chunk that keeps some but not all of its
    ties (at most one per model) needs their positions, read from its bits (``chunk_bits(c, k)``)."""
    k, n_chunks = ties.shape
    sizes = np.asarray([sl.stop - sl.start for sl in slices])
    earlier = np.cumsum(ties, axis=1) - ties                    # ties in the chunks before
    keep = np.clip(np.asarray(left)[:, None] - earlier, 0, ties)
    cut = np.where(keep == ties, sizes[None, :], 0).astype(np.int32)   # all of them, or none
    for m, c in zip(*np.nonzero((keep > 0) & (keep < ties))):
        cut[m, c] = np.flatnonzero(chunk_bits(c, m) == thr[m])[keep[m, c] - 1] + 1
    return cut.T.copy()


class _Padded:
    """Chunk inputs of one fixed length: a tensor's last, shorter chunk is copied into zero-padded
    aligned buffers, so each kernel compiles once per method and chunk size instead of once per
    distinct tail length (each compile took 0.3–0.7 s: ≈ 1.7 s of TIES's and 2 s of DARE-TIES's
    time in the benchmark). Padded entries have δ = 0 and are cut off the output; the statistics
    they could touch (tie counts, L1 sums) are either zero for them or unused after the last
    chunk. RAM's counting pass is not padded (a negative ε would count zeros)."""

    def __init__(self, k: int, chunk: int):
        self.k, self.chunk, self.bufs = k, chunk, None

    def inputs(self, flat_b, rows, sl):
        size = sl.stop - sl.start
        if size == self.chunk:
            return flat_b[sl], tuple(r[sl] for r in rows)
        if self.bufs is None:
            self.bufs = [_scratch(("pad", i), 4 * self.chunk).view(np.float32) for i in range(1 + self.k)]
        for buf, src in zip(self.bufs, [flat_b, *rows]):
            buf[:size] = src[sl]
            buf[size:] = 0.0
        return self.bufs[0], tuple(self.bufs[1:])


def _authors_face(face: str) -> str:
    return "arm-r-v2" if face == "authors" else face


def check_shapes(base_shape, shapes, names, where: str = "") -> None:
    at = f" for tensor {where}" if where else ""
    for n, s in zip(names, shapes):
        if tuple(s) != tuple(base_shape):
            raise UnmergeError(f"shape mismatch{at}: {n} has {tuple(s)} but the base has {tuple(base_shape)}; "
                               f"inputs must share the base architecture")


def merge_tensors(method: str, base, tensors, weights=None, *, seed: int = 0, name: str = "",
                  deltas: bool = True, **params):
    """Merge one tensor in memory.

    Args:
      method: a name in ``MERGE_METHODS`` (linear, task_arithmetic, ties, dare_linear, dare_ties,
        ram, ramplus_tl).
      base: base weights, shape ``S``; ``None`` only for ``linear`` (then ``tensors`` are merged
        as full weights onto a zero base).
      tensors: K arrays of shape ``S`` (a list or a stacked ``(K, *S)`` array). By default these
        are **task vectors** ``δ_k = θ_k − θ_base``; pass ``deltas=False`` for fine-tuned weights.
      weights: K per-model weights (default 1 each).
      seed, name: key DARE's random masks by ``(seed, name)`` (see ``kernels.merge``).
      **params: the method's mergekit parameters, e.g. ``density`` (scalar or K values),
        ``normalize``, ``rescale`` (``"l1"``/True, ``"inverse_density"``, False), ``lambda``;
        for ``ram``: ``face`` (``mergekit`` | ``seed003`` | ``arm`` | ``arm-r`` | ``arm-r-v2`` =
        ``authors`` | ``tensor_local``), ``epsilon``, ``r``, ``alpha``, ``lambda``, ``q``.
        For the global faces (``arm-r``, ``arm-r-v2``) this tensor is the whole model.
    Returns:
      the merged float32 weights ``θ``, shape ``S`` (a JAX array).
    """
    spec = get_method(method)
    tensors = [np.asarray(t, dtype=np.float32) for t in tensors]
    if base is None:
        if spec.needs_base:
            raise UnmergeError(f"merge method {method!r} needs a base model; pass base (base_model: in a config)")
        if not tensors:
            raise UnmergeError(f"merge method {method!r} needs at least one model to merge")
        base = np.zeros_like(tensors[0])
        deltas = True
    base = np.asarray(base, dtype=np.float32)
    k = len(tensors)
    check_shapes(base.shape, [t.shape for t in tensors], [f"model {i}" for i in range(k)], name)
    per_model = [{} for _ in range(k)]
    for pname in ("weight", "density"):
        v = params.pop(pname, None)
        if v is None:
            continue
        if np.ndim(v) == 0:
            params[pname] = v
        else:
            _per_model_list(pname, v, k, per_model)
    if weights is not None:
        _per_model_list("weight", weights, k, per_model)
    res = resolve(method, k, params, per_model, where=name)
    return jnp.asarray(run_kernel(res, base, tuple(tensors), seed=seed, name=name, deltas=deltas))


def _per_model_list(pname, values, k, per_model):
    values = list(np.ravel(np.asarray(values, dtype=object)))
    if len(values) != k:
        raise UnmergeError(f"{len(values)} {pname} value(s) given for {k} model(s); give one per model")
    for p, v in zip(per_model, values):
        p[pname] = v
