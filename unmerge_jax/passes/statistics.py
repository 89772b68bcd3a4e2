"""The checkpoint statistics pass: dictionary + target task vectors → :class:`GramStats`.

``stream_stats(base, dictionary, targets)`` reads every selected tensor once, one tensor at a
time, and accumulates ``G = DᵀD``, ``C = DᵀV``, ``‖v‖²`` (and S bootstrap replicates) in float64.
Row order (it fixes the bootstrap weights): tensors in the :class:`~unmerge_jax.passes.mask.Selection`'s
order (the base's sorted names), inside a tensor the kept flat indices in increasing order (C order).
The result equals ``gram_stats(D, V)`` of the dense concatenated vectors to float64 rounding
(``dense_columns`` builds that reference for small models).

Inputs are read through the tensor sources (``unmerge_jax.sources``): the base and the K + T
task vectors of the entries (``unmerge_jax.entries``). Per tensor: read the base once (when a
source holds full weights) and each source's tensor (full weights in their stored dtype, or a
LoRA ``ΔW``) into one reusable buffer per input, gather the kept entries into a staging block of
B rows (rows of consecutive tensors are packed together; ``unmerge_jax.staging`` holds the
buffers and bounds the blocks in flight), and run the jit kernel ``kernels.stream_stats.row_block``
(task-vector entries, padding, non-finite counts) and the statistics kernel on the block, rows
sharded over the devices. Alive at once: the base and K + T source tensors, plus the staging
blocks (B × (1 + K + T) × 4 bytes each) — peak ≈ (1 + K + T) × largest tensor × 4 B + a constant,
independent of the model size.

Multi-process (``jax.distributed``): each process reads a contiguous share of the tensors (about
equal bytes), accumulates its rows with their global offsets on its local devices, and the partial
statistics are summed with a cross-process all-gather (gloo on CPU). The top-k mask pass shares
tensors the same way and exchanges only its candidates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from unmerge_jax.entries import open_entries
from unmerge_jax.errors import UnmergeError
from unmerge_jax.kernels.stats import ROW_AXIS, row_mesh
from unmerge_jax.kernels.stream_stats import row_block
from unmerge_jax.passes.mask import Selection, build_selection, candidate_names, share
from unmerge_jax.passes.signatures import DENSITY_GRID, SignatureAccumulator
from unmerge_jax.progress import progress
from unmerge_jax.provenance import provenance
from unmerge_jax.sources import WEIGHTS, CheckpointSource, TensorSource, nonfinite_error, open_source
from unmerge_jax.staging import BLOCK_ROWS, Staging, block_rows_for
from unmerge_jax.stats import GramStats, accumulate_block, add_stats, bootstrap_unit_rows

CHECK_EVERY = 16  # blocks between non-finite checks (each check waits for the device)
MAX_INFLIGHT = 2  # blocks dispatched but not finished while the next one is staged


@dataclass
class StreamResult:
    """What :func:`stream_stats` produced.

    ``warnings``: one-line notes where the answer is ambiguous (``report.stats_warnings``: the
    same task vector twice, an all-zero entry, a target equal to the base), filled by the pipeline.
    ``signatures``: the :class:`~unmerge_jax.attribution.SignatureStats` of the same rows and targets
    when the pass was asked for them (``signatures=True``), else None.
    """

    stats: GramStats
    provenance: dict
    selection: Selection
    warnings: list = field(default_factory=list)
    signatures: Any = None


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
    """Packs selected rows of consecutive tensors into blocks and accumulates their statistics.

    Each block is gathered into a staging buffer of :class:`~unmerge_jax.staging.Staging` (depth
    ``MAX_INFLIGHT + 1``: staging block i+1 overlaps the kernels of blocks i and i−1, never more),
    laid out (1 + K + T, B): the base's values, then each source's.
    """

    def __init__(self, n_dict, relative, block, devices, seeds, key, compute_dtype, offset, on_bad, boot_block=1,
                 sig=None):
        self.n_dict, self.block = n_dict, block
        self.sig = sig  # SignatureAccumulator or None: its sums come from the same device block
        self.n_in = 1 + len(relative)
        self.relative = jnp.asarray(np.asarray(relative, bool))
        self.devices, self.seeds, self.key, self.cdt = devices, seeds, key, compute_dtype
        self.boot_block = boot_block
        self.sharding = NamedSharding(row_mesh(devices), P(None, ROW_AXIS))
        self.offset = offset
        self.fill = 0
        self.staging = Staging(depth=MAX_INFLIGHT + 1)
        self.buf = None
        self.segments: list[int] = []
        self.pending: list = []
        self.total = None
        self.on_bad = on_bad
        self.n_blocks = 0

    def _start_block(self):
        self.staging.wait_turn()
        self.buf = self.staging.buffer("block", self.n_blocks, self.n_in * self.block, np.float32).reshape(
            self.n_in, self.block)

    def push(self, tensor_id: int, base_flat, src_flats, index, rows: int):
        pos = 0
        while pos < rows:
            if self.fill == 0:
                self._start_block()
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
        if self.sig is not None:
            self.sig.add(D, V, self.offset, n)
        if n < self.block:
            D, V = D[:n], V[:n]
        part = accumulate_block(D, V, row_offset=self.offset, seeds=self.seeds, key=self.key, devices=self.devices,
                                compute_dtype=self.cdt, pad_to=self.block, bootstrap_block=self.boot_block)
        self.total = part if self.total is None else add_stats(self.total, part)
        self.pending.append((bad, tuple(self.segments)))
        self.staging.dispatched(part.gram)  # ready once the device no longer reads this block's buffer
        self.offset += n
        self.fill = 0
        self.buf = None
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


def _load_mask(mask, base) -> Selection:
    sel = mask if isinstance(mask, Selection) else Selection.load(mask)
    sel.check_base(base)
    return sel


def stream_stats(base, dictionary, targets, *, top_k: int | None = None, scope: str = "group", modules=None,
                 mask=None, seeds: int = 0, key: int = 0, devices=None, block_rows: int = BLOCK_ROWS,
                 compute_dtype: str = "float64", distributed: bool | None = None,
                 bootstrap_block: int | None = None, signatures: bool = False,
                 densities=DENSITY_GRID) -> StreamResult:
    """Float64 :class:`GramStats` of checkpoint task vectors in one streaming pass.

    Args:
      base: the base model directory (or an opened checkpoint, or a weights
        :class:`~unmerge_jax.sources.TensorSource`).
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
      signatures: also accumulate the merge-method signature sums
        (:class:`~unmerge_jax.attribution.SignatureStats`, ``passes.signatures``) from the same
        device blocks; the TIES thresholds at ``densities`` come from the mask pass or from this
        pass's reading of each tensor.
      densities: TIES densities of the signature sums.

    Returns:
      :class:`StreamResult` (``stats``, ``provenance``, ``selection``, ``signatures``).
    """
    t0 = time.perf_counter()
    if seeds < 0:
        raise UnmergeError(f"seeds must be >= 0, got {seeds}")
    if block_rows < 1:
        raise UnmergeError(f"block_rows must be >= 1, got {block_rows}")
    pidx, pcount = _process_info(distributed)
    if signatures and pcount > 1:
        raise UnmergeError("the signature sums (attribution) are accumulated in one process; run the decomposition "
                           "without jax.distributed (several processes serve `unmerge stats`)")
    base = open_source(base, kind=WEIGHTS)
    if mask is not None:
        selection = _load_mask(mask, base)
        check = selection.names
    else:
        check = candidate_names(base, modules)
    d_entries, t_entries, tvs = open_entries(base, dictionary, targets, check)
    K = len(d_entries)
    gather = _gather_concat if pcount > 1 else None
    if mask is None:
        selection = build_selection(base, tvs[:K], top_k, scope=scope, modules=modules, names=check,
                                    process_index=pidx, process_count=pcount, gather=gather,
                                    densities=densities if signatures else None)
    n_rows = selection.n_rows
    if n_rows == 0:
        raise UnmergeError("the selection keeps no parameter entries; raise --top-k or widen --modules")
    boot_block = bootstrap_unit_rows(n_rows, bootstrap_block)
    sig = SignatureAccumulator(selection, K, len(tvs) - K, densities, devices) if signatures else None
    stats, n_blocks = _accumulate(base, tvs, K, selection, seeds=seeds, key=key, devices=devices,
                                  block_rows=block_rows, compute_dtype=compute_dtype, pidx=pidx, pcount=pcount,
                                  boot_block=boot_block, sig=sig)
    mask_file = None if mask is None or isinstance(mask, Selection) else str(mask)
    prov = provenance(d_entries, t_entries, atom_names=[e.name for e in d_entries],
                      target_names=[e.name for e in t_entries], n_rows=n_rows, seeds=seeds, key=key,
                      bootstrap_block=boot_block, seconds=time.perf_counter() - t0, base=base, task_vectors=tvs,
                      selection=selection, block_rows=block_rows, n_processes=pcount, mask_file=mask_file,
                      n_blocks=n_blocks)
    return StreamResult(stats, prov, selection,
                        signatures=sig.result() if sig is not None else None)


def _accumulate(base, tvs, K, selection, *, seeds, key, devices, block_rows, compute_dtype, pidx, pcount,
                boot_block=1, sig=None):
    names = selection.names
    mine = share(names, [selection.rows(n) for n in names], pcount)[pidx]
    if devices is None:
        devices = jax.local_devices()
    local_rows = sum(selection.rows(n) for n in mine)
    block = block_rows_for(local_rows, block_rows, len(devices))
    relative = [tv.relative for tv in tvs]
    offsets = selection.offsets()
    ids = {n: i for i, n in enumerate(names)}

    def on_bad(tensor_ids, inp):
        _raise_nonfinite(base, tvs, K, selection, [names[i] for i in tensor_ids], inp)

    packer = _Packer(K, relative, block, devices, seeds, key, compute_dtype, offsets[mine[0]] if mine else 0, on_bad,
                     boot_block, sig)
    # One reusable buffer per input, sized for its largest tensor: tensors are read into it (in
    # their stored dtype where the source is a checkpoint; staging casts to float32) instead of
    # into fresh arrays, so the pass allocates (and page-faults) its (1 + K + T) tensors' worth
    # once, not once per tensor.
    todo = [n for n in mine if selection.rows(n)]
    read_base = _Reader(base, todo) if any(relative) else None
    readers = [_Reader(tv.source, todo, tv.touches) for tv in tvs]
    for name in progress(mine, desc="statistics pass", total=len(mine)):
        rows = selection.rows(name)
        if rows == 0:
            continue
        base_flat = read_base(name) if read_base is not None else None
        flats = [read(name) for read in readers]
        if sig is not None and sig.needs(name):  # whole tensors in hand: their trimming thresholds
            sig.from_reading(name, flats[:K], base_flat, relative[:K])
        packer.push(ids[name], base_flat, flats, selection.index.get(name), rows)
        del base_flat, flats
    packer.flush()
    packer.check()
    total = packer.total
    if pcount > 1:
        if total is None:  # this process got no rows: contribute zeros of the right shapes
            total = _zero_stats(K, len(tvs) - K, seeds)
        total = _sum_over_processes(total)
    return total, packer.n_blocks


class _Reader:
    """Reads one input's tensors, flat, into one reusable byte buffer sized for the largest of ``names``.

    A :class:`~unmerge_jax.sources.CheckpointSource` is read in its stored dtype
    (``read_raw``: one ``pread``, no conversion; the staging copy casts to float32); any other
    source as float32 (``read``, e.g. a LoRA ``ΔW``). ``touches(name)`` False → None (all zero).
    """

    def __init__(self, src: TensorSource, names, touches=None):
        stored = isinstance(src, CheckpointSource)
        self.read = src.read_raw if stored else src.read
        self.touches = touches if touches is not None else (lambda name: True)
        nbytes = src.stored_nbytes if stored else src.nbytes
        self.buf = np.empty(max((nbytes(n) for n in names if self.touches(n)), default=0), np.uint8)

    def __call__(self, name):
        if not self.touches(name):
            return None
        return self.read(name, out=self.buf).reshape(-1)


def _zero_stats(K, T, seeds):
    z = GramStats(np.zeros((K, K)), np.zeros((K, T)), np.zeros(T), np.zeros((), np.int64))
    if seeds:
        z = z._replace(boot_gram=np.zeros((seeds, K, K)), boot_cross=np.zeros((seeds, K, T)),
                       boot_target_sq=np.zeros((seeds, T)), boot_n_rows=np.zeros(seeds))
    return z


def _raise_nonfinite(base, tvs, K, selection, tensors, inp):
    """Name the tensor, the input, its file and the first index (in the tensor) of a NaN/Inf.

    The slow path, after a block reported non-finite values: re-reads the block's tensors. Only
    the selected entries count (a NaN outside the top-k mask does not enter the statistics).
    """
    def first_bad(arr, name):
        flat = arr.reshape(-1)
        idx = selection.index.get(name)
        bad = ~np.isfinite(flat if idx is None else flat[idx])
        if not bad.any():
            return None
        hit = np.zeros(flat.size, bool)
        if idx is None:
            hit = bad
        else:
            hit[idx[bad]] = True
        return np.where(hit, flat, 0.0).reshape(arr.shape)  # non-finite at the selected places only

    for name in tensors:
        if inp == 0:
            bad = first_bad(base.read(name), name)
            if bad is not None:
                raise nonfinite_error(name, f"base {base.where(name)}", bad, "holds NaN/Inf:")
            continue
        s = tvs[inp - 1]
        role = "dictionary entry" if inp - 1 < K else "target"
        arr, _ = s.parts(name)
        bad = None if arr is None else first_bad(arr, name)
        if bad is not None:
            raise nonfinite_error(name, f"{role} {s.name} ({s.where(name)})", bad, "holds NaN/Inf:")
        with np.errstate(over="ignore", invalid="ignore"):
            delta = s.read(name)
        bad = first_bad(delta, name)
        if bad is not None:  # finite weights whose difference from the base overflows float32
            raise nonfinite_error(name, f"the task vector of {role} {s.name} ({s.where(name)} minus the base)", bad,
                                  "overflows float32 to NaN/Inf:")
    s = tvs[inp - 1] if inp else None
    raise UnmergeError(f"non-finite values in the task vector of {s.name if s else 'the base'} near tensor "
                       f"{tensors[0]}; the fine-tuned and base values overflow when subtracted")


def dense_columns(base, dictionary, targets, selection: Selection | None = None, modules=None):
    """The dense ``(D, V)`` (rows × K, rows × T, float32) the streaming pass never forms.

    For tests and small models only: it holds every selected entry of every input in memory. Rows
    are in the streaming pass's order, so ``gram_stats(D, V)`` equals :func:`stream_stats`.
    """
    base = open_source(base, kind=WEIGHTS)
    sel = selection if selection is not None else build_selection(base, [], None, modules=modules)
    d_entries, _, tvs = open_entries(base, dictionary, targets, sel.names)
    K = len(d_entries)
    cols = [[] for _ in tvs]
    for name in sel.names:
        idx = sel.index.get(name)
        for j, tv in enumerate(tvs):
            d = tv.delta(name).reshape(-1)
            cols[j].append(d if idx is None else d[idx])
    mat = np.stack([np.concatenate(c) for c in cols], axis=1)
    return mat[:, :K], mat[:, K:]
