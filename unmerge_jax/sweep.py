"""Vectorised decomposition sweeps and the paper's mean ± std tables.

``sweep`` runs every (target, method, grid point, seed) of a grid with ONE compiled call per
solver program (Lasso shares ElasticNet's; Ridge and dot-product thresholding share one): the grid points are an array
axis, seeds are bootstrap replicates of the Gram statistics (all computed in the same data pass),
targets are another axis, each padded to a bucket (``unmerge_jax.solve.bucket``) so that other
grid, target or seed counts inside it reuse the program. No Python loop runs over targets, grid
points or seeds.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple, Sequence

import jax
import numpy as np
import pandas as pd

from unmerge_jax.compile_cache import compile_programs
from unmerge_jax.errors import UnmergeError
from unmerge_jax.metrics import reconstruction, support_metrics
from unmerge_jax.solve import (_static_items, _warn_unconverged, bucket, dispatch_padded, padded_request,
                               resolve_method, resolve_params, stacked_problems, validate_stats)
from unmerge_jax.solvers import SOLVERS, program_spec
from unmerge_jax.solvers.common import gram_is_well_posed
from unmerge_jax.stats import GramStats, gram_stats

# The UNMERGE paper's grid (§4.1). Its dot-product thresholds are not given; these three are ours.
PAPER_GRID: dict[str, dict[str, list]] = {
    "nnls": {},
    "omp": {"n_nonzero_coefs": [1, 2, 3, 4, 5, 6, 7, 8]},
    "lasso": {"alpha": [1e-8, 1e-7, 1e-6]},
    "ridge": {"alpha": [1e-8, 1e-6, 1e-4, 1e-2]},
    "elastic_net": {"l1_ratio": [0.1, 0.5, 0.9], "alpha": [1e-8, 1e-6, 1e-4]},
    "dot": {"threshold": [0.01, 0.05, 0.1]},
}

# Families solved by another program, with the parameters that make them that family: Lasso is
# ElasticNet with l1_ratio = 1 (``solvers.lasso`` calls ``elastic_net`` so); Ridge and dot-product
# thresholding are lanes of one masked solve (``solvers.support``). The paper grid compiles four
# solver programs, not six.
SHARED_PROGRAM = {"lasso": "elastic_net", "ridge": "support_solve", "dot": "support_solve"}
PROGRAM_PARAMS = {"lasso": {"l1_ratio": 1.0},
                  "ridge": {"threshold": 0.0, "by_score": 0.0, "coef": "lstsq"},
                  "dot": {"alpha": 0.0, "by_score": 1.0}}

METHOD_LABELS = {"nnls": "NNLS", "omp": "OMP", "ridge": "Ridge", "elastic_net": "Elastic Net",
                 "dot": "Dot Product", "lasso": "Lasso"}


def grid_points(method: str, grid: dict, n_atoms: int) -> list[dict]:
    """Cartesian product of one method's grid, as a list of parameter dicts.

    OMP atom counts above the dictionary size are dropped (they would select every atom anyway).
    """
    axes = {k: list(np.atleast_1d(v)) for k, v in grid.items()}
    if method == "omp":
        axes["n_nonzero_coefs"] = [int(k) for k in axes.get("n_nonzero_coefs", [1]) if int(k) <= n_atoms] or [n_atoms]
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))] or [{}]


def _format_params(p: dict) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, (float, np.floating)) else f"{k}={v}" for k, v in sorted(p.items())) or "-"


def sweep(D_or_stats, V=None, *, grid="paper", seeds: int = 3, key=None, truth=None, methods: Sequence[str] | None = None,
          target_names: Sequence[str] | None = None, atom_names: Sequence[str] | None = None,
          support_tol: float = 1e-8, **static) -> pd.DataFrame:
    """Run a decomposition grid over all targets and seeds.

    Args:
      D_or_stats: (n, K) dictionary (then ``V`` is (n,) or (n, T)), or a :class:`GramStats`.
      V: targets when a dictionary array is given.
      grid: "paper" (:data:`PAPER_GRID`) or ``{method: {param: [values]}}``.
      seeds: S bootstrap replicates (Poisson(1) weights per resampling unit of rows, see
        ``unmerge_jax.bootstrap_unit_rows``); each run is solved on a replicate and
        scored against the full data. ``seeds=0`` solves the full data once (``seed = -1``).
        With statistics that already hold replicates, the first S are used.
      key: bootstrap key/int seed (arrays only).
      truth: optional (T, K) true weights (0 = atom absent) → precision, recall, perfect match,
        weight errors.
      methods: subset of the grid's methods to run.
      target_names, atom_names: labels (default: indices).
      support_tol: ``|a_i| > support_tol`` counts as a selected atom.
      **static: static solver options applied where a method takes them (``positive``, ``tol``, ``max_iter``).

    Returns:
      DataFrame, one row per (target, method, params, seed): ``target``, ``method``, ``params``,
      one column per swept parameter, ``seed``, ``coef`` (tuple of K), ``recon_error``,
      ``cosine``, ``unexplained``, ``sparsity``, ``n_iter``, ``converged``, ``error``, and with
      ``truth``: ``precision``, ``recall``, ``perfect_match``, ``weight_error``, ``weight_rel_error``.
    """
    if isinstance(D_or_stats, GramStats):
        if V is not None:
            raise UnmergeError("pass either statistics or (D, V) arrays to sweep, not both")
        stats = D_or_stats
        if seeds > stats.n_seeds:
            raise UnmergeError(f"sweep asked for seeds={seeds} but the statistics hold {stats.n_seeds} bootstrap "
                               f"replicates; recompute them with seeds={seeds} (or pass seeds=0)")
        if seeds and seeds < stats.n_seeds:
            stats = stats._replace(boot_gram=stats.boot_gram[:seeds], boot_cross=stats.boot_cross[:seeds],
                                   boot_target_sq=stats.boot_target_sq[:seeds], boot_n_rows=stats.boot_n_rows[:seeds])
    else:
        if V is None:
            raise UnmergeError("sweep needs targets V when given a dictionary array")
        stats = gram_stats(D_or_stats, V, seeds=seeds, key=key)
    validate_stats(stats)
    k, t = stats.n_atoms, stats.n_targets
    grid = PAPER_GRID if isinstance(grid, str) and grid == "paper" else grid
    if not isinstance(grid, dict):
        raise UnmergeError(f"grid must be 'paper' or a dict {{method: {{param: [values]}}}}, got {grid!r}")
    chosen = [resolve_method(m) for m in (methods if methods is not None else grid)]
    if truth is not None:
        truth = np.asarray(truth, dtype=np.float64)
        if truth.shape != (t, k):
            raise UnmergeError(f"truth must be (targets, atoms) = ({t}, {k}), got {truth.shape}")
    target_names = list(target_names) if target_names is not None else list(range(t))
    atom_names = list(atom_names) if atom_names is not None else list(range(k))
    if len(target_names) != t or len(atom_names) != k:
        raise UnmergeError(f"got {len(target_names)} target names for {t} targets and {len(atom_names)} atom names for {k} atoms")

    use_seeds = seeds > 0
    solve_arrays = stacked_problems(stats, use_seeds=use_seeds)
    full = stacked_problems(stats, use_seeds=False)  # runs are scored against the full data
    full_rank = gram_is_well_posed(solve_arrays[0])
    # Plan every family, then dispatch one compiled call per program: families that are one
    # solver share it (Lasso is ElasticNet with l1_ratio = 1, the same arithmetic), and the
    # calls run asynchronously, one after another, while the host builds the rows of the
    # families already done.
    planned, programs = [], {}
    for method in chosen:
        spec = SOLVERS[method]
        points = grid_points(method, grid.get(method, {}), k)
        st = {n: v for n, v in static.items() if n in spec.defaults}
        resolved = [resolve_params(method, k, {**st, **p}) for p in points]
        if method == "omp":
            for r in resolved:
                r["max_atoms"] = min(bucket(max(int(q["n_nonzero_coefs"]) for q in resolved)), k)
        program = SHARED_PROGRAM.get(method, method)
        as_program = [{**r, **PROGRAM_PARAMS.get(method, {})} for r in resolved]
        rows = np.asarray([[float(r[n]) for n in program_spec(program).swept] for r in as_program], np.float64)
        key = (program, _static_items(program, as_program[0]))
        offset = sum(len(x) for x in programs.get(key, []))
        programs.setdefault(key, []).append(rows.reshape(len(points), len(program_spec(program).swept)))
        planned.append((method, spec, points, resolved, key, offset))
    # Compile (or load) every program first, in parallel, then dispatch them one after another.
    requests = {key: padded_request(*solve_arrays, np.concatenate(rows), method=key[0], static=key[1],
                                    full_rank=full_rank) for key, rows in programs.items()}
    compile_programs(list(requests.values()))
    s, t_in = solve_arrays[0].shape[0], solve_arrays[1].shape[2]
    launched = {key: dispatch_padded(req, (s, t_in, sum(len(r) for r in programs[key])))
                for key, req in requests.items()}
    frames = []
    fetched = {}
    for method, spec, points, resolved, key, offset in planned:
        if key not in fetched:
            fetched[key] = launched[key].get()
        res = jax.tree_util.tree_map(lambda a: a[:, :, offset:offset + len(points)], fetched[key])
        _warn_unconverged(method, resolved[0], res.converged)
        coef = np.asarray(res.coef)  # (S, T, P, K)
        rec = reconstruction(full[0][0], np.swapaxes(np.asarray(full[1][0]), 0, 1)[None, :, None, :],
                             np.asarray(full[2][0])[None, :, None], coef)
        s_ax, t_ax, p_ax = np.meshgrid(np.arange(coef.shape[0]), np.arange(t), np.arange(len(points)), indexing="ij")
        cols = {
            "target": np.asarray(target_names, dtype=object)[t_ax.ravel()],
            "method": method,
            "params": np.asarray([_format_params(p) for p in points], dtype=object)[p_ax.ravel()],
        }
        for name in spec.swept:
            cols[name] = np.asarray([r[name] for r in resolved])[p_ax.ravel()]
        cols["seed"] = s_ax.ravel() if use_seeds else -1
        flat = coef.reshape(-1, k)
        cols["coef"] = list(map(tuple, flat.tolist()))
        cols["recon_error"] = np.asarray(rec.recon_error).ravel()
        cols["cosine"] = np.asarray(rec.cosine).ravel()
        cols["unexplained"] = np.asarray(rec.unexplained).ravel()
        cols["n_iter"] = np.asarray(res.n_iter).ravel()
        cols["converged"] = np.asarray(res.converged).ravel()
        cols["error"] = np.asarray(res.error).ravel()
        if truth is not None:
            sm = support_metrics(flat, truth[t_ax.ravel()], support_tol)
            cols.update(sm)
        else:
            cols["sparsity"] = np.sum(np.abs(flat) > support_tol, axis=-1).astype(float)
        frames.append(cols)
    table = _concat_columns(frames)
    table.attrs["atom_names"] = atom_names
    return table


def _concat_columns(frames: list[dict]) -> pd.DataFrame:
    """One DataFrame from per-family column dicts (what ``pd.concat`` of their frames gives: columns
    in order of first appearance, NaN where a family lacks a column), built in one go."""
    lengths = [len(f["coef"]) for f in frames]
    names = list(dict.fromkeys(name for f in frames for name in f))
    columns = {}
    for name in names:
        parts = []
        for f, n in zip(frames, lengths):
            value = f.get(name, np.nan)
            if isinstance(value, list):  # tuples (coefficients) stay one object per row
                parts.append(np.fromiter(value, dtype=object, count=n))
            elif np.ndim(value):
                parts.append(np.asarray(value))
            else:
                parts.append(np.full(n, value, dtype=object if isinstance(value, str) else None))
        columns[name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return pd.DataFrame(columns)


def mean_std_cell(mean, sd, *, digits: int = 2, std: bool = True) -> str:
    """One cell of the paper's tables: ``"0.45 ± 0.21"`` (``mean ± sd`` to ``digits`` decimals).

    A missing ``sd`` (NaN: a sample standard deviation of a single value) prints as 0;
    ``std=False`` prints the mean alone.
    """
    if not std:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {0.0 if pd.isna(sd) else sd:.{digits}f}"


def mean_std_cells(row, metrics: Sequence[str], *, digits: int = 2, std: bool = True) -> str:
    """``metrics`` of one :func:`summarize` frame row (``<metric>_mean`` / ``<metric>_std`` columns) as
    :func:`mean_std_cell` cells joined by `` / ``."""
    return " / ".join(mean_std_cell(row[f"{m}_mean"], row[f"{m}_std"], digits=digits, std=std) for m in metrics)


class Summary(NamedTuple):
    """``frame``: numeric means/stds/counts; ``markdown``: the paper-style table."""

    frame: pd.DataFrame
    markdown: str


def summarize(table: pd.DataFrame, by: Sequence[str] = ("method",), metrics: Sequence[str] = ("recon_error", "precision", "sparsity"),
              *, columns: str | None = None, std: bool = True, digits: int = 2, labels: dict | None = None) -> Summary:
    """Mean ± sample standard deviation (ddof = 1) of ``metrics`` grouped by ``by``.

    Args:
      table: output of :func:`sweep` (possibly with extra columns such as ``category``).
      by: row grouping, e.g. ``["method"]`` (Table 1) or ``["category"]`` (Table 2).
      metrics: columns to aggregate (missing ones are skipped).
      columns: optional column to pivot on (Tables 3–6: ``merge_method`` or ``category``);
        the cells then hold ``metrics`` joined by `` / ``.
      std: include ``± std``; digits: decimals; labels: display names for values (default: the
        paper's method names).

    Returns:
      :class:`Summary` (DataFrame with ``<metric>_mean``, ``<metric>_std``, ``n`` columns; markdown).
    """
    by = list(by)
    keys = by + ([columns] if columns else [])
    missing = [c for c in keys if c not in table.columns]
    if missing:
        raise UnmergeError(f"cannot group by {', '.join(missing)}: the table has columns {', '.join(map(str, table.columns))}")
    metrics = [m for m in metrics if m in table.columns]
    if not metrics:
        raise UnmergeError("none of the requested metrics are columns of the table")
    grouped = table.groupby(keys, sort=False)[metrics]
    frame = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=1).add_suffix("_std")).join(grouped.size().rename("n"))
    frame = frame.reset_index()
    labels = {**METHOD_LABELS, **(labels or {})}

    show = frame.copy()
    show["cell"] = show.apply(lambda row: mean_std_cells(row, metrics, digits=digits, std=std), axis=1)
    for c in keys:
        show[c] = show[c].map(lambda v: labels.get(v, v))
    if columns:
        wide = show.pivot(index=by, columns=columns, values="cell")
        wide = wide.reset_index()
        header = [*by, *map(str, wide.columns[len(by):])]
        rows = wide.astype(str).values.tolist()
    else:
        header = [*by, *[m.replace("_", " ") for m in metrics]]
        rows = [[str(r[c]) for c in by] + [mean_std_cells(r, [m], digits=digits, std=std) for m in metrics]
                for _, r in show.iterrows()]
    md = "| " + " | ".join(header) + " |\n|" + "|".join("---" for _ in header) + "|\n"
    md += "".join("| " + " | ".join(row) + " |\n" for row in rows)
    return Summary(frame, md)
