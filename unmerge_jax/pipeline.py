"""The decompose pipeline, one way: entries → sources → (mask pass) → statistics → solve → report → outputs.

Each step is its own module and calls only the steps below it:

* ``entries``: named inputs, opened as task vectors against the base (``sources``);
* ``passes.mask``: the top-k selection of rows (checkpoints);
* ``passes.statistics``: the checkpoint statistics pass → ``GramStats`` (``stats``: dense arrays);
* ``solve`` (Gram-space solvers) → ``report`` (coefficients, fit, CIs; JSON and tables);
* outputs, written atomically (``io``) only after every step succeeded.

This module joins them into what the commands run: :func:`collect_stats` (checkpoints or array
files → :class:`~unmerge_jax.passes.statistics.StreamResult`), :func:`decompose_files`
(``unmerge decompose``), :func:`stats_file` (``unmerge stats``) and :func:`sweep_files`
(``unmerge sweep``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from unmerge_jax.entries import is_array_file, parse_entries
from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.arrays import load_columns
from unmerge_jax.io.atomic import atomic_file
from unmerge_jax.passes.statistics import StreamResult, stream_stats
from unmerge_jax.provenance import provenance
from unmerge_jax.report import decomposition_report
from unmerge_jax.solve import resolve_method, resolve_params
from unmerge_jax.stats import bootstrap_unit_rows, gram_stats, load_stats, save_stats
from unmerge_jax.sweep import summarize, sweep


# ----------------------------------------------------------------------------------------------
# statistics of the inputs
# ----------------------------------------------------------------------------------------------
def array_columns(specs, what: str):
    """The columns of array-file entries, side by side: ``(matrix (n, columns), column names, entries)``.

    Names: one plain file gives its own column names; a named entry ``NAME=FILE`` gives ``NAME``
    (one column) or ``NAME:column``; several files without names use their stems the same way.
    """
    entries = parse_entries(specs, what)
    mats, names = [], []
    for e in entries:
        m, cols = load_columns(e.path)
        if len(entries) == 1 and e.name == e.path.name:
            names += cols                                  # one plain file: its own column names
        elif m.shape[1] == 1:
            names.append(e.name if e.name != e.path.name else e.path.stem)
        else:
            stem = e.name if e.name != e.path.name else e.path.stem
            names += [f"{stem}:{c}" for c in cols]
        mats.append(m)
    rows = {m.shape[0] for m in mats}
    if len(rows) != 1:
        raise UnmergeError(f"the {what} files have different numbers of rows {sorted(rows)}; every file must hold "
                           f"vectors over the same parameters")
    return (mats[0] if len(mats) == 1 else np.concatenate([np.asarray(m) for m in mats], axis=1)), names, entries


def collect_stats(base, dictionary, targets, *, top_k=None, scope="group", modules=None, mask=None, seeds=0, key=0,
                  **kw) -> StreamResult:
    """Statistics of the inputs of ``unmerge decompose`` / ``unmerge stats``.

    Checkpoint mode (``base`` given): :func:`~unmerge_jax.passes.statistics.stream_stats`. Array
    mode (``base`` None and every entry a ``.npy``/``.safetensors`` array file, loaded with
    ``load_columns``): ``gram_stats`` of the columns (``selection`` is None in the result). Both
    record their provenance with :func:`~unmerge_jax.provenance.provenance`.
    """
    dictionary, targets = list(dictionary or []), list(targets or [])
    if not dictionary:
        raise UnmergeError("the dictionary is empty; give at least one --dictionary entry")
    if not targets:
        raise UnmergeError("no targets; give at least one --target entry")
    arrays = [is_array_file(s) for s in dictionary + targets]
    if base is not None:
        if any(arrays):
            bad = next(s for s, a in zip(dictionary + targets, arrays) if a)
            raise UnmergeError(f"{bad} is an array file but --base was given; with --base every entry must be a model "
                               f"or adapter directory (drop --base to decompose arrays)")
        return stream_stats(base, dictionary, targets, top_k=top_k, scope=scope, modules=modules, mask=mask,
                            seeds=seeds, key=key, **kw)
    if not all(arrays):
        bad = next(s for s, a in zip(dictionary + targets, arrays) if not a)
        raise UnmergeError(f"{bad} is not a .npy/.safetensors array file; model and adapter directories need "
                           f"--base DIR (the model they were fine-tuned from)")
    if top_k is not None or modules is not None or mask is not None:
        raise UnmergeError("--top-k, --modules and --mask apply to checkpoints; array inputs are used as given")
    t0 = time.perf_counter()
    D, d_names, d_entries = array_columns(dictionary, "dictionary")
    V, t_names, t_entries = array_columns(targets, "targets")
    if D.shape[0] != V.shape[0]:
        raise UnmergeError(f"the dictionary arrays have {D.shape[0]} rows but the targets have {V.shape[0]}; both "
                           f"must be flattened over the same parameters")
    boot_block = bootstrap_unit_rows(int(D.shape[0]), kw.get("bootstrap_block"))
    stats = gram_stats(D, V, seeds=seeds, key=key, bootstrap_block=boot_block)
    prov = provenance(d_entries, t_entries, atom_names=d_names, target_names=t_names, n_rows=D.shape[0], seeds=seeds,
                      key=key, bootstrap_block=boot_block, seconds=time.perf_counter() - t0,
                      dtypes={D.dtype, V.dtype})
    return StreamResult(stats, prov, None)


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
def check_outputs(inputs, outputs) -> None:
    """Refuse outputs that would overwrite an input (``NAME=PATH`` entries count by their path), before any work."""
    given = [p for p in inputs if p]
    resolved = {Path(str(p).partition("=")[2] or str(p)).resolve() for p in given} | {
        Path(str(p)).resolve() for p in given}
    for out in outputs:
        if out is not None and Path(out).resolve() in resolved:
            raise UnmergeError(f"output {out} is one of the inputs; choose another file")


def _check_mask_output(base, mask_out) -> None:
    if mask_out is not None and base is None:
        raise UnmergeError("--save-mask needs checkpoint inputs (--base); array inputs have no mask")


def _save_mask(result: StreamResult, mask_out) -> None:
    if mask_out is None:
        return
    if result.selection is None:
        raise UnmergeError("--save-mask needs checkpoint inputs (--base); array inputs have no mask")
    result.selection.save(mask_out)


# ----------------------------------------------------------------------------------------------
# the commands
# ----------------------------------------------------------------------------------------------
def decompose_files(base, dictionary, targets, method: str = "nnls", *, params: dict | None = None, ci: float = 0.95,
                    json_out=None, stats_out=None, mask_out=None, **stats_kw) -> dict:
    """``unmerge decompose``: statistics of the inputs, the report, then the outputs.

    Args:
      base, dictionary, targets: as :func:`collect_stats` (checkpoints with ``base``, else array files).
      method, params: the solver and its parameters (checked before anything is read).
      ci: bootstrap confidence level.
      json_out: write the report (with ``provenance``) as JSON here.
      stats_out: also write the statistics (``save_stats``) here.
      mask_out: write the selection (checkpoints) here.
      **stats_kw: :func:`collect_stats` options (``top_k``, ``scope``, ``modules``, ``mask``,
        ``seeds``, ``key``, ``block_rows``, ``bootstrap_block``).

    Returns:
      the report of :func:`~unmerge_jax.report.decomposition_report` with its ``provenance``.
      Nothing is written unless every step succeeded; each output is written atomically.
    """
    check_outputs([base, *dictionary, *targets, stats_kw.get("mask")], [json_out, mask_out, stats_out])
    params = dict(params or {})
    resolve_params(resolve_method(method), 1 << 30, params)  # bad method/parameter: fail before reading
    _check_mask_output(base, mask_out)
    res = collect_stats(base, dictionary, targets, **stats_kw)
    prov = res.provenance
    report = decomposition_report(res.stats, prov["atom_names"], prov["target_names"], method, ci=ci, **params)
    report["provenance"] = prov
    if json_out is not None:
        with atomic_file(json_out) as tmp:
            tmp.write_text(json.dumps(report, indent=2, default=str))
    if stats_out is not None:
        save_stats(stats_out, res.stats, prov)
    _save_mask(res, mask_out)
    return report


def stats_file(base, dictionary, targets, out, *, mask_out=None, coordinator=None, num_processes=None,
               process_id=None, **stats_kw) -> tuple[StreamResult, bool]:
    """``unmerge stats``: the statistics of the inputs written to ``out`` (``save_stats``).

    Args:
      base, dictionary, targets, **stats_kw: as :func:`collect_stats`.
      out: the ``.npz`` to write; mask_out: also write the selection (checkpoints).
      coordinator, num_processes, process_id: run as one of several ``jax.distributed``
        processes (all three, or none); each reads its share of the tensors and process 0 writes.

    Returns:
      ``(result, written)``: written is False in the processes other than 0.
    """
    check_outputs([base, *dictionary, *targets, stats_kw.get("mask")], [out, mask_out])
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise UnmergeError("--coordinator, --num-processes and --process-id go together")
    _check_mask_output(base, mask_out)
    writer = True
    if all(given):
        import jax

        if base is None:
            raise UnmergeError("several processes need checkpoint inputs (--base); arrays are read by one process")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        writer = process_id == 0
    res = collect_stats(base, dictionary, targets, **stats_kw)
    if writer:
        save_stats(out, res.stats, res.provenance)
        _save_mask(res, mask_out)
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
      grid: ``"paper"``, a ``{method: {param: [values]}}`` dict, or a JSON file of one.
      methods: subset of the grid's methods; seeds: bootstrap replicates per run; truth: a
        ``.npy`` (targets × atoms) of true weights (adds precision/recall/perfect match).
      by: summary columns; runs_out: write every run as CSV; summary_out: the summary as JSON.

    Returns:
      ``(table, summary)``: the runs (``unmerge_jax.sweep``) and their ``summarize`` table.
    """
    if stats is not None:
        if dictionary or targets:
            raise UnmergeError("give either --stats or --dictionary/--targets, not both")
        gs, prov = load_stats(stats)
        atom_names, target_names = prov.get("atom_names"), prov.get("target_names")
    elif dictionary is not None and targets is not None:
        d, atom_names = load_columns(dictionary)
        v, target_names = load_columns(targets)
        gs = gram_stats(d, v, seeds=seeds, key=key, bootstrap_block=bootstrap_block)
    else:
        raise UnmergeError("give --stats FILE.npz, or both --dictionary and --targets")
    if isinstance(grid, (str, Path)) and str(grid) != "paper":
        try:
            grid = json.loads(Path(grid).read_text())
        except (OSError, ValueError) as err:
            raise UnmergeError(f"cannot read grid file {grid}: {err}") from None
    truth = np.load(truth) if truth is not None else None
    table = sweep(gs, grid=grid, seeds=seeds, truth=truth, methods=methods, atom_names=atom_names,
                  target_names=target_names)
    summary = summarize(table, by=list(by), metrics=list(TRUTH_METRICS if truth is not None else SWEEP_METRICS))
    if runs_out is not None:
        with atomic_file(runs_out) as tmp:
            table.to_csv(tmp, index=False)
    if summary_out is not None:
        with atomic_file(summary_out) as tmp:
            tmp.write_text(summary.frame.to_json(orient="records", indent=2))
    return table, summary
