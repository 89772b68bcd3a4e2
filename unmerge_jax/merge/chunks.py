"""One tensor's base and K inputs, flattened and cut into fixed-size chunks for the merge kernels.

A method's statistics and apply passes both walk the same chunks (:class:`TensorChunks`), so a
tensor is never copied whole: the only tensor-sized buffers are the 1 + K inputs (and ``out``,
which may be the base buffer itself). Scratch buffers are 64-byte aligned
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


class TensorChunks:
    """The chunks of one tensor: base ``b`` and K inputs (task vectors, or fine-tuned weights with
    ``deltas=False``), flat, in slices of ``chunk`` entries, and the output buffer they merge into.

    :meth:`inputs` hands every chunk to a kernel at one fixed length: a tensor's last, shorter
    chunk is copied into zero-padded aligned buffers, so each kernel compiles once per method and
    chunk size instead of once per distinct tail length (each compile took 0.3–0.7 s). Padded
    entries have δ = 0 and are cut off the output; the statistics they could touch (tie counts,
    L1 sums) are zero for them or unused after the last chunk. :meth:`raw` gives the unpadded
    chunk (RAM's counting pass: a negative ε would count the zeros).

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
      n, k, chunk, deltas, slices, limit (float32); ``out`` (shape ``S``); ``row_len`` (entries per
      row of the last axis; ``n`` for a 0-/1-D tensor); ``rows`` (chunks hold whole rows).
    """

    def __init__(self, base: np.ndarray, tensors, *, deltas: bool, chunk: int, out: np.ndarray | None = None,
                 limit: float = np.inf, rows: bool = False):
        base = np.asarray(base, np.float32)
        if out is None:
            out = aligned_empty(base.nbytes).view(np.float32).reshape(base.shape)
            out[...] = base
        self.out = out
        self.deltas = bool(deltas)
        self._base = base.reshape(-1)
        self._rows = [np.asarray(t, np.float32).reshape(-1) for t in tensors]
        self._out = out.reshape(-1)
        self.n, self.k = self._base.size, len(self._rows)
        self.row_len = int(base.shape[-1]) if base.ndim >= 2 else max(1, self.n)
        self.rows = bool(rows)
        self.chunk = max(1, int(chunk))
        if self.rows:
            self.chunk = max(1, self.chunk // self.row_len) * self.row_len
        self.slices = [slice(s, min(s + self.chunk, self.n)) for s in range(0, self.n, self.chunk)]
        self.limit = np.float32(limit)
        self._pad = None

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def sizes(self) -> np.ndarray:
        return np.asarray([sl.stop - sl.start for sl in self.slices])

    def start(self, c: int) -> np.int64:
        """Offset of chunk ``c`` in the flat tensor (keys counter-based random draws)."""
        return np.int64(self.slices[c].start)

    def raw(self, c: int):
        """``(base, tensors)`` of chunk ``c``, unpadded views."""
        sl = self.slices[c]
        return self._base[sl], tuple(r[sl] for r in self._rows)

    def inputs(self, c: int):
        """``(base, tensors)`` of chunk ``c`` at the full chunk length (the tail zero-padded)."""
        sl = self.slices[c]
        size = sl.stop - sl.start
        if size == self.chunk:
            return self._base[sl], tuple(r[sl] for r in self._rows)
        if self._pad is None:
            self._pad = [scratch(("pad", i), 4 * self.chunk).view(np.float32) for i in range(1 + self.k)]
        for buf, src in zip(self._pad, [self._base, *self._rows]):
            buf[:size] = src[sl]
            buf[size:] = 0.0
        return self._pad[0], tuple(self._pad[1:])

    def store(self, c: int, merged) -> None:
        """Write a kernel's result for chunk ``c`` (padding dropped) into ``out``.

        Raises:
          NonFinite: the chunk holds a NaN — an entry the kernel marked (a non-finite input, or a
            merged value that is not finite or not below :attr:`limit`). Found by one NumPy
            ``max`` (which propagates NaN); only then are the inputs searched for the culprit.
        """
        sl = self.slices[c]
        m = np.asarray(merged)[:sl.stop - sl.start]
        if m.size and np.isnan(m.max()):
            raise self.diagnose(c, m)
        self._out[sl] = m

    def diagnose(self, c: int, merged: np.ndarray) -> NonFinite:
        """The :class:`NonFinite` error of chunk ``c`` (the slow path): the first non-finite entry of
        the base, then of each input, then of each task vector formed from them, else the first
        marked entry of ``merged``. Inputs are searched from chunk ``c`` to the end of the tensor:
        the chunks before it passed the kernel's check, and a NaN further on may have reached this
        chunk through the statistics pass (a NaN L1 sum or threshold)."""
        start = self.slices[c].start
        shape = self.out.shape

        def at(i):
            return tuple(int(j) for j in np.unravel_index(start + i, shape))

        b = self._base[start:]
        i = _first_bad(b)
        if i is not None:
            return NonFinite(BASE, at(i), b[i], self.limit)
        for k, r in enumerate(self._rows):
            i = _first_bad(r[start:])
            if i is not None:
                return NonFinite(k, at(i), r[start + i], self.limit)
        if not self.deltas:
            with np.errstate(over="ignore", invalid="ignore"):
                for k, r in enumerate(self._rows):
                    d = r[start:] - b
                    i = _first_bad(d)
                    if i is not None:
                        return NonFinite((DELTA, k), at(i), d[i], self.limit)
        i = int(np.flatnonzero(np.isnan(merged))[0])
        return NonFinite(OUTPUT, at(i), np.nan, self.limit)

    def abs_bits(self, scale=None, want=None) -> Iterator[list]:
        """Iterator over the chunks of the K models' ``|δ|`` (or ``|scale_k δ|``) uint32 bit patterns,
        ``None`` for a model not in ``want``; one reused buffer per model (valid until the next
        chunk)."""
        bufs = [scratch(("bits", i), 4 * min(self.chunk, self.n)).view(np.float32) for i in range(self.k)]
        for sl in self.slices:
            b = self._base[sl]
            bits = []
            for i, r in enumerate(self._rows):
                if want is not None and not want[i]:
                    bits.append(None)
                    continue
                d = bufs[i][:sl.stop - sl.start]
                if self.deltas:
                    np.copyto(d, r[sl])
                else:
                    np.subtract(r[sl], b, out=d)
                if scale is not None:
                    np.multiply(d, scale[i], out=d)
                bits.append(np.abs(d, out=d).view(np.uint32))
            yield bits

    def chunk_abs_bits(self, c: int, i: int) -> np.ndarray:
        """Model ``i``'s unscaled ``|δ|`` bits in chunk ``c`` (a fresh array)."""
        sl = self.slices[c]
        d = self._rows[i][sl] if self.deltas else self._rows[i][sl] - self._base[sl]
        return abs_bits(d)

    def sampled_abs_bits(self, i: int, idx: np.ndarray, scale=None) -> np.ndarray:
        """Model ``i``'s ``|δ|`` (or ``|scale_i δ|``) bits at the flat positions ``idx``."""
        r = self._rows[i]
        d = r[idx] if self.deltas else r[idx] - self._base[idx]
        return abs_bits(d if scale is None else d * scale[i])

    def sampled_inputs(self, idx: np.ndarray):
        """``(base, tensors)`` at the flat positions ``idx`` (copies), e.g. to bracket an order
        statistic of a per-entry function of all K inputs."""
        return self._base[idx], tuple(r[idx] for r in self._rows)
