"""Benchmark: the paper-scale decomposition sweep, side by side with the paper's way and the data limit.

Paper case (UNMERGE §4): n = 1,000,000 compressed parameters, K = 8 dictionary task vectors,
T = 72 targets, the paper grid (28 configurations), 3 bootstrap seeds = 6,048 runs. Measured in
one process, on the same data:

  * ``engine``  — ``gram_stats`` (one pass, 3 Poisson bootstrap replicates, float64 products, the
    default resampling unit: 4,096-row blocks at this n) then ``sweep`` (one compiled call per
    method family), warm (compiled once before timing) and cold;
  * ``paper way`` — each run fitted by scikit-learn / SciPy on the n×K matrix (``Lasso``,
    ``ElasticNet``, ``Ridge(solver="cholesky")``, ``OrthogonalMatchingPursuit``, ``scipy.optimize.nnls``,
    NumPy cosine + ``lstsq`` for dot), timed on a sample of runs per configuration and scaled to all
    runs (bootstrap resampling is *not* charged to it, so the ratio favours the paper's way);
  * ``limit``   — one BLAS pass ``Dᵀ[D V]`` over the same float32 data (NumPy), the least any method
    that reads the data must do.

Scale case: K = 1024 atoms, T = 1024 targets, n rows generated in row blocks and fed to
``iter_gram_stats`` (never materialised whole); reported as a fraction of the GEMM throughput of
the same block product (NumPy float64 and float32 BLAS on one block, same shapes).

Cold start: the same paper case in two fresh processes sharing a new, empty persistent compilation
cache (a temporary directory): statistics, the paper sweep, then ``unmerge decompose``'s library
call at its defaults (200 bootstrap replicates and the attribution decisions) on the same data as
array files. Per phase: wall time, seconds compiling or loading (JAX's own compile events:
tracing, lowering, XLA compile or XLA-cache load; plus the loads of whole programs by
``unmerge_jax.compile_cache``), the number of programs compiled, loaded whole and XLA-cache hits.
Cold compiles overlap (one program lowers while others compile on a thread pool), so their
event seconds sum to more than they cost: ``cold_<phase>_compile_wall_s`` is the cold phase's
wall time beyond its computation (the warm phase's wall less its loads). Keys ``cold_*`` (empty
cache) and ``warm_*`` (the second process) in ``paper_case``.

Prints the ratios and writes ``bench/results/sweep.json``.

Usage: ``python bench/sweep.py [--rows 1000000] [--scale-rows 262144] [--quick] [--only-cold]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

import unmerge_jax as u
from unmerge_jax.sweep import grid_points

HERE = Path(__file__).resolve().parent


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make_problem(n, k, t, seed=0):
    """Correlated dictionary (shared component, as fine-tunes of one base are) and sparse mixtures."""
    rng = np.random.default_rng(seed)
    d = (rng.standard_normal((n, k), dtype=np.float32) + 0.3 * rng.standard_normal((n, 1), dtype=np.float32))
    w = np.abs(rng.standard_normal((t, k))) * (rng.random((t, k)) < 0.4)
    v = (d @ w.T.astype(np.float32)) + 0.05 * rng.standard_normal((n, t), dtype=np.float32)
    return d, v.astype(np.float32), w


def paper_way_run(method, params, d, v):
    """One run the paper's way: a scikit-learn / SciPy fit on the n×K matrix."""
    from scipy.optimize import nnls
    from sklearn.linear_model import ElasticNet, Lasso, OrthogonalMatchingPursuit, Ridge

    if method == "nnls":
        return nnls(d, v)[0]
    if method == "lasso":
        return Lasso(alpha=params["alpha"], fit_intercept=False, positive=True, max_iter=20000).fit(d, v).coef_
    if method == "elastic_net":
        return ElasticNet(alpha=params["alpha"], l1_ratio=params["l1_ratio"], fit_intercept=False, positive=True,
                          max_iter=20000).fit(d, v).coef_
    if method == "ridge":
        return Ridge(alpha=params["alpha"], fit_intercept=False, solver="cholesky").fit(d, v).coef_
    if method == "omp":
        return OrthogonalMatchingPursuit(n_nonzero_coefs=params["n_nonzero_coefs"], fit_intercept=False).fit(d, v).coef_
    if method == "dot":
        cos = (d.T @ v) / (np.linalg.norm(d, axis=0) * np.linalg.norm(v))
        sel = cos >= params["threshold"]
        coef = np.zeros(d.shape[1])
        if sel.any():
            coef[sel] = np.linalg.lstsq(d[:, sel], v, rcond=None)[0]
        return coef
    raise ValueError(method)


def paper_case(n, k, t, seeds, samples, rounds=7):
    d, v, _ = make_problem(n, k, t)
    d64, v64 = d.astype(np.float64), v.astype(np.float64)
    configs = [(m, p) for m, g in u.PAPER_GRID.items() for p in grid_points(m, g, k)]
    n_runs = len(configs) * t * seeds

    # Engine, cold (includes compilation) then warm.
    t0 = time.perf_counter()
    stats = u.gram_stats(d, v, seeds=seeds, key=0)
    cold_stats = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = u.sweep(stats, grid="paper", seeds=seeds)
    cold_sweep = time.perf_counter() - t0
    assert len(table) == n_runs, (len(table), n_runs)
    stats32 = u.gram_stats(d, v, seeds=seeds, key=0, compute_dtype="float32")
    u.gram_stats(d, v, seeds=0)
    f32_rel = max(float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
                  for a, b in [(stats32.gram, stats.gram), (stats32.cross, stats.cross),
                               (stats32.boot_cross, stats.boot_cross)])

    # Warm timings, interleaved round by round with the limit (one float32 BLAS pass over the
    # data, as stored), each item right after an untimed run of itself, in rotating order, and the
    # best of each kept: on a shared machine a ratio of two timings taken minutes apart measures
    # the load, not the engine.
    dv = np.concatenate([d, v], axis=1)
    timed = {
        "limit": lambda: d.T @ dv,
        "stats": lambda: u.gram_stats(d, v, seeds=seeds, key=0),
        "sweep": lambda: u.sweep(stats, grid="paper", seeds=seeds),
        # The opt-in float32 products (float64 sums per 4,096-row chunk), same data and replicates.
        "stats32": lambda: u.gram_stats(d, v, seeds=seeds, key=0, compute_dtype="float32"),
        # The same products without bootstrap replicates: the pass the limit actually mirrors.
        "stats0": lambda: u.gram_stats(d, v, seeds=0),
        # Per-row resampling units (bootstrap_block=1): every replicate is one more product.
        "stats_rows": lambda: u.gram_stats(d, v, seeds=seeds, key=0, bootstrap_block=1),
    }
    best = {name: float("inf") for name in timed}
    names = list(timed)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = timed[name]
            # Each timed call follows an untimed call of the same item: whatever ran before would
            # otherwise still hold the cores (OpenBLAS threads keep spinning after the limit) and
            # penalise the next item. The order rotates every round.
            fn()
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    limit, stats_time, sweep_time = best["limit"], best["stats"], best["sweep"]
    stats32_time, stats0_time, rows_time = best["stats32"], best["stats0"], best["stats_rows"]
    engine = stats_time + sweep_time

    # The paper's way, sampled per configuration and scaled to all its runs.
    per_config = []
    rng = np.random.default_rng(1)
    for method, params in configs:
        times = []
        for j in rng.choice(t, size=samples, replace=False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                paper_way_run(method, params, d64, v64[:, j])
                times.append(time.perf_counter() - t0)
        per_config.append({"method": method, "params": params, "seconds_per_run": float(np.mean(times))})
    paper_total = sum(c["seconds_per_run"] for c in per_config) * t * seeds

    # Agreement on one configuration (full data): engine NNLS vs SciPy.
    from scipy.optimize import nnls

    ours = u.solve(stats, "nnls", bootstrap=False).coef
    ref = np.stack([nnls(d64, v64[:, j])[0] for j in range(min(t, 4))])
    agree = float(np.max(np.abs(ours[: len(ref)] - ref)) / np.max(np.abs(ref)))

    return {
        "n": n, "K": k, "T": t, "seeds": seeds, "configurations": len(configs), "runs": n_runs,
        "limit_blas_pass_s": limit,
        "engine_stats_pass_s": stats_time, "engine_sweep_s": sweep_time, "engine_total_s": engine,
        "engine_cold_stats_s": cold_stats, "engine_cold_sweep_s": cold_sweep,
        "engine_per_run_s": engine / n_runs,
        "paper_way_per_run_s": paper_total / n_runs, "paper_way_total_s_estimated": paper_total,
        "paper_way_samples_per_config": samples, "paper_way_per_config": per_config,
        "speedup_per_run_vs_paper_way": paper_total / engine,
        "engine_total_over_limit": engine / limit,
        "engine_stats_over_limit": stats_time / limit,
        "engine_sweep_over_limit": sweep_time / limit,
        "engine_f32_stats_pass_s": stats32_time,
        "engine_f32_total_over_limit": (stats32_time + sweep_time) / limit,
        "engine_f32_max_rel_diff_vs_f64": f32_rel,
        "engine_stats_pass_no_seeds_s": stats0_time,
        "engine_stats_no_seeds_over_limit": stats0_time / limit,
        "bootstrap_block": u.bootstrap_unit_rows(n),
        "engine_per_row_bootstrap_stats_pass_s": rows_time,
        "engine_per_row_bootstrap_total_over_limit": (rows_time + sweep_time) / limit,
        "nnls_max_rel_diff_vs_scipy": agree,
    }


def scale_case(n, k, t, block):
    """Statistics of K=1024 atoms × T=1024 targets over n rows fed in generated row blocks."""
    rng = np.random.default_rng(2)
    pool = [rng.standard_normal((block, k + t), dtype=np.float32) for _ in range(2)]  # generated once
    n_blocks = n // block

    def blocks():
        for i in range(n_blocks):
            x = pool[i % 2]
            yield x[:, :k], x[:, k:]

    u.accumulate_block(pool[0][:, :k], pool[0][:, k:])  # compile outside the timer
    t0 = time.perf_counter()
    st = u.iter_gram_stats(blocks())
    stats_time = time.perf_counter() - t0
    x64 = pool[0].astype(np.float64)
    gemm64 = best_of(lambda: x64[:, :k].T @ x64, repeat=2)
    gemm32 = best_of(lambda: pool[0][:, :k].T @ pool[0], repeat=2)
    flops = 2.0 * n * k * (k + t)
    # Check against NumPy float64 on the repeated blocks: G = (n_blocks/2)·(X0ᵀX0 + X1ᵀX1).
    ref = sum(p.astype(np.float64)[:, :k].T @ p.astype(np.float64)[:, :k] for p in pool) * (n_blocks / 2)
    rel = float(np.max(np.abs(np.asarray(st.gram) - ref)) / np.max(np.abs(ref)))
    return {
        "n": n, "K": k, "T": t, "block_rows": block, "blocks": n_blocks,
        "stats_pass_s": stats_time, "stats_gflops": flops / stats_time / 1e9,
        "numpy_gemm_f64_gflops": 2.0 * block * k * (k + t) / gemm64 / 1e9,
        "numpy_gemm_f32_gflops": 2.0 * block * k * (k + t) / gemm32 / 1e9,
        "fraction_of_f64_gemm": (flops / stats_time) / (2.0 * block * k * (k + t) / gemm64),
        "fraction_of_f32_gemm": (flops / stats_time) / (2.0 * block * k * (k + t) / gemm32),
        "rows_per_s": n / stats_time,
        "gram_max_rel_diff_vs_numpy_f64": rel,
    }


# ------------------------------------------------------------------------------------------------
# Cold start: the first sweep / decompose of a fresh process, with an empty and with a warm
# persistent compilation cache.
# ------------------------------------------------------------------------------------------------
def _compile_probe():
    """Per-phase compile records from JAX's own events, plus the process CPU seconds spent inside
    XLA compile-or-cache-load calls (less sensitive to other processes' load than wall time)."""
    import collections

    import jax
    from jax import monitoring
    from jax._src import compiler

    rec = {"phase": None, "data": collections.defaultdict(lambda: collections.defaultdict(float))}

    def on_duration(name, secs, **kw):
        if rec["phase"] and name in ("/jax/core/compile/backend_compile_duration",
                                     "/jax/core/compile/jaxpr_trace_duration",
                                     "/jax/core/compile/jaxpr_to_mlir_module_duration"):
            d = rec["data"][rec["phase"]]
            short = name.rsplit("/", 1)[-1].replace("_duration", "")
            d[short + "_s"] += secs
            d[short + "_n"] += 1

    def on_event(name, **kw):
        if rec["phase"] and name in ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"):
            rec["data"][rec["phase"]][name.rsplit("/", 1)[-1]] += 1

    monitoring.register_event_duration_secs_listener(on_duration)
    monitoring.register_event_listener(on_event)
    original = compiler.compile_or_get_cached

    def timed(*a, **kw):
        c0 = time.process_time()
        try:
            return original(*a, **kw)
        finally:
            if rec["phase"]:
                rec["data"][rec["phase"]]["compile_cpu_s"] += time.process_time() - c0

    compiler.compile_or_get_cached = timed

    # Programs loaded whole by unmerge_jax's compiled-program cache emit no JAX compile event:
    # their load time is counted here.
    from unmerge_jax import compile_cache

    import threading

    load = compile_cache.load_program
    lock = threading.Lock()

    def timed_load(*a, **kw):
        t0 = time.perf_counter()
        program = load(*a, **kw)
        if rec["phase"]:  # a miss (None) costs a file lookup; it is timed, not counted as a load
            d = rec["data"][rec["phase"]]
            # Loads run side by side on a thread pool: count the union of their intervals.
            t1 = time.perf_counter()
            with lock:
                d["program_load_s"] += max(0.0, t1 - max(t0, d["program_load_end"]))
                d["program_load_end"] = max(d["program_load_end"], t1)
                d["program_load_n"] += program is not None
        return program

    compile_cache.load_program = timed_load
    del jax
    return rec


def cold_child(n, t, seeds, work_dir):
    """Run in a fresh process: statistics, the paper sweep, then ``decompose_files`` at its defaults
    (200 replicates, attribution) on the same data as array files; print the compile records."""
    rec = _compile_probe()
    import jax

    from unmerge_jax.pipeline import decompose_files

    d, v, _ = make_problem(n, 8, t)
    out = {"cache_dir": jax.config.jax_compilation_cache_dir}

    def phase(name, fn):
        rec["phase"] = name
        t0 = time.perf_counter()
        fn()
        kept = {k: float(x) for k, x in rec["data"][name].items() if not k.endswith("_end")}
        out[name] = {"wall_s": time.perf_counter() - t0, **kept}
        rec["phase"] = None

    holder = {}
    phase("stats", lambda: holder.update(stats=u.gram_stats(d, v, seeds=seeds, key=0)))
    phase("sweep", lambda: u.sweep(holder["stats"], grid="paper", seeds=seeds))
    np.save(Path(work_dir) / "D.npy", d)
    np.save(Path(work_dir) / "V.npy", v)
    del d, v
    phase("decompose", lambda: decompose_files(None, [f"D={work_dir}/D.npy"], [f"V={work_dir}/V.npy"]))
    print("COLD_START " + json.dumps(out), flush=True)


def cold_start(n, t, seeds):
    """Two fresh processes sharing one new, empty persistent cache directory: the first compiles
    everything (cold), the second loads it all from the cache (warm)."""
    import subprocess
    import sys
    import tempfile

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: x for k, x in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "UNMERGE_C"))}
        env.update(UNMERGE_CACHE_DIR=str(Path(tmp) / "cache"), UNMERGE_PROGRESS="0",
                   PYTHONPATH=os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]))
        for name in ("cold", "warm"):
            load = os.getloadavg()[0]
            r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--cold-child", tmp, "--rows", str(n),
                                "--targets", str(t), "--seeds", str(seeds)], env=env, capture_output=True, text=True,
                               check=False)
            if r.returncode:
                raise RuntimeError(r.stderr[-3000:])
            line = next(x for x in r.stdout.splitlines() if x.startswith("COLD_START "))
            runs[name] = {"load_average_1min": load, **json.loads(line[len("COLD_START "):])}
    return runs


def _cold_summary(runs):
    """Flat keys for the JSON: compile seconds (JAX's events: compile or cache load) per phase."""
    out = {}
    for name, r in runs.items():
        for ph in ("stats", "sweep", "decompose"):
            p = r[ph]
            out[f"{name}_{ph}_wall_s"] = p["wall_s"]
            out[f"{name}_{ph}_compile_s"] = p.get("backend_compile_s", 0.0) + p.get("jaxpr_trace_s", 0.0) + \
                p.get("jaxpr_to_mlir_module_s", 0.0) + p.get("program_load_s", 0.0)
            out[f"{name}_{ph}_program_loads"] = int(p.get("program_load_n", 0))
            out[f"{name}_{ph}_backend_compile_s"] = p.get("backend_compile_s", 0.0)
            out[f"{name}_{ph}_compile_cpu_s"] = p.get("compile_cpu_s", 0.0)
            out[f"{name}_{ph}_programs"] = int(p.get("backend_compile_n", 0))
            out[f"{name}_{ph}_cache_hits"] = int(p.get("cache_hits", 0))
        out[f"{name}_load_average_1min"] = r["load_average_1min"]
    # Cold compiles overlap (tracing one program while others compile on a thread pool), so their
    # event seconds add up to more than the wall time they cost; the cold phase's cost is its wall
    # time beyond the computation, which the warm phase measures (its wall less its loads).
    if "warm" in runs and "cold" in runs:
        for ph in ("stats", "sweep", "decompose"):
            compute = out[f"warm_{ph}_wall_s"] - out[f"warm_{ph}_compile_s"]
            out[f"cold_{ph}_compile_wall_s"] = out[f"cold_{ph}_wall_s"] - compute
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="paper case rows n (default 1,000,000)")
    ap.add_argument("--targets", type=int, default=72)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=2, help="paper-way runs timed per configuration (default 2)")
    ap.add_argument("--scale-rows", type=int, default=262_144, help="scale case rows (default 262,144; 1M "
                    "takes ~4x longer and gives the same throughput)")
    ap.add_argument("--scale-block", type=int, default=16_384)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "sweep.json")
    ap.add_argument("--cold-child", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--only-cold", action="store_true", help="only the cold-start figures (merged into --out)")
    args = ap.parse_args()
    if args.cold_child:
        cold_child(args.rows, args.targets, args.seeds, args.cold_child)
        return
    if args.quick:
        args.rows, args.scale_rows, args.scale_block = 50_000, 32_768, 8_192

    import jax

    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                          "devices": [str(dev) for dev in jax.devices()]}}
    print(f"cold start: paper case in two fresh processes sharing a new, empty compilation cache ...", flush=True)
    cold = cold_start(args.rows, args.targets, args.seeds)
    c = _cold_summary(cold)
    print(f"  cold (load average {c['cold_load_average_1min']:.1f}): wall beyond the computation "
          + ", ".join(f"{ph} {c[f'cold_{ph}_compile_wall_s']:.2f} s ({c[f'cold_{ph}_programs']} programs compiled, "
                      f"events {c[f'cold_{ph}_compile_s']:.2f} s)" for ph in ("stats", "sweep", "decompose")))
    print(f"  warm (load average {c['warm_load_average_1min']:.1f}): compile or load "
          + ", ".join(f"{ph} {c[f'warm_{ph}_compile_s']:.2f} s ({c[f'warm_{ph}_program_loads']} programs loaded "
                      f"whole, {c[f'warm_{ph}_cache_hits']} XLA cache hits)" for ph in ("stats", "sweep", "decompose")))
    if args.only_cold:
        old = json.loads(args.out.read_text()) if args.out.exists() else {}
        old.setdefault("paper_case", {}).update(c)
        old["cold_start"] = cold
        result = {**old, "machine": result["machine"]}
        _write(args.out, result)
        return
    print(f"paper case: n={args.rows:,} K=8 T={args.targets} seeds={args.seeds} ...", flush=True)
    p = paper_case(args.rows, 8, args.targets, args.seeds, args.samples)
    result["paper_case"] = {**p, **c}
    result["cold_start"] = cold
    print(f"  {p['runs']:,} runs; engine {p['engine_total_s']:.2f} s (stats pass {p['engine_stats_pass_s']:.2f} s + "
          f"sweep {p['engine_sweep_s']:.2f} s; cold {p['engine_cold_stats_s'] + p['engine_cold_sweep_s']:.1f} s)")
    print(f"  paper's way (sklearn/SciPy per run, {args.samples} sampled per configuration): "
          f"{p['paper_way_per_run_s'] * 1e3:.1f} ms/run, ~{p['paper_way_total_s_estimated']:.0f} s in all")
    print(f"  per run: engine is {p['speedup_per_run_vs_paper_way']:,.0f}x faster than the paper's way (target >= 500x)")
    print(f"  whole sweep / one BLAS pass D^T[D V] ({p['limit_blas_pass_s']:.3f} s): {p['engine_total_over_limit']:.2f}x "
          f"(target <= 3x); stats pass alone {p['engine_stats_over_limit']:.2f}x, solves alone "
          f"{p['engine_sweep_over_limit']:.2f}x")
    print(f"  same pass without replicates (the products the limit does): {p['engine_stats_no_seeds_over_limit']:.2f}x; "
          f"float32 products (compute_dtype='float32', max rel diff {p['engine_f32_max_rel_diff_vs_f64']:.1e}): "
          f"stats {p['engine_f32_stats_pass_s']:.3f} s, whole sweep {p['engine_f32_total_over_limit']:.2f}x")
    print(f"  bootstrap unit {p['bootstrap_block']:,} rows; with per-row units (bootstrap_block=1) the stats pass "
          f"takes {p['engine_per_row_bootstrap_stats_pass_s']:.3f} s, whole sweep "
          f"{p['engine_per_row_bootstrap_total_over_limit']:.2f}x")
    print(f"  NNLS vs scipy.optimize.nnls: max rel diff {p['nnls_max_rel_diff_vs_scipy']:.1e}")

    print(f"scale case: n={args.scale_rows:,} K=1024 T=1024 in blocks of {args.scale_block:,} rows ...", flush=True)
    s = scale_case(args.scale_rows, 1024, 1024, args.scale_block)
    result["scale_case"] = s
    print(f"  statistics pass {s['stats_pass_s']:.1f} s = {s['stats_gflops']:.1f} GFLOP/s; "
          f"{s['fraction_of_f64_gemm']:.2f} of NumPy float64 GEMM ({s['numpy_gemm_f64_gflops']:.1f} GFLOP/s), "
          f"{s['fraction_of_f32_gemm']:.2f} of float32 GEMM ({s['numpy_gemm_f32_gflops']:.1f} GFLOP/s); "
          f"Gram vs NumPy float64 max rel diff {s['gram_max_rel_diff_vs_numpy_f64']:.1e}")

    _write(args.out, result)


def _write(out, result):
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
