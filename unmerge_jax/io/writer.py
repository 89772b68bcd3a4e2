"""Streaming sharded safetensors writer: one tensor in memory at a time.

Shapes and dtypes of every output tensor are known before the first one is computed (they are
the base model's), so the writer plans the shards up front, writes each shard's safetensors
header first and then writes each tensor's bytes as they arrive — whole (:meth:`ShardedWriter.write`)
or in parts at known offsets (:meth:`ShardedWriter.write_part`, a tensor merged row block by row
block) — so no shard, and no large tensor, is ever held in memory. Files follow the Hugging Face layout: ``model.safetensors`` for a single shard, else
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``. Float tensors are cast
to their planned dtype; other tensors (integer buffers such as position ids) are written as
stored. Write it inside :func:`unmerge_jax.io.atomic.atomic_dir` (as :func:`unmerge_jax.merge.merge`
does) so a failed merge leaves nothing behind.

Side files (tokenizer, generation config) are copied from the source model directory, but never
through a link that leads outside it — except, in a Hugging Face cache snapshot
(``…/snapshots/<rev>/file → ../../blobs/<hash>``), into that repository's ``blobs/``, the rule the
checkpoint reader applies to shards.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.dtypes import NP_DTYPES, TORCH_NAMES
from unmerge_jax.io.checkpoint import inside_model

DEFAULT_SHARD_BYTES = 5 * 10**9  # mergekit's default out_shard_size
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


class ShardedWriter:
    """Write a planned list of tensors, in order, into size-capped safetensors shards.

    Args:
      out_dir: an existing (temporary) directory.
      plan: ``[(name, shape, tag), ...]`` in the order tensors will be written (``tag`` any
        safetensors dtype tag of ``unmerge_jax.io.dtypes.NP_DTYPES``).
      max_shard_bytes: a new shard starts when the current one would exceed this (a tensor
        larger than the cap gets a shard of its own).
    """

    def __init__(self, out_dir, plan, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata=None):
        self.out_dir = Path(out_dir)
        self.plan = [(n, tuple(int(s) for s in shape), tag) for n, shape, tag in plan]
        unknown = next((tag for _, _, tag in self.plan if tag not in NP_DTYPES), None)
        if unknown is not None:
            raise UnmergeError(f"cannot write dtype {unknown!r}; supported: {', '.join(NP_DTYPES)}")
        self.metadata = {"format": "pt", **(metadata or {})}
        shards, cur, size = [], [], 0
        for entry in self.plan:
            nbytes = _nbytes(entry)
            if cur and size + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = [], 0
            cur.append(entry)
            size += nbytes
        if cur or not shards:
            shards.append(cur)
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shards = shards
        self._order = [(si, e) for si, s in enumerate(shards) for e in s]
        self._pos = 0
        self._fh = None
        self._shard = -1
        self._offsets = {}     # name → byte offset of its data in its shard file (the open shard's tensors)
        self._filled = 0       # entries of the current tensor written so far by write_part
        self.total_size = sum(_nbytes(e) for e in self.plan)

    def _open_shard(self, si):
        if self._fh is not None:
            self._fh.close()
        header, off, offsets = {}, 0, {}
        for name, shape, tag in self.shards[si]:
            nb = _nbytes((name, shape, tag))
            header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [off, off + nb]}
            offsets[name] = off
            off += nb
        header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._fh = open(self.out_dir / self.files[si], "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._offsets = {n: 8 + len(raw) + o for n, o in offsets.items()}
        self._shard = si

    def _next(self, name: str):
        """The plan entry of ``name``, which must be the next tensor; opens its shard."""
        if self._pos >= len(self._order):
            raise UnmergeError(f"tensor {name} was not planned for this output")
        si, (pname, shape, tag) = self._order[self._pos]
        if name != pname:
            raise UnmergeError(f"tensor {name} written out of order; expected {pname}")
        if si != self._shard:
            self._open_shard(si)
        return shape, tag

    def write(self, name: str, array) -> None:
        """Write the next planned tensor whole (cast to its planned dtype)."""
        shape, tag = self._next(name)
        if self._filled:
            raise UnmergeError(f"tensor {name} is being written in parts; finish it with write_part")
        arr = np.asarray(array)
        if tuple(arr.shape) != shape:
            raise UnmergeError(f"tensor {name} has shape {tuple(arr.shape)}, planned {shape}")
        arr = np.ascontiguousarray(arr.astype(NP_DTYPES[tag], copy=False))
        self._fh.seek(self._offsets[name])
        self._fh.write(memoryview(arr.reshape(-1).view(np.uint8)))
        self._pos += 1

    def write_part(self, name: str, start: int, values) -> None:
        """Write flat entries ``start : start + len(values)`` (C order) of the next planned tensor,
        cast to its planned dtype, at their offset in the shard. A tensor written in parts is
        complete (and the next one may start) once its parts add up to its size; each entry is
        written once (parts may come in any order, and must not overlap).

        Args:
          name: the tensor (the next one planned).
          start: flat offset of the first entry.
          values: 1-D array of the entries (float32 from the merge; cast here).
        """
        shape, tag = self._next(name)
        arr = np.ascontiguousarray(np.asarray(values).reshape(-1).astype(NP_DTYPES[tag], copy=False))
        numel = int(np.prod(shape, dtype=np.int64))
        start = int(start)
        if start < 0 or start + arr.size > numel:
            raise UnmergeError(f"entries {start}:{start + arr.size} of tensor {name} lie outside its {numel} entries")
        self._fh.seek(self._offsets[name] + start * arr.itemsize)
        self._fh.write(memoryview(arr.view(np.uint8)))
        self._filled += arr.size
        if self._filled >= numel:
            self._filled = 0
            self._pos += 1

    def close(self) -> None:
        """Finish the last shard and write the index (when sharded); all tensors must be written."""
        if self._pos != len(self._order):
            missing = self._order[self._pos][1][0]
            how = f"only {self._filled} of its entries were" if self._filled else "was never"
            raise UnmergeError(f"output incomplete: tensor {missing} {how} written")
        for si in range(len(self.shards)):  # shards with no tensors still need their header
            if si > self._shard:
                self._open_shard(si)
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {n: self.files[si] for si, (n, _, _) in self._order}}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        elif self._fh is not None:
            self._fh.close()


class NullWriter:
    """A writer that checks and counts what :class:`ShardedWriter` would write, and discards it: the
    same order, shape and completeness checks and the cast to the planned dtype, no file (to
    measure a merge's own cost and memory, e.g. of a model that does not fit the disk).

    Args:
      plan: ``[(name, shape, tag), ...]`` as for :class:`ShardedWriter`.

    Attributes:
      total_size: bytes the plan holds; ``written``: bytes received so far.
    """

    def __init__(self, plan):
        self.plan = [(n, tuple(int(s) for s in shape), tag) for n, shape, tag in plan]
        self.total_size = sum(_nbytes(e) for e in self.plan)
        self.written, self._pos, self._filled = 0, 0, 0

    def _next(self, name: str):
        if self._pos >= len(self.plan):
            raise UnmergeError(f"tensor {name} was not planned for this output")
        pname, shape, tag = self.plan[self._pos]
        if name != pname:
            raise UnmergeError(f"tensor {name} written out of order; expected {pname}")
        return shape, tag

    def write(self, name: str, array) -> None:
        shape, tag = self._next(name)
        arr = np.asarray(array)
        if tuple(arr.shape) != shape:
            raise UnmergeError(f"tensor {name} has shape {tuple(arr.shape)}, planned {shape}")
        self.written += arr.astype(NP_DTYPES[tag], copy=False).nbytes
        self._pos += 1

    def write_part(self, name: str, start: int, values) -> None:
        shape, tag = self._next(name)
        arr = np.asarray(values).reshape(-1).astype(NP_DTYPES[tag], copy=False)
        numel = int(np.prod(shape, dtype=np.int64))
        if start < 0 or start + arr.size > numel:
            raise UnmergeError(f"entries {start}:{start + arr.size} of tensor {name} lie outside its {numel} entries")
        self.written += arr.nbytes
        self._filled += arr.size
        if self._filled >= numel:
            self._filled, self._pos = 0, self._pos + 1

    def close(self) -> None:
        if self._pos != len(self.plan):
            raise UnmergeError(f"output incomplete: tensor {self.plan[self._pos][0]} was never written")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()


def _nbytes(entry) -> int:
    _, shape, tag = entry
    return int(np.prod(shape, dtype=np.int64)) * NP_DTYPES[tag].itemsize


def write_config(src_dir, out_dir, tag: str) -> None:
    """Copy ``config.json`` from ``src_dir`` with its dtype field(s) set to ``tag``'s torch name."""
    src = Path(src_dir) / "config.json"
    if not src.exists():
        return
    cfg = json.loads(src.read_text())
    name = TORCH_NAMES[tag]
    keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["dtype"]
    for k in keys:
        cfg[k] = name
    (Path(out_dir) / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


class SideFiles(NamedTuple):
    """What :func:`copy_side_files` did: file names copied, and paths skipped (links outside)."""

    copied: list
    skipped: list


def copy_side_files(src_dir, out_dir) -> SideFiles:
    """Copy the tokenizer and generation files that exist in ``src_dir`` (links followed only where
    they stay inside the model, see the module docstring)."""
    copied, skipped = [], []
    src_dir = Path(src_dir)
    for f in TOKENIZER_FILES:
        p = src_dir / f
        if not p.is_file():
            continue
        if not inside_model(src_dir, p):
            skipped.append(str(p))
            continue
        shutil.copy2(p, Path(out_dir) / f)
        copied.append(f)
    return SideFiles(copied, skipped)
