"""Row blocks from host memory to the device: the one staging mechanism of the statistics passes.

A statistics pass hands the device blocks of B rows (``BLOCK_ROWS`` by default), B rounded up to
a multiple of the device count so the rows shard evenly (:func:`block_rows_for`). Where a block
cannot be used in place, its rows are copied into a staging buffer. :class:`Staging` owns those
buffers and the bound on blocks in flight, with one rule:

* each input has ``depth`` staging buffers, 64-byte aligned (XLA:CPU then reads them in place),
  allocated on first use and reused in turn: block ``i`` uses buffer ``i mod depth``;
* before block ``i`` is staged, :meth:`Staging.wait_turn` waits for block ``i − depth`` — the
  last block that used that buffer — so at most ``depth − 1`` blocks are in flight while the
  host stages the next one (async dispatch would otherwise queue staged blocks without limit).

Users: ``stats.gram_stats`` stages blocks of dense arrays (:class:`ArrayBlocks`: in place when
possible, else copied); the checkpoint passes (``passes.statistics``, ``passes.mask``) read the
selected entries of a tensor source a row block at a time with :class:`RowReader`, straight into
the block (one buffer per block, nothing tensor-sized).
"""

from __future__ import annotations

import collections

import jax
import numpy as np

from unmerge_jax.hostmem import ALIGN, aligned_empty
from unmerge_jax.io.dtypes import to_float32
from unmerge_jax.kernels.stats import FLAT_PAD
from unmerge_jax.sources import AdapterSource, CheckpointSource, TensorSource

BLOCK_ROWS = 1 << 16  # rows per block of every statistics pass (bounds the staging buffers)


def block_rows_for(n_rows: int, block_rows: int, n_devices: int) -> int:
    """Rows per block: ``block_rows`` capped at ``n_rows``, at least one per device, rounded up to a
    multiple of ``n_devices``."""
    rows = max(int(n_devices), min(int(block_rows), int(n_rows)))
    return -(-rows // n_devices) * n_devices


class Staging:
    """Reusable staging buffers and the bound on blocks in flight, for the blocks of one pass.

    Args:
      depth: buffers per input; at most ``depth − 1`` blocks are in flight while one is staged.

    Use: per block ``i``, :meth:`wait_turn` before staging it, :meth:`buffer` for each input that
    needs a copy, then :meth:`dispatched` with an array that is ready once the device is done with
    the block.
    """

    def __init__(self, depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = int(depth)
        self._buffers: dict = {}
        self._inflight: collections.deque = collections.deque()

    def wait_turn(self) -> None:
        """Wait until fewer than ``depth`` blocks are in flight: the oldest one's buffers may then be refilled."""
        while len(self._inflight) >= self.depth:
            jax.block_until_ready(self._inflight.popleft())

    def dispatched(self, marker) -> None:
        """Record a dispatched block; ``marker`` (a device array) is ready when the device no longer reads it."""
        self._inflight.append(marker)

    def buffer(self, key, i: int, size: int, dtype) -> np.ndarray:
        """The aligned 1-D buffer of ``size`` entries for input ``key`` and block ``i`` (``i mod depth``)."""
        slot = (key, i % self.depth)
        buf = self._buffers.get(slot)
        if buf is None or buf.size != size or buf.dtype != np.dtype(dtype):
            buf = self._buffers[slot] = aligned_empty(size, dtype)
        return buf


class ArrayBlocks:
    """Hands row blocks of one dense input to the device, copying only when it cannot be used in place.

    JAX arrays are sliced on their device. A NumPy block is passed as is when it is C-contiguous
    and full and either 64-byte aligned or (``flat`` mode, one device) preceded within the array
    by the entries back to a 64-byte boundary: it then goes over as a flat buffer from that
    boundary plus the shift to the block. Otherwise it is copied into the input's staging buffer
    of :class:`Staging` (used in turn, so block i+1 is staged while the device still reads block
    i), and a short last block is zero-padded there.

    Args:
      x: (n, cols) input.
      block: rows per block.
      flat: hand blocks over as ``(flat buffer, shift)`` pairs (``kernels.stats.flat_block_stats``).
      before_copy: called before a staging buffer is refilled (flat mode: the device may still
        read it through the running total).
      staging: the pass's :class:`Staging` (default: a private one of depth 2).

    ``block()`` returns a (rows, cols) array, or in ``flat`` mode a ``(buffer, shift)`` pair.
    """

    def __init__(self, x, block: int, flat: bool = False, before_copy=None, staging: Staging | None = None):
        self.x, self.block_rows, self.flat = x, block, flat
        self.before_copy = before_copy
        self.staging = staging if staging is not None else Staging()
        self.cols = x.shape[1]
        self.pad = FLAT_PAD[x.dtype.itemsize] if flat else 0

    def block(self, i: int, start: int, stop: int):
        part = self.x[start:stop]
        if isinstance(self.x, jax.Array):
            return part
        full = stop - start == self.block_rows
        if full and self.x.flags.c_contiguous:
            if self.flat:
                shifted = self._shifted(start, stop)
                if shifted is not None:
                    return shifted
            elif part.ctypes.data % ALIGN == 0:
                return part
        buf = self.staging.buffer(id(self), i, self.block_rows * self.cols + self.pad, self.x.dtype)
        if self.before_copy is not None:
            self.before_copy()
        rows = buf[: self.block_rows * self.cols].reshape(self.block_rows, self.cols)
        np.copyto(rows[: stop - start], part)
        if not full:
            rows[stop - start:] = 0
        return (buf, 0) if self.flat else rows

    def _shifted(self, start: int, stop: int):
        """``(flat view from the 64-byte boundary at or before row start, shift)``, or None if that
        boundary or the view's padded end falls outside the array."""
        flat = self.x.reshape(-1)
        size = self.x.dtype.itemsize
        first = start * self.cols
        addr = flat.ctypes.data + first * size
        if addr % size:
            return None
        shift = (addr % ALIGN) // size
        lo, hi = first - shift, first - shift + (stop - start) * self.cols + self.pad
        if lo < 0 or hi > flat.size:
            return None
        return flat[lo:hi], shift


class RowReader:
    """Writes one input's values at selected flat positions of a tensor into a float32 destination.

    A :class:`~unmerge_jax.sources.CheckpointSource` storing float32 is read by one ``pread`` of
    just the range's bytes straight into the destination (a row of the staging block: no
    intermediate copy); other stored dtypes through a scratch buffer of at most ``window``
    entries, converted on the copy. Generated or in-memory tensors through ``read_rows`` of the
    rows covering the range. A LoRA ``ΔW`` is formed once per tensor (``B @ A`` whole, held
    while its rows are staged): BLAS may round a product of a row subset ``B[rows] @ A``
    differently in the last bit, and the statistics must equal those of the whole product. A
    compressed selection reads windows of at most ``window`` entries spanning its kept indices
    and gathers them. ``touches(name)`` False → zeros, nothing read.
    """

    def __init__(self, src: TensorSource, touches=None, *, window: int):
        self.src = src
        self.stored = isinstance(src, CheckpointSource)
        self.whole = isinstance(src, AdapterSource)
        self.touches = touches if touches is not None else (lambda name: True)
        self.window = max(1, int(window))
        self._scratch = None
        self._held = (None, None)  # (name, flat ΔW) of the adapter tensor being staged
        self._held_buf = None

    def scratch(self, n: int, dtype) -> np.ndarray:
        nbytes = n * np.dtype(dtype).itemsize
        if self._scratch is None or self._scratch.size < nbytes:
            self._scratch = aligned_empty(max(nbytes, self.window * 4))
        return self._scratch[:nbytes].view(dtype)

    def fill(self, name, index, pos: int, take: int, dst: np.ndarray) -> None:
        """``dst[:] =`` the values at flat positions ``index[pos:pos + take]`` (``pos:pos + take``
        when ``index`` is None) of tensor ``name``."""
        if not self.touches(name):
            dst[:] = 0.0
            return
        if index is None:
            self._range(name, pos, pos + take, dst)
            return
        idx = index[pos:pos + take]
        i = 0
        while i < take:  # windows of at most `window` entries from the next kept index on
            lo = int(idx[i])
            cut = i + int(np.searchsorted(idx[i:], lo + self.window, side="left"))
            hi = int(idx[cut - 1]) + 1
            part = self.scratch(hi - lo, np.float32)
            self._range(name, lo, hi, part)
            np.take(part, idx[i:cut] - lo, out=dst[i:cut])
            i = cut

    def held(self, name) -> np.ndarray:
        """The flat float32 ``ΔW`` of adapter tensor ``name``, formed once and held until the next
        tensor (for a pass that needs the whole tensor too, e.g. its trimming thresholds)."""
        if self._held[0] != name:
            self._held = (None, None)
            # One buffer, reused from tensor to tensor: a fresh ΔW per tensor costs a page fault
            # per 4 KiB (the kernel zeroes each new page) on top of the product.
            size = int(np.prod(self.src.shape(name), dtype=np.int64))
            if self._held_buf is None or self._held_buf.size < size:
                self._held_buf = aligned_empty(size, np.float32)
            self._held = (name, self.src.read(name, out=self._held_buf[:size]).reshape(-1))
        return self._held[1]

    def _range(self, name, lo: int, hi: int, dst: np.ndarray) -> None:
        """``dst[:] =`` flat entries ``lo:hi`` of ``name`` as float32."""
        src = self.src
        if self.stored:
            if src.dtype(name) == "F32":
                src.read_raw_flat(name, lo, hi, out=dst)
                return
            raw = self.scratch_raw(name, hi - lo)
            to_float32(src.read_raw_flat(name, lo, hi, out=raw), dst)
            return
        if self.whole:
            dst[:] = self.held(name)[lo:hi]
            return
        shape = src.shape(name)
        if len(shape) <= 1:
            part = src.read_rows(name, lo, hi) if shape else src.read(name)
            dst[:] = part.reshape(-1)[: hi - lo] if shape else part.reshape(-1)[lo:hi]
            return
        width = int(np.prod(shape[1:], dtype=np.int64))
        r0, r1 = lo // width, -(-hi // width)
        rows = src.read_rows(name, r0, r1).reshape(-1)
        dst[:] = rows[lo - r0 * width: hi - r0 * width]

    def scratch_raw(self, name, n: int) -> np.ndarray:
        """A byte buffer for ``n`` stored entries of ``name`` (kept apart from the float32 window)."""
        nbytes = n * 8
        buf = getattr(self, "_raw", None)
        if buf is None or buf.size < nbytes:
            buf = self._raw = aligned_empty(max(nbytes, self.window * 8))
        return buf[:nbytes]
