"""Streaming merge driver: base + K inputs, one tensor at a time, into a sharded safetensors dir.

The inputs are tensor sources (``unmerge_jax.sources``): the base a :class:`CheckpointSource`, each
input a :class:`TaskVector` over it — fine-tuned weights from a model directory, or ``ΔW =
B@A·α/r`` from a PEFT LoRA adapter (adapters are merged in ΔW space, never A and B separately).
For every tensor of the base model (in sorted name order) the method runs chunk by chunk (its
statistics pass, if any, then its apply kernel). A tensor of at most ``whole_max`` entries is read
whole as float32 (base and K inputs, ``merge.tensor.merge_resolved`` into the base buffer), cast to
the output dtype and appended to its shard. A larger one is **streamed by row blocks**
(``merge.tensor.merge_streamed`` over :class:`_RowBlocks`): every walk of the method reads each
chunk's base and K inputs from the sources again (page cache for files, regeneration for a
virtual source) and each merged chunk is cast and written at its offset in the shard
(``ShardedWriter.write_part``). The chunks and kernel calls are the same either way, so the bits
are too; peak memory is ≈ (1 + K) × min(largest tensor, ``whole_max``) × 4 bytes + (1 + K + 1)
chunks + a constant, whatever the model (measured in ``tests/test_merge_rows.py`` and
``bench/merge_scale.py``). Inputs whose rows cannot be read exactly on their own (a LoRA ``ΔW``,
whose row-block product rounds differently from ``B @ A``; a vocabulary realigned to a new
tokenizer) are formed whole for the tensor and sliced. A method with a whole-model statistics
pass (the ``overlap_*`` RAM faces) gets it first, over all tensors (it reads the inputs once more).

Everything that headers and configs can tell is checked before the output directory is created
(unknown method/parameter, density, weights, seed, shapes, dtypes, missing or extra tensors,
architecture, an output that exists or overlaps an input); the output is written to a temporary
directory under an exclusive lock (``io.atomic.atomic_dir``, given every input path) and renamed
at the end, so a failure leaves nothing behind and never touches an input. Values are checked as
they stream: a NaN/Inf in any input tensor, or a merged value that is not finite or does not fit
the output dtype (float16 overflows beyond ±65504), is an error naming the file, the tensor and the
first index — the apply kernels mark such entries in the pass they make anyway, and only then are
the inputs read again to name the culprit.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.hostmem import aligned_empty
from unmerge_jax.io.atomic import atomic_dir, check_output
from unmerge_jax.io.dtypes import NP_DTYPES, TORCH_NAMES, dtype_tag, to_float32
from unmerge_jax.io.lora import is_adapter_dir
from unmerge_jax.io.names import parse_tensor_name
from unmerge_jax.io.writer import DEFAULT_SHARD_BYTES, ShardedWriter, copy_side_files, write_config
from unmerge_jax.merge.base import short
from unmerge_jax.merge.card import CONFIG_NAME, write_recipe  # noqa: F401  (CONFIG_NAME: where the recipe is)
from unmerge_jax.merge.chunks import BASE, CHUNK, OUTPUT, NonFinite, TensorChunks, scratch
from unmerge_jax.merge.config import MergeConfig, layer_fraction, load_config, resolve_for_tensor
from unmerge_jax.merge.mergekit_bf16 import check_compute_dtype, merge_tensor_bf16, output_tag as bf16_output_tag
from unmerge_jax.merge.params import get_method, resolve
from unmerge_jax.merge.refs import LoraApplied, weights_source
from unmerge_jax.merge.tensor import merge_resolved, merge_streamed
from unmerge_jax.merge import tokenizer as tokenization
from unmerge_jax.progress import progress
from unmerge_jax.sources import (WEIGHTS, AdapterSource, CheckpointSource, TaskVector, check_same_architecture,
                                 first_nonfinite, nonfinite_error, open_source, task_vector)
from unmerge_jax.stats import check_seed

# Tensors of more entries than this are merged by row blocks (streamed from the sources); smaller
# ones are read whole (one pread per input into reused buffers; (1 + K) × 16 MiB at most).
WHOLE_MAX = 1 << 22


@dataclass
class MergeResult:
    """What :func:`merge` wrote."""

    out: Path
    n_tensors: int
    n_merged: int          # tensors that went through the kernel (others are the base, unchanged)
    bytes_written: int
    seconds: float
    lambdas: list | None = None   # per-model numbers of a whole-model pass (RAM's unique-region scales)
    skipped: tuple = ()           # side files not copied: links to files outside the source model directory
    notes: tuple = ()             # one-line notes printed at run time (mergekit semantics, tokenizer, ignored parameters)
    diagnostics: dict = field(default_factory=dict)   # tensor name → a method's per-tensor report (karcher)


def _note(notes: list, text: str) -> None:
    """Keep one note for the :class:`MergeResult` (the CLI prints them, ``note: …`` on stderr)."""
    notes.append(text)


class _Buffers:
    """Reusable read buffers, one per slot, each grown once to the largest tensor.

    A stored-float32 tensor is read into a buffer with one ``pread`` (``source.read(name,
    out=buf)``): reading into pages already mapped runs at ≈ 7–9 GB/s here against ≈ 1.5 GB/s into
    a fresh allocation, whose page faults dominated the merge's time. Buffers are 64-byte aligned
    (:func:`aligned_empty`), and so is every chunk of them: XLA:CPU takes an aligned NumPy argument
    without copying, but copies a misaligned one on every kernel call. A tensor read into a slot is
    valid until the next read into that slot.
    """

    def __init__(self, largest: int):
        self.largest, self._bufs = largest, {}

    def out(self, src, name: str, slot: int):
        """The buffer for reading ``name`` of ``src`` into ``slot``, or None (not stored as float32:
        it is converted into a fresh array, and a copy into the buffer would add a pass)."""
        if src.dtype(name) != "F32":
            return None
        need = src.nbytes(name)
        buf = self._bufs.get(slot)
        if buf is None or buf.size < need:
            buf = self._bufs[slot] = aligned_empty(max(need, self.largest))
        return buf


def _open_inputs(cfg: MergeConfig, vocab=None):
    """``(base, models)``: the base source (None without ``base_model``; ``base+lora``: the adapter
    applied on the fly) and one source per input — a :class:`TaskVector` over the base, or (no
    base, or ``linear`` averaging the base in) the full weights themselves — checked from headers.
    A ``model+lora`` input is the model's weights with the adapter applied (:mod:`unmerge_jax.merge.refs`).
    With ``vocab`` (an :class:`~unmerge_jax.merge.tokenizer.AlignedVocabulary`) every full-weight
    source has its vocabulary tensors aligned to the output tokenizer."""
    def aligned(src):
        if vocab is None or src.kind != WEIGHTS:
            return src
        return vocab.wrap(src, vocab.index_of(src.path))

    refs = cfg.refs
    if cfg.base_model is not None:
        base = aligned(weights_source(cfg.base_ref))
        # linear with the base averaged in (base_input): normalised, Σ w_k θ_k / Σ w_k = θ_b + Σ w_k δ_k / Σ w_k
        # with the base an input whose task vector is 0 (so a row every input shares stays exact);
        # not normalised, mergekit's Σ w_k θ_k needs every input, the base too, as full weights.
        full = (cfg.base_input is not None and not resolve_for_tensor(cfg, "", 0.0).shared["normalize"]
                and not any(r.lora is None and is_adapter_dir(r.model) for r in refs))
        if not full:
            return base, [task_vector(base, aligned(_input(r, cfg, base))) for r in refs]
    models = [aligned(weights_source(r) if r.lora is not None else open_source(r.model, kind=WEIGHTS)) for r in refs]
    for r, m in zip(refs, models):
        if m.kind != WEIGHTS:
            raise UnmergeError(f"{r.model} is a LoRA adapter; merging it needs base_model")
    for m in models[1:]:
        check_same_architecture(models[0], m)
    return None, models


def _input(ref, cfg: MergeConfig, base):
    """The source a task vector over ``base`` is formed from: the model (or adapter) directory, or
    full weights (``model+lora``; an adapter directory over a ``base+lora``, whose update is
    relative to the plain base)."""
    if ref.lora is not None:
        return weights_source(ref)
    if cfg.base_lora is not None and is_adapter_dir(ref.model):
        return LoraApplied(cfg.base_model, ref.model)
    return open_source(ref.model, base=base)


def _untouched(base, models, name: str) -> bool:
    """True when no input changes ``name`` (every input an adapter that skips it): the merge is the base."""
    return base is not None and not any(m.touches(name) for m in models)


def _read(base, models, name: str, bufs: _Buffers, base_slot: int = 0):
    """``(base, tensors, deltas)`` of one tensor, float32. The base is read once, into buffer
    ``base_slot`` (``overlap`` alternates two, see :func:`merge`), input ``i`` into slot ``i + 1``.
    With only full-weight inputs the tensors are the fine-tuned weights (``deltas=False``: the
    kernel forms δ itself, no extra copy); otherwise task vectors. NaN/Inf pass through silently
    here (the merge kernels mark them, and the driver names them)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return _read_parts(base, models, name, bufs, base_slot)


def _read_parts(base, models, name: str, bufs: _Buffers, base_slot: int):
    if base is None:   # full weights merged onto zeros
        ts = tuple(m.read(name, out=bufs.out(m, name, i + 1)) for i, m in enumerate(models))
        return np.zeros(models[0].shape(name), np.float32), ts, True
    b = base.read(name, out=bufs.out(base, name, base_slot))
    parts = [m.parts(name, out=bufs.out(m, name, i + 1)) for i, m in enumerate(models)]
    if all(relative for _, relative in parts):
        return b, tuple(a for a, _ in parts), False
    ts = []
    for a, relative in parts:
        if a is None:
            a = np.zeros(b.shape, np.float32)
        elif relative:
            a = a if a.flags.writeable else a.copy()
            a -= b
        ts.append(a)
    return b, tuple(ts), True


def _numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _flat_reader(src, name: str, shape):
    """``read(start, stop, out) -> out``: flat entries ``start:stop`` of ``name`` of ``src`` as float32
    into the float32 buffer ``out`` (length ``stop − start``). A checkpoint reads just those bytes
    (one ``pread``; other dtypes converted as a whole read converts them), a source with exact
    row reads the rows that cover them; any other source (a LoRA ``ΔW``, a realigned vocabulary)
    forms the tensor whole once, here, and is sliced."""
    if isinstance(src, CheckpointSource):
        tag = src.dtype(name)
        if tag == "F32":
            return lambda a, b, out: src.read_raw_flat(name, a, b, out=out)
        itemsize = NP_DTYPES[tag].itemsize

        def converted(a, b, out):
            return to_float32(src.read_raw_flat(name, a, b, out=scratch(("stage",), (b - a) * itemsize)), out)
        return converted
    if src.exact_rows(name) and len(shape) >= 1:
        row = _numel(shape[1:])

        def rows(a, b, out):
            r0 = a // row
            got = src.read_rows(name, r0, -(-b // row)).reshape(-1)
            np.copyto(out, got[a - r0 * row:b - r0 * row])
            return out
        return rows
    held = src.read(name).reshape(-1)

    def whole(a, b, out):
        np.copyto(out, held[a:b])
        return out
    return whole


class _RowBlocks:
    """The blocks of one tensor for :meth:`TensorChunks.streamed`: flat entries of the base and the K
    inputs read from the sources on each request, into reused aligned per-thread buffers, combined
    as :func:`_read` combines whole tensors (task vectors, or the fine-tuned weights themselves
    when every input is full weights: ``deltas``). No tensor-sized buffer except for inputs that
    must be formed whole (see :func:`_flat_reader`)."""

    def __init__(self, base, models, name: str, shape):
        self.shape, self.k = tuple(shape), len(models)
        if base is None:   # full weights merged onto zeros
            self._base, self._inputs, self.deltas = None, [(_flat_reader(m, name, shape), False) for m in models], True
            return
        self._base = _flat_reader(base, name, shape)
        parts = []
        for m in models:
            if isinstance(m, TaskVector):
                parts.append((_flat_reader(m.source, name, shape), m.relative) if m.touches(name) else (None, False))
            else:
                parts.append((_flat_reader(m, name, shape), False))
        self.deltas = not all(relative for _, relative in parts)
        self._inputs = parts if self.deltas else [(read, False) for read, _ in parts]

    def get(self, start: int, stop: int):
        size = stop - start
        nbytes = 4 * size

        def buf(slot):
            return scratch(("rows", slot), nbytes).view(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            if self._base is None:
                b = buf(0)
                b[...] = 0.0
            else:
                b = self._base(start, stop, buf(0))
            ts = []
            for i, (read, relative) in enumerate(self._inputs):
                if read is None:
                    t = buf(i + 1)
                    t[...] = 0.0
                else:
                    t = read(start, stop, buf(i + 1))
                    if relative:
                        np.subtract(t, b, out=t)
                ts.append(t)
        return b, tuple(ts)


def _streams(n: int, whole_max: int, compute: str = "float32") -> bool:
    """Whether a tensor of ``n`` entries is merged by row blocks."""
    return n > whole_max and compute == "float32"


def _n_layers(ref, names):
    cfg = getattr(ref, "config", None) or {}
    n = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    if n:
        return int(n)
    idx = [i for i in (parse_tensor_name(n).layer for n in names) if i is not None]
    return max(idx) + 1 if idx else None


def _model_pass(base, models, names, res_by_name, first, bufs: _Buffers, chunk: int,
                whole_max: int = WHOLE_MAX) -> np.ndarray:
    """The whole-model statistics pass: the method's additive counts over every merged tensor, then
    its per-model numbers (one set for the whole model: the face and r of the first tensor)."""
    method, totals = first.method, 0
    ref = base if base is not None else models[0]
    for name in progress(names, desc="counting pass"):
        if name not in res_by_name or _untouched(base, models, name):
            continue
        res = res_by_name[name]
        shape = tuple(ref.shape(name))
        if _streams(_numel(shape), whole_max):
            blocks = _RowBlocks(base, models, name, shape)
            chunks = TensorChunks.streamed(blocks, shape, len(models), deltas=blocks.deltas, chunk=chunk, sink=None,
                                           rows=method.whole_rows(res))
        else:
            b, ts, deltas = _read(base, models, name, bufs)
            chunks = TensorChunks(b, ts, deltas=deltas, chunk=chunk, out=b, rows=method.whole_rows(res))
        totals = totals + method.count(res, chunks)
        del chunks
    return method.finish(first, totals)


def output_limit(tag: str) -> np.float32:
    """The smallest float32 magnitude that the output dtype ``tag`` cannot hold: casting it rounds
    to ±inf (float16: 65520, bfloat16: ≈3.3962e38; float32 and float64: inf). A merged value must
    stay below it."""
    dt = NP_DTYPES[tag]
    if dt.itemsize >= 4:
        return np.float32(np.inf)
    lo, hi = 0, 0x7F800000   # bit patterns of non-negative float32: monotone in the value
    with np.errstate(over="ignore"):
        while hi - lo > 1:    # invariant: lo casts to a finite value, hi to inf
            mid = (lo + hi) // 2
            if np.isfinite(np.array(mid, np.uint32).view(np.float32).astype(dt).astype(np.float32)):
                lo = mid
            else:
                hi = mid
    return np.array(hi, np.uint32).view(np.float32)[()]


def _positive_int(what: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UnmergeError(f"{what} must be a positive integer, got {short(value)}")
    return int(value)


def _check_values(name: str, arr: np.ndarray, limit, src, start: int = 0, shape=None) -> None:
    """A tensor (or the flat entries from ``start`` of a tensor of ``shape``) copied from ``src``
    unmerged: finite and within the output dtype (two NumPy reductions, which propagate NaN; the
    index is searched only on failure)."""
    if arr.size == 0 or arr.dtype.kind != "f":
        return
    lo, hi = arr.min(), arr.max()
    if -limit < lo and hi < limit:
        return
    shape = arr.shape if shape is None else tuple(shape)
    flat = arr.reshape(-1)

    def at(i):
        idx = tuple(int(j) for j in np.unravel_index(start + i, shape))
        return idx[0] if len(idx) == 1 else idx
    if first_nonfinite(flat) is not None:
        raise nonfinite_error(name, src.where(name), flat, start=start, shape=shape)
    bad = np.flatnonzero(np.abs(flat) >= limit)[0]
    raise UnmergeError(f"tensor {name} of {src.where(name)} holds {flat[bad]:g} at index "
                       f"{at(bad)}, beyond the output dtype's range (|x| ≥ {limit:.6g} "
                       f"rounds to inf); write a wider dtype (--dtype float32 or out_dtype)")


def _nonfinite_in(src, name: str, chunk: int = CHUNK, whole_max: int = WHOLE_MAX):
    """The one-line error naming the first NaN/Inf of tensor ``name`` of ``src``, or None when it is
    finite; a large tensor is read block by block (as the merge streamed it)."""
    shape = tuple(src.shape(name))
    n = _numel(shape)
    if not _streams(n, whole_max) or not (isinstance(src, CheckpointSource) or src.exact_rows(name)):
        arr = src.read(name)
        return nonfinite_error(name, src.where(name), arr) if first_nonfinite(arr) is not None else None
    read = _flat_reader(src, name, shape)
    for a in range(0, n, chunk):
        blk = read(a, min(a + chunk, n), scratch(("scan",), 4 * (min(a + chunk, n) - a)).view(np.float32))
        if first_nonfinite(blk) is not None:
            return nonfinite_error(name, src.where(name), blk, start=a, shape=shape)
    return None


def _explain(err: NonFinite, name: str, base, models, tag: str, rerun) -> UnmergeError:
    """The slow path of a tensor that failed the kernels' check: re-read the culprit from its file
    to name the file, the tensor and the first index (and, for a LoRA adapter, the factor)."""
    if err.culprit == BASE:
        found = _nonfinite_in(base, name)
        return found if found is not None else err
    if err.culprit == OUTPUT:
        at = err.index[0] if len(err.index) == 1 else err.index
        value = rerun()
        if value is None or not np.isfinite(value):
            return UnmergeError(f"the merged value of tensor {name} at index {at} is not finite in float32 (every "
                                f"input is finite there): the weights, lambda or rescale overflow — use smaller "
                                f"weights")
        wider = "float32" if tag == "BF16" else "float32 or bfloat16"
        return UnmergeError(f"the merged value of tensor {name} at index {at} is {value:g}, beyond the range of "
                            f"{TORCH_NAMES[tag]} (|x| ≥ {err.limit:.6g} rounds to inf); write {wider} (--dtype, "
                            f"out_dtype) or use smaller weights")
    k = err.culprit[1] if isinstance(err.culprit, tuple) else err.culprit
    m = models[k]
    src = getattr(m, "source", m)
    if isinstance(src, AdapterSource):
        for key, arr in src.factors(name).items():
            if first_nonfinite(arr) is not None:
                return nonfinite_error(key, src.where(name), arr)
        return UnmergeError(f"the LoRA update B@A·scale of {src.where(name)} for tensor {name} overflows float32 "
                            f"(scale {src.scale(name):g}); check lora_alpha and the factors")
    found = _nonfinite_in(src, name)
    if found is not None:
        return found
    at = err.index[0] if len(err.index) == 1 else err.index
    return UnmergeError(f"the task vector of tensor {name} ({src.where(name)} − the base) overflows float32 at index "
                        f"{at}: the two are not a fine-tune and its base — check base_model")


def merge(config, out, *, seed: int = 0, force: bool = False, dtype: str | None = None,
          shard_bytes: int = DEFAULT_SHARD_BYTES, overlap: bool = False, chunk: int = CHUNK,
          compute_dtype: str | None = None, whole_max: int = WHOLE_MAX) -> MergeResult:
    """Merge the models of a mergekit-style config into ``out`` (a new directory).

    Args:
      config: path to a YAML file, a YAML string, a dict in mergekit's schema, or a
        :class:`MergeConfig`.
      out: output directory; refused if it exists unless ``force``, and whenever it is, lies
        inside or (with ``force``) contains an input (the config file, base, models, adapters).
      seed: keys DARE's random masks together with each tensor's name; an integer in
        ``[0, 2**32 − 1]``.
      dtype: output dtype (``float32``/``float16``/``bfloat16``); default the config's
        ``out_dtype``, then ``dtype``, then the base's stored dtype. Computation is float32.
      shard_bytes: maximum bytes per output shard.
      overlap: read the next tensor and write the previous one in threads while the kernel runs
        (faster, at the price of one more base buffer of a whole-read tensor and a few chunks).
      chunk: elements per kernel call (results do not depend on it).
      whole_max: tensors of more entries than this are merged by row blocks, streamed from the
        inputs (results do not depend on it; 0 streams every tensor). Float32 compute only: the
        ``bfloat16`` compute path reads tensors whole.
      compute_dtype: ``float32`` (default: inputs of any dtype merged in float32, rounded once on
        output) or ``bfloat16`` (mergekit's arithmetic with ``dtype: bfloat16``, bit for bit, for
        the methods of :data:`unmerge_jax.merge.mergekit_bf16.BF16_METHODS`).
    Returns:
      a :class:`MergeResult` (``skipped``: side files not copied because they link outside the
      source model directory; ``notes``: the notes printed to stderr).
    Raises:
      UnmergeError: bad input of any kind (one line; nothing is written).
    """
    t0 = time.perf_counter()
    seed = check_seed(seed)
    shard_bytes = _positive_int("shard_bytes (the output shard size)", shard_bytes)
    chunk = _positive_int("chunk", chunk)
    if isinstance(whole_max, (bool, np.bool_)) or not isinstance(whole_max, (int, np.integer)) or whole_max < 0:
        raise UnmergeError(f"whole_max must be a whole number ≥ 0, got {short(whole_max)}")
    cfg = load_config(config)
    compute = check_compute_dtype(compute_dtype, cfg.merge_method)
    notes: list = []
    for text in (*cfg.notes, *ignored_parameters(cfg)):
        _note(notes, text)
    if cfg.dtype in ("bfloat16", "float16") and compute == "float32":
        _note(notes, f"dtype: {cfg.dtype}: merging in float32 and rounding once on output (mergekit computes in "
                     f"{cfg.dtype}; --compute-dtype bfloat16 reproduces its bfloat16 merge bit for bit)")
    if cfg.slices is not None:
        from unmerge_jax.merge.slices import merge_slices

        return merge_slices(cfg, out, seed=seed, force=force, dtype=dtype, shard_bytes=shard_bytes, compute=compute,
                            chunk=chunk, notes=notes, t0=t0)
    out = Path(out)
    inputs = [*cfg.input_paths, *tokenization.extra_inputs(cfg.tokenizer)]
    check_output(out, inputs, directory=True, force=force)   # before any reading; again by atomic_dir
    toks = tokenization.prepare(cfg.tokenizer, cfg.base_model, [p for p, _ in cfg.models])
    base, models = _open_inputs(cfg, toks if isinstance(toks, tokenization.AlignedVocabulary) else None)
    ref = base if base is not None else models[0]
    names = list(ref.names)
    shapes = {n: tuple(ref.shape(n)) for n in names}
    whole = [_numel(s) for s in shapes.values() if compute != "float32" or not _streams(_numel(s), whole_max)]
    bufs = _Buffers(4 * max(whole, default=0))
    n_layers = _n_layers(ref, names)
    res_by_name = {}
    for name in names:
        if ref.is_float(name):
            res_by_name[name] = resolve_for_tensor(cfg, name, layer_fraction(name, n_layers))
    stored = [ref.dtype(n) for n in names if n in res_by_name]
    tag = dtype_tag(dtype or cfg.out_dtype or cfg.dtype or (max(set(stored), key=stored.count) if stored else "F32"))
    tag = bf16_output_tag(tag, compute, cfg.merge_method, dtype or cfg.out_dtype)   # mergekit's float32 ramplus_tl
    lambdas = None
    first = next(iter(res_by_name.values()), None)
    plan = [(n, shapes[n], tag if n in res_by_name else ref.dtype(n)) for n in names]
    n_merged = 0
    diagnostics: dict = {}
    with atomic_dir(out, force=force, inputs=inputs) as tmp:
        if first is not None and first.method.statistics(first) == "model":
            lambdas = _model_pass(base, models, names, res_by_name, first, bufs, chunk, whole_max)
        with ShardedWriter(tmp, plan, max_shard_bytes=shard_bytes,
                           metadata={"merged_by": "unmerge_jax", "merge_method": cfg.merge_method}) as writer:
            n_merged = write_merged(base, models, names, res_by_name, writer, tag=tag, seed=seed, chunk=chunk,
                                    overlap=overlap, compute=compute, model_stats=lambdas, diagnostics=diagnostics,
                                    whole_max=whole_max, bufs=bufs)
            total = writer.total_size
        src = cfg.base_model if cfg.base_model is not None else cfg.models[0][0]
        write_config(src, tmp, tag)
        side = copy_side_files(src, tmp)
        if toks is not None:   # a built tokenizer (or the base's with a chat template) replaces the copied files
            toks.write(tmp)
        lam = None if lambdas is None else [float(x) for x in lambdas]
        write_recipe(tmp, {**cfg.to_dict(), "out_dtype": TORCH_NAMES[tag]}, out.name, seed=seed,
                     run={"seed": int(seed), "lambdas": lam})
    return MergeResult(out, len(names), n_merged, total, time.perf_counter() - t0, lam, tuple(side.skipped),
                       tuple(notes) + (tuple(toks.notes) if toks is not None else ()),
                       {n: diagnostics[n] for n in names if n in diagnostics})


def write_merged(base, models, names, res_by_name: dict, writer, *, tag: str = "F32", seed: int = 0,
                 chunk: int = CHUNK, overlap: bool = False, compute: str = "float32", model_stats=None,
                 diagnostics: dict | None = None, whole_max: int = WHOLE_MAX, bufs: _Buffers | None = None) -> int:
    """Merge every tensor of ``names`` from the sources into ``writer``, in order (the body of
    :func:`merge`, also the entry point for sources that are not directories, e.g. virtual ones).

    Args:
      base: the base source (None: full-weight inputs merged onto zeros); models: the K input
        sources (task vectors over ``base``, or full weights without it; see :func:`_open_inputs`).
      names: the tensors, in the writer's planned order.
      res_by_name: ``{name: Resolved}`` for the tensors to merge; any other tensor is copied from
        the base (or the first input) as stored.
      writer: a :class:`~unmerge_jax.io.writer.ShardedWriter` (or anything with its ``write`` and
        ``write_part``, e.g. :class:`~unmerge_jax.io.writer.NullWriter`).
      tag: the output dtype tag (the merged values must fit it).
      seed, chunk, overlap, whole_max: as for :func:`merge`; compute: ``"float32"`` or ``"bfloat16"``.
      model_stats: the whole-model pass's (K,) numbers for a ``"model"`` method (:func:`_model_pass`).
      diagnostics: receives the methods' per-tensor reports.
      bufs: the read buffers of whole-read tensors (default: new ones).
    Returns:
      how many tensors went through a merge kernel.
    """
    limit = output_limit(tag)
    ref = base if base is not None else models[0]
    bufs = bufs if bufs is not None else _Buffers(0)
    lambdas = model_stats
    # The merged tensor overwrites the base buffer it was computed in, so that buffer is busy
    # until the output is written. Serially one base buffer is enough; with overlap the next
    # tensor is read while the previous one is written, into the other of two base buffers:
    # the K input buffers are free again once the kernel has run, so overlap costs one tensor
    # (2 + K), not a second input set. A streamed tensor needs no buffer: its chunks go to
    # ``emit`` as they are merged.
    free_slots: queue.Queue = queue.Queue()
    for slot in ((0, -1) if overlap else (0,)):
        free_slots.put(slot)

    def produce(name, emit):
        shape = tuple(ref.shape(name))
        streamed = _streams(_numel(shape), whole_max, compute)
        if name not in res_by_name or _untouched(base, models, name):
            # Unmerged: float tensors as float32 (cast on write), others as stored.
            if name in res_by_name and streamed:
                read, n = _flat_reader(ref, name, shape), _numel(shape)
                for a in range(0, n, chunk):
                    b = min(a + chunk, n)
                    blk = read(a, b, scratch(("copy",), 4 * (b - a)).view(np.float32))
                    _check_values(name, blk, limit, ref, start=a, shape=shape)
                    emit(name, a, blk)
                return name, None, False, None
            out = ref.read(name) if name in res_by_name else ref.read_raw(name)
            if name in res_by_name:
                _check_values(name, out, limit, ref)
            return name, out, False, None
        if compute == "bfloat16":
            slot = free_slots.get()
            b, ts, deltas = _read(base, models, name, bufs, base_slot=slot)
            return name, _merge_bf16(name, res_by_name[name], b, ts, deltas, base, models, limit), True, slot
        slot = None if streamed else free_slots.get()
        try:
            out = merge_one(name, shape, limit, lambda a, m: emit(name, a, m), bufs, slot, diagnostics)
        except NonFinite as err:
            raise _explain(err, name, base, models, tag, lambda: _rerun(name, err.index)) from None
        return name, out, True, slot

    def merge_one(name, shape, limit, sink, bufs, slot, diagnostics):
        """Tensor ``name`` merged by its method: by row blocks into ``sink(start, chunk)`` (returns
        None), or read whole into buffer ``slot`` of ``bufs`` and merged in place over the base
        (returns the float32 array). Every method runs chunk by chunk (a statistics pass first where
        it needs one): the only tensor-sized buffers are the whole path's 1 + K inputs."""
        if _streams(_numel(shape), whole_max, compute):
            blocks = _RowBlocks(base, models, name, shape)
            merge_streamed(res_by_name[name], blocks, shape, len(models), sink=sink, seed=seed, name=name,
                           deltas=blocks.deltas, model_stats=lambdas, chunk=chunk, limit=limit,
                           diagnostics=diagnostics)
            return None
        b, ts, deltas = _read(base, models, name, bufs, base_slot=slot)
        out = b if b.flags.writeable else b.copy()
        merge_resolved(res_by_name[name], out, ts, seed=seed, name=name, deltas=deltas, model_stats=lambdas,
                       chunk=chunk, out=out, limit=limit, diagnostics=diagnostics)
        return out

    def _rerun(name, index):
        """The slow path's merged value at ``index`` without the output-dtype bound, from a
        fresh read (None if it is not finite in float32 either)."""
        shape = tuple(ref.shape(name))
        flat, got = int(np.ravel_multi_index(index, shape)) if shape else 0, []

        def pick(a, m):
            if a <= flat < a + m.size:
                got.append(float(m[flat - a]))
        try:
            merged = merge_one(name, shape, np.inf, pick, _Buffers(0), 0, None)
        except NonFinite:
            return None
        if merged is not None:
            return float(merged[index])
        return got[0] if got else None

    def written(slot):
        if slot is not None:
            free_slots.put(slot)

    n_merged = 0
    for merged in _stream(names, produce, writer, overlap, written):
        n_merged += merged
    return n_merged


def merge_sources(base, models, method: str, writer, *, params: dict | None = None, per_model=None,
                  seed: int = 0, chunk: int = CHUNK, overlap: bool = False, whole_max: int = WHOLE_MAX,
                  tag: str = "F32") -> int:
    """Merge full-weight tensor sources with one method and parameters for every float tensor (no
    config file: e.g. :class:`~unmerge_jax.sources.VirtualSource` models that exist only as seeds),
    into ``writer``. The tensors are the base's, in sorted name order.

    Args:
      base: the base (kind ``weights``); models: K full-weight sources of its architecture (each
        merged as the task vector over ``base``).
      method: a name in ``MERGE_METHODS``; params: its method-wide parameters; per_model: K dicts
        of per-model parameters (``weight``, ``density``, ...).
      writer: a :class:`~unmerge_jax.io.writer.ShardedWriter` or
        :class:`~unmerge_jax.io.writer.NullWriter` planned with the base's tensors in sorted order.
      seed, chunk, overlap, whole_max: as for :func:`merge`; tag: the output dtype tag.
    Returns:
      how many tensors went through a merge kernel.
    """
    seed = check_seed(seed)
    chunk = _positive_int("chunk", chunk)
    tvs = [task_vector(base, m) for m in models]
    names = sorted(base.names)
    res = resolve(method, len(tvs), dict(params or {}), per_model, where=method)
    res_by_name = {n: res for n in names if base.is_float(n)}
    lambdas = None
    if res.method.statistics(res) == "model":
        lambdas = _model_pass(base, tvs, names, res_by_name, res, _Buffers(0), chunk, whole_max)
    return write_merged(base, tvs, names, res_by_name, writer, tag=tag, seed=seed, chunk=chunk, overlap=overlap,
                        model_stats=lambdas, whole_max=whole_max)


def ignored_parameters(cfg: MergeConfig) -> tuple:
    """Notes for per-model parameters that the config gives but its method ignores, as mergekit
    does (``MergeMethod.options["ignores"]``; e.g. slerp's per-model ``weight``)."""
    method = get_method(cfg.merge_method)
    return tuple(f"{cfg.merge_method} ignores per-model {p}, as in mergekit" for p in method.options.get("ignores", ())
                 if any(p in prm for _, prm in cfg.models))


def _merge_bf16(name, res, b, ts, deltas, base, models, limit) -> np.ndarray:
    """One tensor in mergekit's bfloat16 arithmetic, its inputs and output checked on the host."""
    for src, arr in ((base, b), *zip(models, ts)):
        if src is not None and first_nonfinite(arr) is not None:
            raise nonfinite_error(name, getattr(src, "source", src).where(name), arr)
    merged = merge_tensor_bf16(res, b, ts, deltas=deltas, full=base is None)
    bad = ~(np.abs(merged) < limit)
    if bad.any():
        at = np.unravel_index(int(np.flatnonzero(bad)[0]), merged.shape)
        raise UnmergeError(f"the merged value of tensor {name} at index {tuple(int(i) for i in at)} is "
                           f"{merged[at]:g}, beyond the output dtype (|x| ≥ {limit:.6g}); use smaller weights")
    return merged


class _Part(NamedTuple):
    """Merged entries ``start:`` of tensor ``name`` (a streamed tensor's chunk), to be written."""

    name: str
    start: int
    values: np.ndarray


def _stream(names, produce, writer, overlap: bool, written):
    """Produce and write every tensor, yielding whether it was merged; ``written(slot)`` is called
    once an output is on disk (its buffer may then be reused). ``produce(name, emit)`` returns a
    whole tensor, or None after handing a streamed one to ``emit(name, start, values)`` chunk by
    chunk. With ``overlap`` the next read+compute runs in a thread while the main thread writes
    (a streamed tensor's chunks pass through the same bounded queue, copied). Nothing tensor-sized
    is yielded or kept: serially the written output is released before the next tensor is read, so
    the peak stays at the 1 + K inputs of a whole-read tensor; with overlap at 2 + K (two base
    buffers)."""
    desc = "merging"
    if not overlap:
        for name in progress(names, desc=desc):
            item = produce(name, writer.write_part)
            if item[1] is not None:
                writer.write(item[0], item[1])
            merged = item[2]
            written(item[3])
            del item
            yield merged
        return
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def emit(name, start, values):
        q.put(_Part(name, start, np.array(values, copy=True)))   # the producer's buffer is reused

    def worker():
        try:
            for name in names:
                if stop.is_set():
                    return
                q.put(produce(name, emit))
            q.put(None)
        except BaseException as err:  # hand the error to the main thread
            q.put(err)

    th = threading.Thread(target=worker, daemon=True)
    th.start()
    try:
        for _ in progress(range(len(names)), desc=desc, total=len(names)):
            item = q.get()
            while isinstance(item, _Part):
                writer.write_part(*item)
                item = q.get()
            if isinstance(item, BaseException):
                raise item
            if item[1] is not None:
                writer.write(item[0], item[1])
            merged = item[2]
            written(item[3])
            del item
            yield merged
    finally:
        stop.set()
        while th.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                th.join(0.05)
