"""One-pass statistics of checkpoints: dictionary + target task vectors → :class:`GramStats`.

``stream_stats(base, dictionary, targets)`` reads every selected tensor once, one tensor at a
time, and accumulates ``G = DᵀD``, ``C = DᵀV``, ``‖v‖²`` (and S bootstrap replicates) in float64.
Row order (it fixes the bootstrap weights): tensors in the :class:`~unmerge_jax.io.compress.Selection`'s
order (the base's sorted names), inside a tensor the kept flat indices in increasing order (C order).
The result equals ``gram_stats(D, V)`` of the dense concatenated vectors to float64 rounding
(``dense_columns`` builds that reference for small models).

Per tensor: read the base once (when a source holds full weights) and each source's tensor
(full weights, or a LoRA ``ΔW``), gather the kept entries into a staging block of B rows (rows of
consecutive tensors are packed together), and run the jit kernel ``kernels.stream_stats.row_block``
(task-vector entries, padding, non-finite counts) and the statistics kernel on the block, rows
sharded over the devices. Alive at once: the base and K + T source tensors, plus the staging
block (B × (1 + K + T) × 4 bytes) — peak ≈ (1 + K + T) × largest tensor × 4 B + a constant,
independent of the model size.

Multi-process (``jax.distributed``): each process reads a contiguous share of the tensors (about
equal bytes), accumulates its rows with their global offsets on its local devices, and the partial
statistics are summed with a cross-process all-gather (gloo on CPU). The top-k mask pass shares
tensors the same way and exchanges only its candidates.
"""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.checkpoint import open_checkpoint
from unmerge_jax.io.compress import Selection, build_selection, candidate_names, share
from unmerge_jax.sources import TaskVector, task_vector
from unmerge_jax.kernels.stats import ROW_AXIS, row_mesh
from unmerge_jax.kernels.stream_stats import row_block
from unmerge_jax.progress import progress
from unmerge_jax.stats import GramStats, accumulate_block, add_stats, bootstrap_unit_rows

DEFAULT_BLOCK_ROWS = 1 << 17
CHECK_EVERY = 16  # blocks between non-finite checks (each check waits for the device)
MAX_INFLIGHT = 2  # blocks dispatched but not finished


@dataclass(frozen=True)
class Entry:
    """A named dictionary/target input: a model directory or a PEFT LoRA adapter directory."""

    name: str
    path: Path


def parse_entries(specs, what: str = "dictionary") -> list[Entry]:
    """``["DIR", "name=DIR", (name, DIR), Entry]`` (or a ``{name: DIR}`` dict) → entries.

    Names default to the directory's basename; they must be unique.
    """
    if isinstance(specs, dict):
        specs = list(specs.items())
    out = []
    for s in specs or []:
        if isinstance(s, Entry):
            out.append(s)
            continue
        if isinstance(s, (tuple, list)):
            name, path = str(s[0]), Path(s[1])
        else:
            name, path = _split_spec(str(s))
        if not name:
            raise UnmergeError(f"empty name in {what} entry {s!r}; write NAME=DIR")
        out.append(Entry(name, path))
    if not out:
        raise UnmergeError(f"the {what} is empty; give at least one model or adapter directory")
    seen = {}
    for e in out:
        if e.name in seen:
            raise UnmergeError(f"two {what} entries are named {e.name!r} ({seen[e.name]} and {e.path}); name them "
                               f"with NAME=DIR")
        seen[e.name] = e.path
    return out


def _split_spec(s: str) -> tuple[str, Path]:
    """``"name=DIR"`` → (name, DIR); ``"DIR"`` → (basename, DIR). A path containing '=' that exists wins."""
    head, eq, tail = s.partition("=")
    if eq and head and os.sep not in head and not Path(s).exists():
        return head, Path(tail)
    path = Path(s)
    return (path.resolve().name if path.name in ("", ".", "..") else path.name), path


@dataclass
class StreamResult:
    """What :func:`stream_stats` produced."""

    stats: GramStats
    provenance: dict
    selection: Selection


# ----------------------------------------------------------------------------------------------
# distributed helpers
# ----------------------------------------------------------------------------------------------
def _process_info(distributed):
    if distributed is False:
        return 0, 1
    idx, count = jax.process_index(), jax.process_count()
    if distributed and count == 1:
        raise UnmergeError("distributed=True but JAX runs a single process; call jax.distributed.initialize() "
                           "in every process first")
    return idx, count


def _gather_concat(*arrays):
    """Concatenate 1-D arrays of different lengths from every process, in process order."""
    from jax.experimental import multihost_utils as mu

    sizes = np.asarray(mu.process_allgather(np.asarray([arrays[0].size], np.int64))).reshape(-1)
    m = max(1, int(sizes.max()))
    out = []
    for a in arrays:
        g = np.asarray(mu.process_allgather(np.pad(a, (0, m - a.size))))
        out.append(np.concatenate([g[p, :sizes[p]] for p in range(len(sizes))]))
    return tuple(out)


def _sum_over_processes(stats: GramStats) -> GramStats:
    """Sum partial statistics of every process (float64, in process order)."""
    from jax.experimental import multihost_utils as mu

    leaves = {f: np.asarray(getattr(stats, f)) for f in GramStats._fields if getattr(stats, f) is not None}
    gathered = mu.process_allgather(leaves)
    return GramStats(**{f: jnp.asarray(np.sum(np.asarray(gathered[f]), axis=0)) for f in leaves})


# ----------------------------------------------------------------------------------------------
# the pass
# ----------------------------------------------------------------------------------------------
class _Packer:
    """Packs selected rows of consecutive tensors into blocks and accumulates their statistics."""

    def __init__(self, n_dict, relative, block, devices, seeds, key, compute_dtype, offset, on_bad, boot_block=1):
        self.n_dict, self.block = n_dict, block
        self.n_in = 1 + len(relative)
        self.relative = jnp.asarray(np.asarray(relative, bool))
        self.devices, self.seeds, self.key, self.cdt = devices, seeds, key, compute_dtype
        self.boot_block = boot_block
        self.sharding = NamedSharding(row_mesh(devices), P(None, ROW_AXIS))
        self.offset = offset
        self.fill = 0
        self.buf = np.empty((self.n_in, block), np.float32)
        self.segments: list[int] = []
        self.pending: list = []
        self.inflight: collections.deque = collections.deque()
        self.total = None
        self.on_bad = on_bad
        self.n_blocks = 0

    def push(self, tensor_id: int, base_flat, src_flats, index, rows: int):
        pos = 0
        while pos < rows:
            take = min(self.block - self.fill, rows - pos)
            part = slice(pos, pos + take) if index is None else index[pos:pos + take]
            dst = slice(self.fill, self.fill + take)
            if base_flat is not None:
                self.buf[0, dst] = base_flat[part]
            else:
                self.buf[0, dst] = 0.0
            for j, a in enumerate(src_flats):
                if a is None:
                    self.buf[1 + j, dst] = 0.0
                else:
                    self.buf[1 + j, dst] = a[part]
            if not self.segments or self.segments[-1] != tensor_id:
                self.segments.append(tensor_id)
            self.fill += take
            pos += take
            if self.fill == self.block:
                self.flush()

    def flush(self):
        n = self.fill
        if n == 0:
            return
        staged = jax.device_put(self.buf, self.sharding)
        D, V, bad = row_block(staged, self.relative, np.int32(n), n_dict=self.n_dict)
        if n < self.block:
            D, V = D[:n], V[:n]
        part = accumulate_block(D, V, row_offset=self.offset, seeds=self.seeds, key=self.key, devices=self.devices,
                                compute_dtype=self.cdt, pad_to=self.block, bootstrap_block=self.boot_block)
        self.total = part if self.total is None else add_stats(self.total, part)
        self.pending.append((bad, tuple(self.segments)))
        # Bound the blocks in flight (async dispatch would otherwise queue staged copies without
        # limit): staging block i+1 overlaps the kernels of block i, never more.
        self.inflight.append(part.gram)
        if len(self.inflight) > MAX_INFLIGHT:
            self.inflight.popleft().block_until_ready()
        self.offset += n
        self.fill = 0
        self.buf = np.empty((self.n_in, self.block), np.float32)  # the device may still read the old one
        self.segments = []
        self.n_blocks += 1
        if len(self.pending) >= CHECK_EVERY:
            self.check()

    def check(self):
        if not self.pending:
            return
        bads = np.asarray(jnp.stack([b for b, _ in self.pending]))
        hit = np.argwhere(bads > 0)
        if hit.size:
            blk, inp = hit[0]
            self.on_bad(self.pending[blk][1], int(inp))
        self.pending.clear()


def _open_sources(base, dictionary, targets, check_names):
    d_entries = parse_entries(dictionary, "dictionary")
    t_entries = parse_entries(targets, "targets")
    srcs = []
    for e in d_entries + t_entries:
        srcs.append(task_vector(base, e.path, e.name, check_names=check_names))
    return d_entries, t_entries, srcs


def _load_mask(mask, base) -> Selection:
    sel = mask if isinstance(mask, Selection) else Selection.load(mask)
    sel.check_base(base)
    return sel


def stream_stats(base, dictionary, targets, *, top_k: int | None = None, scope: str = "group", modules=None,
                 mask=None, seeds: int = 0, key: int = 0, devices=None, block_rows: int = DEFAULT_BLOCK_ROWS,
                 compute_dtype: str = "float64", distributed: bool | None = None,
                 bootstrap_block: int | None = None) -> StreamResult:
    """Float64 :class:`GramStats` of checkpoint task vectors in one streaming pass.

    Args:
      base: the base model directory (or an opened checkpoint).
      dictionary: K entries — model or PEFT LoRA adapter directories, ``"name=DIR"`` strings,
        ``(name, DIR)`` pairs or a ``{name: DIR}`` dict (names default to basenames).
      targets: T entries, same forms.
      top_k: keep the top-k entries of ``M = max_i |d_i|`` (a streaming mask pass over the
        dictionary first); None = every entry (the full model).
      scope: ``"group"`` (k spread over (layer, module) groups, the paper) or ``"global"``.
      modules: ``--modules`` filter, e.g. ``"q,k,v,o"`` (default: every float tensor).
      mask: a :class:`Selection` or a mask ``.npz`` from :meth:`Selection.save` to reuse
        (overrides ``top_k``/``modules``).
      seeds: S Poisson(1) bootstrap replicates accumulated in the same pass.
      key: bootstrap seed (int).
      devices: devices to shard rows over (default: this process's devices).
      block_rows: rows per staged block.
      compute_dtype: block product dtype (see :func:`unmerge_jax.gram_stats`).
      distributed: share tensors over the ``jax.distributed`` processes (default: when more than
        one process runs). Every process returns the summed statistics.
      bootstrap_block: rows per bootstrap resampling unit (default automatic from the selected
        rows, as :func:`unmerge_jax.gram_stats` does; see :func:`unmerge_jax.bootstrap_unit_rows`).

    Returns:
      :class:`StreamResult` (``stats``, ``provenance``, ``selection``).
    """
    t0 = time.perf_counter()
    if seeds < 0:
        raise UnmergeError(f"seeds must be >= 0, got {seeds}")
    if block_rows < 1:
        raise UnmergeError(f"block_rows must be >= 1, got {block_rows}")
    pidx, pcount = _process_info(distributed)
    base = open_checkpoint(base)
    if mask is not None:
        selection = _load_mask(mask, base)
        check = selection.names
    else:
        check = candidate_names(base, modules)
    d_entries, t_entries, srcs = _open_sources(base, dictionary, targets, check)
    K = len(d_entries)
    gather = _gather_concat if pcount > 1 else None
    if mask is None:
        selection = build_selection(base, srcs[:K], top_k, scope=scope, modules=modules, names=check,
                                    process_index=pidx, process_count=pcount, gather=gather)
    n_rows = selection.n_rows
    if n_rows == 0:
        raise UnmergeError("the selection keeps no parameter entries; raise --top-k or widen --modules")
    boot_block = bootstrap_unit_rows(n_rows, bootstrap_block)
    stats, n_blocks = _accumulate(base, srcs, K, selection, seeds=seeds, key=key, devices=devices,
                                  block_rows=block_rows, compute_dtype=compute_dtype, pidx=pidx, pcount=pcount,
                                  boot_block=boot_block)
    prov = provenance(base, d_entries, t_entries, srcs, selection, seeds=seeds, key=key, block_rows=block_rows,
                      bootstrap_block=boot_block,
                      n_processes=pcount, seconds=time.perf_counter() - t0, mask_file=None if mask is None or
                      isinstance(mask, Selection) else str(mask))
    prov["n_blocks"] = n_blocks
    return StreamResult(stats, prov, selection)


def _accumulate(base, srcs, K, selection, *, seeds, key, devices, block_rows, compute_dtype, pidx, pcount,
                boot_block=1):
    names = selection.names
    mine = share(names, [selection.rows(n) for n in names], pcount)[pidx]
    if devices is None:
        devices = jax.local_devices()
    n_dev = len(devices)
    local_rows = sum(selection.rows(n) for n in mine)
    block = max(n_dev, min(int(block_rows), local_rows))
    block = -(-block // n_dev) * n_dev
    relative = [s.relative for s in srcs]
    need_base = any(relative)
    offsets = selection.offsets()
    ids = {n: i for i, n in enumerate(names)}

    def on_bad(tensor_ids, inp):
        _raise_nonfinite(base, srcs, K, selection, [names[i] for i in tensor_ids], inp)

    packer = _Packer(K, relative, block, devices, seeds, key, compute_dtype, offsets[mine[0]] if mine else 0, on_bad,
                     boot_block)
    # One reusable buffer per input, sized for its largest tensor: tensors are read (in their stored
    # dtype; staging casts to float32) into it instead of into fresh arrays, so the pass allocates
    # (and page-faults) its (1 + K + T) tensors' worth once, not once per tensor.
    todo = [n for n in mine if selection.rows(n)]
    base_buf = np.empty(max((base.nbytes(n) for n in todo), default=0), np.uint8) if need_base else None
    bufs = [_source_buffer(s, todo) for s in srcs]
    for name in progress(mine, desc="statistics pass", total=len(mine)):
        rows = selection.rows(name)
        if rows == 0:
            continue
        base_flat = base.read_raw(name, out=base_buf).reshape(-1) if need_base else None
        flats = []
        for s, buf in zip(srcs, bufs):
            flats.append(_read_source(s, name, buf))
        packer.push(ids[name], base_flat, flats, selection.index.get(name), rows)
        del base_flat, flats
    packer.flush()
    packer.check()
    total = packer.total
    if pcount > 1:
        if total is None:  # this process got no rows: contribute zeros of the right shapes
            total = _zero_stats(K, len(srcs) - K, seeds)
        total = _sum_over_processes(total)
    return total, packer.n_blocks


def _source_buffer(src: TaskVector, names) -> np.ndarray:
    """A byte buffer large enough for any of ``names`` as ``src`` is read (stored bytes, or ΔW float32)."""
    if src.relative:
        size = max((src.source.stored_nbytes(n) for n in names), default=0)
    else:
        size = max((4 * int(np.prod(src.shape(n), dtype=np.int64)) for n in names if src.touches(n)), default=0)
    return np.empty(size, np.uint8)


def _read_source(src: TaskVector, name, buf):
    """One source's tensor, flat, into ``buf``: stored values (model) or ΔW (adapter), or None (zero)."""
    if src.relative:
        return src.source.read_raw(name, out=buf).reshape(-1)
    if not src.touches(name):
        return None
    return src.source.read(name, out=buf).reshape(-1)


def _zero_stats(K, T, seeds):
    z = GramStats(np.zeros((K, K)), np.zeros((K, T)), np.zeros(T), np.zeros((), np.int64))
    if seeds:
        z = z._replace(boot_gram=np.zeros((seeds, K, K)), boot_cross=np.zeros((seeds, K, T)),
                       boot_target_sq=np.zeros((seeds, T)), boot_n_rows=np.zeros(seeds))
    return z


def _raise_nonfinite(base, srcs, K, selection, tensors, inp):
    """Name the tensor and input holding NaN/Inf (re-reads the block's tensors on this slow path)."""
    for name in tensors:
        idx = selection.index.get(name)
        pick = (lambda a: a.reshape(-1)) if idx is None else (lambda a: a.reshape(-1)[idx])
        if inp == 0:
            if not np.all(np.isfinite(pick(base.read(name)))):
                raise UnmergeError(f"tensor {name} of base {base.file_of(name)} holds NaN/Inf; fix or re-download the "
                                   f"base")
            continue
        s = srcs[inp - 1]
        arr, _ = s.parts(name)
        if arr is not None and not np.all(np.isfinite(pick(arr))):
            role = "dictionary entry" if inp - 1 < K else "target"
            where = s.where(name)
            raise UnmergeError(f"tensor {name} of {role} {s.name} ({where}) holds NaN/Inf; fix or drop that input")
    s = srcs[inp - 1] if inp else None
    raise UnmergeError(f"non-finite values in the task vector of {s.name if s else 'the base'} near tensor "
                       f"{tensors[0]}; the fine-tuned and base values overflow when subtracted")


def provenance(base, d_entries, t_entries, srcs, selection, **extra) -> dict:
    """JSON-serialisable record of what the statistics were computed from."""
    import unmerge_jax

    def dtypes_of(obj, names):
        out: dict[str, int] = {}
        for n in names:
            tag = obj.dtype(n)
            out[tag] = out.get(tag, 0) + 1
        return out

    def entry(e, s):
        d = {"name": e.name, "path": str(Path(e.path).resolve()), "kind": s.origin}
        if s.origin == "model":
            d["dtypes"] = dtypes_of(s.source, selection.names)
        else:
            d["lora_modules"] = len(s.source.adapter.base_names)
            d["dtypes"] = s.source.adapter.factor_dtypes()
        return d

    K = len(d_entries)
    spec = dict(selection.spec)
    return {
        "created_by": f"unmerge_jax {unmerge_jax.__version__}",
        "base": str(Path(base.path).resolve()),
        "base_dtypes": dtypes_of(base, selection.names),
        "dictionary": [entry(e, s) for e, s in zip(d_entries, srcs[:K])],
        "targets": [entry(e, s) for e, s in zip(t_entries, srcs[K:])],
        "atom_names": [e.name for e in d_entries],
        "target_names": [e.name for e in t_entries],
        "n_tensors": len(selection.names),
        "n_rows": int(selection.n_rows),
        "mask": spec,
        "tensors": list(selection.names),
        "row_order": "selection order (the base's sorted tensor names), C-order flat indices inside a tensor",
        "compute": "float32 task vectors, float64 accumulation",
        **extra,
    }


def dense_columns(base, dictionary, targets, selection: Selection | None = None, modules=None):
    """The dense ``(D, V)`` (rows × K, rows × T, float32) the streaming pass never forms.

    For tests and small models only: it holds every selected entry of every input in memory. Rows
    are in the streaming pass's order, so ``gram_stats(D, V)`` equals :func:`stream_stats`.
    """
    base = open_checkpoint(base)
    sel = selection if selection is not None else build_selection(base, [], None, modules=modules)
    _, _, srcs = _open_sources(base, dictionary, targets, sel.names)
    K = len(parse_entries(dictionary, "dictionary"))
    cols = [[] for _ in srcs]
    for name in sel.names:
        idx = sel.index.get(name)
        for j, s in enumerate(srcs):
            d = s.delta(name).reshape(-1)
            cols[j].append(d if idx is None else d[idx])
    mat = np.stack([np.concatenate(c) for c in cols], axis=1)
    return mat[:, :K], mat[:, K:]




# ----------------------------------------------------------------------------------------------
# inputs of `unmerge decompose` / `unmerge stats`: checkpoints or dense arrays
# ----------------------------------------------------------------------------------------------
ARRAY_SUFFIXES = (".npy", ".safetensors")


def _is_array_file(spec) -> bool:
    if isinstance(spec, Entry):
        path = spec.path
    elif isinstance(spec, (tuple, list)):
        path = Path(spec[1])
    else:
        path = _split_spec(str(spec))[1]
    return path.suffix in ARRAY_SUFFIXES and not path.is_dir()


def _array_columns(specs, what):
    from unmerge_jax.io.arrays import load_columns

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

    Checkpoint mode (``base`` given): :func:`stream_stats`. Array mode (``base`` None and every
    entry a ``.npy``/``.safetensors`` array file, loaded with ``load_columns``): ``gram_stats`` of
    the columns (``selection`` is None in the result).
    """
    dictionary, targets = list(dictionary or []), list(targets or [])
    if not dictionary:
        raise UnmergeError("the dictionary is empty; give at least one --dictionary entry")
    if not targets:
        raise UnmergeError("no targets; give at least one --target entry")
    arrays = [_is_array_file(s) for s in dictionary + targets]
    if base is None:
        if not all(arrays):
            bad = next(s for s, a in zip(dictionary + targets, arrays) if not a)
            raise UnmergeError(f"{bad} is not a .npy/.safetensors array file; model and adapter directories need "
                               f"--base DIR (the model they were fine-tuned from)")
        if top_k is not None or modules is not None or mask is not None:
            raise UnmergeError("--top-k, --modules and --mask apply to checkpoints; array inputs are used as given")
        from unmerge_jax.stats import gram_stats

        t0 = time.perf_counter()
        D, d_names, d_entries = _array_columns(dictionary, "dictionary")
        V, t_names, t_entries = _array_columns(targets, "targets")
        if D.shape[0] != V.shape[0]:
            raise UnmergeError(f"the dictionary arrays have {D.shape[0]} rows but the targets have {V.shape[0]}; both "
                               f"must be flattened over the same parameters")
        boot_block = bootstrap_unit_rows(int(D.shape[0]), kw.get("bootstrap_block"))
        stats = gram_stats(D, V, seeds=seeds, key=key, bootstrap_block=boot_block)
        import unmerge_jax

        prov = {"created_by": f"unmerge_jax {unmerge_jax.__version__}", "mode": "arrays",
                "dictionary": [str(Path(e.path).resolve()) for e in d_entries],
                "targets": [str(Path(e.path).resolve()) for e in t_entries], "atom_names": d_names,
                "target_names": t_names, "n_rows": int(D.shape[0]), "dtypes": sorted({str(D.dtype), str(V.dtype)}),
                "bootstrap_block": boot_block,
                "seeds": int(seeds), "key": int(key), "seconds": time.perf_counter() - t0}
        return StreamResult(stats, prov, None)
    if any(arrays):
        bad = next(s for s, a in zip(dictionary + targets, arrays) if a)
        raise UnmergeError(f"{bad} is an array file but --base was given; with --base every entry must be a model or "
                           f"adapter directory (drop --base to decompose arrays)")
    res = stream_stats(base, dictionary, targets, top_k=top_k, scope=scope, modules=modules, mask=mask, seeds=seeds,
                       key=key, **kw)
    res.provenance["mode"] = "checkpoints"
    return res


# ----------------------------------------------------------------------------------------------
# the per-target report of `unmerge decompose`
# ----------------------------------------------------------------------------------------------
def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and np.ndim(x) == 0:
        return x.item()
    if hasattr(x, "tolist"):
        return np.asarray(x).tolist()
    return x


def decomposition_report(stats: GramStats, atom_names, target_names, method: str = "nnls", *, ci: float = 0.95,
                         support_tol: float = 1e-8, **params) -> dict:
    """Coefficients of every target (± bootstrap CI when ``stats`` holds replicates), JSON-ready.

    Returns ``{"method", "params", "n_rows", "n_atoms", "n_seeds", "targets": [{"target",
    "coefficients": {atom: value}, "recon_error", "unexplained", "cosine", "converged", "n_iter",
    and with seeds "ci": {atom: [lo, hi]}, "selected": {atom: fraction of replicates}}]}``.
    """
    from unmerge_jax.solve import solve

    if not 0 < ci < 1:
        raise UnmergeError(f"ci must be in (0, 1), got {ci}")
    atom_names = list(atom_names) if atom_names is not None else [str(i) for i in range(stats.n_atoms)]
    target_names = list(target_names) if target_names is not None else [str(i) for i in range(stats.n_targets)]
    if len(atom_names) != stats.n_atoms or len(target_names) != stats.n_targets:
        raise UnmergeError(f"{len(atom_names)} atom / {len(target_names)} target names for statistics of "
                           f"{stats.n_atoms} atoms and {stats.n_targets} targets")
    point = solve(stats, method, bootstrap=False, **params)
    boot = solve(stats, method, bootstrap=True, **params) if stats.n_seeds else None
    out = []
    for t, tname in enumerate(target_names):
        row = {"target": tname,
               "coefficients": {a: float(point.coef[t, k]) for k, a in enumerate(atom_names)},
               "recon_error": float(point.recon_error[t]), "unexplained": float(point.unexplained[t]),
               "cosine": float(point.cosine[t]), "converged": bool(point.converged[t]), "n_iter": int(point.n_iter[t])}
        if boot is not None:
            c = np.asarray(boot.coef)[:, t, :]  # (S, K)
            lo, hi = np.quantile(c, [(1 - ci) / 2, 1 - (1 - ci) / 2], axis=0)
            row["ci"] = {a: [float(lo[k]), float(hi[k])] for k, a in enumerate(atom_names)}
            row["selected"] = {a: float(np.mean(np.abs(c[:, k]) > support_tol)) for k, a in enumerate(atom_names)}
            row["recon_error_boot"] = [float(x) for x in np.quantile(np.asarray(boot.recon_error)[:, t],
                                                                       [(1 - ci) / 2, 1 - (1 - ci) / 2])]
        out.append(row)
    return {"method": point.method, "params": _plain(point.params), "n_rows": int(np.asarray(stats.n_rows)),
            "n_atoms": stats.n_atoms, "n_seeds": stats.n_seeds, "ci_level": ci if stats.n_seeds else None,
            "targets": out}


def format_report(report: dict) -> str:
    """Plain-text tables of :func:`decomposition_report`, one per target."""
    lines = [f"method {report['method']} on {report['n_rows']:,} parameter rows, {report['n_atoms']} dictionary "
             f"entries" + (f", {report['n_seeds']} bootstrap seeds" if report["n_seeds"] else "")]
    for row in report["targets"]:
        lines.append("")
        lines.append(f"target {row['target']}: recon error {row['recon_error']:.3e}, unexplained energy "
                     f"{row['unexplained']:.3e} ({100 * row['unexplained']:.4g}%), cos {row['cosine']:.6f}"
                     + ("" if row["converged"] else "  [NOT CONVERGED]"))
        width = max(len("entry"), *(len(a) for a in row["coefficients"]))
        pct = f"{100 * report['ci_level']:g}% CI" if report.get("ci_level") else None
        head = f"  {'entry':<{width}}  {'coefficient':>12}" + (f"  {pct:>25}  {'selected':>8}" if pct else "")
        lines.append(head)
        lines.append("  " + "-" * (len(head) - 2))
        for a, v in row["coefficients"].items():
            s = f"  {a:<{width}}  {v:>12.6f}"
            if pct:
                lo, hi = row["ci"][a]
                s += f"  {f'[{lo:.6f}, {hi:.6f}]':>25}  {row['selected'][a]:>8.0%}"
            lines.append(s)
    return "\n".join(lines)
