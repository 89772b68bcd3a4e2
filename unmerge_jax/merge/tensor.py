"""Merging one tensor: any registered method, chunk by chunk (:func:`merge_resolved`), and the
in-memory entry point :func:`merge_tensors`.

The code here is the same for every method: it runs the statistics pass the method asks for
(``MergeMethod.statistics``: none, a per-tensor pass with O(K) state, or — in memory, where this
tensor is the whole model — the whole-model counting pass), then the method's apply kernel over
the same chunks. No float32 tensor-sized temporary is created besides the output, and the result
does not depend on the chunk size. A non-finite input or merged entry is a
:class:`~unmerge_jax.merge.chunks.NonFinite` error naming the tensor and the first index (the
apply kernels mark such entries; no extra pass over the inputs). :func:`merge_streamed` runs the
same chunks over entries read on demand from the sources, for tensors too large to hold.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.merge.base import Resolved, merge_key
from unmerge_jax.merge.chunks import CHUNK, NonFinite, TensorChunks
from unmerge_jax.merge.params import get_method, resolve


def merge_resolved(res: Resolved, base, tensors, *, seed: int = 0, name: str = "", deltas: bool = True,
                   model_stats=None, chunk: int = CHUNK, out: np.ndarray | None = None,
                   limit: float = np.inf, diagnostics: dict | None = None) -> np.ndarray:
    """Run a resolved method on one tensor, streamed in chunks of ``chunk`` elements.

    Args:
      res: the resolved method (:func:`~unmerge_jax.merge.params.resolve`).
      base, tensors: the base (shape ``S``) and K inputs of the same shape (checked by the caller).
      seed, name: key the method's random draws (DARE) by ``(seed, name)``.
      deltas: ``tensors`` are task vectors (else fine-tuned weights; δ is formed per chunk).
      model_stats: for a method with a whole-model pass, its (K,) result over the whole model
        (the driver's counting pass); None: this tensor is the whole model.
      chunk: elements per kernel call.
      out: float32 buffer of shape ``S`` for the result; may be ``base`` itself.
      limit: every merged value must be finite and below this in magnitude (the largest float32
        the output dtype holds; ``inf`` for float32 outputs).
      diagnostics: a dict that receives ``diagnostics[name]``, the per-tensor report of a method
        whose statistics carry one (``stats.diagnostics``, e.g. karcher's convergence).
    Returns:
      the merged float32 NumPy array (``out`` when given).
    Raises:
      NonFinite: an input entry is NaN/Inf, or a merged one is not finite or not below ``limit``.
    """
    chunks = TensorChunks(base, tensors, deltas=deltas, chunk=chunk, out=out, limit=limit,
                          rows=res.method.whole_rows(res))
    run_chunks(res, chunks, seed=seed, name=name, model_stats=model_stats, diagnostics=diagnostics)
    return chunks.out


def merge_streamed(res: Resolved, blocks, shape, k: int, *, sink, seed: int = 0, name: str = "",
                   deltas: bool = True, model_stats=None, chunk: int = CHUNK, limit: float = np.inf,
                   diagnostics: dict | None = None) -> None:
    """:func:`merge_resolved` over entries read on demand, the merged chunks handed to ``sink``.

    The same chunks and kernel calls as the in-memory merge (so the same bits), but no
    tensor-sized buffer: ``blocks.get(start, stop)`` reads each chunk's base and K inputs when a
    walk of the method needs them (a statistics pass may walk several times; each walk reads
    again), and ``sink(start, merged)`` receives each checked float32 chunk of the result at its
    flat offset (in order for every registered method).

    Args:
      res: the resolved method.
      blocks: the reader (see :meth:`~unmerge_jax.merge.chunks.TensorChunks.streamed`).
      shape: the tensor's shape; k: the number of inputs.
      sink: ``sink(start, merged)``.
      seed, name, deltas, model_stats, chunk, limit, diagnostics: as for :func:`merge_resolved`.
    Raises:
      NonFinite: an input entry is NaN/Inf, or a merged one is not finite or not below ``limit``.
    """
    chunks = TensorChunks.streamed(blocks, shape, k, deltas=deltas, chunk=chunk, sink=sink, limit=limit,
                                   rows=res.method.whole_rows(res))
    run_chunks(res, chunks, seed=seed, name=name, model_stats=model_stats, diagnostics=diagnostics)


def run_chunks(res: Resolved, chunks: TensorChunks, *, seed: int = 0, name: str = "", model_stats=None,
               diagnostics: dict | None = None) -> None:
    """The statistics pass ``res.method`` asks for over ``chunks``, then its apply pass (the body
    of :func:`merge_resolved` and :func:`merge_streamed`)."""
    method = res.method
    key = merge_key(seed, name)
    kind = method.statistics(res)
    stats = None
    try:
        # A NaN/Inf input may give the statistics pass NaN thresholds or scales; the apply kernel
        # then marks the entries and store() refuses them, so the arithmetic warnings are noise.
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            if kind == "tensor":
                stats = method.tensor_stats(res, chunks, key)
            elif kind == "model":
                stats = model_stats if model_stats is not None else method.finish(res, method.count(res, chunks))
            method.apply(res, chunks, stats, key)
    except NonFinite as err:
        raise err.named(name) from None
    except UnmergeError as err:   # a tensor the method cannot merge (multislerp's zero mean): name it
        if name and name not in str(err):
            raise UnmergeError(f"tensor {name}: {err}") from None
        raise
    if diagnostics is not None and getattr(stats, "diagnostics", None) is not None:
        diagnostics[name] = stats.diagnostics


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
        ram, ramplus_tl, breadcrumbs, breadcrumbs_ties, della, della_linear, sce, model_stock).
      base: base weights, shape ``S``; ``None`` only for ``linear`` (then ``tensors`` are merged
        as full weights onto a zero base).
      tensors: K arrays of shape ``S`` (a list or a stacked ``(K, *S)`` array). By default these
        are **task vectors** ``δ_k = θ_k − θ_base``; pass ``deltas=False`` for fine-tuned weights.
      weights: K per-model weights (default 1 each).
      seed, name: key DARE's random masks by ``(seed, name)`` (see ``kernels.random``).
      **params: the method's mergekit parameters, e.g. ``density`` (scalar or K values),
        ``normalize``, ``rescale`` (``"l1"``/True, ``"inverse_density"``, False), ``lambda``;
        ``gamma`` (breadcrumbs), ``epsilon`` (della; per-model like ``density``), ``select_topk``
        (sce), ``filter_wise`` (model_stock); for ``ram``: ``face`` (one of
        ``unmerge_jax.merge.methods.ram.FACES`` or an alias),
        ``epsilon``, ``r``, ``alpha``, ``lambda``, ``q``. For the whole-model faces
        (``overlap_changed``, ``overlap_unique``) this tensor is the whole model.
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
    for pname in spec.per_model:   # weight, density, gamma, epsilon: a scalar or K values
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
    return jnp.asarray(merge_resolved(res, base, tuple(tensors), seed=seed, name=name, deltas=deltas))


def _per_model_list(pname, values, k, per_model):
    values = list(np.ravel(np.asarray(values, dtype=object)))
    if len(values) != k:
        raise UnmergeError(f"{len(values)} {pname} value(s) given for {k} model(s); give one per model")
    for p, v in zip(per_model, values):
        p[pname] = v
