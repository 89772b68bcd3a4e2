"""``solve``/``decompose``: run a registered solver over every target (and bootstrap seed).

The compiled program is ``jit(vmap_seeds(vmap_targets(vmap_params(solver))))``; static options
(``positive``, ``tol``, ``max_iter``, OMP's ``max_atoms``) are part of the jit cache key, swept
hyper-parameters are array inputs — a second call with other values does not recompile.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unmerge_jax.errors import UnmergeError, check_choice
from unmerge_jax.metrics import reconstruction
from unmerge_jax.solvers import ALIASES, SOLVERS, Problem
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
            out["max_atoms"] = int(ks.max())
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


@functools.partial(jax.jit, static_argnames=("method", "static", "full_rank"))
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
    spec = SOLVERS[method]
    kw = dict(static)

    def one(g, c, vv, n, lip, hp):
        args = [hp[i] for i in range(len(spec.swept))]
        return spec.fn(Problem(g, c, vv, n, lip), *args, **kw, full_rank=full_rank)

    over_params = jax.vmap(one, in_axes=(None, None, None, None, None, 0))
    over_targets = jax.vmap(over_params, in_axes=(None, 1, 0, None, None, None))
    over_seeds = jax.vmap(over_targets, in_axes=(0, 0, 0, 0, 0, None))
    return over_seeds(gram, cross, target_sq, n_rows, lipschitz, swept)


def _static_items(method: str, params: dict) -> tuple:
    spec = SOLVERS[method]
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
    gram, cross, tsq, n, lip = stacked_problems(stats, use_seeds=use_seeds)
    spec = SOLVERS[method]
    swept = jnp.asarray([[float(params[k]) for k in spec.swept]], jnp.float64).reshape(1, len(spec.swept))
    res = solve_batched(gram, cross, tsq, n, lip, swept, method=method, static=_static_items(method, params),
                        full_rank=gram_is_well_posed(gram))
    res = jax.tree_util.tree_map(lambda a: a[:, :, 0], res)  # drop the single grid point
    rec = reconstruction(np.asarray(gram)[:, None], np.swapaxes(np.asarray(cross), 1, 2), tsq, res.coef)
    squeeze = (lambda a: np.asarray(a)[0]) if not use_seeds else np.asarray
    out = Decomposition(squeeze(res.coef), squeeze(rec.recon_error), squeeze(rec.cosine), squeeze(rec.residual_sq),
                        squeeze(rec.unexplained), squeeze(res.n_iter), squeeze(res.converged), squeeze(res.error),
                        method, params)
    _warn_unconverged(method, params, out.converged)
    return out


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
