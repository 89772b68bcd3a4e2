"""One tensor's base and K inputs, flattened and cut into fixed-size chunks for the merge kernels.

A method's statistics and apply passes both walk the same chunks (:class:`TensorChunks`), so a
tensor is never copied whole: in memory the only tensor-sized buffers are the 1 + K inputs (and
``out``, which may be the base buffer itself); streamed (:meth:`TensorChunks.streamed`, the merge
driver's large tensors) there are none — each chunk's entries are read from the sources when a
walk needs them and each merged chunk goes straight to the output file. Scratch buffers are 64-byte aligned
(:func:`~unmerge_jax.hostmem.aligned_empty`) and reused per thread across tensors: XLA:CPU takes
an aligned NumPy argument without copying, but copies a misaligned one on every kernel call, and
fresh 4 MiB buffers per tensor page-faulted ≈ 60,000 times per TIES merge.
"""

from __future__ import annotations

import threading
from typing import Iterator

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.hostmem import aligned_empty
from unmerge_jax.orderstats import abs_bits

CHUNK = 1 << 20  # elements per kernel call (4 MiB float32 per input)

_SCRATCH = threading.local()


OUTPUT, BASE, DELTA = "output", "base", "delta"


class NonFinite(UnmergeError):
    """A merged tensor with a non-finite input or output entry (raised by :meth:`TensorChunks.store`).

    Attributes:
      culprit: ``"base"``; ``k`` (int), input k holds a NaN/Inf; ``("delta", k)``, input k is finite
        but its task vector ``θ_k − θ_base`` overflows float32; ``"output"``, every input is finite
        but the merged value is not, or not below ``limit``.
      index: the first such entry, an index into the tensor's shape (a tuple).
      value: the offending input value (NaN for ``"output"``: the kernel marked it).
      limit: the output's bound (``inf`` for float32 outputs).
      name: the tensor's name ("" until :func:`~unmerge_jax.merge.tensor.merge_resolved` sets it).
    """

    def __init__(self, culprit, index: tuple, value: float, limit: float, name: str = ""):
        self.culprit, self.index, self.value, self.limit, self.name = culprit, tuple(index), float(value), limit, name
        at = index[0] if len(index) == 1 else tuple(index)
        tensor = f"tensor {name}" if name else "the tensor"
        if culprit == OUTPUT:
            what = ("is not finite" if not np.isfinite(limit) else f"is not finite or reaches ±{limit:.6g}, "
                    f"beyond the output dtype")
            msg = (f"the merged value of {tensor} at index {at} {what} (every input is finite there); lower the "
                   f"weights or lambda, or write a wider dtype")
        elif culprit == BASE:
            msg = f"{tensor} of the base holds a non-finite value at index {at} ({value}); fix or drop that input"
        elif isinstance(culprit, tuple):
            msg = (f"the task vector of model {culprit[1]} for {tensor} overflows float32 at index {at} (θ − θ_base "
                   f"= {value}); check that the model is a fine-tune of this base")
        else:
            msg = f"{tensor} of model {culprit} holds a non-finite value at index {at} ({value}); fix or drop that input"
        super().__init__(msg)

    def named(self, name: str) -> "NonFinite":
        """The same error for tensor ``name``."""
        return NonFinite(self.culprit, self.index, self.value, self.limit, name)


def _first_bad(x: np.ndarray):
    bad = np.flatnonzero(~np.isfinite(x))
    return None if bad.size == 0 else int(bad[0])


def scratch(key, nbytes: int) -> np.ndarray:
    """A per-thread aligned uint8 buffer of ``nbytes`` for ``key``, reused across tensors."""
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    buf = pool.get(key)
    if buf is None or buf.size < nbytes:
        buf = pool[key] = aligned_empty(nbytes)
    return buf[:nbytes]


class ArrayBlocks:
    """The flat entries of a base and K inputs held in memory (whole arrays): the blocks of
    :class:`TensorChunks` over arrays.

    Args:
      base: float32 array of shape ``S``.
      tensors: K float32 arrays of shape ``S``.
    """

    def __init__(self, base: np.ndarray, tensors):
        self.base = np.asarray(base, np.float32).reshape(-1)
        self.rows = [np.asarray(t, np.float32).reshape(-1) for t in tensors]

    def get(self, start: int, stop: int):
        """``(base, tensors)`` entries ``start:stop``, views."""
        return self.base[start:stop], tuple(r[start:stop] for r in self.rows)

    def gather(self, idx: np.ndarray):
        """``(base, tensors)`` at the flat positions ``idx`` (copies)."""
        return self.base[idx], tuple(r[idx] for r in self.rows)


class TensorChunks:
    """The chunks of one tensor: base ``b`` and K inputs (task vectors, or fine-tuned weights with
    ``deltas=False``), flat, in slices of ``chunk`` entries, and where the merged chunks go.

    :meth:`inputs` hands every chunk to a kernel at one fixed length: a tensor's last, shorter
    chunk is copied into zero-padded aligned buffers, so each kernel compiles once per method and
    chunk size instead of once per distinct tail length (each compile took 0.3–0.7 s). Padded
    entries have δ = 0 and are cut off the output; the statistics they could touch (tie counts,
    L1 sums) are zero for them or unused after the last chunk. :meth:`raw` gives the unpadded
    chunk (RAM's counting pass: a negative ε would count the zeros).

    The entries come from *blocks*: whole arrays here (:class:`ArrayBlocks`), or, built with
    :meth:`streamed`, a reader that fetches each requested range from the tensor sources (row
    blocks of the files, regenerated rows of a virtual source) — then nothing tensor-sized exists:
    every walk of a statistics pass reads the chunks again, samples of order statistics are
    gathered by one more walk, and the merged chunks go to a ``sink`` (the output file) instead of
    ``out``. The chunk slices, and so every kernel call, are the same either way: results are bit
    for bit those of the whole-tensor merge.

    Args:
      base: float32 array of shape ``S``.
      tensors: K float32 arrays of shape ``S``.
      deltas: ``tensors`` are task vectors (else fine-tuned weights; δ is formed per chunk).
      chunk: entries per chunk (≥ 1).
      rows: cut chunks at whole rows (the last axis of ``S``; a 0-/1-D tensor is one row): the chunk
        length is rounded down to a multiple of the row length, and is one row when a row is longer
        than ``chunk``. For methods that work per row (ranks, norms or cosines within a row).
      out: float32 buffer of shape ``S`` for the result; may be ``base`` itself (the statistics
        pass reads the base before the apply pass overwrites it chunk by chunk). Default: a new
        aligned copy of ``base``.
      limit: the merged values must be finite and below this in magnitude (the output dtype's
        range; ``inf`` for float32). The apply kernels get it as :attr:`limit` and mark bad
        entries NaN; :meth:`store` refuses a chunk holding one.

    Attributes:
      n, k, chunk, deltas, slices, limit (float32); ``shape`` (``S``); ``out`` (shape ``S``; for
      streamed chunks a read-only zero-stride stand-in that only carries the shape); ``row_len``
      (entries per row of the last axis; ``n`` for a 0-/1-D tensor); ``rows`` (chunks hold whole
      rows).
    """

    def __init__(self, base: np.ndarray, tensors, *, deltas: bool, chunk: int, out: np.ndarray | None = None,
                 limit: float = np.inf, rows: bool = False):
        base = np.asarray(base, np.float32)
        if out is None:
            out = aligned_empty(base.nbytes).view(np.float32).reshape(base.shape)
            out[...] = base
        self._setup(ArrayBlocks(base, tensors), base.shape, len(tensors), deltas=deltas, chunk=chunk, limit=limit,
                    rows=rows)
        self.out = out
        self._out = out.reshape(-1)
        self._sink = None

    @classmethod
    def streamed(cls, blocks, shape, k: int, *, deltas: bool, chunk: int, sink, limit: float = np.inf,
                 rows: bool = False) -> "TensorChunks":
        """Chunks whose entries are read on demand and whose merged values go to ``sink``.

        Args:
          blocks: ``blocks.get(start, stop) -> (base, tensors)``: float32 1-D arrays of the flat
            entries ``start:stop`` (``stop − start ≤ chunk``), valid until the next call; e.g. views
            into reused aligned buffers the reader fills from the sources.
          shape: the tensor's shape ``S``.
          k: the number of inputs.
          sink: ``sink(start, merged)`` receives each stored chunk (float32, checked) at its flat
            offset.
          deltas, chunk, limit, rows: as for the constructor.
        """
        self = cls.__new__(cls)
        self._setup(blocks, shape, k, deltas=deltas, chunk=chunk, limit=limit, rows=rows)
        self.out = np.broadcast_to(np.float32(0), self.shape)   # the shape only: the values go to the sink
        self._out, self._sink = None, sink
        return self

    def _setup(self, blocks, shape, k: int, *, deltas: bool, chunk: int, limit: float, rows: bool) -> None:
        self._blocks = blocks
        self.shape = tuple(int(s) for s in shape)
        self.deltas = bool(deltas)
        self.n, self.k = int(np.prod(self.shape, dtype=np.int64)), int(k)
        self.row_len = int(self.shape[-1]) if len(self.shape) >= 2 else max(1, self.n)
        self.rows = bool(rows)
        self.chunk = max(1, int(chunk))
        if self.rows:
            self.chunk = max(1, self.chunk // self.row_len) * self.row_len
        self.slices = [slice(s, min(s + self.chunk, self.n)) for s in range(0, self.n, self.chunk)]
        self.limit = np.float32(limit)
        self._pad = None
        self._gathered = (None, None)   # (idx, (base, tensors)) of the last sample gathered

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def sizes(self) -> np.ndarray:
        return np.asarray([sl.stop - sl.start for sl in self.slices])

    def start(self, c: int) -> np.int64:
        """Offset of chunk ``c`` in the flat tensor (keys counter-based random draws)."""
        return np.int64(self.slices[c].start)

    def raw(self, c: int):
        """``(base, tensors)`` of chunk ``c``, unpadded (views, valid until the next chunk is read)."""
        sl = self.slices[c]
        return self._blocks.get(sl.start, sl.stop)

    def inputs(self, c: int):
        """``(base, tensors)`` of chunk ``c`` at the full chunk length (the tail zero-padded)."""
        sl = self.slices[c]
        size = sl.stop - sl.start
        b, ts = self._blocks.get(sl.start, sl.stop)
        if size == self.chunk:
            return b, ts
        if self._pad is None:
            self._pad = [scratch(("pad", i), 4 * self.chunk).view(np.float32) for i in range(1 + self.k)]
        for buf, src in zip(self._pad, [b, *ts]):
            buf[:size] = src
            buf[size:] = 0.0
        return self._pad[0], tuple(self._pad[1:])

    def store(self, c: int, merged) -> None:
        """Write a kernel's result for chunk ``c`` (padding dropped) into ``out`` (or the sink).

        Raises:
          NonFinite: the chunk holds a NaN — an entry the kernel marked (a non-finite input, or a
            merged value that is not finite or not below :attr:`limit`). Found by one NumPy
            ``max`` (which propagates NaN); only then are the inputs searched for the culprit.
        """
        sl = self.slices[c]
        m = np.asarray(merged)[:sl.stop - sl.start]
        if m.size and np.isnan(m.max()):
            raise self.diagnose(c, m)
        if self._sink is not None:
            self._sink(sl.start, m)
        else:
            self._out[sl] = m

    def diagnose(self, c: int, merged: np.ndarray) -> NonFinite:
        """The :class:`NonFinite` error of chunk ``c`` (the slow path): the first non-finite entry of
        the base, then of each input, then of each task vector formed from them, else the first
        marked entry of ``merged``. Inputs are searched from chunk ``c`` to the end of the tensor
        (one walk over the remaining chunks): the chunks before it passed the kernel's check, and a
        NaN further on may have reached this chunk through the statistics pass (a NaN L1 sum or
        threshold)."""
        start = self.slices[c].start
        shape = self.shape

        def at(i):
            return tuple(int(j) for j in np.unravel_index(i, shape))

        # first[j]: (flat index, value) of the first bad entry of category j — the base, input k,
        # task vector k — over the rest of the tensor; the earliest category found wins.
        first = [None] * (1 + 2 * self.k)
        with np.errstate(over="ignore", invalid="ignore"):
            for lo in range(start, self.n, self.chunk):
                b, ts = self._blocks.get(lo, min(lo + self.chunk, self.n))
                cands = [b, *ts] + ([t - b for t in ts] if not self.deltas else [None] * self.k)
                for j, x in enumerate(cands):
                    if first[j] is None and x is not None:
                        i = _first_bad(x)
                        if i is not None:
                            first[j] = (lo + i, x[i])
                if first[0] is not None:
                    break
        if first[0] is not None:
            return NonFinite(BASE, at(first[0][0]), first[0][1], self.limit)
        for k in range(self.k):
            if first[1 + k] is not None:
                return NonFinite(k, at(first[1 + k][0]), first[1 + k][1], self.limit)
        for k in range(self.k):
            if first[1 + self.k + k] is not None:
                return NonFinite((DELTA, k), at(first[1 + self.k + k][0]), first[1 + self.k + k][1], self.limit)
        i = int(np.flatnonzero(np.isnan(merged))[0])
        return NonFinite(OUTPUT, at(start + i), np.nan, self.limit)

    def abs_bits(self, scale=None, want=None) -> Iterator[list]:
        """Iterator over the chunks of the K models' ``|δ|`` (or ``|scale_k δ|``) uint32 bit patterns,
        ``None`` for a model not in ``want``; one reused buffer per model (valid until the next
        chunk)."""
        bufs = [scratch(("bits", i), 4 * min(self.chunk, self.n)).view(np.float32) for i in range(self.k)]
        for sl in self.slices:
            b, rows = self._blocks.get(sl.start, sl.stop)
            bits = []
            for i, r in enumerate(rows):
                if want is not None and not want[i]:
                    bits.append(None)
                    continue
                d = bufs[i][:sl.stop - sl.start]
                if self.deltas:
                    np.copyto(d, r)
                else:
                    np.subtract(r, b, out=d)
                if scale is not None:
                    np.multiply(d, scale[i], out=d)
                bits.append(np.abs(d, out=d).view(np.uint32))
            yield bits

    def chunk_abs_bits(self, c: int, i: int) -> np.ndarray:
        """Model ``i``'s unscaled ``|δ|`` bits in chunk ``c`` (a fresh array)."""
        b, rows = self.raw(c)
        d = rows[i] if self.deltas else rows[i] - b
        return abs_bits(d)

    def _gather(self, idx: np.ndarray):
        """``(base, tensors)`` at the sorted flat positions ``idx``, kept for the next call with the
        same ``idx`` (an order statistic samples every model at the same positions). Streamed,
        one walk over the chunks that hold a sampled position, each read from its first to its
        last sampled entry."""
        if self._gathered[0] is idx:
            return self._gathered[1]
        gather = getattr(self._blocks, "gather", None)
        if gather is not None:
            got = gather(idx)
        else:
            idx = np.asarray(idx, np.int64)
            base = np.empty(idx.size, np.float32)
            rows = [np.empty(idx.size, np.float32) for _ in range(self.k)]
            bounds = np.searchsorted(idx, [sl.start for sl in self.slices] + [self.n])
            for c in range(len(self.slices)):
                i0, i1 = int(bounds[c]), int(bounds[c + 1])
                if i0 == i1:
                    continue
                lo, hi = int(idx[i0]), int(idx[i1 - 1]) + 1
                b, ts = self._blocks.get(lo, hi)
                at = idx[i0:i1] - lo
                base[i0:i1] = b[at]
                for r, t in zip(rows, ts):
                    r[i0:i1] = t[at]
            got = (base, tuple(rows))
        self._gathered = (idx, got)
        return got

    def sampled_abs_bits(self, i: int, idx: np.ndarray, scale=None) -> np.ndarray:
        """Model ``i``'s ``|δ|`` (or ``|scale_i δ|``) bits at the sorted flat positions ``idx``."""
        b, rows = self._gather(idx)
        d = rows[i] if self.deltas else rows[i] - b
        return abs_bits(d if scale is None else d * scale[i])

    def sampled_inputs(self, idx: np.ndarray):
        """``(base, tensors)`` at the sorted flat positions ``idx`` (copies), e.g. to bracket an order
        statistic of a per-entry function of all K inputs."""
        b, rows = self._gather(idx)
        return b.copy(), tuple(r.copy() for r in rows)
