"""The one staging mechanism of the statistics passes: block sizes rounded to the device count,
aligned buffers reused in turn, and the wait for the block that last used a buffer."""

import jax.numpy as jnp
import numpy as np
import pytest

from unmerge_jax.hostmem import ALIGN
from unmerge_jax.staging import BLOCK_ROWS, ArrayBlocks, Staging, block_rows_for


@pytest.mark.parametrize("n_rows, block_rows, n_devices, want", [
    (10**6, BLOCK_ROWS, 8, BLOCK_ROWS),  # a full block: already a multiple of 8
    (10, BLOCK_ROWS, 8, 16),             # capped at the rows, rounded up to the devices
    (3, BLOCK_ROWS, 1, 3),
    (0, BLOCK_ROWS, 4, 4),               # at least one row per device
    (10**5, 5001, 8, 5008),
    (10**5, 5000, 8, 5000),
    (2, 1, 8, 8),
])
def test_block_rows_rounded_to_the_device_count(n_rows, block_rows, n_devices, want):
    got = block_rows_for(n_rows, block_rows, n_devices)
    assert got == want and got % n_devices == 0


class _Marker:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def block_until_ready(self):
        self.log.append(self.name)
        return self


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_wait_turn_waits_for_the_block_that_last_used_the_buffer(depth):
    st, waited = Staging(depth), []
    for i in range(7):
        st.wait_turn()
        # block i is staged: every block up to i - depth has been waited for, none after it
        assert waited == list(range(max(0, i - depth + 1)))
        st.dispatched(_Marker(i, waited))
    st.wait_turn()
    assert waited == list(range(7 - depth + 1))


def test_buffers_are_aligned_and_reused_in_turn():
    st = Staging(3)
    bufs = [st.buffer("d", i, 1000, np.float32) for i in range(6)]
    assert all(b.ctypes.data % ALIGN == 0 and b.shape == (1000,) and b.dtype == np.float32 for b in bufs)
    assert all(bufs[i] is bufs[i + 3] for i in range(3))
    assert len({id(b) for b in bufs}) == 3
    assert st.buffer("v", 0, 1000, np.float32) is not bufs[0]  # one set per input
    assert st.buffer("d", 0, 2000, np.float64).size == 2000     # a new shape: a new buffer


def test_array_blocks_copy_only_what_cannot_be_used_in_place():
    from unmerge_jax.hostmem import aligned_empty

    x = aligned_empty((40, 4), np.float32)
    x[...] = np.arange(160, dtype=np.float32).reshape(40, 4)
    st = Staging(2)
    blocks = ArrayBlocks(x, 16, staging=st)
    full = blocks.block(0, 0, 16)
    assert np.shares_memory(full, x)                          # aligned and full: in place
    last = blocks.block(2, 32, 40)                            # ragged: copied, zero-padded
    assert not np.shares_memory(last, x) and last.shape == (16, 4)
    np.testing.assert_array_equal(last[:8], x[32:])
    assert not last[8:].any()
    np.testing.assert_array_equal(ArrayBlocks(jnp.asarray(x), 16).block(1, 16, 32), x[16:32])  # JAX: sliced
