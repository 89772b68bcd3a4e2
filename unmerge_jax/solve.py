"""``solve``/``decompose``: run a registered solver over every target (and bootstrap seed).

The compiled program is ``jit(vmap_seeds(vmap_targets(vmap_params(solver))))``; static options
(``positive``, ``tol``, ``max_iter``, OMP's ``max_atoms``) are part of the jit cache key, swept
hyper-parameters are array inputs — a second call with other values does not recompile.

Shapes are padded to buckets (:func:`bucket`) before the compiled call and the results sliced
back (:func:`solve_padded`): seeds and grid points by repeating the last one, targets with zero
targets (``c = 0``, ``‖v‖² = 0``, solved at iteration 0). Lanes of a ``vmap`` are independent
(finished lanes of a ``while_loop`` stay frozen), so padding changes no result, and a new number
of targets, grid points or seeds inside a bucket reuses the compiled program (:func:`bucket`,
:func:`grid_bucket`).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np

from unmerge_jax.compile_cache import ProgramRequest, cached_program
from unmerge_jax.errors import UnmergeError, check_choice
from unmerge_jax.metrics import reconstruction
from unmerge_jax.solvers import ALIASES, SOLVERS, Problem, program_spec
from unmerge_jax.solvers.common import gram_is_well_posed
from unmerge_jax.stats import GramStats, gram_stats, to_host


class Decomposition(NamedTuple):
    """Result of :func:`solve`. Leading axes: (T,) or, with bootstrap seeds, (S, T).

    Attributes:
      coef: (..., K) coefficients.
      recon_error: (...) ``1 − max(0, cos(v, Da))²`` (UNMERGE eq. 6).
      cosine: (...) ``cos(v, Da)``.
      residual_sq: (...) ``‖v − Da‖²``.
      unexplained: (...) ``‖v − Da‖² / ‖v‖²``, the target energy the dictionary does not explain.
      n_iter: (...) iterations each target took.
      converged: (...) bool.
      error: (...) final optimality measure (NNLS: relative KKT residual; Lasso/ElasticNet:
        duality gap / ‖v‖²; Ridge: relative residual of the normal equations; OMP: residual
        correlation; dot: largest unselected cosine).
      method: solver name.
      params: the parameters used (defaults filled in).
    """

    coef: Any
    recon_error: Any
    cosine: Any
    residual_sq: Any
    unexplained: Any
    n_iter: Any
    converged: Any
    error: Any
    method: str
    params: dict


def resolve_method(method: str) -> str:
    name = ALIASES.get(str(method).lower(), str(method).lower())
    check_choice("decomposition method", name, SOLVERS)
    return name


def resolve_params(method: str, n_atoms: int, params: dict, *, allow_arrays: bool = False) -> dict:
    """Fill defaults, reject unknown parameters and out-of-range values (one-line errors)."""
    spec = SOLVERS[method]
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        allowed = ", ".join(sorted(spec.defaults)) or "none"
        raise UnmergeError(f"{method} does not take parameter(s) {', '.join(unknown)}; it takes: {allowed}")
    out = dict(spec.defaults)
    out.update({k: v for k, v in params.items() if v is not None})
    if method == "omp":
        if out["n_nonzero_coefs"] is None:
            out["n_nonzero_coefs"] = max(1, int(0.1 * n_atoms))  # scikit-learn's default
        ks = np.atleast_1d(np.asarray(out["n_nonzero_coefs"]))
        if not np.all(ks == np.round(ks)) or ks.min() < 1 or ks.max() > n_atoms:
            raise UnmergeError(f"omp n_nonzero_coefs must be whole numbers in 1..{n_atoms} (the number of atoms), got {out['n_nonzero_coefs']}")
        if out["max_atoms"] is None:
            # Bucketed: the greedy path's first k steps do not depend on its length, so a longer
            # path changes no result, and nearby k share one program.
            out["max_atoms"] = min(bucket(int(ks.max())), int(n_atoms))
        out["max_atoms"] = int(out["max_atoms"])
    for name in ("alpha",):
        if name in out and np.any(np.asarray(out[name]) < 0):
            raise UnmergeError(f"{method} {name} must be >= 0, got {out[name]}")
    if "l1_ratio" in out and np.any((np.asarray(out["l1_ratio"]) < 0) | (np.asarray(out["l1_ratio"]) > 1)):
        raise UnmergeError(f"{method} l1_ratio must be in [0, 1], got {out['l1_ratio']}")
    if "tol" in out and not out["tol"] > 0:
        raise UnmergeError(f"{method} tol must be > 0, got {out['tol']}")
    if "max_iter" in out:
        if int(out["max_iter"]) < 1:
            raise UnmergeError(f"{method} max_iter must be >= 1, got {out['max_iter']}")
        out["max_iter"] = int(out["max_iter"])
    if "positive" in out:
        out["positive"] = bool(out["positive"])
    if "coef" in out:
        check_choice("dot coefficient rule", out["coef"], ("lstsq", "score"))
    if not allow_arrays:
        for name in spec.swept:
            if np.ndim(out[name]) != 0:
                raise UnmergeError(f"{method} {name} must be a single value here; use unmerge_jax.sweep for grids")
    return out


# XLA:CPU's legacy loop emitters compile the solvers' many small K×K kernels in ~60 % of the
# time of the fusion emitters, with bit-identical results (tests/test_cold_start.py); the
# solvers run in milliseconds, so compile time is what a first call pays. Other backends
# ignore ``xla_cpu_*`` options.
SOLVER_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def grid_bucket(n: int) -> int:
    """The padded number of grid points: the next power of two (grids are short, and a sweep
    concatenates families that share a program, so coarse buckets keep the program count low)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def bucket(n: int) -> int:
    """The padded length of an axis of ``n`` ≥ 1 targets or seeds.

    The next power of two up to 8 (1, 2, 4, 8), then the next multiple of an eighth of the next
    power of two (10, 12, …, 16, 20, 24, …, 32, 40, …, 64, 80, …): at most 4 buckets per
    octave, under 25 % padding.
    """
    n = int(n)
    if n <= 1:
        return 1
    pow2 = 1 << (n - 1).bit_length()
    if pow2 <= 8:
        return pow2
    step = pow2 // 8
    return -(-n // step) * step


@functools.partial(jax.jit, static_argnames=("method", "static", "full_rank"),
                   compiler_options=SOLVER_COMPILER_OPTIONS)
def solve_batched(gram, cross, target_sq, n_rows, lipschitz, swept, *, method: str, static: tuple,
                  full_rank: bool = False):
    """The compiled core: every (seed, target, grid point) in one program.

    Args:
      gram: (S, K, K); cross: (S, K, T); target_sq: (S, T); n_rows: (S,); lipschitz: (S,).
      swept: (P, n_swept) float64 grid of swept hyper-parameters (P ≥ 1 grid points).
      method: registry name. static: sorted ``(name, value)`` pairs of static options.
      full_rank: every Gram passes ``gram_is_well_posed`` (support solves skip the rank-deficient
        branch; see ``solvers.common.psd_solve``).

    Returns:
      SolverResult with leading axes (S, T, P).
    """
    spec = program_spec(method)
    kw = dict(static)

    def one(g, c, vv, n, lip, hp):
        args = [hp[i] for i in range(len(spec.swept))]
        return spec.fn(Problem(g, c, vv, n, lip), *args, **kw, full_rank=full_rank)

    over_params = jax.vmap(one, in_axes=(None, None, None, None, None, 0))
    over_targets = jax.vmap(over_params, in_axes=(None, 1, 0, None, None, None))
    over_seeds = jax.vmap(over_targets, in_axes=(0, 0, 0, 0, 0, None))
    return over_seeds(gram, cross, target_sq, n_rows, lipschitz, swept)


def _pad_axis(a: np.ndarray, axis: int, size: int, *, zero: bool) -> np.ndarray:
    """``a`` padded along ``axis`` to ``size``: zeros, or repeats of its last entry."""
    extra = size - a.shape[axis]
    if extra <= 0:
        return a
    if zero:
        shape = list(a.shape)
        shape[axis] = extra
        fill = np.zeros(shape, a.dtype)
    else:
        fill = np.repeat(np.take(a, [-1], axis=axis), extra, axis=axis)
    return np.concatenate([a, fill], axis=axis)


def padded_request(gram, cross, target_sq, n_rows, lipschitz, swept, *, method: str, static: tuple,
                   full_rank: bool = False) -> ProgramRequest:
    """The :func:`solve_batched` call of :func:`solve_padded`, on shapes padded to buckets.

    Seeds (S, to :func:`bucket`) and grid points (P, to :func:`grid_bucket`) are padded with
    repeats of the last one (a real problem, so no lane meets a degenerate input), targets (T)
    with zero targets (``c = 0``, ``‖v‖² = 0``: every solver stops at iteration 0 with ``a = 0``).
    Same arguments as :func:`solve_batched`. Handing several to
    :func:`~unmerge_jax.compile_cache.compile_programs` compiles their programs in parallel.
    """
    gram, cross, target_sq, n_rows, lipschitz, swept = (np.asarray(a, np.float64) for a in
                                                         (gram, cross, target_sq, n_rows, lipschitz, swept))
    sb, tb, pb = bucket(gram.shape[0]), bucket(cross.shape[2]), grid_bucket(swept.shape[0])
    gram, n_rows, lipschitz = (_pad_axis(a, 0, sb, zero=False) for a in (gram, n_rows, lipschitz))
    cross = _pad_axis(_pad_axis(cross, 0, sb, zero=False), 2, tb, zero=True)
    target_sq = _pad_axis(_pad_axis(target_sq, 0, sb, zero=False), 1, tb, zero=True)
    swept = _pad_axis(swept, 0, pb, zero=False)
    return ProgramRequest(solve_batched, "solve_batched", (gram, cross, target_sq, n_rows, lipschitz, swept),
                          dict(method=method, static=static, full_rank=full_rank), SOLVER_COMPILER_OPTIONS)


def solve_padded(gram, cross, target_sq, n_rows, lipschitz, swept, *, method: str, static: tuple,
                 full_rank: bool = False):
    """:func:`solve_batched` on shapes padded to buckets (:func:`padded_request`), results sliced back.

    Goes through the compiled-program cache (``unmerge_jax.compile_cache``): a warm process loads
    the program instead of tracing the vmapped loops. Same arguments as :func:`solve_batched`.

    Returns:
      :class:`PaddedResult`, dispatched asynchronously; its ``get()`` is the ``SolverResult`` of
      :func:`solve_batched` as host NumPy arrays with leading axes (S, T, P).
    """
    req = padded_request(gram, cross, target_sq, n_rows, lipschitz, swept, method=method, static=static,
                         full_rank=full_rank)
    return dispatch_padded(req, (np.shape(gram)[0], np.shape(cross)[2], np.shape(swept)[0]))


def dispatch_padded(req: ProgramRequest, shape: tuple) -> "PaddedResult":
    """Run a :func:`padded_request` through the compiled-program cache, asynchronously.

    Args:
      req: from :func:`padded_request`. shape: the unpadded (S, T, P) its result is sliced to.
    """
    res = cached_program(req.jitted, req.name, req.args, req.static, compiler_options=req.compiler_options)
    return PaddedResult(res, tuple(shape))


class PaddedResult(NamedTuple):
    """A dispatched :func:`solve_padded` call: ``get()`` waits for it and slices the padding off."""

    result: Any
    shape: tuple

    def get(self):
        s, t, p = self.shape
        # One transfer, then NumPy slices (eager slicing of device arrays compiles a program per field).
        return jax.tree_util.tree_map(lambda a: np.asarray(a)[:s, :t, :p], jax.device_get(self.result))


def _static_items(method: str, params: dict) -> tuple:
    spec = program_spec(method)
    return tuple(sorted((k, v) for k, v in params.items() if k not in spec.swept))


def stacked_problems(stats: GramStats, *, use_seeds: bool):
    """(S, …)-stacked arrays of the full-data problem (S = 1) or of the bootstrap replicates."""
    # Host arrays first: the solve runs on one device whatever the statistics' sharding (see to_host).
    s = to_host(stats)
    s = s.replicates() if use_seeds else GramStats(*(None if a is None else a[None] for a in s.point()))
    gram = s.gram
    # λmax on the host: G is K×K and eager JAX would compile an eigh per shape.
    lip = np.linalg.eigvalsh(gram)[..., -1]
    # Host NumPy: the jitted solvers take them as they are, and the sweep's host-side scoring reads
    # them without an eager device op per slice.
    return (np.asarray(gram, np.float64), np.asarray(s.cross, np.float64), np.asarray(s.target_sq, np.float64),
            np.asarray(s.n_rows, np.float64), np.asarray(lip, np.float64))


def validate_stats(stats: GramStats) -> None:
    if not isinstance(stats, GramStats):
        raise UnmergeError(f"expected GramStats (from unmerge_jax.gram_stats or load_stats), got {type(stats).__name__}")
    for name in ("gram", "cross", "target_sq"):
        if not np.all(np.isfinite(np.asarray(getattr(stats, name)))):
            raise UnmergeError(f"statistics field {name} holds NaN/Inf; the inputs they came from had non-finite values")


def solve(stats: GramStats, method: str = "nnls", *, bootstrap: bool | None = None, **params) -> Decomposition:
    """Decompose every target of ``stats`` with one solver.

    Args:
      stats: :class:`GramStats` (from :func:`gram_stats` or a streaming pass).
      method: one of ``SOLVERS`` (nnls, omp, lasso, elastic_net, ridge, dot; aliases accepted).
      bootstrap: solve each bootstrap replicate (result axes (S, T)) instead of the full data.
        Default: True when ``stats`` has replicates.
      **params: solver parameters (scikit-learn names): ``alpha``, ``l1_ratio``, ``positive``,
        ``n_nonzero_coefs``, ``threshold``, ``tol``, ``max_iter``...

    Returns:
      :class:`Decomposition`.
    """
    validate_stats(stats)
    method = resolve_method(method)
    params = resolve_params(method, stats.n_atoms, params)
    use_seeds = stats.n_seeds > 0 if bootstrap is None else bool(bootstrap)
    return _solve_stacked(stats, method, params, point=not use_seeds, replicates=use_seeds)[0]


def solve_with_replicates(stats: GramStats, method: str = "nnls", **params) -> tuple:
    """``(solve(stats, bootstrap=False), solve(stats, bootstrap=True))`` in ONE compiled call.

    The full-data problem is solved as one more seed beside the S replicates, so a report that
    needs both (coefficients and their bootstrap intervals) compiles one program, not two. The
    second item is None when ``stats`` holds no replicates.
    """
    validate_stats(stats)
    method = resolve_method(method)
    params = resolve_params(method, stats.n_atoms, params)
    return _solve_stacked(stats, method, params, point=True, replicates=stats.n_seeds > 0)


def _solve_stacked(stats: GramStats, method: str, params: dict, *, point: bool, replicates: bool) -> tuple:
    """Solve the full-data problem and/or the replicates (stacked on the seed axis, one call)."""
    parts = ([stacked_problems(stats, use_seeds=False)] if point else []) + \
            ([stacked_problems(stats, use_seeds=True)] if replicates else [])
    gram, cross, tsq, n, lip = (np.concatenate(a) for a in zip(*parts))
    spec = SOLVERS[method]
    swept = np.asarray([[float(params[k]) for k in spec.swept]], np.float64).reshape(1, len(spec.swept))
    res = solve_padded(gram, cross, tsq, n, lip, swept, method=method, static=_static_items(method, params),
                       full_rank=gram_is_well_posed(gram)).get()
    res = jax.tree_util.tree_map(lambda a: a[:, :, 0], res)  # drop the single grid point
    rec = reconstruction(gram[:, None], np.swapaxes(cross, 1, 2), tsq, res.coef)
    fields = (res.coef, rec.recon_error, rec.cosine, rec.residual_sq, rec.unexplained, res.n_iter, res.converged,
              res.error)
    out = []
    if point:
        out.append(Decomposition(*(np.asarray(f)[0] for f in fields), method, params))
    if replicates:
        out.append(Decomposition(*(np.asarray(f)[int(point):] for f in fields), method, params))
    else:
        out.append(None)
    for d in out:
        if d is not None:
            _warn_unconverged(method, params, d.converged)
    return tuple(out)


def _warn_unconverged(method, params, converged) -> None:
    bad = int(np.size(converged) - np.count_nonzero(converged))
    if bad:
        hint = f" within max_iter={params['max_iter']}; raise max_iter or tol" if "max_iter" in params else ""
        warnings.warn(f"{method}: {bad} of {np.size(converged)} problems did not converge{hint}", RuntimeWarning,
                      stacklevel=3)


def decompose(D, V, method: str = "nnls", *, seeds: int = 0, key=None, **params) -> Decomposition:
    """``solve(gram_stats(D, V, seeds=seeds, key=key), method, **params)``.

    ``V`` may be (n,) (one target: the target axis is dropped from the result) or (n, T).
    """
    single = np.ndim(V) == 1
    stats = gram_stats(D, V, seeds=seeds, key=key)
    out = solve(stats, method, **params)
    if single:
        out = out._replace(**{f: (np.asarray(getattr(out, f))[..., 0, :] if f == "coef" else np.asarray(getattr(out, f))[..., 0])
                              for f in ("coef", "recon_error", "cosine", "residual_sq", "unexplained", "n_iter",
                                        "converged", "error")})
    return out
