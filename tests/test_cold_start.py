"""The persistent compilation cache for library users: on at import (per-user directory), the
opt-out, a cache the process chose kept, a read-only location left alone, and a second process
that compiles nothing new (every program a cache hit)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import json, jax, unmerge_jax
    print(json.dumps({"dir": jax.config.jax_compilation_cache_dir}))
""")

SOLVE = textwrap.dedent("""
    import json, os, time
    import numpy as np, jax, unmerge_jax as u
    rng = np.random.default_rng(0)
    D = rng.standard_normal((2000, 5)); V = D @ rng.uniform(0, 1, (5, 3))
    t0 = time.perf_counter()
    r = u.decompose(D, V, "nnls")
    jax.block_until_ready(r.coef)
    print(json.dumps({"s": time.perf_counter() - t0, "dir": jax.config.jax_compilation_cache_dir}))
""")


def _run(script, env_extra, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "UNMERGE_C"))}
    env.update({"PYTHONPATH": str(ROOT), "HOME": str(tmp_path / "home"), "UNMERGE_PROGRESS": "0", **env_extra})
    env.pop("XDG_CACHE_HOME", None)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_cache_on_at_import_in_the_users_cache_dir(tmp_path):
    got = _run(PROBE, {}, tmp_path)
    assert got["dir"] == str(tmp_path / "home" / ".cache" / "unmerge_jax" / "xla")


def test_opt_out_and_a_chosen_cache_are_respected(tmp_path):
    assert _run(PROBE, {"UNMERGE_COMPILE_CACHE": "0"}, tmp_path)["dir"] in (None, "")
    mine = str(tmp_path / "mine")
    assert _run(PROBE, {"JAX_COMPILATION_CACHE_DIR": mine}, tmp_path)["dir"] == mine


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_location_is_left_alone(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert _run(PROBE, {"UNMERGE_CACHE_DIR": str(ro)}, tmp_path)["dir"] in (None, "")
    finally:
        ro.chmod(0o700)


def test_unwritable_location_is_left_alone(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert _run(PROBE, {"UNMERGE_CACHE_DIR": str(blocker)}, tmp_path)["dir"] in (None, "")


def test_second_process_compiles_nothing_new(tmp_path):
    cache = tmp_path / "cache"
    first = _run(SOLVE, {"UNMERGE_CACHE_DIR": str(cache)}, tmp_path)
    entries = sorted(p.name for p in (cache / "unmerge_jax" / "xla").iterdir())
    assert entries, "the first process wrote no cache entry"
    second = _run(SOLVE, {"UNMERGE_CACHE_DIR": str(cache)}, tmp_path)
    assert sorted(p.name for p in (cache / "unmerge_jax" / "xla").iterdir()) == entries  # all hits
    print(f"first process {first['s']:.2f} s, second {second['s']:.2f} s")


# ------------------------------------------------------------------------------------------------
# Buckets: fewer programs, and a new number of targets / grid points / seeds inside a bucket
# reuses the compiled program.
# ------------------------------------------------------------------------------------------------
import chex  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import unmerge_jax as u  # noqa: E402
solve_module = __import__("importlib").import_module("unmerge_jax.solve")  # the module (the package exports the function)
from unmerge_jax.solvers import SHARED_PROGRAMS, SOLVERS  # noqa: E402


def test_bucket_sizes():
    b = solve_module.bucket
    assert [b(n) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 10]
    assert [b(n) for n in (16, 17, 33, 65, 72, 80, 81, 200, 201, 224, 225)] == [16, 20, 40, 80, 80, 80, 96, 224, 224, 224, 256]
    for n in range(1, 2000):
        assert n <= b(n) and (n <= 8 or b(n) < 1.25 * n) and b(b(n)) == b(n)


def _data(seed, k, t, n=400):
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((n, k))
    v = d @ np.abs(rng.standard_normal((k, t))) + 0.1 * rng.standard_normal((n, t))
    return d, v


def _count_traces(monkeypatch, methods):
    # Traces are counted through jax.jit's own cache, so the compiled-program cache (which would
    # load a program another run stored, tracing nothing) is off here.
    monkeypatch.setenv("UNMERGE_PROGRAM_CACHE", "0")
    chex.clear_trace_counter()
    for m in methods:
        table = SOLVERS if m in SOLVERS else SHARED_PROGRAMS
        monkeypatch.setitem(table, m, table[m]._replace(fn=chex.assert_max_traces(table[m].fn, n=1)))


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_target_counts_inside_a_bucket_share_one_program(method, monkeypatch):
    """K = 7 (no other test uses it): T = 5, 6, 7 (bucket 8) trace the solver once; T = 9 (bucket
    10) is a new shape and traces again, which ``assert_max_traces`` refuses — the counter counts."""
    _count_traces(monkeypatch, [method])
    for t in (5, 6, 7):
        res = u.solve(u.gram_stats(*_data(t, 7, t)), method)
        assert res.coef.shape == (t, 7)
    with pytest.raises(AssertionError, match="traced"):
        u.solve(u.gram_stats(*_data(9, 7, 9)), method)


def test_sweep_targets_grid_points_and_seeds_inside_buckets_share_programs(monkeypatch):
    """A sweep compiles one program per solver program (Lasso rides on ElasticNet's, Ridge and dot
    on ``support_solve``), and T = 5, 6, 7 with 5, 6, 7 grid points per family and 5, 6, 7 seeds
    reuse them all."""
    _count_traces(monkeypatch, [*SOLVERS, *SHARED_PROGRAMS])
    for i, t in enumerate((5, 6, 7)):
        n_points = 5 + i
        grid = {"nnls": {}, "lasso": {"alpha": list(np.geomspace(1e-8, 1e-4, n_points))},
                "elastic_net": {"alpha": list(np.geomspace(1e-8, 1e-4, n_points)), "l1_ratio": [0.5]},
                "ridge": {"alpha": list(np.geomspace(1e-8, 1e-2, n_points))},
                "omp": {"n_nonzero_coefs": list(range(1, n_points + 1))},
                "dot": {"threshold": list(np.linspace(0.01, 0.2, n_points))}}
        table = u.sweep(*_data(10 + t, 6, t, n=5000), grid=grid, seeds=t, key=0)
        assert len(table) == t * t * (1 + 4 * n_points + min(n_points, 6))


def _sliced(res, t):
    return {f: np.asarray(getattr(res, f))[:, :t] if f != "coef" else np.asarray(res.coef)[:, :t, :]
            for f in ("coef", "n_iter", "converged", "error", "recon_error")}


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_padding_changes_no_result(method):
    """The same 3 targets solved in bucket 4 (alone) and in bucket 16 (beside 10 others), with 3
    and 11 replicates (buckets 4 and 16): coefficients, iterations, convergence and fit
    bit-identical; the final optimality measure (a relative residual at the rounding level, whose
    matrix-vector product XLA vectorises by batch shape) to 1e-15."""
    crowd_stats = u.gram_stats(*_data(0, 6, 13), seeds=11, key=1)
    few = crowd_stats.select_targets(np.arange(3))
    few = few._replace(boot_gram=few.boot_gram[:3], boot_cross=few.boot_cross[:3],
                       boot_target_sq=few.boot_target_sq[:3], boot_n_rows=few.boot_n_rows[:3])
    alone, crowd = u.solve(few, method), u.solve(crowd_stats, method)
    a, c = _sliced(alone, 3), {f: x[:3] for f, x in _sliced(crowd, 3).items()}
    for f in ("coef", "n_iter", "converged", "recon_error"):
        np.testing.assert_array_equal(a[f], c[f], err_msg=f"{method} {f}")
    np.testing.assert_allclose(a["error"], c["error"], rtol=0, atol=1e-15)


def test_one_call_for_point_and_replicates_matches_separate_solves():
    st = u.gram_stats(*_data(3, 6, 5), seeds=20, key=2)
    point, boot = solve_module.solve_with_replicates(st, "nnls")
    np.testing.assert_array_equal(boot.coef, u.solve(st, "nnls", bootstrap=True).coef)
    # The full-data problem solved as one more seed: the same optimum, to rounding.
    np.testing.assert_allclose(point.coef, u.solve(st, "nnls", bootstrap=False).coef, rtol=1e-12, atol=1e-15)
    assert point.coef.shape == (5, 6) and boot.coef.shape == (20, 5, 6)


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_solver_compile_options_change_no_result(method):
    """``SOLVER_COMPILER_OPTIONS`` (XLA:CPU's loop emitters) only speed up compilation: the same
    program compiled with XLA's defaults gives bit-identical results."""
    from unmerge_jax.solve import _static_items, resolve_params, solve_batched, stacked_problems
    from unmerge_jax.sweep import PAPER_GRID, grid_points

    arrays = stacked_problems(u.gram_stats(*_data(4, 8, 6), seeds=2, key=0), use_seeds=True)
    pts = [resolve_params(method, 8, p) for p in grid_points(method, PAPER_GRID[method], 8)]
    if method == "omp":
        for p in pts:
            p["max_atoms"] = 8
    swept = np.asarray([[float(p[n]) for n in SOLVERS[method].swept] for p in pts]).reshape(len(pts), -1)
    kw = dict(method=method, static=_static_items(method, pts[0]), full_rank=True)
    fast = solve_batched(*arrays, swept, **kw)
    plain = jax.jit(solve_batched.__wrapped__, static_argnames=("method", "static", "full_rank"))(*arrays, swept, **kw)
    for f in ("coef", "n_iter", "error"):
        np.testing.assert_array_equal(np.asarray(getattr(fast, f)), np.asarray(getattr(plain, f)), err_msg=f)


def test_omp_path_length_changes_no_result():
    """OMP's static path length is bucketed (k = 3 runs a path of 4): its first k steps are the same."""
    st = u.gram_stats(*_data(5, 6, 4), seeds=2, key=0)
    short, longer = (u.solve(st, "omp", n_nonzero_coefs=3, max_atoms=m) for m in (3, 6))
    for f in ("coef", "n_iter", "error"):
        np.testing.assert_array_equal(getattr(short, f), getattr(longer, f), err_msg=f)
    assert u.solve(st, "omp", n_nonzero_coefs=3).params["max_atoms"] == 4


def test_grid_bucket_sizes():
    assert [solve_module.grid_bucket(n) for n in (1, 2, 3, 5, 8, 9, 12, 16, 17)] == [1, 2, 4, 8, 8, 16, 16, 16, 32]


# ------------------------------------------------------------------------------------------------
# Compiled programs stored whole: a second process traces nothing, and results are unchanged.
# ------------------------------------------------------------------------------------------------
SWEEP = textwrap.dedent("""
    import json, os
    import numpy as np, jax, unmerge_jax as u
    traces = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: traces.append(name) if name == "/jax/core/compile/jaxpr_trace_duration" else None)
    rng = np.random.default_rng(0)
    D = rng.standard_normal((3000, 6)); V = D @ rng.uniform(0, 1, (6, 5))
    st = u.gram_stats(D, V, seeds=2, key=0)
    before = len(traces)
    table = u.sweep(st, grid="paper", seeds=2)
    np.save(os.environ["OUT"], np.asarray(table["coef"].tolist()))
    print(json.dumps({"sweep_traces": len(traces) - before}))
""")


def test_second_process_loads_programs_and_traces_nothing(tmp_path):
    cache = {"UNMERGE_CACHE_DIR": str(tmp_path / "cache")}
    first = _run(SWEEP, {**cache, "OUT": str(tmp_path / "a.npy")}, tmp_path)
    programs = sorted((tmp_path / "cache" / "unmerge_jax" / "xla" / "programs").iterdir())
    assert first["sweep_traces"] >= 4 and len(programs) == 4  # four solver programs, stored
    second = _run(SWEEP, {**cache, "OUT": str(tmp_path / "b.npy")}, tmp_path)
    assert second["sweep_traces"] == 0
    off = _run(SWEEP, {**cache, "OUT": str(tmp_path / "c.npy"), "UNMERGE_PROGRAM_CACHE": "0"}, tmp_path)
    assert off["sweep_traces"] >= 4  # the opt-out traces as plain jax.jit does
    a, b, c = (np.load(tmp_path / f"{x}.npy") for x in "abc")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_cached_program_equals_plain_jit(method, tmp_path, monkeypatch):
    """The same solve through the program cache (compiled and stored) and through plain
    ``jax.jit``: bit-identical. (Loading it in another process: the sweep test above.)"""
    from unmerge_jax import compile_cache

    st = u.gram_stats(*_data(21, 6, 3), seeds=3, key=4)
    monkeypatch.setenv("UNMERGE_PROGRAM_CACHE", "0")
    plain = u.solve(st, method)
    monkeypatch.setenv("UNMERGE_PROGRAM_CACHE", "1")
    monkeypatch.setattr(compile_cache, "program_cache_dir", lambda: tmp_path / "programs")
    monkeypatch.setattr(compile_cache, "_PROGRAMS", {})
    cached = u.solve(st, method)
    assert len(list((tmp_path / "programs").iterdir())) == 1
    for f in ("coef", "n_iter", "converged", "error"):
        np.testing.assert_array_equal(getattr(plain, f), getattr(cached, f), err_msg=f)


def test_damaged_program_file_is_compiled_again(tmp_path, monkeypatch):
    from unmerge_jax import compile_cache

    st = u.gram_stats(*_data(22, 6, 3))
    monkeypatch.setenv("UNMERGE_PROGRAM_CACHE", "1")
    monkeypatch.setattr(compile_cache, "program_cache_dir", lambda: tmp_path / "programs")
    monkeypatch.setattr(compile_cache, "_PROGRAMS", {})
    good = u.solve(st, "nnls")
    (path,) = (tmp_path / "programs").iterdir()
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 3])  # truncated, as by a full disk
    monkeypatch.setattr(compile_cache, "_PROGRAMS", {})
    again = u.solve(st, "nnls")
    np.testing.assert_array_equal(good.coef, again.coef)
    assert compile_cache.load_program(path) is not None  # rewritten whole
    # Loaded back into the process that compiled it, XLA:CPU refuses to run it: compiled again.
    monkeypatch.setattr(compile_cache, "_PROGRAMS", {})
    monkeypatch.setattr(compile_cache, "_LOADED", set())
    np.testing.assert_array_equal(good.coef, u.solve(st, "nnls").coef)


def test_program_key_covers_shapes_static_options_and_environment(monkeypatch):
    from unmerge_jax import compile_cache

    spec = (jax.ShapeDtypeStruct((4, 6, 6), np.float64),)
    base = compile_cache._program_key("p", spec, {"method": "nnls"}, None)
    assert base == compile_cache._program_key("p", spec, {"method": "nnls"}, None)
    assert base != compile_cache._program_key("p", (jax.ShapeDtypeStruct((8, 6, 6), np.float64),), {"method": "nnls"}, None)
    assert base != compile_cache._program_key("p", spec, {"method": "omp"}, None)
    assert base != compile_cache._program_key("p", spec, {"method": "nnls"}, {"xla_cpu_use_fusion_emitters": False})
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=false")
    assert base != compile_cache._program_key("p", spec, {"method": "nnls"}, None)
    monkeypatch.setattr(compile_cache, "_source_hash", lambda: "edited")
    monkeypatch.delenv("XLA_FLAGS")
    assert base != compile_cache._program_key("p", spec, {"method": "nnls"}, None)
