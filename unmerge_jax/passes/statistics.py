"""The checkpoint statistics pass: dictionary + target task vectors → :class:`GramStats`.

``stream_stats(base, dictionary, targets)`` reads every selected entry once, a row block at a
time, and accumulates ``G = DᵀD``, ``C = DᵀV``, ``‖v‖²`` (and S bootstrap replicates) in float64.
Row order (it fixes the bootstrap weights): tensors in the :class:`~unmerge_jax.passes.mask.Selection`'s
order (the base's sorted names), inside a tensor the kept flat indices in increasing order (C order).
The result equals ``gram_stats(D, V)`` of the dense concatenated vectors to float64 rounding
(``dense_columns`` builds that reference for small models).

Inputs are read through the tensor sources (``unmerge_jax.sources``): the base and the K + T
task vectors of the entries (``unmerge_jax.entries``), in row blocks. The selected entries of
consecutive tensors are packed into staging blocks of B rows (``unmerge_jax.staging``: the
buffers and the bound on blocks in flight), each input's values read straight into its row of the
block (:class:`~unmerge_jax.staging.RowReader`: one ``pread`` of just the range's bytes for a
float32 checkpoint; a LoRA ``ΔW`` formed once per tensor), and one fused jit kernel
(``kernels.stream_stats.staged_block_stats``) adds the block's float64 statistics to running
totals, rows sharded over the devices. Alive at once: three staging blocks
(B × (1 + K + T) × 4 bytes each) and block-sized scratch — memory depends on the block size and
K + T, not on the largest tensor (plus one ``ΔW`` per adapter input).

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
from unmerge_jax.kernels.stats import ROW_AXIS, chunks_inside_units, row_mesh
from unmerge_jax.kernels.stream_stats import (row_block, staged_block_stats, staged_block_stats_x2, totals_x2_to_float64,
                                              zero_totals, zero_totals_x2)
from unmerge_jax.passes.mask import Selection, build_selection, candidate_names, share
from unmerge_jax.passes.signatures import DENSITY_GRID, SignatureAccumulator, gather_thresholds, sum_over_processes
from unmerge_jax.progress import progress
from unmerge_jax.provenance import provenance
from unmerge_jax.sources import WEIGHTS, CheckpointSource, nonfinite_error, open_source
from unmerge_jax.staging import BLOCK_ROWS, RowReader, Staging, block_rows_for
from unmerge_jax.stats import GramStats, _seed_key, bootstrap_unit_rows

COMPUTE_DTYPES = ("auto", "float64", "float32", "float32x2")
FLOAT32_ONLY = "float32x2"  # exact float32 products, double-float32 sums: no float64 arithmetic on the device
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

    Each block is a staging buffer of :class:`~unmerge_jax.staging.Staging` (depth
    ``MAX_INFLIGHT + 1``: staging block i+1 overlaps the kernels of blocks i and i−1, never more),
    laid out (1 + K + T, B): the base's values, then each source's. The inputs' readers
    (:class:`~unmerge_jax.staging.RowReader`) write each tensor's rows straight into it — no
    tensor-sized buffer — and one fused kernel (``kernels.stream_stats.staged_block_stats``) adds the block to the running
    totals.

    ``hooks``: callables ``hook(name, values, relative)`` called for every piece of a tensor staged
    into a block, with ``values`` the (1 + K + T, n) float32 staged rows of that piece (base first;
    read-only, valid during the call) — the per-block callback point for passes that accumulate
    more per tensor than the statistics.
    """

    def __init__(self, n_dict, n_targets, relative, block, devices, seeds, key, compute_dtype, offset, on_bad,
                 boot_block=1, hooks=(), sig=None):
        self.n_dict, self.block = n_dict, block
        self.sig = sig  # SignatureAccumulator or None: its sums come from the same device block
        self.n_in = 1 + len(relative)
        self.relative_host = np.asarray(relative, bool)
        self.relative = jnp.asarray(self.relative_host)
        self.devices, self.seeds, self.cdt = devices, seeds, compute_dtype
        self.key = _seed_key(key, seeds)
        self.boot_block = boot_block
        self.mesh = row_mesh(devices)
        self.sharding = NamedSharding(self.mesh, P(None, ROW_AXIS))
        self.single = len(devices) == 1 and devices[0] == jax.devices()[0] and jax.config.jax_default_device is None
        self.offset = offset
        self.fill = 0
        self.staging = Staging(depth=MAX_INFLIGHT + 1)
        self.buf = None
        self.segments: list[int] = []
        self.pending: list = []
        self.n_targets = n_targets
        self.x2 = compute_dtype == FLOAT32_ONLY
        self.total = (zero_totals_x2 if self.x2 else zero_totals)(n_dict, n_targets, seeds)
        self.n_rows = 0
        self.on_bad = on_bad
        self.hooks = tuple(hooks)
        self.n_blocks = 0
        self.dict_touched = False  # whether a dictionary source touches a tensor of the block being staged
        # Dictionary rows of untouched tensors are written (zeros) only once the block needs them:
        # not with hooks (they see every row) or on the float32-only path (no targets-only kernel).
        self.lazy_zeros = not self.hooks and not self.x2

    def _start_block(self):
        self.staging.wait_turn()
        self.buf = self.staging.buffer("block", self.n_blocks, self.n_in * self.block, np.float32).reshape(
            self.n_in, self.block)

    def push(self, tensor_id: int, name: str, readers, index, rows: int):
        """Stage the ``rows`` selected entries of tensor ``name`` (``index``: kept flat indices, or
        None for all), read by ``readers`` (one per input, base first; None = all zero)."""
        pos = 0
        while pos < rows:
            if self.fill == 0:
                self._start_block()
            take = min(self.block - self.fill, rows - pos)
            dst = slice(self.fill, self.fill + take)
            touched = any(r is not None and r.touches(name) for r in readers[1:1 + self.n_dict])
            if touched and not self.dict_touched and self.lazy_zeros:
                self.buf[1:1 + self.n_dict, :self.fill] = 0.0  # the untouched pieces staged before, left unwritten
            self.dict_touched = self.dict_touched or touched
            for j, reader in enumerate(readers):
                if self.lazy_zeros and not self.dict_touched and 1 <= j <= self.n_dict:
                    continue  # D = 0 here: a targets-only block never reads these rows (zeroed if it stops being one)
                if reader is None:
                    self.buf[j, dst] = 0.0
                else:
                    reader.fill(name, index, pos, take, self.buf[j, dst])
            for hook in self.hooks:
                piece = self.buf[:, dst]
                piece.flags.writeable = False
                hook(name, piece, self.relative_host)
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
        if n < self.block:
            self.buf[:, n:] = 0.0  # zero rows add nothing: the kernel needs no mask
        staged = self.buf if self.single else jax.device_put(self.buf, self.sharding)
        unit_chunks = chunks_inside_units(self.seeds, self.boot_block, self.offset, self.block // len(self.devices))
        if self.sig is not None and self.dict_touched:  # the signature kernel reads the block's (D, V) rows on the device
            D, V, _ = row_block(staged, self.relative, np.int32(n), n_dict=self.n_dict)
            self.sig.add(D, V, self.offset, n)
        elif self.sig is not None:  # no dictionary entry touches these rows: D = 0, every signature sum adds 0
            self.sig.count(n)
        kw = dict(mesh=self.mesh, n_dict=self.n_dict, n_seeds=self.seeds, boot_block=self.boot_block,
                  unit_chunks=unit_chunks)
        if self.x2:
            self.total, bad = staged_block_stats_x2(staged, self.relative, n, self.offset, self.key, self.total, **kw)
        else:
            self.total, bad = staged_block_stats(staged, self.relative, n, self.offset, self.key, self.total,
                                                 compute_dtype=self.cdt, targets_only=not self.dict_touched, **kw)
        self.pending.append((bad, tuple(self.segments)))
        self.staging.dispatched(bad)  # ready once the device no longer reads this block's buffer
        self.offset += n
        self.n_rows += n
        self.fill = 0
        self.buf = None
        self.segments = []
        self.dict_touched = False
        self.n_blocks += 1
        if len(self.pending) >= CHECK_EVERY + MAX_INFLIGHT:
            self.check(keep=MAX_INFLIGHT)

    def check(self, keep: int = 0):
        """Raise for the first non-finite input of the pending blocks but the last ``keep`` (those
        may still run: checking them would drain the pipeline; the older ones are done)."""
        done = self.pending[:max(len(self.pending) - keep, 0)]
        if not done:
            return
        bads = np.asarray(jnp.stack([b for b, _ in done]))
        hit = np.argwhere(bads > 0)
        if hit.size:
            blk, inp = hit[0]
            self.on_bad(done[blk][1], int(inp))
        del self.pending[:len(done)]

    def result(self) -> GramStats | None:
        """The accumulated statistics (None when no block was staged)."""
        if not self.n_blocks:
            return None
        t = self.total
        if self.x2:
            t = tuple(jnp.asarray(a) for a in totals_x2_to_float64(t, self.n_dict, self.n_targets, self.seeds))
        n = np.int64(self.n_rows)
        if self.seeds:
            return GramStats(t[0], t[1], t[2], n, t[3], t[4], t[5], t[6])
        return GramStats(t[0], t[1], t[2], n)


def _load_mask(mask, base) -> Selection:
    sel = mask if isinstance(mask, Selection) else Selection.load(mask)
    sel.check_base(base)
    return sel


def stream_stats(base, dictionary, targets, *, top_k: int | None = None, scope: str = "group", modules=None,
                 mask=None, seeds: int = 0, key: int = 0, devices=None, block_rows: int = BLOCK_ROWS,
                 compute_dtype: str = "auto", distributed: bool | None = None,
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
      compute_dtype: arithmetic of the block statistics: ``"float64"`` (float32 products exact in
        float64, float64 sums), ``"float32x2"`` (float32 arithmetic only: products made exact by
        splitting each float32 into two 12-bit halves, double-float32 sums; within ~1e-14 of
        float64 for backends without fast float64), ``"float32"`` (float32 products and chunk sums,
        ~1e-7), or ``"auto"`` (default: ``"float32x2"`` on TPU, which has no float64 unit,
        ``"float64"`` elsewhere). Totals are float64 in every case.
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
    compute_dtype = resolve_compute_dtype(compute_dtype, devices)
    pidx, pcount = _process_info(distributed)
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
    sig = None
    if signatures:  # several processes: each has the mask pass's thresholds of its own share of tensors
        thr = gather_thresholds(selection.thresholds, selection.names, K, densities) \
            if pcount > 1 and selection.threshold_densities is not None else None
        sig = SignatureAccumulator(selection, K, len(tvs) - K, densities, devices, thresholds=thr)
    stats, n_blocks = _accumulate(base, tvs, K, selection, seeds=seeds, key=key, devices=devices,
                                  block_rows=block_rows, compute_dtype=compute_dtype, pidx=pidx, pcount=pcount,
                                  boot_block=boot_block, sig=sig)
    mask_file = None if mask is None or isinstance(mask, Selection) else str(mask)
    prov = provenance(d_entries, t_entries, atom_names=[e.name for e in d_entries],
                      target_names=[e.name for e in t_entries], n_rows=n_rows, seeds=seeds, key=key,
                      bootstrap_block=boot_block, seconds=time.perf_counter() - t0, base=base, task_vectors=tvs,
                      selection=selection, block_rows=block_rows, n_processes=pcount, mask_file=mask_file,
                      n_blocks=n_blocks)
    if sig is not None:
        sig = sig.result() if pcount == 1 else sum_over_processes(sig.result())
    return StreamResult(stats, prov, selection, signatures=sig)


def resolve_compute_dtype(compute_dtype: str, devices=None) -> str:
    """The statistics arithmetic for ``compute_dtype`` (``"auto"``: from the devices' platform)."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise UnmergeError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    if compute_dtype != "auto":
        return compute_dtype
    platform = (list(devices)[0] if devices else jax.local_devices()[0]).platform
    return FLOAT32_ONLY if platform == "tpu" else "float64"


def _accumulate(base, tvs, K, selection, *, seeds, key, devices, block_rows, compute_dtype, pidx, pcount,
                boot_block=1, hooks=(), sig=None):
    names = selection.names
    mine = share(names, [selection.rows(n) for n in names], pcount)[pidx]
    if devices is None:
        devices = jax.local_devices()
    devices = list(devices)
    local_rows = sum(selection.rows(n) for n in mine)
    block = block_rows_for(local_rows, block_rows, len(devices))
    relative = [tv.relative for tv in tvs]
    offsets = selection.offsets()
    ids = {n: i for i, n in enumerate(names)}

    def on_bad(tensor_ids, inp):
        _raise_nonfinite(base, tvs, K, selection, [names[i] for i in tensor_ids], inp)

    packer = _Packer(K, len(tvs) - K, relative, block, devices, seeds, key, compute_dtype,
                     offsets[mine[0]] if mine else 0, on_bad, boot_block, hooks, sig)
    # Readers write each tensor's selected entries straight into the staging block, a row block at
    # a time: nothing tensor-sized is held, so memory depends on the block and K + T only.
    readers = [RowReader(base, window=block) if any(relative) else None]
    readers += [RowReader(tv.source, tv.touches, window=block) for tv in tvs]
    for name in progress(mine, desc="statistics pass", total=len(mine)):
        rows = selection.rows(name)
        if rows == 0:
            continue
        if sig is not None and sig.needs(name):  # per-tensor hook: thresholds need the whole tensors
            sig.from_reading(name, *_whole_dictionary(base, tvs[:K], name, readers[1:1 + K]))
        packer.push(ids[name], name, readers, selection.index.get(name), rows)
    packer.flush()
    packer.check()
    total = packer.result()
    if pcount > 1:
        if total is None:  # this process got no rows: contribute zeros of the right shapes
            total = _zero_stats(K, len(tvs) - K, seeds)
        total = _sum_over_processes(total)
    return total, packer.n_blocks


def _whole_dictionary(base, dictionary, name, readers=None):
    """``(flats, base_flat, relative)`` of one tensor read whole, as ``SignatureAccumulator.from_reading``
    takes them: the K dictionary sources' flat arrays in their stored dtype (None = untouched),
    the base's (when some source is relative). ``readers``: the pass's K dictionary
    :class:`~unmerge_jax.staging.RowReader` s — a LoRA ``ΔW`` is then formed once, for the
    thresholds and the staged rows alike."""
    def raw(src, reader=None):
        if reader is not None and reader.whole:
            return reader.held(name)
        return (src.read_raw(name) if isinstance(src, CheckpointSource) else src.read(name)).reshape(-1)

    relative = [tv.relative for tv in dictionary]
    readers = list(readers) if readers is not None else [None] * len(dictionary)
    flats = [raw(tv.source, r) if tv.touches(name) else None for tv, r in zip(dictionary, readers)]
    return flats, raw(base) if any(relative) else None, relative


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

    # The kernel flags an input from its column sums; look there first, then at every other input
    # (a base flag can also mean that every relative source holds a NaN of its own).
    for i in [inp] + [j for j in range(1 + len(tvs)) if j != inp]:
        for name in tensors:
            _raise_if_nonfinite(base, tvs, K, i, name, first_bad)
    s = tvs[inp - 1] if inp else None
    raise UnmergeError(f"non-finite values in the task vector of {s.name if s else 'the base'} near tensor "
                       f"{tensors[0]}; the fine-tuned and base values overflow when subtracted")


def _raise_if_nonfinite(base, tvs, K, inp, name, first_bad):
    """Raise the one-line error if input ``inp`` (0 = the base) holds a selected NaN/Inf in ``name``."""
    if inp == 0:
        if not any(tv.relative for tv in tvs):
            return
        bad = first_bad(base.read(name), name)
        if bad is not None:
            raise nonfinite_error(name, f"base {base.where(name)}", bad, "holds NaN/Inf:")
        return
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
