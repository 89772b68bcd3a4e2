"""Lazy reader of Hugging Face safetensors checkpoints: one tensor at a time, float32 out.

A checkpoint is a model directory holding ``model.safetensors`` or the shards listed in
``model.safetensors.index.json`` (a single ``.safetensors`` file is accepted too). Opening it
reads the headers only (names, shapes, dtypes) through ``safetensors.safe_open``, which also
checks that every file is complete; :meth:`Checkpoint.read` then copies exactly one tensor out of
its shard and upcasts fp16/bf16 to float32. No file is ever loaded whole, so the memory of a pass
is bounded by the tensors alive at once, not by the model size.

Every problem with the files (missing directory, no weights, a shard the index names but the
directory lacks, a truncated or corrupt file, a tensor the index maps to the wrong shard) is an
:class:`~unmerge_jax.errors.UnmergeError` raised at open time, naming the file and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from unmerge_jax.errors import UnmergeError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FLOAT_TAGS = ("F32", "F16", "BF16", "F64")
BYTES_PER = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def _safe_open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="numpy")
    except Exception as err:  # SafetensorError, OSError: truncated, corrupt, unreadable
        raise UnmergeError(f"cannot read {path}: {err}; the file is truncated or corrupt — re-download or "
                           f"re-save it") from None


class Checkpoint:
    """An opened checkpoint (headers only). Use :func:`open_checkpoint`.

    Attributes:
      path: the directory (or the single ``.safetensors`` file).
      names: tensor names, sorted.
      files: shard file names (relative to the directory), sorted.
      config: ``config.json`` as a dict, or None.
    """

    def __init__(self, path):
        path = Path(path)
        if not path.exists():
            raise UnmergeError(f"{path} does not exist; pass a model directory with model.safetensors (or a "
                               f"sharded model.safetensors.index.json)")
        if path.is_file():
            if path.suffix != ".safetensors":
                raise UnmergeError(f"{path} is not a .safetensors file or a model directory")
            self.path, root, where = path, path.parent, None
            files = [path.name]
        else:
            self.path, root = path, path
            where, files = self._layout(path)
        self._root = root
        self._handles: dict[str, object] = {}
        self._meta: dict[str, tuple[str, tuple]] = {}
        self._where: dict[str, str] = {}
        for fname in files:
            h = self._handle(fname)
            for name in h.keys():
                if where is not None and where.get(name) != fname:
                    if name not in where:
                        continue  # a tensor the index does not list (transformers ignores those too)
                    raise UnmergeError(f"{root / INDEX_NAME} maps tensor {name} to {where[name]} but it is stored in "
                                       f"{fname}; the index does not match the shards — re-download the checkpoint")
                sl = h.get_slice(name)
                self._meta[name] = (str(sl.get_dtype()), tuple(int(d) for d in sl.get_shape()))
                self._where[name] = fname
        if where is not None:
            lost = [n for n in where if n not in self._meta]
            if lost:
                raise UnmergeError(f"{root / INDEX_NAME} lists tensor {lost[0]} in {where[lost[0]]}, which does not "
                                   f"hold it ({len(lost)} tensor(s) missing); re-download that shard")
        self.names = sorted(self._meta)
        self.files = sorted(files)
        cfg = root / "config.json" if path.is_dir() else None
        self.config = None
        if cfg is not None and cfg.exists():
            try:
                self.config = json.loads(cfg.read_text())
            except ValueError as err:
                raise UnmergeError(f"cannot parse {cfg}: {err}; fix or delete it") from None

    @staticmethod
    def _layout(path: Path):
        index = path / INDEX_NAME
        if index.exists():
            try:
                wm = json.loads(index.read_text())["weight_map"]
                if not isinstance(wm, dict):
                    raise TypeError("weight_map is not an object")
            except (ValueError, KeyError, TypeError) as err:
                raise UnmergeError(f"cannot parse {index}: {err!r}; it must hold a weight_map — re-download "
                                   f"it") from None
            files = sorted(set(wm.values()))
            for f in files:
                if not (path / f).is_file():
                    n = sum(1 for v in wm.values() if v == f)
                    raise UnmergeError(f"{index} lists shard {f} ({n} tensors) but {path / f} is missing; "
                                       f"download the missing shard")
            return dict(wm), files
        if (path / SINGLE_NAME).is_file():
            return None, [SINGLE_NAME]
        if (path / "adapter_config.json").exists():
            raise UnmergeError(f"{path} is a PEFT LoRA adapter, not a model; pass it as a dictionary/target entry "
                               f"together with --base")
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise UnmergeError(f"{path} holds only PyTorch .bin weights; convert it to safetensors (e.g. "
                               f"model.save_pretrained(dir, safe_serialization=True))")
        raise UnmergeError(f"{path} holds no {SINGLE_NAME} or {INDEX_NAME}; pass a Hugging Face model directory")

    def _handle(self, fname: str):
        h = self._handles.get(fname)
        if h is None:
            h = self._handles[fname] = _safe_open(self._root / fname)
        return h

    # --- metadata ---------------------------------------------------------------------------
    def __contains__(self, name) -> bool:
        return name in self._meta

    def _entry(self, name):
        try:
            return self._meta[name]
        except KeyError:
            raise UnmergeError(f"{self.path} has no tensor {name}; the inputs must share one architecture") from None

    def shape(self, name) -> tuple:
        """Stored shape of ``name``."""
        return self._entry(name)[1]

    def dtype(self, name) -> str:
        """Stored safetensors dtype tag of ``name`` (``F32``, ``F16``, ``BF16``, ...)."""
        return self._entry(name)[0]

    def file_of(self, name) -> Path:
        """The shard file holding ``name``."""
        self._entry(name)
        return self._root / self._where[name]

    def nbytes(self, name) -> int:
        """Stored size of ``name`` in bytes."""
        tag, shape = self._entry(name)
        return int(np.prod(shape, dtype=np.int64)) * BYTES_PER.get(tag, 4)

    def is_float(self, name) -> bool:
        return self.dtype(name) in FLOAT_TAGS

    # --- data -------------------------------------------------------------------------------
    def read_raw(self, name) -> np.ndarray:
        """``name`` as stored (its own dtype); one tensor copied out of its shard."""
        self._entry(name)
        fname = self._where[name]
        try:
            return self._handle(fname).get_tensor(name)
        except Exception as err:
            raise UnmergeError(f"cannot read tensor {name} from {self._root / fname}: {err}; the file is corrupt — "
                               f"re-download it") from None

    def read(self, name) -> np.ndarray:
        """``name`` as a new float32 NumPy array the caller may modify (fp16/bf16/fp64 converted)."""
        arr = self.read_raw(name)
        return arr if arr.dtype == np.float32 else arr.astype(np.float32)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.names)} tensors in {len(self.files)} file(s))"


def open_checkpoint(path) -> Checkpoint:
    """Open a model directory / ``.safetensors`` file lazily (headers only). See :class:`Checkpoint`."""
    if isinstance(path, Checkpoint):
        return path
    return Checkpoint(path)


def is_checkpoint(path) -> bool:
    """True for a model directory with safetensors weights (or a ``.safetensors`` file)."""
    p = Path(path)
    if p.is_file():
        return p.suffix == ".safetensors"
    return (p / INDEX_NAME).exists() or (p / SINGLE_NAME).exists()
