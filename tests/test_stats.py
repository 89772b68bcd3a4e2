"""Statistics (``unmerge_jax.stats``): Gram sums against float64 NumPy across devices, blocks, chunks
and staging buffers; bootstrap replicates as weighted Grams; save/load; one-line errors."""

import jax
import numpy as np
import pytest

import unmerge_jax as u
from tests._problems import KINDS, N, f64, make_dictionary, make_targets, rand


@pytest.mark.parametrize("kind", KINDS)
def test_gram_stats_match_float64_numpy(kind):
    d = make_dictionary(kind)
    v, _ = make_targets(d)
    st = u.gram_stats(d, v)
    d64, v64 = f64(d), f64(v)
    np.testing.assert_allclose(st.gram, d64.T @ d64, rtol=1e-12, atol=1e-12 * np.abs(d64.T @ d64).max())
    np.testing.assert_allclose(st.cross, d64.T @ v64, rtol=1e-12, atol=1e-12 * np.abs(d64.T @ v64).max())
    np.testing.assert_allclose(st.target_sq, (v64**2).sum(0), rtol=1e-12)
    assert int(st.n_rows) == N
    assert st.gram.dtype == np.float64


def test_sharded_equals_single_device_and_streaming():
    assert len(jax.devices()) == 8, "conftest forces 8 host devices"
    d, v = rand(n=10_007)
    many = u.gram_stats(d, v, seeds=3, key=7, block_rows=4096)
    one = u.gram_stats(d, v, seeds=3, key=7, devices=jax.devices()[:1], block_rows=4096)
    blocks = [(d[a:b], v[a:b]) for a, b in [(0, 13), (13, 5000), (5000, 10_007)]]
    streamed = u.iter_gram_stats(blocks, seeds=3, key=7)
    for a, b, c in zip(many, one, streamed):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-9)


def test_bootstrap_replicates_are_weighted_grams():
    d, v = rand(n=3000)
    st = u.gram_stats(d, v, seeds=2, key=3)
    from unmerge_jax.kernels.random import poisson1_weights as bootstrap_weights

    w = np.asarray(bootstrap_weights(jax.random.key(3), np.arange(3000), 2))
    assert set(np.unique(w)) <= set(range(16)) and abs(w.mean() - 1) < 0.1  # Poisson(1)
    d64, v64 = d.astype(np.float64), v.astype(np.float64)
    for s in range(2):
        np.testing.assert_allclose(st.boot_gram[s], (d64 * w[s][:, None]).T @ d64, rtol=1e-12)
        np.testing.assert_allclose(st.boot_cross[s], (d64 * w[s][:, None]).T @ v64, rtol=1e-12)
        np.testing.assert_allclose(st.boot_target_sq[s], (w[s][:, None] * v64**2).sum(0), rtol=1e-12)
        assert st.boot_n_rows[s] == w[s].sum()
    assert not np.allclose(st.boot_gram[0], st.boot_gram[1])


def test_save_load_roundtrip(tmp_path):
    d, v = rand()
    st = u.gram_stats(d, v, seeds=2)
    u.save_stats(tmp_path / "s.npz", st, {"source": "test"})
    back, prov = u.load_stats(tmp_path / "s.npz")
    assert prov == {"source": "test"}
    for a, b in zip(st, back):
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temp file left behind


def test_chunked_statistics_equal_float64_numpy_across_chunk_and_device_boundaries():
    # More rows than one scan chunk per device, and a ragged last block: padding and chunking
    # must not change the sums.
    from unmerge_jax.kernels.stats import CHUNK_ROWS

    rng = np.random.default_rng(7)
    n = CHUNK_ROWS * 8 * 2 + 123
    d = rng.standard_normal((n, 3)).astype(np.float32)
    v = rng.standard_normal((n, 2)).astype(np.float32)
    st = u.gram_stats(d, v, block_rows=CHUNK_ROWS * 8 + 5000)
    d64, v64 = d.astype(np.float64), v.astype(np.float64)
    np.testing.assert_allclose(st.gram, d64.T @ d64, rtol=1e-12)
    np.testing.assert_allclose(st.cross, d64.T @ v64, rtol=1e-11, atol=1e-9)
    np.testing.assert_allclose(st.target_sq, (v64 ** 2).sum(0), rtol=1e-12)
    assert int(st.n_rows) == n


@pytest.mark.parametrize("n_devices", [8, 1])
@pytest.mark.parametrize("aligned", [True, False])
def test_staged_and_in_place_blocks_equal_float64_numpy(aligned, n_devices):
    # Five blocks through the two reused staging buffers (misaligned input) or used in place
    # (64-byte aligned input), with bootstrap replicates: a buffer refilled while the device still
    # read it would show up as wrong sums here.
    from unmerge_jax.kernels.random import poisson1_weights as bootstrap_weights
    from unmerge_jax.hostmem import ALIGN, aligned_empty

    rng = np.random.default_rng(11)
    n, block = 5 * 2048 - 77, 2048
    src = rng.standard_normal((n, 9)).astype(np.float32)
    if aligned:
        x = aligned_empty(src.shape, np.float32)
        x[...] = src
    else:
        raw = np.empty(src.size + 1, np.float32)
        x = raw[1:].reshape(src.shape) if raw.ctypes.data % ALIGN == 0 else raw[:-1].reshape(src.shape)
        x[...] = src
        assert x.ctypes.data % ALIGN != 0
    d, v = x[:, :4], np.ascontiguousarray(x[:, 4:])  # d is a strided view: always staged
    # One device: the flat path, whose staged blocks (all of them for the strided d) refill the
    # two buffers after waiting for the running total.
    st = u.gram_stats(d, v, seeds=2, key=5, block_rows=block, devices=jax.devices()[:n_devices])
    d64, v64 = src[:, :4].astype(np.float64), src[:, 4:].astype(np.float64)
    np.testing.assert_allclose(st.gram, d64.T @ d64, rtol=1e-12)
    np.testing.assert_allclose(st.cross, d64.T @ v64, rtol=1e-11, atol=1e-9)
    w = np.asarray(bootstrap_weights(jax.random.key(5), np.arange(n), 2)).astype(np.float64)
    for s in range(2):
        np.testing.assert_allclose(st.boot_cross[s], (d64 * w[s][:, None]).T @ v64, rtol=1e-11, atol=1e-9)
        np.testing.assert_allclose(st.boot_target_sq[s], (w[s][:, None] * v64**2).sum(0), rtol=1e-12)
    np.testing.assert_array_equal(src, x)  # the input is never written


def test_float64_overflow_in_statistics_is_a_clear_error():
    d = np.ones((10, 2))
    d[3, 1] = 1e200  # finite, but its square is not
    with pytest.raises(u.UnmergeError, match="too large"):
        u.gram_stats(d, np.ones(10))


def test_block_bootstrap_weights_whole_units_and_matches_per_row_formula():
    # bootstrap_block=CHUNK_ROWS: every row of unit u = row // 4096 carries that unit's Poisson
    # weight. Aligned blocks take the fast path (chunk products weighted once per replicate),
    # misaligned streamed blocks the per-row path; both must equal the float64 formula, with 1 and
    # 8 devices.
    from unmerge_jax.kernels.random import poisson1_weights as bootstrap_weights
    from unmerge_jax.kernels.stats import CHUNK_ROWS

    rng = np.random.default_rng(21)
    n = 2 * 8 * CHUNK_ROWS + 3000  # two full blocks and a ragged one
    d = rng.standard_normal((n, 3)).astype(np.float32)
    v = rng.standard_normal((n, 2)).astype(np.float32)
    w = np.asarray(bootstrap_weights(jax.random.key(4), np.arange(n) // CHUNK_ROWS, 3)).astype(np.float64)
    assert all(np.all(w[:, i * CHUNK_ROWS:(i + 1) * CHUNK_ROWS] == w[:, [i * CHUNK_ROWS]]) for i in range(n // CHUNK_ROWS))
    d64, v64 = d.astype(np.float64), v.astype(np.float64)
    runs = {
        "fast, 8 devices": u.gram_stats(d, v, seeds=3, key=4, bootstrap_block=CHUNK_ROWS, block_rows=8 * CHUNK_ROWS),
        "fast, 1 device": u.gram_stats(d, v, seeds=3, key=4, bootstrap_block=CHUNK_ROWS, block_rows=8 * CHUNK_ROWS,
                                       devices=jax.devices()[:1]),
        "per-row path": u.iter_gram_stats([(d[a:a + 10_007], v[a:a + 10_007]) for a in range(0, n, 10_007)],
                                          seeds=3, key=4, bootstrap_block=CHUNK_ROWS),
    }
    for name, st in runs.items():
        for s in range(3):
            np.testing.assert_allclose(st.boot_gram[s], (d64 * w[s][:, None]).T @ d64, rtol=1e-12, err_msg=name)
            np.testing.assert_allclose(st.boot_cross[s], (d64 * w[s][:, None]).T @ v64, rtol=1e-10, atol=1e-8,
                                       err_msg=name)
            np.testing.assert_allclose(st.boot_target_sq[s], w[s] @ v64**2, rtol=1e-12, err_msg=name)
            assert st.boot_n_rows[s] == w[s].sum(), name
        np.testing.assert_allclose(st.gram, d64.T @ d64, rtol=1e-12, err_msg=name)


def test_cheap_replicate_path_only_when_chunks_sit_inside_units():
    from unmerge_jax.kernels.stats import CHUNK_ROWS as C, chunks_inside_units

    assert chunks_inside_units(3, C, 5 * C, 2 * C)
    assert chunks_inside_units(3, 4 * C, 0, C)
    assert not chunks_inside_units(0, C, 0, C)  # no replicates
    assert not chunks_inside_units(3, 1, 0, C)  # per-row units
    assert not chunks_inside_units(3, C // 2, 0, C)  # units smaller than a chunk
    assert not chunks_inside_units(3, C, 7, C)  # block starts mid-chunk
    assert not chunks_inside_units(3, C, 0, C + 8)  # device shares straddle chunks


def test_automatic_bootstrap_unit():
    from unmerge_jax.kernels.stats import CHUNK_ROWS

    assert u.bootstrap_unit_rows(1000) == 1 and u.bootstrap_unit_rows(200 * CHUNK_ROWS - 1) == 1
    assert u.bootstrap_unit_rows(200 * CHUNK_ROWS) == CHUNK_ROWS == u.bootstrap_unit_rows(10**9)
    assert u.bootstrap_unit_rows(10**9, 1) == 1 and u.bootstrap_unit_rows(10, 64) == 64
    with pytest.raises(u.UnmergeError, match="bootstrap_block must be >= 1"):
        u.gram_stats(np.ones((4, 1)), np.ones(4), seeds=1, bootstrap_block=0)


@pytest.mark.parametrize("offset_bytes", [0, 16, 48])
def test_one_device_reads_misaligned_host_arrays_in_place(offset_bytes):
    # On one device, blocks of a C-contiguous NumPy array go over as flat buffers starting at the
    # 64-byte boundary at or before them (NumPy's large arrays start 16 bytes past one), so they
    # are not copied. The first block (no room before it) and the ragged last one are staged.
    from unmerge_jax.hostmem import ALIGN, aligned_empty
    from unmerge_jax.kernels.random import poisson1_weights as bootstrap_weights
    from unmerge_jax.kernels.stats import CHUNK_ROWS
    from unmerge_jax.staging import ArrayBlocks as _Staging

    rng = np.random.default_rng(offset_bytes)
    n, block = 5 * 2 * CHUNK_ROWS - 333, 2 * CHUNK_ROWS

    def at_offset(cols):
        raw = aligned_empty(n * cols * 4 + ALIGN, np.uint8)
        x = raw[offset_bytes:offset_bytes + n * cols * 4].view(np.float32).reshape(n, cols)
        x[...] = rng.standard_normal((n, cols))
        return x

    d, v = at_offset(3), at_offset(5)
    before = d.copy(), v.copy()
    assert d.ctypes.data % ALIGN == offset_bytes
    shifts = [_Staging(v, block, flat=True)._shifted(a, a + block) for a in range(block, n - block, block)]
    assert all(s is not None and s[0].ctypes.data % ALIGN == 0 for s in shifts)
    st = u.gram_stats(d, v, seeds=2, key=3, block_rows=block, bootstrap_block=CHUNK_ROWS, devices=jax.devices()[:1])
    d64, v64 = d.astype(np.float64), v.astype(np.float64)
    np.testing.assert_allclose(st.gram, d64.T @ d64, rtol=1e-12)
    np.testing.assert_allclose(st.cross, d64.T @ v64, rtol=1e-11, atol=1e-9)
    np.testing.assert_allclose(st.target_sq, (v64 ** 2).sum(0), rtol=1e-12)
    w = np.asarray(bootstrap_weights(jax.random.key(3), np.arange(n) // CHUNK_ROWS, 2)).astype(np.float64)
    for s in range(2):
        np.testing.assert_allclose(st.boot_cross[s], (d64 * w[s][:, None]).T @ v64, rtol=1e-11, atol=1e-9)
        np.testing.assert_allclose(st.boot_target_sq[s], w[s] @ v64**2, rtol=1e-12)
        assert st.boot_n_rows[s] == w[s].sum()
    other = u.gram_stats(d, v, seeds=2, key=3, block_rows=block, bootstrap_block=CHUNK_ROWS, devices=jax.devices()[3:4])
    for a, b in zip(st, other):  # a device other than the default one: buffers placed explicitly
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(d, before[0])  # inputs are never written
    np.testing.assert_array_equal(v, before[1])
