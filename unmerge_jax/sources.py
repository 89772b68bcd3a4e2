"""Tensor sources: the one way the engine reads named tensors, one tensor (or row block) at a time.

Every command — decompose, stats, merge, sparsity, the studies — reads its inputs through a
:class:`TensorSource`:

* ``names``: tensor names, in a fixed order;
* ``shape(name)`` / ``dtype(name)``: the stored shape and safetensors dtype tag, from headers;
* ``read(name, out=None)``: the tensor as float32 NumPy (a fresh array the caller may modify, or a
  view into the reusable buffer ``out``); ``read_rows(name, start, stop)``: rows ``start:stop`` of
  its first axis, without reading the rest where the storage allows it; ``exact_rows(name)``: True
  when those rows are exactly ``read(name)[start:stop]`` and cost only their share (so a merge may
  stream the tensor by row blocks and still give the bits of a whole-tensor merge);
* ``kind``: ``"weights"`` (full model weights) or ``"delta"`` (a task vector / update ``ΔW``);
* ``touches(name)``: False when the tensor is known to be an all-zero delta without reading it
  (a module a LoRA adapter does not adapt).

Implementations: :class:`CheckpointSource` (a Hugging Face model directory, single file or sharded
index), :class:`AdapterSource` (a PEFT LoRA adapter, ``ΔW = B@A·scale`` produced lazily),
:class:`MemorySource` (a ``{name: array}`` mapping) and :class:`VirtualSource` (tensors generated on
the fly, never on disk). :class:`TaskVector` is ``source − base``, lazily: the one representation of
a task vector. :func:`open_source` turns a path, a mapping or an array into a source.

The architecture checks between a source and its base (same tensor names and shapes) live here,
in :func:`check_same_architecture`, so every command validates its inputs the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.checkpoint import ARCH_KEYS, Checkpoint, is_checkpoint, open_checkpoint
from unmerge_jax.io.dtypes import FLOAT_TAGS, NP_DTYPES, to_float32
from unmerge_jax.io.lora import Adapter, is_adapter_dir, open_adapter

WEIGHTS = "weights"
DELTA = "delta"
KINDS = (WEIGHTS, DELTA)


# NumPy dtype → safetensors tag, for in-memory tensors.
_TAGS = {dt: tag for tag, dt in NP_DTYPES.items()}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UnmergeError(f"kind must be one of {KINDS}, got {kind!r}")


def _float32(arr, name: str, where: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype.kind not in "fiub":
        raise UnmergeError(f"tensor {name!r} of {where} has dtype {a.dtype}; expected a real-valued array")
    return a if a.dtype == np.float32 else a.astype(np.float32)


def _into(arr: np.ndarray, out) -> np.ndarray:
    """``arr`` copied into the reusable buffer ``out`` (any dtype, enough bytes), as a float32 view."""
    if out is None:
        return arr
    view = out.reshape(-1).view(np.uint8)[:arr.nbytes].view(np.float32).reshape(arr.shape)
    np.copyto(view, arr)
    return view


class TensorSource:
    """Named tensors read one at a time (see the module docstring for the protocol).

    Subclasses set ``label``, ``kind`` and ``names`` and implement ``shape``, ``dtype`` and
    ``read``; ``read_rows``, ``touches``, ``where`` and ``nbytes`` have generic defaults.
    """

    label: str = "tensors"
    kind: str = DELTA
    names: list

    def __contains__(self, name) -> bool:
        return name in self._name_set()

    def _name_set(self) -> set:
        cached = getattr(self, "_names_cache", None)
        if cached is None or len(cached) != len(self.names):
            cached = self._names_cache = set(self.names)
        return cached

    def _check(self, name) -> None:
        if name not in self:
            raise UnmergeError(f"{self.label} has no tensor {name}; the inputs must share one architecture")

    def shape(self, name) -> tuple:
        raise NotImplementedError

    def dtype(self, name) -> str:
        """The stored safetensors dtype tag of ``name`` (``F32``, ``BF16``, ...)."""
        raise NotImplementedError

    def is_float(self, name) -> bool:
        return self.dtype(name) in FLOAT_TAGS

    def read(self, name, out: np.ndarray | None = None) -> np.ndarray:
        """``name`` as float32 of shape :meth:`shape`: a fresh array, or a view into ``out``
        (a reusable buffer with at least :meth:`nbytes` bytes)."""
        raise NotImplementedError

    def read_rows(self, name, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the first axis of ``name`` as float32 (1-D tensors: entries)."""
        return np.ascontiguousarray(self.read(name)[start:stop])

    def touches(self, name) -> bool:
        """False when ``name`` is known, without reading, to be an all-zero delta."""
        return True

    def exact_rows(self, name) -> bool:
        """True when ``read_rows(name, a, b)`` equals ``read(name)[a:b]`` bit for bit without forming
        the other rows. Default False (the generic ``read_rows`` reads the whole tensor)."""
        return False

    def where(self, name) -> str:
        """The file (or description) holding ``name``, for error messages."""
        return self.label

    def nbytes(self, name) -> int:
        """Bytes of ``read(name)``'s float32 result."""
        return 4 * int(np.prod(self.shape(name), dtype=np.int64))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r}, kind={self.kind}, {len(self.names)} tensors)"


class CheckpointSource(TensorSource):
    """A Hugging Face safetensors model directory (or one ``.safetensors`` file), read lazily.

    Args:
      path: the directory/file, or an opened :class:`~unmerge_jax.io.checkpoint.Checkpoint`.
      kind: ``"weights"`` (default: full model weights) or ``"delta"`` (a file that stores task
        vectors themselves).

    Attributes:
      checkpoint: the opened checkpoint (headers only); ``path``, ``config`` come from it.
    """

    def __init__(self, path, kind: str = WEIGHTS):
        _check_kind(kind)
        self.checkpoint = open_checkpoint(path)
        self.kind = kind
        self.path = self.checkpoint.path
        self.label = str(self.path)
        self.names = list(self.checkpoint.names)
        self.config = self.checkpoint.config

    def __contains__(self, name) -> bool:
        return name in self.checkpoint

    def shape(self, name) -> tuple:
        return tuple(self.checkpoint.shape(name))

    def dtype(self, name) -> str:
        return self.checkpoint.dtype(name)

    def stored_nbytes(self, name) -> int:
        """Bytes of ``name`` as stored (what :meth:`read_raw` needs)."""
        return self.checkpoint.nbytes(name)

    def read_raw(self, name, out: np.ndarray | None = None) -> np.ndarray:
        """``name`` in its stored dtype (one ``pread``; a view into the byte buffer ``out`` if given)."""
        return self.checkpoint.read_raw(name, out=out)

    def read(self, name, out: np.ndarray | None = None) -> np.ndarray:
        if out is not None and self.dtype(name) == "F32":
            return self.checkpoint.read_raw(name, out=out)
        return _into(self.checkpoint.read(name), out)

    def read_rows(self, name, start: int, stop: int) -> np.ndarray:
        rows = self.checkpoint.read_raw_rows(name, start, stop)
        return rows if rows.dtype == np.float32 else to_float32(rows)

    def read_raw_flat(self, name, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Flat entries ``start:stop`` of ``name`` in its stored dtype (one ``pread`` of just their
        bytes; a view into the buffer ``out`` if given)."""
        return self.checkpoint.read_raw_flat(name, start, stop, out=out)

    def exact_rows(self, name) -> bool:
        return True

    def where(self, name) -> str:
        return str(self.checkpoint.file_of(name))


class AdapterSource(TensorSource):
    """A PEFT LoRA adapter as the deltas ``ΔW = B@A·scale`` it adds to a base (``kind="delta"``).

    Args:
      path: the adapter directory (or an opened :class:`~unmerge_jax.io.lora.Adapter`).
      base: the base it applies to (a :class:`TensorSource` or a model directory). With a base,
        the adapter is checked against it (names, shapes, declared base) and ``names`` are the
        *base's* tensor names it changes; without, the adapter's own names.

    Attributes:
      adapter: the opened adapter (config and factor shapes only).
    """

    kind = DELTA

    def __init__(self, path, base=None):
        self.adapter = open_adapter(path)
        self.path = self.adapter.path
        self.label = str(self.path)
        if base is not None:
            base = base if isinstance(base, TensorSource) else CheckpointSource(base)
            ck = base.checkpoint if isinstance(base, CheckpointSource) else base
            mapping = self.adapter.check_base(ck)          # {adapter name: base name}
        else:
            mapping = {n: n for n in self.adapter.base_names}
        self._own = {b: a for a, b in mapping.items()}    # base name → adapter name
        self.names = sorted(self._own)

    def touches(self, name) -> bool:
        return name in self._own

    def shape(self, name) -> tuple:
        self._check(name)
        return tuple(self.adapter.shape(self._own[name]))

    def dtype(self, name) -> str:
        """The factors' stored tag (LoRA factors of one adapter share a dtype in practice)."""
        self._check(name)
        a_key = self.adapter._mods[self._own[name]][0]
        return str(self.adapter._f.get_slice(a_key).get_dtype())

    def read(self, name, out: np.ndarray | None = None) -> np.ndarray:
        self._check(name)
        buf = None if out is None else out.reshape(-1).view(np.uint8).view(np.float32)
        return self.adapter.delta(self._own[name], out=buf)

    def read_rows(self, name, start: int, stop: int) -> np.ndarray:
        """Rows of ``ΔW`` as ``B[start:stop] @ A · scale``: the other rows are never formed."""
        self._check(name)
        return self.adapter.delta_rows(self._own[name], start, stop)

    def scale(self, name) -> float:
        return self.adapter.scale(self._own[name])

    def exact_rows(self, name) -> bool:
        """False: ``B[a:b] @ A`` rounds differently from the rows of ``B @ A`` (BLAS blocks the product
        by its shape), so a bit-exact merge forms ``ΔW`` whole."""
        return False

    def factors(self, name) -> dict:
        """``{stored key: float32 array}`` of the two LoRA factors (A, B) behind ``ΔW`` of ``name``
        (to name the factor that holds a bad value)."""
        self._check(name)
        a_key, b_key = self.adapter._mods[self._own[name]][:2]
        return {key: np.asarray(self.adapter._f.get_tensor(key), np.float32) for key in (a_key, b_key)}

    def where(self, name) -> str:
        return str(self.adapter.file)


class MemorySource(TensorSource):
    """In-memory ``{name: array}`` tensors (read returns float32 copies; the caller's arrays are
    never modified).

    Args:
      tensors: the mapping (its order is ``names``).
      kind: ``"delta"`` (default) or ``"weights"``.
      label: a description for messages.
      copy: False makes :meth:`read` (without ``out``) return float32 arrays as read-only views
        of the caller's, not copies — for passes that only read.
    """

    def __init__(self, tensors: Mapping, kind: str = DELTA, label: str = "in-memory tensors", *, copy: bool = True):
        _check_kind(kind)
        self.tensors = {str(k): v for k, v in tensors.items()}
        self.kind, self.label, self.copy = kind, label, copy
        self.names = list(self.tensors)

    def shape(self, name) -> tuple:
        self._check(name)
        return tuple(np.shape(self.tensors[name]))

    def dtype(self, name) -> str:
        self._check(name)
        dt = np.asarray(self.tensors[name]).dtype
        return _TAGS.get(dt, str(dt))

    def read(self, name, out: np.ndarray | None = None) -> np.ndarray:
        self._check(name)
        arr = _float32(self.tensors[name], name, self.label)
        if out is not None:
            return _into(arr, out)
        if not self.copy:
            view = arr.view()
            view.flags.writeable = False
            return view
        return np.array(arr, np.float32)  # a copy: the caller may modify it

    def read_rows(self, name, start: int, stop: int) -> np.ndarray:
        self._check(name)
        arr = np.asarray(self.tensors[name])
        part = arr[start:stop] if arr.ndim else arr
        return np.array(_float32(part, name, self.label), np.float32)  # converts only these rows

    def exact_rows(self, name) -> bool:
        return True


class VirtualSource(TensorSource):
    """Tensors generated on the fly (seeded), never stored: ``generate(name) -> array``.

    Args:
      shapes: ``{name: shape}`` in order (the order is ``names``).
      generate: a function of the tensor name returning the tensor (any real dtype, converted to
        float32) or None for an all-zero tensor.
      kind: ``"delta"`` (default) or ``"weights"``.
      label: a description for messages.
      dtypes: optional ``{name: tag}`` reported by :meth:`dtype` (default ``F32``).
      generate_rows: optional ``generate_rows(name, start, stop) -> array`` of rows ``start:stop``
        (equal to ``generate(name)[start:stop]``), so :meth:`read_rows` never forms a whole
        tensor. Without it, :meth:`read_rows` generates the tensor once and serves consecutive row
        reads of it from that copy (one tensor held per source).
    """

    def __init__(self, shapes: Mapping, generate: Callable, kind: str = DELTA, label: str = "generated tensors",
                 dtypes: Mapping | None = None, generate_rows: Callable | None = None):
        _check_kind(kind)
        self.shapes = {str(k): tuple(int(d) for d in v) for k, v in shapes.items()}
        self.generate, self.kind, self.label = generate, kind, label
        self.dtypes = dict(dtypes or {})
        self.names = list(self.shapes)
        self.generate_rows = generate_rows
        self._held = (None, None)  # (name, tensor) of the last tensor generated for row reads

    def shape(self, name) -> tuple:
        self._check(name)
        return self.shapes[name]

    def dtype(self, name) -> str:
        self._check(name)
        return self.dtypes.get(name, "F32")

    def read(self, name, out: np.ndarray | None = None) -> np.ndarray:
        self._check(name)
        arr = self.generate(name)
        if arr is None:
            arr = np.zeros(self.shapes[name], np.float32)
        arr = _float32(arr, name, self.label).reshape(self.shapes[name])
        return _into(arr, out) if out is not None else arr

    def read_rows(self, name, start: int, stop: int) -> np.ndarray:
        self._check(name)
        shape = self.shapes[name]
        if not shape:
            return self.read(name)
        start, stop = max(0, int(start)), min(shape[0], int(stop))
        if self.generate_rows is not None:
            part = self.generate_rows(name, start, stop)
            rows = (stop - start,) + shape[1:]
            if part is None:
                return np.zeros(rows, np.float32)
            return np.array(_float32(part, name, self.label), np.float32).reshape(rows)
        if self._held[0] != name:
            self._held = (None, None)  # drop the previous tensor before generating the next
            self._held = (name, self.read(name))
        return np.array(self._held[1][start:stop])

    def exact_rows(self, name) -> bool:
        """True with ``generate_rows`` (which must equal ``generate(name)[start:stop]``)."""
        return self.generate_rows is not None


# ----------------------------------------------------------------------------------------------
# task vectors
# ----------------------------------------------------------------------------------------------
class TaskVector(TensorSource):
    """``source − base`` over the base's tensors, formed lazily. Use :func:`task_vector`.

    ``source`` of kind ``"weights"`` (a fine-tuned model): ``δ = θ − θ_base`` per tensor;
    of kind ``"delta"`` (a LoRA adapter, stored deltas): ``δ`` is the source's tensor, zero where
    the source does not touch a base tensor.

    Attributes:
      name: a label (the source directory's basename unless given).
      path: the source's path (None for in-memory/virtual sources).
      base: the base :class:`TensorSource` (kind ``"weights"``).
      source: the fine-tuned side.
      names: the base's tensor names (a task vector covers every tensor of the base).
    """

    kind = DELTA

    def __init__(self, base: TensorSource, source: TensorSource, name: str | None = None):
        self.base, self.source = base, source
        self.path = getattr(source, "path", None)
        self.name = name or (Path(self.path).name if self.path is not None else source.label)
        self.label = self.name
        self.names = list(base.names)

    @property
    def relative(self) -> bool:
        """True when the source holds full weights (``δ`` needs the base subtracted)."""
        return self.source.kind == WEIGHTS

    @property
    def origin(self) -> str:
        """What the fine-tuned side is: ``"model"`` (a model directory), ``"adapter"`` (a PEFT LoRA
        adapter), or ``"memory"`` / ``"generated"``."""
        if isinstance(self.source, AdapterSource):
            return "adapter"
        if isinstance(self.source, CheckpointSource):
            return "model"
        return "generated" if isinstance(self.source, VirtualSource) else "memory"

    def shape(self, name) -> tuple:
        return self.base.shape(name)

    def dtype(self, name) -> str:
        """Stored dtype of the fine-tuned side (the base's where a delta source does not touch it)."""
        return self.source.dtype(name) if self.touches(name) else self.base.dtype(name)

    def touches(self, name) -> bool:
        return self.relative or self.source.touches(name)

    def where(self, name) -> str:
        return self.source.where(name) if self.touches(name) else self.base.where(name)

    def parts(self, name, out: np.ndarray | None = None) -> tuple[np.ndarray | None, bool]:
        """``(array, relative)``: the fine-tuned weights with ``relative=True`` (subtract the base),
        the delta with ``relative=False``, or ``(None, False)`` for an untouched (all-zero) tensor.

        Lets a streaming pass read the base tensor once for all task vectors of a tensor.
        """
        if name not in self.base:
            raise UnmergeError(f"base {self.base.label} has no tensor {name}")
        if not self.touches(name):
            return None, False
        return self.source.read(name, out=out), self.relative

    def read(self, name, out: np.ndarray | None = None) -> np.ndarray:
        """``δ`` of tensor ``name`` as float32 (a new array, or a view into ``out``)."""
        arr, relative = self.parts(name, out=out)
        if arr is None:
            z = np.zeros(self.base.shape(name), np.float32)
            return _into(z, out) if out is not None else z
        if relative:
            if not arr.flags.writeable:
                arr = arr.copy()
            arr -= self.base.read(name)
        return arr

    def read_rows(self, name, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``δ``: the source's rows minus the base's (only these rows are read)."""
        if name not in self.base:
            raise UnmergeError(f"base {self.base.label} has no tensor {name}")
        if not self.touches(name):
            shape = self.base.shape(name)
            if not shape:
                return np.zeros((), np.float32)
            return np.zeros((max(0, min(shape[0], stop) - max(0, start)),) + tuple(shape[1:]), np.float32)
        rows = self.source.read_rows(name, start, stop)
        if self.relative:
            if not rows.flags.writeable:
                rows = rows.copy()
            rows -= self.base.read_rows(name, start, stop)
        return rows

    def delta(self, name) -> np.ndarray:
        """``δ`` of ``name`` as a new float32 array (same as :meth:`read`)."""
        return self.read(name)

    def exact_rows(self, name) -> bool:
        if not self.touches(name):
            return self.base.exact_rows(name)
        return self.source.exact_rows(name) and (not self.relative or self.base.exact_rows(name))

    def __repr__(self) -> str:
        return f"TaskVector({self.name!r}: {self.source.label} − {self.base.label})"


def check_same_architecture(base: TensorSource, model: TensorSource, names=None, *, allow_extra: bool = False) -> None:
    """One-line error unless ``model`` is a fine-tune of ``base``'s architecture.

    Checked from headers and configs only: every tensor of ``base`` (or of ``names``) exists in
    ``model`` with the same shape; a tensor the base stores as floating point is floating point in
    ``model`` too, and a non-float tensor (an integer buffer) has the base's dtype; ``model`` has no
    tensor the base lacks (unless ``allow_extra``: those are then ignored); the architecture fields
    of both ``config.json`` files (``ARCH_KEYS``: model type, layers, sizes, vocabulary, tied
    embeddings) agree where both state them.
    """
    base_cfg, model_cfg = getattr(base, "config", None), getattr(model, "config", None)
    if isinstance(base_cfg, dict) and isinstance(model_cfg, dict):
        for k in ARCH_KEYS:
            if k in base_cfg and k in model_cfg and base_cfg[k] != model_cfg[k]:
                raise UnmergeError(f"{model.label} has {k} = {model_cfg[k]!r} in config.json but the base "
                                   f"{base.label} has {base_cfg[k]!r}: a different architecture — use fine-tunes "
                                   f"of this base")
    for n in (base.names if names is None else names):
        if n not in model:
            raise UnmergeError(f"{model.label} has no tensor {n} (the base {base.label} has it): missing tensor — the "
                               f"inputs must be fine-tunes of the same architecture")
        if tuple(model.shape(n)) != tuple(base.shape(n)):
            raise UnmergeError(f"shape mismatch for tensor {n}: {model.label} has {tuple(model.shape(n))}, the base "
                               f"{base.label} has {tuple(base.shape(n))} — a different architecture; use fine-tunes "
                               f"of this base")
        mine, theirs = model.dtype(n), base.dtype(n)
        if (theirs in FLOAT_TAGS) != (mine in FLOAT_TAGS) or (theirs not in FLOAT_TAGS and mine != theirs):
            raise UnmergeError(f"tensor {n} of {model.where(n)} is stored as {mine} but the base {base.label} stores "
                               f"it as {theirs}; the file is mislabelled or from another model — re-save it")
    if not allow_extra:
        extra = [n for n in model.names if n not in base]
        if extra:
            raise UnmergeError(f"{model.label} has tensor {extra[0]} that the base {base.label} lacks ({len(extra)} "
                               f"extra tensor(s)): a different architecture — use fine-tunes of this base")


def first_nonfinite(arr: np.ndarray):
    """Index (a tuple) of the first NaN/Inf of ``arr`` in C order, or None when all are finite."""
    bad = np.flatnonzero(~np.isfinite(arr.reshape(-1)))
    return None if bad.size == 0 else tuple(int(i) for i in np.unravel_index(bad[0], arr.shape))


def nonfinite_error(name: str, where: str, arr: np.ndarray, what: str = "holds", start: int = 0,
                    shape=None) -> UnmergeError:
    """The one-line error for a tensor with NaN/Inf: file, tensor, first index and value. ``arr`` may
    also be the flat entries from ``start`` of a tensor of ``shape`` (a row block): the index is the
    tensor's."""
    flat = arr.reshape(-1)
    bad = np.flatnonzero(~np.isfinite(flat))
    at = ""
    if bad.size:
        idx = tuple(int(i) for i in np.unravel_index(start + bad[0], arr.shape if shape is None else tuple(shape)))
        at = f" at index {idx if len(idx) != 1 else idx[0]} ({flat[bad[0]]})"
    return UnmergeError(f"tensor {name} of {where} {what} a non-finite value{at}; fix or drop that input")


def open_source(obj, *, base=None, kind: str | None = None) -> TensorSource:
    """A :class:`TensorSource` for ``obj``.

    Args:
      obj: a source (returned as is); a PEFT LoRA adapter directory (:class:`AdapterSource`,
        checked against ``base`` when given); a model directory or ``.safetensors`` file
        (:class:`CheckpointSource`); an opened ``Checkpoint``/``Adapter``; a ``{name: array}``
        mapping (:class:`MemorySource`); or one array (a source with the single tensor ``"delta"``).
      base: the base model, for adapters (optional).
      kind: ``"weights"`` or ``"delta"`` for checkpoints and mappings (default: weights for
        checkpoints, delta for mappings and arrays).
    """
    if isinstance(obj, TensorSource):
        return obj
    if isinstance(obj, Checkpoint):
        return CheckpointSource(obj, kind or WEIGHTS)
    if isinstance(obj, Adapter):
        return AdapterSource(obj, base)
    if isinstance(obj, (str, Path)):
        path = Path(obj)
        if not path.exists():
            raise UnmergeError(f"{path} does not exist; pass a model directory, a LoRA adapter directory or a "
                               f".safetensors file")
        if path.is_dir() and is_adapter_dir(path):
            return AdapterSource(path, base)
        if is_checkpoint(path) or path.is_dir():
            return CheckpointSource(path, kind or WEIGHTS)
        raise UnmergeError(f"{path} is not a model directory, a LoRA adapter directory or a .safetensors file")
    if isinstance(obj, Mapping):
        return MemorySource(obj, kind or DELTA, "dict of arrays")
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return MemorySource({"delta": obj}, kind or DELTA, "array")
    raise UnmergeError(f"cannot read tensors from {type(obj).__name__}; pass a model/adapter directory, a "
                       f".safetensors file, a dict of arrays or an array")


def task_vector(base, source, name: str | None = None, *, check_names=None) -> TaskVector:
    """The lazy task vector ``source − base``, checked from headers only.

    Args:
      base: the base model (a :class:`TensorSource`, an opened checkpoint or a model directory).
      source: a fine-tuned model directory, a PEFT LoRA adapter directory, or a source.
      name: label (default: the source directory's basename).
      check_names: base tensors that must exist with the base's shape in a full-weight source
        (default: all of them).
    """
    base = open_source(base, kind=WEIGHTS)
    if isinstance(source, (str, Path)) and not Path(source).exists():
        raise UnmergeError(f"{source} does not exist; pass a fine-tuned model directory or a LoRA adapter directory")
    src = open_source(source, base=base)
    if src.kind == WEIGHTS:
        check_same_architecture(base, src, check_names)
    return TaskVector(base, src, name)
