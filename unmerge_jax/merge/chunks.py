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

from unmerge_jax.hostmem import aligned_empty
from unmerge_jax.orderstats import abs_bits

CHUNK = 1 << 20  # elements per kernel call (4 MiB float32 per input)

_SCRATCH = threading.local()


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
      out: float32 buffer of shape ``S`` for the result; may be ``base`` itself (the statistics
        pass reads the base before the apply pass overwrites it chunk by chunk). Default: a new
        aligned copy of ``base``.

    Attributes:
      n, k, chunk, deltas, slices; ``out`` (shape ``S``).
    """

    def __init__(self, base: np.ndarray, tensors, *, deltas: bool, chunk: int, out: np.ndarray | None = None):
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
        self.chunk = max(1, int(chunk))
        self.slices = [slice(s, min(s + self.chunk, self.n)) for s in range(0, self.n, self.chunk)]
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
        """Write a kernel's result for chunk ``c`` (padding dropped) into ``out``."""
        sl = self.slices[c]
        self._out[sl] = np.asarray(merged)[:sl.stop - sl.start]

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
