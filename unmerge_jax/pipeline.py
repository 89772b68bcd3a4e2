"""The decompose pipeline, one way: entries → sources → (mask pass) → statistics → solve → report → outputs.

Each step is its own module and calls only the steps below it:

* ``entries``: named inputs, opened as task vectors against the base (``sources``);
* ``passes.mask``: the top-k selection of rows (checkpoints);
* ``passes.statistics``: the checkpoint statistics pass → ``GramStats`` (``stats``: dense arrays);
* ``solve`` (Gram-space solvers) → ``report`` (coefficients, fit, CIs; JSON and tables);
* outputs, written atomically (``io``) only after every step succeeded.

This module joins them into what the commands run: :func:`collect_stats` (checkpoints or array
files → :class:`~unmerge_jax.passes.statistics.StreamResult`), :func:`attribute_files` (the
presence decisions, merge method and verdict of every target, ``unmerge_jax.attribution``, from
the same pass), :func:`decompose_files` (``unmerge decompose``), :func:`stats_file` (``unmerge
stats``) and :func:`sweep_files` (``unmerge sweep``).

Each command checks everything that needs no weights before reading any (docs/errors.md):
options (:func:`check_options`: whole numbers in range, 32-bit seeds, finite solver parameters,
non-empty lists) and outputs (:func:`check_outputs`: never over, inside or containing an input,
never two outputs on one file, a writable location). Where the answer is ambiguous the result
carries ``warnings`` (``report.stats_warnings``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from unmerge_jax.attribution import (CALIBRATED_SEEDS, DEFAULT_RULES, DENSITY_GRID, METHOD_ALIASES, Attribution,
                                     attribute, signature_stats, trim_thresholds)

from unmerge_jax.entries import Entry, entry_path, is_array_file, parse_entries
from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.arrays import load_array, load_columns
from unmerge_jax.io.atomic import atomic_file, check_output
from unmerge_jax.passes.signatures import ties_stride
from unmerge_jax.passes.statistics import StreamResult, stream_stats
from unmerge_jax.provenance import provenance
from unmerge_jax.report import add_attribution, decomposition_report, no_attribution, report_json, stats_warnings
from unmerge_jax.solve import resolve_method, resolve_params
from unmerge_jax.stats import SIGNATURES_VERSION, bootstrap_unit_rows, check_seed, gram_stats, load_stats, save_stats
from unmerge_jax.sweep import summarize, sweep


# ----------------------------------------------------------------------------------------------
# checks that need no weights: options and outputs
# ----------------------------------------------------------------------------------------------
def _whole(flag: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise UnmergeError(f"{flag} must be a whole number >= {low}, got {value!r}")


def _finite_number(what: str, value) -> None:
    """Numbers must be finite; booleans and strings (solver options such as ``coef=lstsq``) pass."""
    if isinstance(value, (bool, str, np.bool_)) or value is None:
        return
    if isinstance(value, (int, float, np.integer, np.floating)):
        if not math.isfinite(float(value)):
            raise UnmergeError(f"{what} is {value}; give a finite number")
        return
    raise UnmergeError(f"{what} is {value!r}; give a number")


def check_options(*, seeds=0, key=0, top_k=None, block_rows=None, bootstrap_block=None, modules=None, ci=None,
                  **_) -> None:
    """One-line errors for options out of range, before any input is read.

    ``seeds`` ≥ 0 and ``top_k``/``block_rows``/``bootstrap_block`` ≥ 1 whole numbers; an int
    ``key`` is a 32-bit seed (:func:`~unmerge_jax.stats.check_seed`: refused, never folded);
    ``modules`` not empty; ``ci`` finite in (0, 1).
    """
    _whole("--seeds", seeds, 0)
    if isinstance(key, (int, np.integer)):
        check_seed(key, "--seed")
    for flag, value in (("--top-k", top_k), ("--block-rows", block_rows), ("--bootstrap-block", bootstrap_block)):
        if value is not None:
            _whole(flag, value, 1)
    if modules is not None and not [t for t in (modules.split(",") if isinstance(modules, str) else modules)
                                    if str(t).strip()]:
        raise UnmergeError("--modules is empty; name modules such as q,k,v,o, or leave it out for every module")
    if ci is not None and not (isinstance(ci, (int, float, np.floating)) and not isinstance(ci, bool) and 0 < ci < 1):
        raise UnmergeError(f"--ci must be a confidence level in (0, 1), e.g. 0.95; got {ci}")


def check_grid(grid) -> None:
    """A sweep grid ``{method: {param: [values]}}``: objects, non-empty value lists, finite numbers."""
    if isinstance(grid, str) and grid == "paper":
        return
    if not isinstance(grid, dict) or not grid:
        raise UnmergeError(f"the grid must be 'paper' or a non-empty object {{method: {{param: [values]}}}}, got "
                           f"{str(grid)[:80]}")
    for method, params in grid.items():
        if not isinstance(params, dict):
            raise UnmergeError(f"grid entry {method!r} is {str(params)[:80]}; expected an object {{param: [values]}}")
        for name, values in params.items():
            values = list(values) if isinstance(values, (list, tuple)) else [values]
            if not values:
                raise UnmergeError(f"grid {method} {name} is an empty list; give at least one value")
            for v in values:
                _finite_number(f"grid {method} {name} value", v)


def _input_paths(specs) -> list:
    """Paths of entry specs (any form :func:`~unmerge_jax.entries.parse_entries` takes, a source with
    ``.path``, or None) — what outputs must stay clear of."""
    if specs is None:
        return []
    if isinstance(specs, dict):
        specs = list(specs.values())
    if isinstance(specs, (str, Path, Entry)):
        specs = [specs]
    out = []
    for s in specs:
        if isinstance(s, (str, Path, Entry, tuple, list)):
            out.append(entry_path(s))
        elif getattr(s, "path", None) is not None:
            out.append(Path(s.path))
    return out


def check_outputs(inputs, outputs) -> None:
    """Refuse, before any work, outputs that would overwrite, sit inside or contain an input,
    outputs given twice, and outputs that cannot be written (``io.atomic.check_output``).

    Args:
      inputs: input specs and paths (``NAME=PATH`` entries count by their path; None ignored).
      outputs: output file paths (None ignored).
    """
    paths = [p for spec in inputs for p in _input_paths(spec)]
    seen: dict = {}
    for out in outputs:
        if out is None:
            continue
        key = Path(out).resolve()
        if key in seen:
            raise UnmergeError(f"two outputs are the same file {out}; give each output its own path")
        seen[key] = out
        check_output(out, paths)


def _check_mask_output(base, mask_out) -> None:
    if mask_out is not None and base is None:
        raise UnmergeError("--save-mask needs checkpoint inputs (--base); array inputs have no mask")


def _save_mask(result: StreamResult, mask_out, inputs) -> None:
    if mask_out is None:
        return
    if result.selection is None:
        raise UnmergeError("--save-mask needs checkpoint inputs (--base); array inputs have no mask")
    result.selection.save(mask_out, inputs=inputs)


# ----------------------------------------------------------------------------------------------
# statistics of the inputs
# ----------------------------------------------------------------------------------------------
def _array_inputs(specs, what: str):
    """``[(entry, matrix (n, columns), column names)]`` of array-file entries (see :func:`array_columns`)."""
    entries = parse_entries(specs, what)
    out = []
    for e in entries:
        m, cols = load_columns(e.path)
        if len(entries) == 1 and e.name == e.path.name:
            names = list(cols)                             # one plain file: its own column names
        elif m.shape[1] == 1:
            names = [e.name if e.name != e.path.name else e.path.stem]
        else:
            stem = e.name if e.name != e.path.name else e.path.stem
            names = [f"{stem}:{c}" for c in cols]
        out.append((e, m, names))
    return out


def _side_by_side(files, what: str):
    mats = [m for _, m, _ in files]
    rows = {m.shape[0] for m in mats}
    if len(rows) != 1:
        raise UnmergeError(f"the {what} files have different numbers of rows {sorted(rows)}; every file must hold "
                           f"vectors over the same parameters")
    matrix = mats[0] if len(mats) == 1 else np.concatenate([np.asarray(m) for m in mats], axis=1)
    return matrix, [n for _, _, cols in files for n in cols]


def array_columns(specs, what: str):
    """The columns of array-file entries, side by side: ``(matrix (n, columns), column names, entries)``.

    Names: one plain file gives its own column names; a named entry ``NAME=FILE`` gives ``NAME``
    (one column) or ``NAME:column``; several files without names use their stems the same way.
    """
    files = _array_inputs(specs, what)
    matrix, names = _side_by_side(files, what)
    return matrix, names, [e for e, _, _ in files]


def _raise_nonfinite_columns(files) -> None:
    """Slow path once the statistics came out non-finite: name the file, the column and the first row."""
    for e, m, names in files:
        for j in range(m.shape[1]):
            bad = np.flatnonzero(~np.isfinite(np.asarray(m[:, j])))
            if bad.size:
                r = int(bad[0])
                raise UnmergeError(f"{e.path} holds {bad.size} non-finite value(s) in column {names[j]} (first: "
                                   f"{m[r, j]} at row {r}); fix or drop that input")


def _array_stats(files, D, V, **kw):
    """``gram_stats(D, V, **kw)``, with NaN/Inf named by file, column and row."""
    try:
        return gram_stats(D, V, **kw)
    except UnmergeError:
        _raise_nonfinite_columns(files)
        raise


def collect_stats(base, dictionary, targets, *, top_k=None, scope="group", modules=None, mask=None, seeds=0, key=0,
                  **kw) -> StreamResult:
    """Statistics of the inputs of ``unmerge decompose`` / ``unmerge stats``.

    Checkpoint mode (``base`` given): :func:`~unmerge_jax.passes.statistics.stream_stats`. Array
    mode (``base`` None and every entry a ``.npy``/``.safetensors`` array file, loaded with
    ``load_columns``): ``gram_stats`` of the columns (``selection`` is None in the result). Both
    record their provenance with :func:`~unmerge_jax.provenance.provenance`, and the result's
    ``warnings`` are :func:`~unmerge_jax.report.stats_warnings` of the statistics.

    ``signatures=True`` (with ``densities``) also accumulates the merge-method signature sums
    (``result.signatures``): in the checkpoint pass from the same device blocks; for arrays, the
    columns are one tensor (thresholds over all their rows).
    """
    dictionary, targets = list(dictionary or []), list(targets or [])
    if not dictionary:
        raise UnmergeError("the dictionary is empty; give at least one --dictionary entry")
    if not targets:
        raise UnmergeError("no targets; give at least one --target entry")
    check_options(seeds=seeds, key=key, top_k=top_k, modules=modules, **kw)
    arrays = [is_array_file(s) for s in dictionary + targets]
    if base is not None:
        if any(arrays):
            bad = next(s for s, a in zip(dictionary + targets, arrays) if a)
            raise UnmergeError(f"{bad} is an array file but --base was given; with --base every entry must be a model "
                               f"or adapter directory (drop --base to decompose arrays)")
        res = stream_stats(base, dictionary, targets, top_k=top_k, scope=scope, modules=modules, mask=mask,
                           seeds=seeds, key=key, **kw)
    else:
        res = _collect_arrays(dictionary, targets, top_k=top_k, modules=modules, mask=mask, seeds=seeds, key=key,
                              **kw)
    if res.signatures is not None:
        res.provenance["signatures"] = signature_record(res.signatures, res.provenance["n_rows"], base is not None)
    res.warnings = stats_warnings(res.stats, res.provenance["atom_names"], res.provenance["target_names"])
    return res


def signature_record(sig, n_rows: int, checkpoints: bool) -> dict:
    """The provenance record of signature sums: format version, TIES density grid and the stride of
    the TIES rows (``passes.signatures.ties_stride``: 1 = every row; arrays take every row)."""
    return {"version": SIGNATURES_VERSION, "densities": [float(p) for p in np.asarray(sig.densities).reshape(-1)],
            "ties_stride": ties_stride(n_rows) if checkpoints else 1}


def _collect_arrays(dictionary, targets, *, top_k, modules, mask, seeds, key, **kw) -> StreamResult:
    if not all(is_array_file(s) for s in dictionary + targets):
        bad = next(s for s in dictionary + targets if not is_array_file(s))
        raise UnmergeError(f"{bad} is not a .npy/.safetensors array file; model and adapter directories need "
                           f"--base DIR (the model they were fine-tuned from)")
    if top_k is not None or modules is not None or mask is not None:
        raise UnmergeError("--top-k, --modules and --mask apply to checkpoints; array inputs are used as given")
    signatures, densities = kw.pop("signatures", False), kw.pop("densities", DENSITY_GRID)
    t0 = time.perf_counter()
    d_files = _array_inputs(dictionary, "dictionary")
    t_files = _array_inputs(targets, "targets")
    D, d_names = _side_by_side(d_files, "dictionary")
    V, t_names = _side_by_side(t_files, "targets")
    if D.shape[0] != V.shape[0]:
        raise UnmergeError(f"the dictionary arrays have {D.shape[0]} rows but the targets have {V.shape[0]}; both "
                           f"must be flattened over the same parameters")
    boot_block = bootstrap_unit_rows(int(D.shape[0]), kw.get("bootstrap_block"))
    stats = _array_stats(d_files + t_files, D, V, seeds=seeds, key=key, bootstrap_block=boot_block)
    sig = None
    if signatures:  # the arrays are one "tensor": thresholds over all rows of each column
        D32 = np.asarray(D, np.float32)
        sig = signature_stats(D32, np.asarray(V, np.float32), [(0, D32.shape[0])],
                              trim_thresholds(D32.T, densities)[None], densities)
    prov = provenance([e for e, _, _ in d_files], [e for e, _, _ in t_files], atom_names=d_names,
                      target_names=t_names, n_rows=D.shape[0], seeds=seeds, key=key, bootstrap_block=boot_block,
                      seconds=time.perf_counter() - t0, dtypes={D.dtype, V.dtype})
    return StreamResult(stats, prov, None, signatures=sig)


# ----------------------------------------------------------------------------------------------
# the commands
# ----------------------------------------------------------------------------------------------
def _inputs(base, dictionary, targets, stats_kw) -> list:
    return [base, dictionary, targets, stats_kw.get("mask")]


MERGE_METHOD_CHOICES = ("task_arithmetic", "linear", "ties", "dare")


def check_attribution_options(method=None, density=None, densities=DENSITY_GRID) -> None:
    """One-line errors for a given merge method / density, before any input is read.

    ``method`` one of :data:`MERGE_METHOD_CHOICES` (or another name ``attribute`` knows); a
    ``density`` needs ``ties`` or ``dare``, lies in (0, 1], and for TIES is on the signature grid.
    """
    if method is not None and str(method).lower() not in METHOD_ALIASES:
        raise UnmergeError(f"--merge-method {method!r} is not one of {', '.join(MERGE_METHOD_CHOICES)}")
    if density is None:
        return
    _finite_number("--density", density)
    if isinstance(density, bool) or not isinstance(density, (int, float, np.integer, np.floating)) \
            or not 0 < float(density) <= 1:
        raise UnmergeError(f"--density must be a fraction in (0, 1], got {density!r}")
    forced = None if method is None else METHOD_ALIASES[str(method).lower()]
    if forced not in ("ties", "dare"):
        raise UnmergeError("--density needs --merge-method ties or dare (task arithmetic and linear have no density)")
    grid = np.asarray(densities, np.float64)
    if forced == "ties" and not np.any(np.isclose(grid, float(density), atol=1e-9)):
        raise UnmergeError(f"TIES density {density} is not on the signature grid {grid.tolist()}; give one of those")


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """Hide the passes' progress bars for the duration (``enabled=False``); True keeps the
    default rule of :mod:`unmerge_jax.progress`."""
    if enabled:
        yield
        return
    old = os.environ.get("UNMERGE_PROGRESS")
    os.environ["UNMERGE_PROGRESS"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("UNMERGE_PROGRESS", None)
        else:
            os.environ["UNMERGE_PROGRESS"] = old


class AttributionResult(NamedTuple):
    """What :func:`attribute_files` returns.

    Attributes:
      attribution: the :class:`~unmerge_jax.attribution.Attribution` (decisions per target and entry).
      result: the pass's :class:`~unmerge_jax.passes.statistics.StreamResult` (``stats``,
        ``signatures``, ``provenance``, ``selection``, ``warnings``).
    """

    attribution: Attribution
    result: StreamResult


def attribute_files(base, dictionary, targets, *, seeds: int = CALIBRATED_SEEDS, key: int = 0, top_k=None,
                    scope: str = "group", modules=None, method: str | None = None, density: float | None = None,
                    rules=None, progress: bool = True, **stats_kw) -> AttributionResult:
    """Which dictionary entries each target holds, how it was merged, and what is left unexplained.

    One pass over the weights gives the Gram statistics with ``seeds`` bootstrap replicates and the
    merge-method signature sums (:func:`collect_stats` with ``signatures=True``); the decisions are
    :func:`unmerge_jax.attribution.attribute` of them (no second read).

    Args:
      base, dictionary, targets: as :func:`decompose_files` (model or adapter directories with
        ``base``, ``NAME=PATH`` strings, ``(name, path)`` pairs, ``{name: path}``; array files
        without ``base``).
      seeds: bootstrap replicates; at least :data:`~unmerge_jax.attribution.CALIBRATED_SEEDS`
        (200), the count the rules were calibrated with (fewer: a one-line error).
      key: bootstrap seed; the decisions are a deterministic function of it.
      top_k, scope, modules: the compression (``--top-k``, ``--scope``, ``--modules``).
      method: the merge method if known (``task_arithmetic``, ``linear``, ``ties``, ``dare``),
        instead of identifying it; density: its density (TIES: on the signature grid).
      rules: :class:`~unmerge_jax.attribution.Rules` (default ``DEFAULT_RULES``).
      progress: False hides the progress bars.
      **stats_kw: further :func:`collect_stats` options (``mask``, ``block_rows``,
        ``bootstrap_block``, ``densities``, ...).

    Returns:
      :class:`AttributionResult` ``(attribution, result)``.
    """
    _whole("--seeds", seeds, 0)
    if seeds < CALIBRATED_SEEDS:
        raise UnmergeError(f"presence decisions need --seeds {CALIBRATED_SEEDS} or more (the rules were calibrated "
                           f"with {CALIBRATED_SEEDS} bootstrap replicates); got --seeds {seeds}")
    densities = stats_kw.pop("densities", DENSITY_GRID)
    check_attribution_options(method, density, densities)
    check_options(seeds=seeds, key=key, top_k=top_k, modules=modules, **stats_kw)
    with _progress_bars(progress):
        res = collect_stats(base, dictionary, targets, top_k=top_k, scope=scope, modules=modules, seeds=seeds, key=key,
                            signatures=True, densities=densities, **stats_kw)
    prov = res.provenance
    at = attribute(res.stats, res.signatures, rules=DEFAULT_RULES if rules is None else rules, method=method,
                   density=density, atom_names=prov["atom_names"], target_names=prov["target_names"])
    return AttributionResult(at, res)


PASS_OPTIONS = ("top_k", "modules", "mask", "seeds", "key", "block_rows", "bootstrap_block", "densities")


def load_stats_result(path, **pass_options) -> StreamResult:
    """A statistics file (``unmerge stats``, ``--stats-out``) as the :class:`StreamResult` of the pass
    that wrote it: ``stats``, its ``provenance``, its ``signatures`` (None in a file without them)
    and ``warnings`` (:func:`~unmerge_jax.report.stats_warnings`); ``selection`` is None.

    ``pass_options``: options of a pass (``top_k``, ``modules``, ``mask``, ``seeds``, ``key``, ...,
    ``scope`` other than ``"group"``) given beside the file are refused — the file fixed them.
    """
    given = [k for k, v in pass_options.items() if v is not None and not (k == "scope" and v == "group")]
    if given:
        flag = "--" + given[0].replace("_", "-").replace("key", "seed")
        raise UnmergeError(f"{flag} is an option of the statistics pass; the statistics file {path} was computed with "
                           f"its own (see its provenance) — drop {flag}, or decompose the models instead of the file")
    stats, prov, sig = load_stats(path, signatures=True)
    res = StreamResult(stats, prov, None, signatures=sig)
    res.warnings = stats_warnings(stats, prov.get("atom_names"), prov.get("target_names"))
    return res


def _join_processes(coordinator, num_processes, process_id, base) -> bool:
    """Join ``jax.distributed`` when all three options are given (none: one process); True in the
    process that writes the outputs (process 0, or the only one)."""
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if not any(given):
        return True
    if not all(given):
        raise UnmergeError("--coordinator, --num-processes and --process-id go together")
    if base is None:
        raise UnmergeError("several processes need checkpoint inputs (--base); arrays are read by one process")
    _whole("--num-processes", num_processes, 1)
    _whole("--process-id", process_id, 0)
    if process_id >= num_processes:
        raise UnmergeError(f"--process-id {process_id} must be below --num-processes {num_processes}")
    import jax

    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return process_id == 0


def decompose_files(base, dictionary, targets, method: str = "nnls", *, params: dict | None = None, ci: float = 0.95,
                    json_out=None, stats_out=None, mask_out=None, merge_method: str | None = None,
                    density: float | None = None, rules=None, stats=None, coordinator=None, num_processes=None,
                    process_id=None, **stats_kw) -> dict:
    """``unmerge decompose``: statistics of the inputs, the report with its decisions, then the outputs.

    Args:
      base, dictionary, targets: as :func:`collect_stats` (checkpoints with ``base``, else array files).
      method, params: the solver and its parameters (checked before anything is read; numbers
        must be finite).
      ci: bootstrap confidence level, in (0, 1).
      json_out: write the report (with ``provenance``) as JSON here (NaN as ``null``).
      stats_out: also write the statistics (``save_stats``, with the signature sums when the
        decisions were made) here.
      mask_out: write the selection (checkpoints) here.
      merge_method, density: the merge method (and density) if known, instead of identifying it
        (see :func:`attribute_files`); rules: the decision thresholds (default ``DEFAULT_RULES``).
      stats: instead of ``base``/``dictionary``/``targets``, a statistics file of ``unmerge stats``
        or ``stats_out`` (:func:`load_stats_result`): no weights are read, and the report is the one
        the pass that wrote it would give (decisions need its signature sums and 200 replicates).
      coordinator, num_processes, process_id: run as one of several ``jax.distributed`` processes
        (all three, or none; checkpoints only): each reads its share of the tensors, every process
        gets the summed statistics and the report, process 0 writes the outputs.
      **stats_kw: :func:`collect_stats` options (``top_k``, ``scope``, ``modules``, ``mask``,
        ``seeds``, ``key``, ``block_rows``, ``bootstrap_block``, ``densities``).

    With ``seeds`` ≥ :data:`~unmerge_jax.attribution.CALIBRATED_SEEDS` (200) the same pass also
    accumulates the signature sums and every target gets the attribution decisions
    (:func:`~unmerge_jax.report.add_attribution`: ``verdict``, ``present``, ``method``, per-entry
    ``decisions``/``shares``/``weights``); with fewer, the report holds the fit only and a warning
    says why (``verdict``/``method`` None).

    Returns:
      the report of :func:`~unmerge_jax.report.decomposition_report` with its ``provenance``
      (and ``warnings``). Nothing is written unless every step succeeded; each output is written
      atomically, never over, inside or around an input.
    """
    inputs = _inputs(base, dictionary, targets, stats_kw) + [stats]
    params = dict(params or {})
    for k, v in params.items():
        _finite_number(f"--param {k}", v)
    resolve_params(resolve_method(method), 1 << 30, params)  # bad method/parameter: fail before reading
    check_options(ci=ci, **({} if stats is not None else stats_kw))
    if stats is None:
        check_attribution_options(merge_method, density, stats_kw.get("densities", DENSITY_GRID))
    check_outputs(inputs, [json_out, mask_out, stats_out])
    if stats is not None:
        if base is not None or dictionary or targets or any(x is not None for x in (coordinator, num_processes,
                                                                                    process_id)):
            raise UnmergeError(f"give either --stats {stats} or the inputs (--base, --dictionary, --target), not both")
        if stats_out is not None or mask_out is not None:
            raise UnmergeError(f"--stats-out and --save-mask write what a pass over the weights computed; with --stats "
                               f"{stats} there is none — the file is the statistics (drop them)")
        res = load_stats_result(stats, **stats_kw)
        if res.signatures is not None:
            check_attribution_options(merge_method, density, res.signatures.densities)
        else:
            check_attribution_options(merge_method, density)
        seeds, writer = res.stats.n_seeds, True
        decide = seeds >= CALIBRATED_SEEDS
        if decide and res.signatures is None:
            raise UnmergeError(f"statistics file {stats} holds no merge-method signature sums, which the presence "
                               f"decisions need; write it again with `unmerge stats --seeds {CALIBRATED_SEEDS}` (they are "
                               f"accumulated from {CALIBRATED_SEEDS} replicates on) or `unmerge decompose --stats-out`")
        few = (f"no presence decisions from {stats}: it holds {seeds} bootstrap replicates and the rules were "
               f"calibrated with {CALIBRATED_SEEDS}, so this report gives the fit only — write it again with "
               f"`unmerge stats --seeds {CALIBRATED_SEEDS}`")
    else:
        _check_mask_output(base, mask_out)
        writer = _join_processes(coordinator, num_processes, process_id, base)
        seeds = stats_kw.get("seeds", 0)
        decide = seeds >= CALIBRATED_SEEDS
        res = collect_stats(base, dictionary, targets, signatures=decide, **stats_kw)
        few = (f"no presence decisions with --seeds {seeds}: the rules were calibrated with {CALIBRATED_SEEDS} "
               f"bootstrap replicates, so this report gives the fit only — use --seeds {CALIBRATED_SEEDS} (the default)")
    prov = res.provenance
    # a file saved without names (unmerge_jax.save_stats) numbers its columns, as the report does
    atom_names = prov.get("atom_names") or [str(i) for i in range(res.stats.n_atoms)]
    target_names = prov.get("target_names") or [str(i) for i in range(res.stats.n_targets)]
    report = decomposition_report(res.stats, atom_names, target_names, method, ci=ci, **params)
    if decide:
        at = attribute(res.stats, res.signatures, rules=DEFAULT_RULES if rules is None else rules, method=merge_method,
                       density=density, atom_names=atom_names, target_names=target_names)
        add_attribution(report, at)
    else:
        no_attribution(report, few)
    report["provenance"] = prov
    if not writer:
        return report
    paths = [p for spec in inputs for p in _input_paths(spec)]
    if json_out is not None:
        with atomic_file(json_out, inputs=paths) as tmp:
            tmp.write_text(report_json(report))
    if stats_out is not None:
        save_stats(stats_out, res.stats, prov, inputs=paths, signatures=res.signatures)
    _save_mask(res, mask_out, paths)
    return report


def stats_file(base, dictionary, targets, out, *, mask_out=None, coordinator=None, num_processes=None,
               process_id=None, signatures: bool | None = None, **stats_kw) -> tuple[StreamResult, bool]:
    """``unmerge stats``: the statistics of the inputs written to ``out`` (``save_stats``).

    Args:
      base, dictionary, targets, **stats_kw: as :func:`collect_stats`.
      out: the ``.npz`` to write; mask_out: also write the selection (checkpoints).
      coordinator, num_processes, process_id: run as one of several ``jax.distributed``
        processes (all three, or none); each reads its share of the tensors and process 0 writes.
      signatures: also accumulate the merge-method signature sums in the same pass, so that
        ``unmerge decompose --stats out`` gives the presence decisions. Default (None): when
        ``seeds`` ≥ :data:`~unmerge_jax.attribution.CALIBRATED_SEEDS` (200), the replicates the
        decisions need — as ``unmerge decompose`` does; their cost is the TIES thresholds of every
        dictionary tensor and the signature kernel beside the Gram kernel (docs/attribution.md).

    Returns:
      ``(result, written)``: written is False in the processes other than 0; ``result.warnings``
      says where a decomposition of these statistics would be ambiguous.
    """
    inputs = _inputs(base, dictionary, targets, stats_kw)
    check_options(**stats_kw)
    check_outputs(inputs, [out, mask_out])
    _check_mask_output(base, mask_out)
    if signatures is None:
        signatures = stats_kw.get("seeds", 0) >= CALIBRATED_SEEDS
    writer = _join_processes(coordinator, num_processes, process_id, base)
    res = collect_stats(base, dictionary, targets, signatures=bool(signatures), **stats_kw)
    if writer:
        paths = [p for spec in inputs for p in _input_paths(spec)]
        save_stats(out, res.stats, res.provenance, inputs=paths, signatures=res.signatures)
        _save_mask(res, mask_out, paths)
    return res, writer


SWEEP_METRICS = ("recon_error", "sparsity")
TRUTH_METRICS = ("recon_error", "precision", "recall", "perfect_match", "sparsity")


def sweep_files(*, stats=None, dictionary=None, targets=None, grid="paper", methods=None, seeds: int = 3,
                key: int = 0, bootstrap_block=None, truth=None, by=("method",), runs_out=None, summary_out=None):
    """``unmerge sweep``: a grid of decompositions over saved statistics or dense array files.

    Args:
      stats: a ``.npz`` from ``unmerge stats`` (names from its provenance); or
      dictionary, targets: array files (``load_columns``), whose statistics are computed here
        with ``seeds`` replicates (``key``, ``bootstrap_block``).
      grid: ``"paper"``, a ``{method: {param: [values]}}`` dict, or a JSON file of one (value
        lists non-empty, numbers finite).
      methods: subset of the grid's methods (non-empty); seeds: bootstrap replicates per run;
        truth: a ``.npy`` (targets × atoms) of true weights (adds precision/recall/perfect match).
      by: summary columns (non-empty); runs_out: write every run as CSV; summary_out: the
        summary as JSON. Outputs are checked before any work and never overlap an input.

    Returns:
      ``(table, summary)``: the runs (``unmerge_jax.sweep``) and their ``summarize`` table;
      ``table.attrs["warnings"]`` holds :func:`~unmerge_jax.report.stats_warnings` of the statistics.
    """
    check_options(seeds=seeds, key=key, bootstrap_block=bootstrap_block)
    if methods is not None and (not list(methods) or not all(str(m).strip() for m in methods)):
        raise UnmergeError(f"--methods {','.join(map(str, methods))!r} names no method (or an empty one); give e.g. "
                           f"nnls,omp, or leave it out for every method of the grid")
    if not list(by) or not all(str(b).strip() for b in by):
        raise UnmergeError(f"--by {','.join(map(str, by))!r} names no column (or an empty one); give e.g. method")
    inputs = [stats, dictionary, targets, truth, grid if isinstance(grid, (str, Path)) and str(grid) != "paper"
              else None]
    check_outputs(inputs, [runs_out, summary_out])
    if isinstance(grid, (str, Path)) and str(grid) != "paper":
        try:
            grid = json.loads(Path(grid).read_text())
        except (OSError, ValueError) as err:
            raise UnmergeError(f"cannot read grid file {grid}: {err}") from None
    check_grid(grid)
    if stats is not None:
        if dictionary or targets:
            raise UnmergeError("give either --stats or --dictionary/--targets, not both")
        if bootstrap_block is not None:
            raise UnmergeError("--bootstrap-block applies to --dictionary/--targets; a statistics file holds its "
                               "replicates already")
        gs, prov = load_stats(stats)
        atom_names, target_names = prov.get("atom_names"), prov.get("target_names")
    elif dictionary is not None and targets is not None:
        d, atom_names = load_columns(dictionary)
        v, target_names = load_columns(targets)
        files = [(Entry(Path(dictionary).name, Path(dictionary)), d, atom_names),
                 (Entry(Path(targets).name, Path(targets)), v, target_names)]
        gs = _array_stats(files, d, v, seeds=seeds, key=key, bootstrap_block=bootstrap_block)
    else:
        raise UnmergeError("give --stats FILE.npz, or both --dictionary and --targets")
    if truth is not None:
        truth_path, truth = truth, load_array(truth, "truth file")
        if truth.dtype.kind not in "fiub":
            raise UnmergeError(f"truth file {truth_path} holds {truth.dtype} values; give true weights as numbers")
        if truth.dtype.kind in "f" and not np.all(np.isfinite(truth)):
            raise UnmergeError(f"truth file {truth_path} holds NaN/Inf; give the true weights (0 = absent)")
    table = sweep(gs, grid=grid, seeds=seeds, truth=truth, methods=methods, atom_names=atom_names,
                  target_names=target_names)
    table.attrs["warnings"] = stats_warnings(gs, atom_names, target_names)
    summary = summarize(table, by=list(by), metrics=list(TRUTH_METRICS if truth is not None else SWEEP_METRICS))
    paths = [p for spec in inputs for p in _input_paths(spec)]
    if runs_out is not None:
        with atomic_file(runs_out, inputs=paths) as tmp:
            table.to_csv(tmp, index=False)
    if summary_out is not None:
        with atomic_file(summary_out, inputs=paths) as tmp:
            tmp.write_text(summary.frame.to_json(orient="records", indent=2))
    return table, summary
