"""Streaming sharded safetensors writer: one tensor in memory at a time.

Shapes and dtypes of every output tensor are known before the first one is computed (they are
the base model's), so the writer plans the shards up front, writes each shard's safetensors
header first and then appends each tensor's bytes as it arrives — no shard is ever held in
memory. Files follow the Hugging Face layout: ``model.safetensors`` for a single shard, else
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
        self.total_size = sum(_nbytes(e) for e in self.plan)

    def _open_shard(self, si):
        if self._fh is not None:
            self._fh.close()
        header, off = {}, 0
        for name, shape, tag in self.shards[si]:
            nb = _nbytes((name, shape, tag))
            header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
        header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._fh = open(self.out_dir / self.files[si], "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._shard = si

    def write(self, name: str, array) -> None:
        """Append the next planned tensor (cast to its planned dtype)."""
        if self._pos >= len(self._order):
            raise UnmergeError(f"tensor {name} was not planned for this output")
        si, (pname, shape, tag) = self._order[self._pos]
        if name != pname:
            raise UnmergeError(f"tensor {name} written out of order; expected {pname}")
        arr = np.asarray(array)
        if tuple(arr.shape) != shape:
            raise UnmergeError(f"tensor {name} has shape {tuple(arr.shape)}, planned {shape}")
        if si != self._shard:
            self._open_shard(si)
        arr = np.ascontiguousarray(arr.astype(NP_DTYPES[tag], copy=False))
        self._fh.write(memoryview(arr.reshape(-1).view(np.uint8)))
        self._pos += 1

    def close(self) -> None:
        """Finish the last shard and write the index (when sharded); all tensors must be written."""
        if self._pos != len(self._order):
            missing = self._order[self._pos][1][0]
            raise UnmergeError(f"output incomplete: tensor {missing} was never written")
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
