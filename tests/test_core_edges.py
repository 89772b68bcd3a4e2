"""Edge cases with defined behaviour, statistics plumbing, sweeps and summaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from scipy.optimize import nnls as scipy_nnls

import unmerge_jax as u
from unmerge_jax.solvers import SOLVERS

K, T, N = 8, 6, 600
PARAMS = {"nnls": {}, "omp": {"n_nonzero_coefs": 3}, "lasso": {"alpha": 1e-4}, "ridge": {"alpha": 0.0},
          "elastic_net": {"alpha": 1e-4, "l1_ratio": 0.5}, "dot": {"threshold": 0.1}}


def rand(seed=0, n=N, k=K, t=T):
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((n, k)).astype(np.float32)
    w = np.abs(rng.standard_normal((k, t)))
    v = (d.astype(np.float64) @ w + 0.1 * rng.standard_normal((n, t))).astype(np.float32)
    return d, v


def test_every_registered_solver_is_covered_here():
    assert set(PARAMS) == set(SOLVERS)


# ---- statistics -------------------------------------------------------------------------------

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


def test_bootstrap_solve_has_seed_axis_and_recovers_exact_mixtures():
    d, _ = rand()
    w = np.zeros((T, K))
    w[:, :3] = [0.5, 0.3, 0.2]
    w[1] = [0, 0, 0, 0.25, 0.25, 0.25, 0.25, 0]
    res = u.decompose(d, d.astype(np.float64) @ w.T, "nnls", seeds=4)
    assert res.coef.shape == (4, T, K)
    np.testing.assert_allclose(res.coef, np.broadcast_to(w, (4, T, K)), atol=1e-9)


# ---- edge cases -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(PARAMS))
def test_single_atom(method):
    rng = np.random.default_rng(0)
    d = rng.standard_normal((N, 1))
    v = 0.7 * d + 0.01 * rng.standard_normal((N, T))
    params = dict(PARAMS[method], **({"n_nonzero_coefs": 1} if method == "omp" else {}))
    res = u.decompose(d, v, method, **params)
    assert res.coef.shape == (T, 1)
    expect = np.linalg.lstsq(d, v, rcond=None)[0][0]
    np.testing.assert_allclose(res.coef[:, 0], expect, rtol=2e-2)


def test_single_target_vector_drops_target_axis():
    d, v = rand()
    res = u.decompose(d, v[:, 0], "nnls")
    assert res.coef.shape == (K,) and np.ndim(res.recon_error) == 0
    ref, _ = scipy_nnls(d.astype(np.float64), v[:, 0].astype(np.float64))
    np.testing.assert_allclose(res.coef, ref, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_duplicate_atoms_singular_gram(method):
    d, v = rand()
    d[:, 3] = d[:, 2]  # G is singular
    res = u.decompose(d, v, method, **PARAMS[method])
    assert np.all(np.isfinite(res.coef))
    d64, v64 = d.astype(np.float64), v.astype(np.float64)
    if method == "nnls":
        for t in range(T):
            ref, _ = scipy_nnls(d64, v64[:, t])
            ours = np.sum((v64[:, t] - d64 @ res.coef[t]) ** 2)
            assert ours <= np.sum((v64[:, t] - d64 @ ref) ** 2) * (1 + 1e-9)
    if method == "ridge":  # alpha = 0 on a singular G: the minimum-norm least-squares solution
        np.testing.assert_allclose(res.coef, (np.linalg.pinv(d64) @ v64).T,
                                   rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(res.coef[:, 2], res.coef[:, 3], rtol=1e-9)
    if method == "omp":
        assert not np.any((res.coef[:, 2] != 0) & (res.coef[:, 3] != 0))


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_zero_target(method):
    d, v = rand()
    v[:, 1] = 0.0
    res = u.decompose(d, v, method, **PARAMS[method])
    np.testing.assert_array_equal(res.coef[1], 0.0)
    assert res.recon_error[1] == 0.0 and res.unexplained[1] == 0.0
    assert bool(res.converged[1])


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_zero_atom_gets_zero_weight(method):
    d, v = rand()
    d[:, 5] = 0.0
    res = u.decompose(d, v, method, **PARAMS[method])
    assert np.all(np.isfinite(res.coef))
    np.testing.assert_array_equal(res.coef[:, 5], 0.0)


@pytest.mark.parametrize("where,bad", [("D", np.nan), ("V", np.inf), ("V", -np.inf)])
def test_non_finite_input_is_a_clear_error(where, bad):
    d, v = rand()
    (d if where == "D" else v)[7, 1] = bad
    with pytest.raises(u.UnmergeError) as err:
        u.decompose(d, v, "nnls")
    msg = str(err.value)
    assert ("dictionary D" if where == "D" else "targets V") in msg and "(7, 1)" in msg and "\n" not in msg


def test_shape_and_parameter_errors():
    d, v = rand()
    with pytest.raises(u.UnmergeError, match="has 600 rows but targets V have 599"):
        u.decompose(d, v[:-1], "nnls")
    with pytest.raises(u.UnmergeError, match="unknown decomposition method 'lars'"):
        u.decompose(d, v, "lars")
    with pytest.raises(u.UnmergeError, match="does not take parameter"):
        u.decompose(d, v, "nnls", alpha=1.0)
    with pytest.raises(u.UnmergeError, match="n_nonzero_coefs must be whole numbers in 1..8"):
        u.decompose(d, v, "omp", n_nonzero_coefs=9)
    with pytest.raises(u.UnmergeError, match="alpha must be >= 0"):
        u.decompose(d, v, "lasso", alpha=-1.0)
    with pytest.raises(u.UnmergeError, match="l1_ratio must be in"):
        u.decompose(d, v, "elastic_net", l1_ratio=1.5)
    with pytest.raises(u.UnmergeError, match="dictionary D is empty"):
        u.decompose(np.zeros((5, 0), np.float32), np.zeros((5, 1), np.float32))
    with pytest.raises(u.UnmergeError, match="1-D or 2-D"):
        u.decompose(np.zeros((5, 2, 2)), np.zeros(5))


def test_unconverged_runs_warn_and_say_so():
    from tests.test_solvers import make_dictionary, make_targets

    d = make_dictionary("illcond")
    v, _ = make_targets(d)
    with pytest.warns(RuntimeWarning, match="did not converge within max_iter=10"):
        res = u.decompose(d, v, "lasso", alpha=1e-8, positive=False, max_iter=10)
    assert not res.converged.all() and np.all(res.n_iter <= 10)


# ---- sweep and summarize ------------------------------------------------------------------------

def test_sweep_rows_match_individual_solves_and_truth_metrics():
    d, _ = rand()
    truth = np.zeros((T, K))
    truth[0, [0, 1]] = 0.5
    truth[1, [2, 3, 4]] = 1 / 3
    truth[2:, 5] = 1.0
    v = d.astype(np.float64) @ truth.T
    st = u.gram_stats(d, v, seeds=3, key=0)
    table = u.sweep(st, seeds=3, truth=truth, target_names=[f"t{i}" for i in range(T)])
    n_runs = sum(len(u.sweep.__globals__["grid_points"](m, g, K)) for m, g in u.PAPER_GRID.items())
    # OMP k=1..8 (8) + Lasso (3) + Ridge (4) + ElasticNet 3×3 (9) + NNLS (1) + dot thresholds (3)
    assert len(table) == n_runs * T * 3 == 28 * T * 3
    # One row equals the corresponding solve() on that bootstrap replicate.
    row = table[(table.method == "lasso") & (table.alpha == 1e-7) & (table.seed == 2) & (table.target == "t1")]
    ref = u.solve(st, "lasso", alpha=1e-7)
    np.testing.assert_allclose(np.asarray(row.coef.iloc[0]), ref.coef[2, 1], rtol=1e-9, atol=1e-12)
    nnls = table[table.method == "nnls"]
    assert (nnls.precision == 1).all() and (nnls.recall == 1).all() and (nnls.perfect_match == 1).all()
    assert nnls.weight_error.max() < 1e-8
    omp1 = table[(table.method == "omp") & (table.n_nonzero_coefs == 1) & (table.target == "t1")]
    assert (omp1.precision == 1).all() and np.allclose(omp1.recall, 1 / 3) and (omp1.sparsity == 1).all()


def test_support_metrics_by_hand():
    coef = np.array([[0.5, 0.0, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1]])
    truth = np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1]])
    m = u.metrics.support_metrics(coef, truth)
    np.testing.assert_allclose(m["precision"], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(m["recall"], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(m["perfect_match"], [0, 1, 1])
    np.testing.assert_allclose(m["sparsity"], [2, 0, 4])
    np.testing.assert_allclose(m["weight_error"], [0.5, 0.0, 0.0])


def test_summarize_mean_and_sample_std():
    table = pd.DataFrame({"method": ["nnls"] * 3 + ["lasso"] * 2, "cat": ["a", "a", "b", "a", "b"],
                          "recon_error": [0.1, 0.2, 0.6, 0.5, 0.7], "precision": [1, 1, 0, 1, 0.5]})
    s = u.summarize(table, by=["method"], metrics=["recon_error", "precision"])
    nn = s.frame.set_index("method").loc["nnls"]
    assert nn.recon_error_mean == pytest.approx(0.3) and nn.recon_error_std == pytest.approx(np.std([0.1, 0.2, 0.6], ddof=1))
    assert "| NNLS | 0.30 ± 0.26 | 0.67 ± 0.58 |" in s.markdown
    wide = u.summarize(table, by=["method"], columns="cat", metrics=["recon_error"])
    assert "| NNLS | 0.15 ± 0.07 | 0.60 ± 0.00 |" in wide.markdown


def test_statistics_come_back_on_host_so_solves_run_on_one_device():
    # Regression: replicated 8-device statistics made every solve an 8-way SPMD program, which
    # deadlocked intermittently inside XLA on CPU (elastic_net sweeps hung about one run in three).
    import jax

    assert len(jax.devices()) == 8
    d, v = rand()
    st = u.gram_stats(d, v, seeds=2, key=0)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float64 for a in (st.gram, st.cross, st.boot_gram))
    problems = u.solve.__globals__["stacked_problems"](st, use_seeds=True)
    # Host arrays: the jitted solvers put them on the default device, never on a mesh.
    assert all(isinstance(p, np.ndarray) and p.dtype == np.float64 for p in problems)
    from unmerge_jax.solve import solve_batched

    res = solve_batched(*problems, np.zeros((1, 0)), method="nnls", static=(), full_rank=True)
    assert len(res.coef.devices()) == 1


@pytest.mark.parametrize("case", ["spd", "ill", "rank_deficient", "zero_rows"])
def test_psd_solve_is_pinv(case):
    from unmerge_jax.solvers.common import psd_solve

    rng = np.random.default_rng(3)
    d = rng.standard_normal((50, 7))
    if case == "ill":
        d = d @ np.diag(np.logspace(0, -3, 7))  # κ(D) = 1e3, κ(G) = 1e6
    if case == "rank_deficient":
        d[:, 4] = d[:, 1] - 2 * d[:, 2]
        d[:, 6] = d[:, 0]
    if case == "zero_rows":
        d[:, 3] = 0.0
    g, c = d.T @ d, d.T @ rng.standard_normal(50)
    x = np.asarray(jax.jit(psd_solve)(g, c))
    ref = np.linalg.pinv(g, rcond=1e-13, hermitian=True) @ c
    np.testing.assert_allclose(x, ref, rtol=1e-8 if case != "ill" else 1e-6, atol=1e-10 * np.abs(ref).max())


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


def test_bootstrap_replicate_depends_on_row_and_seed_only():
    from unmerge_jax.kernels.random import poisson1_weights as bootstrap_weights

    key = jax.random.key(9)
    rows = np.arange(200_000)
    w3 = np.asarray(bootstrap_weights(key, rows, 3))
    np.testing.assert_array_equal(np.asarray(bootstrap_weights(key, rows, 2)), w3[:2])  # S does not matter
    np.testing.assert_array_equal(np.asarray(bootstrap_weights(key, rows[5000:6000], 3)), w3[:, 5000:6000])
    big = np.asarray(bootstrap_weights(key, np.asarray([2**40 + 7, 7]), 1))[0]
    assert big.shape == (2,)  # 64-bit row indices hash both words
    # Poisson(1): mean 1, variance 1, P(0) = P(1) = e⁻¹, P(2) = e⁻¹/2; replicates uncorrelated.
    for s in range(3):
        assert abs(w3[s].mean() - 1) < 0.01 and abs(w3[s].var() - 1) < 0.02
        freq = np.bincount(w3[s], minlength=3)[:3] / rows.size
        np.testing.assert_allclose(freq, np.exp(-1) * np.array([1, 1, 0.5]), atol=0.005)
    assert abs(np.corrcoef(w3)[np.triu_indices(3, 1)]).max() < 0.01


def test_float64_overflow_in_statistics_is_a_clear_error():
    d = np.ones((10, 2))
    d[3, 1] = 1e200  # finite, but its square is not
    with pytest.raises(u.UnmergeError, match="too large"):
        u.gram_stats(d, np.ones(10))


def test_well_posed_check_and_its_fast_path():
    # gram_is_well_posed lets every support solve skip the rank-deficient branch. It must say no
    # for singular Grams, and when it says yes every masked, shifted or normalised system it
    # covers must factor at full rank and give the same answer as the general path.
    from unmerge_jax.solvers.common import _pivoted_cholesky, gram_is_well_posed, masked_solve

    rng = np.random.default_rng(5)
    d = rng.standard_normal((400, 8)) @ np.diag(np.logspace(0, -2, 8))
    g = d.T @ d
    assert gram_is_well_posed(g) and gram_is_well_posed(np.stack([g, 2 * g]))
    dup = d.copy()
    dup[:, 5] = dup[:, 2]
    zero = d.copy()
    zero[:, 0] = 0
    for bad in (dup.T @ dup, zero.T @ zero, g * 1e-30, np.stack([g, dup.T @ dup])):
        assert not gram_is_well_posed(bad)
    norm = np.sqrt(np.diag(g))
    k = 8
    masks = rng.random((200, k)) < 0.6
    rhs = rng.standard_normal((200, k))

    @jax.jit
    def check(mat, mask, b):
        m = mask.astype(mat.dtype)
        a = mat * m[:, None] * m[None, :] + jnp.diag(1 - m)
        rank = _pivoted_cholesky(a, k * jnp.finfo(a.dtype).eps * jnp.max(jnp.abs(jnp.diag(a))))[2]
        return rank, masked_solve(mat, b, mask, full_rank=True), masked_solve(mat, b, mask)

    for mat in (g, g / np.outer(norm, norm)):  # as given, and atom-normalised (OMP)
        rank, fast, slow = jax.vmap(check, in_axes=(None, 0, 0))(jnp.asarray(mat), jnp.asarray(masks), jnp.asarray(rhs))
        assert np.all(np.asarray(rank) == k)
        np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), rtol=1e-12, atol=1e-14)


def test_sweep_fast_path_equals_general_path():
    # The sweep takes the full-rank path on a well-posed dictionary; every solver must give the
    # general path's coefficients there.
    from unmerge_jax.solve import solve_batched, stacked_problems
    from unmerge_jax.solvers.common import gram_is_well_posed

    d, v = rand(seed=3)
    st = u.gram_stats(d, v, seeds=2, key=1)
    arrays = stacked_problems(st, use_seeds=True)
    assert gram_is_well_posed(arrays[0])
    for method, swept, static in [("nnls", [[]], (("block", 10), ("max_iter", 2000), ("tol", 1e-10))),
                                  ("lasso", [[1e-6], [1e-3]], (("block", 10), ("max_iter", 2000), ("positive", False), ("tol", 1e-10))),
                                  ("elastic_net", [[1e-4, 0.5]], (("block", 10), ("max_iter", 2000), ("positive", True), ("tol", 1e-10))),
                                  ("ridge", [[1e-2]], ()), ("omp", [[2], [4]], (("max_atoms", 4),)),
                                  ("dot", [[0.05]], (("coef", "lstsq"),))]:
        sw = jnp.asarray(swept, jnp.float64).reshape(len(swept), -1)
        fast = solve_batched(*arrays, sw, method=method, static=static, full_rank=True)
        slow = solve_batched(*arrays, sw, method=method, static=static, full_rank=False)
        np.testing.assert_allclose(np.asarray(fast.coef), np.asarray(slow.coef), rtol=1e-9, atol=1e-12, err_msg=method)
        np.testing.assert_array_equal(np.asarray(fast.n_iter), np.asarray(slow.n_iter))


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
    from unmerge_jax.stats import _Staging

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
