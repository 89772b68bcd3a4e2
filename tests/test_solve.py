"""``solve`` / ``decompose`` (``unmerge_jax.solve``): result axes, bootstrap seeds, one-line errors for
bad input, convergence warnings, host-side problems on one device, the full-rank fast path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import nnls as scipy_nnls

import unmerge_jax as u
from tests._problems import K, T, make_dictionary, make_targets, rand


def test_bootstrap_solve_has_seed_axis_and_recovers_exact_mixtures():
    d, _ = rand()
    w = np.zeros((T, K))
    w[:, :3] = [0.5, 0.3, 0.2]
    w[1] = [0, 0, 0, 0.25, 0.25, 0.25, 0.25, 0]
    res = u.decompose(d, d.astype(np.float64) @ w.T, "nnls", seeds=4)
    assert res.coef.shape == (4, T, K)
    np.testing.assert_allclose(res.coef, np.broadcast_to(w, (4, T, K)), atol=1e-9)


def test_single_target_vector_drops_target_axis():
    d, v = rand()
    res = u.decompose(d, v[:, 0], "nnls")
    assert res.coef.shape == (K,) and np.ndim(res.recon_error) == 0
    ref, _ = scipy_nnls(d.astype(np.float64), v[:, 0].astype(np.float64))
    np.testing.assert_allclose(res.coef, ref, rtol=1e-7, atol=1e-10)


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
    d = make_dictionary("illcond")
    v, _ = make_targets(d)
    with pytest.warns(RuntimeWarning, match="did not converge within max_iter=10"):
        res = u.decompose(d, v, "lasso", alpha=1e-8, positive=False, max_iter=10)
    assert not res.converged.all() and np.all(res.n_iter <= 10)


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
