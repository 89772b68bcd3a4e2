"""Sufficient statistics of a decomposition problem: ``G = DᵀD``, ``C = DᵀV``, ``‖v_t‖²``.

Every decomposition in the UNMERGE paper needs only these: for coefficients ``a``,
``‖v − Da‖² = ‖v‖² − 2cᵀa + aᵀGa``. One pass over the weights produces them; every solver then
works in K-dimensional Gram space, whatever the model size.

Bootstrap: with ``seeds=S`` the same pass also accumulates ``G_s = Dᵀ W_s D``, ``C_s = Dᵀ W_s V``,
``‖v‖²_s = Σ_r w_sr v_r²`` for S Poisson(1) row weightings ``W_s`` (DESIGN.md §1), giving
confidence intervals and selection stability at no extra read. Rows are resampled in units of
``bootstrap_block`` consecutive rows (:func:`bootstrap_unit_rows`): every row of a unit carries
the unit's weight.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unmerge_jax.attribution.signatures import SignatureStats
from unmerge_jax.compile_cache import cached_program
from unmerge_jax.errors import UnmergeError, check_finite
from unmerge_jax.io.arrays import read_npz, write_npz
from unmerge_jax.kernels.stats import CHUNK_ROWS, FLAT_PAD, block_stats, flat_block_stats, row_mesh
from unmerge_jax.staging import BLOCK_ROWS, ArrayBlocks, Staging, block_rows_for

# Fewest resampling units for which the automatic bootstrap resamples blocks instead of rows.
MIN_BOOT_UNITS = 200
# Integer seeds are 32-bit: every command's generator takes them as they are, never modulo 2**32.
SEED_LIMIT = 1 << 32


def check_seed(seed, what: str = "seed") -> int:
    """``seed`` as an int in ``0 ≤ seed < 2**32``, or a one-line error (a larger seed is refused, not folded)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UnmergeError(f"{what} must be a whole number, got {seed!r}")
    if not 0 <= int(seed) < SEED_LIMIT:
        raise UnmergeError(f"{what} {seed} is outside 0..{SEED_LIMIT - 1}: seeds are 32-bit — give a smaller one")
    return int(seed)


def bootstrap_unit_rows(n_rows: int, block: int | None = None) -> int:
    """Rows per bootstrap resampling unit for ``n_rows`` rows (``block`` if given, else automatic).

    Replicate ``s`` weights every row of unit ``u = row // block`` with one Poisson(1) draw.
    ``block = 1`` is the classic per-row bootstrap. The automatic choice is ``CHUNK_ROWS`` (4,096
    consecutive parameters, e.g. one row of a 4,096-wide weight matrix) once that still leaves at
    least ``MIN_BOOT_UNITS`` units (n ≥ 819,200 rows), and 1 below that.

    Why blocks: neighbouring parameters of a weight matrix are not independent, and resampling
    contiguous blocks (the block bootstrap) keeps that dependence inside each unit; for
    independent rows it estimates the same variance, from fewer units. And the kernel then
    computes each 4,096-row chunk's products once and weights them per replicate, so S replicates
    cost almost nothing instead of S more products.
    """
    if block is None:
        return CHUNK_ROWS if n_rows >= MIN_BOOT_UNITS * CHUNK_ROWS else 1
    block = int(block)
    if block < 1:
        raise UnmergeError(f"bootstrap_block must be >= 1 row, got {block}")
    return block


class GramStats(NamedTuple):
    """Float64 sufficient statistics for K atoms and T targets (a pytree).

    Attributes:
      gram: (K, K) ``DᵀD``.
      cross: (K, T) ``DᵀV``.
      target_sq: (T,) ``‖v_t‖²``.
      n_rows: () int, number of parameter rows n (the ``n`` of scikit-learn's ``1/(2n)``).
      boot_gram: (S, K, K) bootstrap replicates of ``gram``, or None.
      boot_cross: (S, K, T), or None.
      boot_target_sq: (S, T), or None.
      boot_n_rows: (S,) float, Σ of each replicate's row weights (its effective n), or None.
    """

    gram: Any
    cross: Any
    target_sq: Any
    n_rows: Any
    boot_gram: Any = None
    boot_cross: Any = None
    boot_target_sq: Any = None
    boot_n_rows: Any = None

    @property
    def n_atoms(self) -> int:
        return int(self.gram.shape[-1])

    @property
    def n_targets(self) -> int:
        return int(self.cross.shape[-1])

    @property
    def n_seeds(self) -> int:
        return 0 if self.boot_gram is None else int(self.boot_gram.shape[0])

    def replicates(self) -> "GramStats":
        """The bootstrap replicates as a GramStats with a leading seed axis (S, ...)."""
        if self.boot_gram is None:
            raise UnmergeError("these statistics have no bootstrap replicates; compute them with seeds=S > 0")
        return GramStats(self.boot_gram, self.boot_cross, self.boot_target_sq, self.boot_n_rows)

    def point(self) -> "GramStats":
        """The full-data statistics without replicates."""
        return GramStats(self.gram, self.cross, self.target_sq, self.n_rows)

    def select_targets(self, index) -> "GramStats":
        """Statistics restricted to targets ``index`` (int array or slice)."""
        idx = np.asarray(index) if not isinstance(index, slice) else index
        pick = lambda a, axis: None if a is None else np.take(np.asarray(a), np.arange(a.shape[axis])[idx], axis=axis)
        return GramStats(self.gram, pick(self.cross, -1), pick(self.target_sq, -1), self.n_rows,
                         self.boot_gram, pick(self.boot_cross, -1), pick(self.boot_target_sq, -1),
                         self.boot_n_rows)


def add_stats(a: GramStats, b: GramStats) -> GramStats:
    """Sum of two partial statistics over disjoint row sets (same K, T and seeds)."""
    if a.gram.shape != b.gram.shape or a.cross.shape != b.cross.shape or a.n_seeds != b.n_seeds:
        raise UnmergeError(
            f"cannot add statistics of different shapes: K×T {a.cross.shape} vs {b.cross.shape}, "
            f"seeds {a.n_seeds} vs {b.n_seeds}")
    return jax.tree_util.tree_map(lambda x, y: x + y, a, b)


def _as_2d(name: str, x) -> np.ndarray | jax.Array:
    if not hasattr(x, "shape"):
        x = np.asarray(x)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise UnmergeError(f"{name} must be 1-D or 2-D (rows × columns), got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise UnmergeError(f"{name} must hold floating-point values, got dtype {x.dtype}")
    return x


def validate_inputs(D, V, *, check_values: bool = True):
    """Shape/dtype/finiteness checks shared by every dense entry point; returns 2-D D, V.

    ``check_values=False`` skips the NaN/Inf scan (a full extra pass over the data) for callers
    that detect non-finite values from their results, as :func:`gram_stats` does.
    """
    D = _as_2d("dictionary D", D)
    V = _as_2d("targets V", V)
    if D.shape[0] != V.shape[0]:
        raise UnmergeError(
            f"dictionary D has {D.shape[0]} rows but targets V have {V.shape[0]}; both must be "
            f"flattened over the same parameters (rows = parameters, columns = atoms/targets)")
    if D.shape[0] == 0 or D.shape[1] == 0:
        raise UnmergeError(f"dictionary D is empty (shape {tuple(D.shape)}); give at least one atom with one row")
    if V.shape[1] == 0:
        raise UnmergeError("targets V has no columns; give at least one target")
    if check_values:
        check_finite("dictionary D", D)
        check_finite("targets V", V)
    return D, V


def accumulate_block(D_block, V_block, *, row_offset: int = 0, seeds: int = 0, key=None, devices=None,
                     compute_dtype="float64", pad_to: int | None = None, bootstrap_block: int = 1) -> GramStats:
    """Partial statistics of one block of rows (for streaming passes; sum blocks with add_stats).

    Args:
      D_block: (r, K) dictionary rows. V_block: (r, T) target rows (float32/bf16/float64).
      row_offset: global index of the block's first row, which fixes its bootstrap weights, so a
        stream of blocks equals one dense call.
      seeds, key: bootstrap replicates (see :func:`gram_stats`).
      devices: devices to shard rows over (default: all).
      compute_dtype, pad_to: see ``kernels.stats.block_stats``.
      bootstrap_block: rows per resampling unit (see :func:`bootstrap_unit_rows`); every block of
        one pass must use the same value.
    """
    out = block_stats(D_block, V_block, row_offset=row_offset, n_seeds=seeds,
                      key=_seed_key(key, seeds), mesh=row_mesh(devices), compute_dtype=compute_dtype,
                      pad_to=pad_to, boot_block=bootstrap_unit_rows(0, bootstrap_block))
    return GramStats(*out)


def _cached_run(program, name, args, donate=()):
    """Run a statistics kernel through the compiled-program cache (a warm process traces nothing)."""
    return cached_program(program, name, args, {}, donate=donate)


def _seed_key(key, seeds):
    if not seeds:
        return None
    if key is None:
        return jax.random.key(0)
    if isinstance(key, (int, np.integer)):
        return jax.random.key(check_seed(key, "bootstrap seed"))
    return key


def gram_stats(D, V, *, seeds: int = 0, key=None, devices=None, block_rows: int = BLOCK_ROWS,
               compute_dtype="float64", bootstrap_block: int | None = None) -> GramStats:
    """Float64 sufficient statistics of dictionary ``D`` and targets ``V``.

    ``G = DᵀD``, ``C = DᵀV``, ``‖v_t‖²``, accumulated over row blocks in float64 and sharded over
    devices (result independent of the device count to ~1e-15).

    NumPy inputs are handed to the device block by block: a 64-byte aligned C-contiguous block is
    used in place (XLA:CPU aliases it, no copy); otherwise it is copied into one of two reused
    aligned staging buffers while the device works on the previous block (``unmerge_jax.staging``,
    the staging of every statistics pass). NaN/Inf are detected
    from the statistics themselves (a non-finite entry makes a diagonal of ``G`` or an entry of
    ``‖v‖²`` non-finite), so valid inputs are read exactly once.

    Args:
      D: (n, K) dictionary, one task vector per column (float32 is fine).
      V: (n,) or (n, T) targets.
      seeds: S ≥ 0 Poisson(1) bootstrap replicates computed in the same pass.
      key: ``jax.random`` key or int seed for the replicates (default 0).
      bootstrap_block: rows per resampling unit; default automatic: 4,096-row blocks from
        819,200 rows up, single rows below (see :func:`bootstrap_unit_rows`).
      devices: devices to shard rows over (default: all of the default backend).
      block_rows: rows per compiled block (bounds the float64 temporaries and the staging buffers).
      compute_dtype: "float64" (default, exact products) or "float32" (float32 products summed in
        float64 per 4,096-row chunk; ~2× faster on CPU, ~1e-7 relative).

    Returns:
      :class:`GramStats`.
    """
    D, V = validate_inputs(D, V, check_values=False)
    if seeds < 0:
        raise UnmergeError(f"seeds must be >= 0, got {seeds}")
    n = D.shape[0]
    mesh = row_mesh(devices)
    n_dev = mesh.devices.size
    block = block_rows_for(n, block_rows, n_dev)
    key = _seed_key(key, seeds)
    boot_block = bootstrap_unit_rows(n, bootstrap_block)
    # One device and host arrays: blocks go over as flat buffers starting at the 64-byte boundary at
    # or before them, so NumPy's usual 16-byte-aligned arrays are read in place too.
    flat = n_dev == 1 and all(isinstance(x, np.ndarray) and x.dtype.itemsize in FLAT_PAD for x in (D, V))
    total = None

    def before_copy():
        # A staging buffer is about to be refilled: the device may still read it. Flat mode keeps
        # one running total (each block's program adds to it), so wait for that; rare, as flat
        # mode stages only the first and the last block. (Reads ``total`` as it is at the call.)
        if flat and total is not None:
            jax.block_until_ready(total.gram)

    staging = Staging(depth=2)
    stage_d = ArrayBlocks(D, block, flat, before_copy, staging)
    stage_v = ArrayBlocks(V, block, flat, before_copy, staging)
    for i, start in enumerate(range(0, n, block)):
        stop = min(n, start + block)
        staging.wait_turn()  # flat mode dispatches nothing to wait for: ``before_copy`` waits instead
        d_blk, v_blk = stage_d.block(i, start, stop), stage_v.block(i, start, stop)
        if flat:
            # Sums accumulate inside the kernel (one dispatch per block, nothing added on the host).
            sums = None if total is None else [a for f, a in zip(GramStats._fields, total) if f != "n_rows"]
            out = GramStats(*flat_block_stats(*d_blk, *v_blk, rows=block, row_offset=start, n_seeds=seeds, key=key,
                                              device=mesh.devices.flat[0], compute_dtype=compute_dtype,
                                              n_valid=stop - start, boot_block=boot_block, total=sums,
                                              run=_cached_run))
            total = out._replace(n_rows=out.n_rows + (0 if total is None else total.n_rows))
        else:
            part = GramStats(*block_stats(d_blk, v_blk, row_offset=start, n_seeds=seeds, key=key, mesh=mesh,
                                          compute_dtype=compute_dtype, pad_to=block, n_valid=stop - start,
                                          boot_block=boot_block))
            staging.dispatched(part.gram)
            total = part if total is None else add_stats(total, part)
    total = to_host(total)
    if not (np.all(np.isfinite(np.diagonal(total.gram))) and np.all(np.isfinite(total.target_sq))):
        check_finite("dictionary D", D)  # names the array and the first bad entry
        check_finite("targets V", V)
        raise UnmergeError("the statistics overflowed float64: the inputs hold values too large to square "
                           "(|x| > 1e150); rescale them")
    return total


def to_host(stats: GramStats) -> GramStats:
    """Fetch statistics to host float64 NumPy arrays.

    Why: the block kernel leaves its sums replicated over every device of the row mesh; a solver
    jitted on such inputs would run as an 8-way replicated SPMD program, which on the CPU backend
    (forced host devices) intermittently deadlocks inside XLA and wastes work everywhere else.
    The statistics are tiny (K×K, K×T), so the solver phase starts from host arrays and runs on
    one device.
    """
    def fetch(a):
        a = np.asarray(jax.device_get(a))
        return a.astype(np.float64, copy=False) if a.dtype.kind == "f" else a

    return GramStats(*(None if a is None else fetch(a) for a in stats))


def iter_gram_stats(blocks: Iterable, *, seeds: int = 0, key=None, devices=None,
                    compute_dtype="float64", pad_to: int | None = None, bootstrap_block: int = 1) -> GramStats:
    """Statistics of a stream of ``(D_block, V_block)`` row blocks, never materialised whole.

    Blocks may differ in size; row offsets are counted along the stream. The stream's length is
    not known in advance, so the bootstrap unit is not chosen automatically: ``bootstrap_block``
    defaults to single rows (pass :func:`bootstrap_unit_rows` of the total to match ``gram_stats``).
    """
    total, offset = None, 0
    key = _seed_key(key, seeds)
    for d, v in blocks:
        d, v = validate_inputs(d, v)
        part = accumulate_block(d, v, row_offset=offset, seeds=seeds, key=key, devices=devices,
                                compute_dtype=compute_dtype, pad_to=pad_to, bootstrap_block=bootstrap_block)
        offset += d.shape[0]
        total = part if total is None else add_stats(total, part)
    if total is None:
        raise UnmergeError("the stream of row blocks was empty; nothing to accumulate")
    return to_host(total)


_FIELDS = GramStats._fields
# Format of the merge-method signature sums inside a statistics file (``sig_<field>`` arrays and a
# ``signatures`` meta record). A reader refuses a version it does not know. Version 2 added the
# per-group Gram sums ``sig_group_gram`` (G, K, K) and ``sig_group_cross`` (G, K, T).
SIGNATURES_VERSION = 2
_SIG_PREFIX = "sig_"


def save_stats(path, stats: GramStats, provenance: dict | None = None, *, inputs=(), signatures=None) -> None:
    """Write statistics (and a JSON-serialisable provenance dict) to ``.npz``, atomically.

    Args:
      path: the ``.npz`` to write.
      stats: the :class:`GramStats`.
      provenance: the record of what they were computed from (``unmerge_jax.provenance``).
      inputs: paths the file must not overwrite or sit inside (``io.atomic.check_disjoint``).
      signatures: the merge-method signature sums of the same rows and targets
        (:class:`~unmerge_jax.attribution.SignatureStats`, what the presence decisions read), or
        None. Written as ``sig_<field>`` float64 arrays (``sig_densities`` the (P,) TIES density
        grid, ``sig_group_gram`` / ``sig_group_cross`` the (G, K, K) / (G, K, T) per-group sums) with
        a ``signatures`` record ``{"version", "densities"}`` (:data:`SIGNATURES_VERSION`).
    """
    arrays = {f: getattr(stats, f) for f in _FIELDS if getattr(stats, f) is not None}
    meta = {"provenance": provenance or {}}
    if signatures is not None:
        for f in signatures._fields:
            arrays[_SIG_PREFIX + f] = np.asarray(getattr(signatures, f), np.float64)
        meta["signatures"] = {"version": SIGNATURES_VERSION,
                              "densities": [float(p) for p in np.asarray(signatures.densities).reshape(-1)]}
    write_npz(path, arrays, meta, inputs=inputs)


def _expected_shapes(K: int, T: int, S: int) -> dict:
    return {"gram": (K, K), "cross": (K, T), "target_sq": (T,), "n_rows": (), "boot_gram": (S, K, K),
            "boot_cross": (S, K, T), "boot_target_sq": (S, T), "boot_n_rows": (S,)}


def check_stats_file(path, arrays: dict, provenance) -> None:
    """One-line error unless ``arrays`` are consistent :class:`GramStats` fields (K atoms, T targets,
    S replicates: shapes, real dtypes, all four replicate fields or none) and ``provenance`` is a dict."""
    fix = "write it again with `unmerge stats` or unmerge_jax.save_stats"
    missing = [f for f in ("gram", "cross", "target_sq", "n_rows") if f not in arrays]
    if missing:
        raise UnmergeError(f"{path} is not a GramStats file (missing {', '.join(missing)}); "
                           f"write one with `unmerge stats` or unmerge_jax.save_stats")
    for f, a in arrays.items():
        if f in _FIELDS and a.dtype.kind not in "fiu":
            raise UnmergeError(f"{path}: field {f} holds {a.dtype} values, not numbers; {fix}")
    boot = [f for f in _FIELDS if f.startswith("boot_") and f in arrays]
    if boot and len(boot) != 4:
        raise UnmergeError(f"{path} holds only some bootstrap fields ({', '.join(boot)}); {fix}")
    gram, cross = arrays["gram"], arrays["cross"]
    if gram.ndim != 2 or cross.ndim != 2:
        raise UnmergeError(f"{path}: gram has shape {gram.shape} and cross {cross.shape}; expected (K, K) and (K, T)"
                           f" — {fix}")
    K, T = (int(n) for n in cross.shape)
    S = int(arrays["boot_gram"].shape[0]) if boot and arrays["boot_gram"].ndim else 0
    want = _expected_shapes(K, T, S)
    for f in _FIELDS:  # in field order: the first wrong one is named
        if f in arrays and tuple(arrays[f].shape) != want[f]:
            raise UnmergeError(f"{path}: field {f} has shape {tuple(arrays[f].shape)} but {K} atoms, {T} targets and "
                               f"{S} seeds need {want[f]}; {fix}")
    if K == 0 or T == 0:
        raise UnmergeError(f"{path} holds statistics of {K} atoms and {T} targets; nothing to solve — {fix}")
    if not float(arrays["n_rows"]) >= 1:
        raise UnmergeError(f"{path}: n_rows is {arrays['n_rows']}; the statistics must cover at least one row — {fix}")
    if not isinstance(provenance, dict):
        raise UnmergeError(f"{path}: the provenance is a {type(provenance).__name__}, not an object; {fix}")
    for key, n in (("atom_names", gram.shape[0]), ("target_names", cross.shape[1])):
        names = provenance.get(key)
        if names is not None and (not isinstance(names, list) or len(names) != n
                                  or not all(isinstance(x, str) for x in names)):
            raise UnmergeError(f"{path}: provenance {key} is {str(names)[:80]!r}, not a list of {n} names; {fix}")


def _sig_shapes(K: int, T: int, P: int, G: int) -> dict:
    return {"densities": (P,), "n_rows": (), "n_active": (), "zero_count": (T,), "zero_energy": (K, T),
            "ties_dd": (P, T, K, K), "ties_dv": (P, T, K, K), "ties_vv": (P, T, K, K),
            "group_gram": (G, K, K), "group_cross": (G, K, T)}


def check_signatures_file(path, arrays: dict, record, n_rows) -> None:
    """One-line error unless the ``sig_*`` arrays and ``record`` of a statistics file are consistent
    signature sums (:func:`save_stats`) of the file's K atoms and T targets: a known version, every
    field, shapes (G ≥ 1 tensor groups, from ``sig_group_gram``), finite numbers, a density grid in (0, 1] equal to the record's, counts that fit
    (``zero_count ≤ n_active ≤ n_rows`` = the Gram statistics' rows)."""
    fix = "write it again with `unmerge stats` (or leave the file's signature sums out)"
    if not isinstance(record, dict) or record.get("version") != SIGNATURES_VERSION:
        version = record.get("version") if isinstance(record, dict) else record
        raise UnmergeError(f"{path} holds signature sums of format version {version!r}; this unmerge_jax reads "
                           f"version {SIGNATURES_VERSION} — {fix}")
    missing = [f for f in SignatureStats._fields if _SIG_PREFIX + f not in arrays]
    if missing:
        raise UnmergeError(f"{path} holds only some signature sums (missing {', '.join(_SIG_PREFIX + f for f in missing)})"
                           f"; {fix}")
    K, T = (int(n) for n in arrays["cross"].shape)
    dens = arrays[_SIG_PREFIX + "densities"]
    P = int(dens.shape[0]) if dens.ndim == 1 else -1
    gg = arrays[_SIG_PREFIX + "group_gram"]
    G = int(gg.shape[0]) if gg.ndim == 3 else -1
    if G < 1:
        raise UnmergeError(f"{path}: signature field {_SIG_PREFIX}group_gram has shape {tuple(gg.shape)}, not "
                           f"(G, {K}, {K}) for G >= 1 tensor groups; {fix}")
    want = _sig_shapes(K, T, P, G)
    for f in SignatureStats._fields:
        a = arrays[_SIG_PREFIX + f]
        if a.dtype.kind not in "fiu" or tuple(a.shape) != want[f]:
            raise UnmergeError(f"{path}: signature field {_SIG_PREFIX + f} has shape {tuple(a.shape)} and dtype "
                               f"{a.dtype} but {K} atoms, {T} targets, {max(P, 0)} densities and {G} groups need "
                               f"{want[f]} numbers; {fix}")
        if not np.all(np.isfinite(a)):
            raise UnmergeError(f"{path}: signature field {_SIG_PREFIX + f} holds NaN/Inf; {fix}")
    if P < 1 or np.any(~(dens > 0)) or np.any(dens > 1) or \
            not np.array_equal(np.asarray(record.get("densities"), np.float64).reshape(-1), dens.astype(np.float64)):
        raise UnmergeError(f"{path}: the signature density grid {dens.tolist()} is not fractions in (0, 1] equal to "
                           f"the record's {record.get('densities')}; {fix}")
    rows, active = float(arrays[_SIG_PREFIX + "n_rows"]), float(arrays[_SIG_PREFIX + "n_active"])
    if rows != float(n_rows) or not 0 <= active <= rows or np.any(arrays[_SIG_PREFIX + "zero_count"] < 0) \
            or np.any(arrays[_SIG_PREFIX + "zero_count"] > active):
        raise UnmergeError(f"{path}: the signature sums count {rows:g} rows ({active:g} active) but the statistics "
                           f"{float(n_rows):g}; they are not sums of the same rows — {fix}")


def load_stats(path, *, signatures: bool = False):
    """Read statistics written by :func:`save_stats`; returns ``(stats, provenance)``.

    The file is checked (:func:`check_stats_file`, :func:`check_signatures_file`): a truncated,
    foreign or mis-shaped file is a one-line error, never a traceback from a solver.

    Args:
      path: the ``.npz``.
      signatures: also return the merge-method signature sums: ``(stats, provenance, sig)``, with
        ``sig`` a :class:`~unmerge_jax.attribution.SignatureStats` of host float64 arrays, or None
        for a file without them (written with fewer than 200 replicates, ``--no-signatures``, or
        by an older version).
    """
    arrays, meta = read_npz(path, "statistics file")
    provenance = meta.get("provenance", {})
    check_stats_file(path, arrays, provenance)
    stats = GramStats(**{f: arrays.get(f) for f in _FIELDS})
    sig = None
    if "signatures" in meta or any(k.startswith(_SIG_PREFIX) for k in arrays):
        check_signatures_file(path, arrays, meta.get("signatures"), arrays["n_rows"])
        sig = SignatureStats(**{f: np.asarray(arrays[_SIG_PREFIX + f], np.float64) for f in SignatureStats._fields})
    return (stats, provenance, sig) if signatures else (stats, provenance)
