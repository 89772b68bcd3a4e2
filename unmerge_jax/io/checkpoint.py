"""Lazy reader of Hugging Face safetensors checkpoints: one tensor at a time, float32 out.

A checkpoint is a model directory holding ``model.safetensors`` or the shards listed in
``model.safetensors.index.json`` (a single ``.safetensors`` file is accepted too). When both are
there, ``model.safetensors`` is read, as transformers does. An index may name only shard files of
the directory itself (no sub-paths, ``..`` or absolute paths; a symlinked shard must stay inside the
directory or the Hugging Face cache's ``blobs/``). Opening it
reads the headers only: ``safetensors.safe_open`` validates each file (header, dtypes, that the
data covers the file exactly) and the header's offsets are kept. :meth:`Checkpoint.read` then
reads exactly one tensor's bytes with one ``pread`` into a fresh array and upcasts fp16/bf16 to
float32. No file is ever loaded whole, so the memory of a pass is bounded by the tensors alive at
once, not by the model size.

Why ``pread`` and not ``safe_open(...).get_tensor``: with safetensors 0.8, ``get_tensor`` copies
out of a memory map at ≈2 GB/s here (page faults on the mapping) and leaves every page it touched
mapped, so the process RSS grows to the whole model over a pass (reclaimable page cache, but it
is what ``top`` shows). ``pread`` into the destination runs at ≈6–7 GB/s from the page cache and
maps nothing (``bench/stream_stats.py`` measures both).

Every problem with the files (missing directory, no weights, a shard the index names but the
directory lacks, a truncated or corrupt file, a tensor the index maps to the wrong shard) is an
:class:`~unmerge_jax.errors.UnmergeError` raised at open time, naming the file and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.atomic import os_error
from unmerge_jax.io.dtypes import BYTES_PER, FLOAT_TAGS, NP_DTYPES, to_float32

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# config.json fields that fix the architecture: two checkpoints that differ in one are not
# fine-tunes of one another.
ARCH_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size", "tie_word_embeddings", "n_embd", "n_layer", "n_head")


def _safe_open(path: Path):
    from safetensors import safe_open

    try:  # an unreadable file: say so (safe_open would report it as missing)
        os.close(os.open(path, os.O_RDONLY))
    except OSError as err:
        raise os_error(err, path, "read") from None
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
        self._fds: dict[str, int] = {}
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
        self._meta: dict[str, tuple[str, tuple]] = {}
        self._where: dict[str, str] = {}
        self._span: dict[str, tuple[int, int]] = {}
        for fname in files:
            for name, (tag, shape, start, stop) in _header(root / fname).items():
                if where is not None and where.get(name) != fname:
                    if name not in where:
                        continue  # a tensor the index does not list (transformers ignores those too)
                    raise UnmergeError(f"{root / INDEX_NAME} maps tensor {name} to {where[name]} but it is stored in "
                                       f"{fname}; the index does not match the shards — re-download the checkpoint")
                self._meta[name] = (tag, shape)
                self._where[name] = fname
                self._span[name] = (start, stop)
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
            except OSError as err:
                raise os_error(err, cfg, "read") from None

    @staticmethod
    def _layout(path: Path):
        # transformers loads model.safetensors when a directory holds it, whatever index sits
        # beside it: read the same file, so the model analysed is the model served.
        if (path / SINGLE_NAME).is_file():
            return None, [SINGLE_NAME]
        index = path / INDEX_NAME
        if index.exists():
            try:
                wm = json.loads(index.read_text())["weight_map"]
                if not isinstance(wm, dict):
                    raise TypeError("weight_map is not an object")
            except (ValueError, KeyError, TypeError) as err:
                raise UnmergeError(f"cannot parse {index}: {err!r}; it must hold a weight_map — re-download "
                                   f"it") from None
            except OSError as err:
                raise UnmergeError(f"cannot read {index}: {err.strerror or err}") from None
            files = sorted({str(v) for v in wm.values()})
            for f in files:
                _check_shard_name(path, index, f, wm)
                if not (path / f).is_file():
                    n = sum(1 for v in wm.values() if v == f)
                    raise UnmergeError(f"{index} lists shard {f} ({n} tensors) but {path / f} is missing; "
                                       f"download the missing shard")
            return dict(wm), files
        if (path / "adapter_config.json").exists():
            raise UnmergeError(f"{path} is a PEFT LoRA adapter, not a model; pass it as a dictionary/target entry "
                               f"together with --base")
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise UnmergeError(f"{path} holds only PyTorch .bin weights (pickles, not read by default); convert it "
                               f"to safetensors with `unmerge convert {path} --out NEW_DIR`")
        raise UnmergeError(f"{path} holds no {SINGLE_NAME} or {INDEX_NAME}; pass a Hugging Face model directory")

    def _fd(self, fname: str) -> int:
        fd = self._fds.get(fname)
        if fd is None:
            fd = self._fds[fname] = os.open(self._root / fname, os.O_RDONLY)
        return fd

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
    def read_raw(self, name, out: np.ndarray | None = None) -> np.ndarray:
        """``name`` as stored (its own dtype), filled by one ``pread`` of its bytes.

        Args:
          out: optional reusable byte buffer (1-D ``uint8``, at least :meth:`nbytes` long); the
            result is then a view into it (a streaming pass reuses one buffer per input instead
            of allocating — and page-faulting — a fresh tensor every time).
        """
        tag, shape, dt = self._stored(name)
        want = self._span[name][1] - self._span[name][0]
        out = np.empty(shape, dt) if out is None else out[:want].view(dt).reshape(shape)
        return self._pread(name, out, 0)

    def read_raw_rows(self, name, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the first axis of ``name`` as stored, by one ``pread`` of just
        their bytes (C order makes a row range one contiguous byte range)."""
        tag, shape, dt = self._stored(name)
        if not shape:
            return self.read_raw(name)
        start, stop = max(0, int(start)), min(int(shape[0]), int(stop))
        out = np.empty((max(0, stop - start),) + tuple(shape[1:]), dt)
        return self._pread(name, out, start * int(np.prod(shape[1:], dtype=np.int64)) * dt.itemsize)

    def read_raw_flat(self, name, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Flat entries ``start:stop`` (C order) of ``name`` as stored, by one ``pread`` of just their bytes.

        Args:
          out: optional destination: a 1-D buffer of at least ``(stop − start) × itemsize`` bytes (any
            dtype; e.g. a row of a statistics staging block); the result is a view into it.
        """
        tag, shape, dt = self._stored(name)
        size = int(np.prod(shape, dtype=np.int64))
        start, stop = max(0, int(start)), min(size, int(stop))
        n = max(0, stop - start)
        out = np.empty(n, dt) if out is None else out.reshape(-1).view(np.uint8)[:n * dt.itemsize].view(dt)
        return self._pread(name, out, start * dt.itemsize)

    def _stored(self, name):
        """``(tag, shape, NumPy dtype)`` of a readable tensor."""
        tag, shape = self._entry(name)
        dt = NP_DTYPES.get(tag)
        if dt is None:
            raise UnmergeError(f"tensor {name} in {self.file_of(name)} has dtype {tag}, which this reader does not "
                               f"support")
        return tag, shape, dt

    def _pread(self, name, out: np.ndarray, skip: int) -> np.ndarray:
        """Fill ``out`` with the bytes of ``name`` from byte ``skip`` of its data on (one ``pread``)."""
        fname = self._where[name]
        want = out.nbytes
        try:
            got = os.preadv(self._fd(fname), [out.reshape(-1).view(np.uint8)], self._span[name][0] + skip) if want else 0
        except OSError as err:
            raise UnmergeError(f"cannot read tensor {name} from {self._root / fname}: {err.strerror or err}") from None
        if got != want:
            raise UnmergeError(f"{self._root / fname} ended inside tensor {name} ({got} of {want} bytes): the file "
                               f"is truncated — re-download it")
        return out

    def read(self, name) -> np.ndarray:
        """``name`` as a new float32 NumPy array the caller may modify (fp16/bf16/fp64 converted)."""
        arr = self.read_raw(name)
        return arr if arr.dtype == np.float32 else to_float32(arr)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self):
        if hasattr(self, "_fds"):
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.names)} tensors in {len(self.files)} file(s))"


def inside_model(root, path) -> bool:
    """True when ``path`` (a file of the model directory ``root``, maybe a link) resolves inside
    ``root`` or, for a Hugging Face cache snapshot (``…/snapshots/<rev>/``), inside that
    repository's ``blobs/``, where the cache keeps every file of a snapshot."""
    root = Path(root).resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    target = Path(path).resolve()
    return any(a in target.parents for a in allowed)


def _check_shard_name(root: Path, index: Path, fname: str, weight_map: dict) -> None:
    """An index's shard must be a file name inside the model directory: no sub-path, no ``..``,
    not absolute. A shard that is a symlink may only lead inside the directory or, for a Hugging
    Face cache snapshot (``…/snapshots/<rev>/``), into that repository's ``blobs/``."""
    tensor = next(k for k, v in weight_map.items() if str(v) == fname)
    p = Path(fname)
    if not fname or p.is_absolute() or len(p.parts) != 1 or p.name in (".", ".."):
        raise UnmergeError(f"{index} maps tensor {tensor} to {fname!r}, which is not a file of the model directory "
                           f"{root}; an index may only name shards beside it — fix or re-download the index")
    target = (root / p).resolve()
    if not inside_model(root, root / p):
        raise UnmergeError(f"shard {root / p} of {index} is a link to {target}, outside the model directory; copy the "
                           f"shard into the directory instead of linking it")


def _header(path: Path) -> dict:
    """``{name: (dtype tag, shape, start, stop)}`` (absolute byte offsets) of one safetensors file.

    ``safe_open`` validates the file first (a truncated or corrupt file fails here, at open time).
    """
    h = _safe_open(path)
    names = set(h.keys())
    del h
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            head = json.loads(fh.read(n))
    except (OSError, ValueError) as err:
        raise UnmergeError(f"cannot read the header of {path}: {err}; re-download the file") from None
    base = 8 + n
    out = {}
    for name, meta in head.items():
        if name == "__metadata__" or name not in names:
            continue
        start, stop = meta["data_offsets"]
        out[name] = (str(meta["dtype"]), tuple(int(d) for d in meta["shape"]), base + int(start), base + int(stop))
    return out


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
