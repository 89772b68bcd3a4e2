"""The mask pass: which parameter entries enter the decomposition (the paper's top-k compression, §3.4).

``M = max_i |d_i|`` over the dictionary's task vectors, entry by entry. Keep

* ``scope="group"`` (the paper): the ``k_g = ⌊k / G⌋`` largest entries of M in each of the G
  (layer, module) groups (Qwen2.5-7B q,k,v,o: 1M over 112 groups = 8,928 each; a group smaller
  than ``k_g`` keeps all its entries, so the total can be below k);
* ``scope="global"``: the k largest entries of M over all selected tensors;
* nothing (``top_k=None``, ``--full``): every entry of every selected tensor.

Ties are broken by tensor order, then by flat index (lowest first), so a mask is a pure function
of the inputs, whatever the reading order or the number of processes.

A :class:`Selection` is the result: the tensors in row order and, per tensor, the sorted flat
indices kept (None = all). It defines the rows of the statistics; saved to ``.npz`` and reused,
it makes targets compressed exactly like the dictionary. Computing it is a streaming pass: per
tensor, M is formed in place from one task vector at a time (memory: base + M + one tensor) and
only the tensor's top candidates (≤ k_g, or ≤ k) are kept.

Inputs are tensor sources (``unmerge_jax.sources``): the base, and the dictionary's task vectors
(:class:`~unmerge_jax.sources.TaskVector`); :func:`topk_mask` applies the same rule to in-memory
task vectors through :class:`~unmerge_jax.sources.MemorySource`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from unmerge_jax.attribution.signatures import trim_thresholds
from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.arrays import read_npz, write_npz
from unmerge_jax.io.names import group_ids, groups_of, module_filter, modules_label, parse_tensor_name
from unmerge_jax.progress import progress
from unmerge_jax.sources import WEIGHTS, MemorySource, TaskVector, VirtualSource, nonfinite_error, open_source
from unmerge_jax.staging import RowReader

SCOPES = ("group", "global")


@dataclass
class Selection:
    """The rows of a decomposition problem.

    Attributes:
      names: tensors in row order.
      shapes: ``{name: shape}``.
      index: ``{name: sorted int64 flat indices kept, or None for the whole tensor}``.
      spec: how it was made (mode, scope, top_k, per_group, n_groups, modules, ...).
      thresholds: ``{name: (P, K) float32}`` TIES trimming thresholds of the dictionary's whole
        tensors at ``threshold_densities`` (``attribution.trim_thresholds``), filled by the mask
        pass when asked (``densities=``); not saved with the mask (the statistics pass computes
        the ones it lacks from its own reading).
      threshold_densities: the (P,) densities of ``thresholds``, or None.
    """

    names: list
    shapes: dict
    index: dict
    spec: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    threshold_densities: tuple | None = None

    def rows(self, name) -> int:
        idx = self.index.get(name)
        return int(np.prod(self.shapes[name], dtype=np.int64)) if idx is None else int(idx.size)

    @property
    def n_rows(self) -> int:
        return sum(self.rows(n) for n in self.names)

    def offsets(self) -> dict:
        """``{name: global index of the tensor's first row}``."""
        out, off = {}, 0
        for n in self.names:
            out[n] = off
            off += self.rows(n)
        return out

    def mask(self, name) -> np.ndarray:
        """Boolean mask of ``name`` (its shape)."""
        shape = tuple(self.shapes[name])
        idx = self.index.get(name)
        if idx is None:
            return np.ones(shape, bool)
        m = np.zeros(int(np.prod(shape, dtype=np.int64)), bool)
        m[idx] = True
        return m.reshape(shape)

    def check_base(self, base) -> None:
        """One-line error when ``base`` (a :class:`~unmerge_jax.sources.TensorSource`) lacks a tensor or
        has another shape."""
        for n in self.names:
            if n not in base:
                raise UnmergeError(f"the mask selects tensor {n}, which base {base.label} lacks; the mask was made for "
                                   f"another model — recompute it")
            if tuple(base.shape(n)) != tuple(self.shapes[n]):
                raise UnmergeError(f"the mask has tensor {n} with shape {tuple(self.shapes[n])} but base {base.label} "
                                   f"has {tuple(base.shape(n))}; recompute the mask for this base")

    def save(self, path, *, inputs=()) -> None:
        """Write to ``.npz`` atomically (spec, tensor names and shapes, the index arrays); never over
        or inside one of ``inputs``."""
        arrays = {f"idx_{i}": np.asarray(self.index[n], np.int64) for i, n in enumerate(self.names)
                  if self.index.get(n) is not None}
        write_npz(path, arrays, {"spec": self.spec, "names": list(self.names),
                                 "shapes": [list(self.shapes[n]) for n in self.names]}, inputs=inputs)

    @classmethod
    def load(cls, path) -> "Selection":
        """Read a selection written by :meth:`save`."""
        arrays, meta = read_npz(path, "mask file")
        for key in ("names", "shapes", "spec"):
            if key not in meta:
                raise UnmergeError(f"{path} is not a mask file (no {key}_json); write one with --save-mask")
        names, shape_list, spec = meta["names"], meta["shapes"], meta["spec"]
        redo = "write it again with --save-mask"
        if (not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names
                or len(set(names)) != len(names)):
            raise UnmergeError(f"mask file {path}: names is not a non-empty list of distinct tensor names; {redo}")
        if not isinstance(shape_list, list) or len(shape_list) != len(names) or not all(
                isinstance(sh, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in sh)
                for sh in shape_list):
            raise UnmergeError(f"mask file {path}: shapes is not one list of sizes per tensor; {redo}")
        if not isinstance(spec, dict):
            raise UnmergeError(f"mask file {path}: spec is not an object; {redo}")
        for key, a in arrays.items():
            if a.ndim != 1 or a.dtype.kind not in "iu":
                raise UnmergeError(f"mask file {path}: {key} has shape {a.shape} and dtype {a.dtype}; indices are 1-D "
                                   f"integers — {redo}")
        shapes = {n: tuple(s) for n, s in zip(names, shape_list)}
        index = {n: (np.asarray(arrays[f"idx_{i}"], np.int64) if f"idx_{i}" in arrays else None)
                 for i, n in enumerate(names)}
        for n, idx in index.items():
            size = int(np.prod(shapes[n], dtype=np.int64))
            if idx is not None and (idx.size and (idx.min() < 0 or idx.max() >= size) or np.any(np.diff(idx) <= 0)):
                raise UnmergeError(f"mask file {path}: indices of {n} are not sorted, unique and inside its {size} "
                                   f"entries; recompute the mask")
        return cls(names, shapes, index, meta["spec"])


def candidate_names(base, modules=None) -> list[str]:
    """The base's floating-point tensors that pass the ``--modules`` filter, in the base's order."""
    keep = module_filter(modules)
    names = [n for n in base.names if base.is_float(n) and keep(n)]
    if not names:
        raise UnmergeError(f"no floating-point tensor of {base.label} matches --modules {modules_label(modules)}; "
                           f"e.g. {base.names[0] if base.names else '(no tensors)'} is "
                           f"{parse_tensor_name(base.names[0]).module_class if base.names else '-'}")
    return names


def full_selection(base, modules=None) -> Selection:
    """Every entry of every selected tensor (no compression)."""
    names = candidate_names(base, modules)
    return Selection(names, {n: tuple(base.shape(n)) for n in names}, {n: None for n in names},
                     {"mode": "full", "modules": modules_label(modules), "n_tensors": len(names)})


# ----------------------------------------------------------------------------------------------
# the top-k rule
# ----------------------------------------------------------------------------------------------
def select_top(values: np.ndarray, ranks: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` first candidates in the order (value desc, rank asc, idx asc).

    O(n) plus a sort of the ties at the threshold only.
    """
    n = values.size
    if k >= n:
        return np.arange(n)
    if k <= 0:
        return np.zeros(0, np.int64)
    thr = np.partition(values, n - k)[n - k]
    above = np.flatnonzero(values > thr)
    eq = np.flatnonzero(values == thr)
    need = k - above.size
    order = np.lexsort((idx[eq], ranks[eq]))
    return np.sort(np.concatenate([above, eq[order[:need]]]))


def _tensor_top(m: np.ndarray, k: int):
    """(values, flat idx) of the k largest entries of flat ``m`` (ties: lowest index)."""
    flat = m.reshape(-1)
    pos = select_top(flat, np.zeros(flat.size, np.int32), np.arange(flat.size, dtype=np.int64), k) \
        if k < flat.size else np.arange(flat.size)
    return flat[pos].astype(np.float32), pos.astype(np.int64)


def _max_abs(base, dictionary, name, densities=None):
    """``M = max_i |d_i|`` of one tensor, built in place one task vector at a time.

    With ``densities`` (P,), also each entry's TIES trimming thresholds of the whole tensor (the
    k-th largest ``|d_i|``, ``attribution.trim_thresholds``) from the same ``|d_i|``: returns
    ``(M, (P, K) thresholds)``.
    """
    m, base_arr = None, None
    thr = None if densities is None else np.zeros((len(densities), len(dictionary)), np.float32)
    for j, tv in enumerate(dictionary):
        arr, relative = tv.parts(name)
        if arr is None:
            continue
        arr = arr if arr.flags.writeable else arr.copy()  # readers hand out fresh arrays
        if relative:
            if base_arr is None:
                base_arr = base.read(name)
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is named below, not warned
                arr -= base_arr
        np.abs(arr, out=arr)
        if thr is not None:
            thr[:, j] = trim_thresholds([arr], densities)[:, 0]
        if m is None:
            m = arr
        else:
            np.maximum(m, arr, out=m)
        del arr
    if m is None:
        m = np.zeros(base.shape(name), np.float32)
    if not np.all(np.isfinite(m)):
        _raise_nonfinite(base, dictionary, name)
    return m if thr is None else (m, thr)


MASK_BLOCK = 1 << 20  # entries of a tensor per row block of the mask pass (4 MiB per input)


def _tensor_candidates(base, dictionary, name, k: int, readers, block: int = MASK_BLOCK):
    """(values, flat idx) of the k largest entries of ``M = max_i |d_i|`` in tensor ``name``, read a
    block of ``block`` entries at a time: each block's top k merged into the running top k (ties:
    lowest index, as :func:`_tensor_top` of the whole tensor). Memory: the block per input and the
    candidates, not the tensor. ``readers``: a :class:`~unmerge_jax.staging.RowReader` for the base
    and one per dictionary entry."""
    size = int(np.prod(base.shape(name), dtype=np.int64))
    base_reader, dict_readers = readers[0], readers[1:]
    best_v, best_i = np.zeros(0, np.float32), np.zeros(0, np.int64)
    m = np.empty(min(block, max(size, 1)), np.float32)
    arr = np.empty_like(m)
    base_blk = np.empty_like(m)
    for lo in range(0, size, block):
        n = min(block, size - lo)
        mb, ab, bb = m[:n], arr[:n], base_blk[:n]
        mb[:] = 0.0
        have_base = False
        for tv, reader in zip(dictionary, dict_readers):
            if not tv.touches(name):
                continue
            reader.fill(name, None, lo, n, ab)
            if tv.relative:
                if not have_base:
                    base_reader.fill(name, None, lo, n, bb)
                    have_base = True
                with np.errstate(over="ignore", invalid="ignore"):  # an overflow is named below, not warned
                    ab -= bb
            np.abs(ab, out=ab)
            np.maximum(mb, ab, out=mb)
        if not np.all(np.isfinite(mb)):  # NaN-propagating maximum: any non-finite |d_i| shows here
            _raise_nonfinite(base, dictionary, name)
        v, i = _tensor_top(mb, k)
        if lo:
            v, i = np.concatenate([best_v, v]), np.concatenate([best_i, i + lo])
            keep = select_top(v, np.zeros(v.size, np.int32), i, k)
            v, i = v[keep], i[keep]
        best_v, best_i = v, i
    return best_v, best_i


def _raise_nonfinite(base, dictionary, name):
    """Name the input (base or dictionary entry), its file and the first index of a NaN/Inf in ``name``."""
    base_arr = base.read(name)
    if not np.all(np.isfinite(base_arr)):
        raise nonfinite_error(name, f"base {base.where(name)}", base_arr, "holds NaN/Inf:")
    for tv in dictionary:
        arr, relative = tv.parts(name)
        if arr is not None and not np.all(np.isfinite(arr)):
            raise nonfinite_error(name, f"dictionary entry {tv.name} ({tv.where(name)})", arr, "holds NaN/Inf:")
        with np.errstate(over="ignore", invalid="ignore"):
            d = tv.delta(name)
        if not np.all(np.isfinite(d)):  # finite weights whose difference overflows float32
            raise nonfinite_error(name, f"the task vector of dictionary entry {tv.name} ({tv.where(name)} minus the "
                                        f"base)", d, "overflows float32 to NaN/Inf:")
    raise UnmergeError(f"tensor {name}: the dictionary's task vectors are not finite")  # pragma: no cover


def _per_group(top_k: int, n_groups: int) -> int:
    per = int(top_k) // n_groups
    if per < 1:
        raise UnmergeError(f"--top-k {top_k} is smaller than the number of (layer, module) groups ({n_groups}); give "
                           f"at least {n_groups}, or --scope global")
    return per


def build_selection(base, dictionary, top_k: int | None = None, *, scope: str = "group", modules=None,
                    names=None, process_index: int = 0, process_count: int = 1, gather=None,
                    densities=None) -> Selection:
    """The streaming mask pass: top-k of ``M = max_i |d_i|`` (or everything when ``top_k`` is None).

    Args:
      base: the base (a :class:`~unmerge_jax.sources.TensorSource` of kind ``"weights"``).
      dictionary: the dictionary's task vectors (:class:`~unmerge_jax.sources.TaskVector`).
      top_k: total entries to keep; None keeps every entry (the full model).
      scope: ``"group"`` (k spread uniformly over (layer, module) groups, the paper) or ``"global"``.
      modules: ``--modules`` filter.
      names: tensors to consider (default: the base's float tensors passing ``modules``).
      process_index, process_count, gather: multi-process pass — this process reads tensors
        ``share(names)[process_index]`` and ``gather(values, ranks, idx)`` returns every process's
        candidates concatenated (see :mod:`unmerge_jax.passes.statistics`).
      densities: with ``top_k``, also the dictionary's TIES trimming thresholds at these densities
        for the tensors this process reads (``Selection.thresholds``), at no extra read.
    """
    if top_k is None:
        sel = full_selection(base, modules)
        if names is not None:
            sel = Selection(list(names), {n: tuple(base.shape(n)) for n in names}, {n: None for n in names}, sel.spec)
        return sel
    if scope not in SCOPES:
        raise UnmergeError(f"unknown top-k scope {scope!r}; choose group or global")
    if int(top_k) < 1:
        raise UnmergeError(f"--top-k must be >= 1, got {top_k}")
    if not dictionary:
        raise UnmergeError("the dictionary is empty; the top-k mask is computed from the dictionary's task vectors")
    names = list(names) if names is not None else candidate_names(base, modules)
    rank_of = {n: i for i, n in enumerate(names)}
    groups = groups_of(names)
    k_each = _per_group(top_k, len(groups)) if scope == "group" else int(top_k)
    mine = share(names, [int(np.prod(base.shape(n), dtype=np.int64)) for n in names], process_count)[process_index]
    vals, ranks, idxs = [], [], []
    readers = [RowReader(open_source(base, kind=WEIGHTS), window=MASK_BLOCK)]
    readers += [RowReader(tv.source, tv.touches, window=MASK_BLOCK) for tv in dictionary]
    thresholds = {}
    for name in progress(mine, desc="top-k mask pass", total=len(mine)):
        if densities is not None:
            # TIES thresholds are order statistics of the whole tensor's |d_i|: this per-tensor
            # path holds the tensor (the row-block path below does not).
            m, thresholds[name] = _max_abs(base, dictionary, name, densities)
            v, i = _tensor_top(m, k_each)
            del m
        else:
            v, i = _tensor_candidates(base, dictionary, name, k_each, readers)
        vals.append(v)
        idxs.append(i)
        ranks.append(np.full(v.size, rank_of[name], np.int32))
        if scope == "global" and sum(x.size for x in vals) > 2 * k_each:
            vals, ranks, idxs = _merge_global(vals, ranks, idxs, k_each)
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
    v, r, i = cat(vals, np.float32), cat(ranks, np.int32), cat(idxs, np.int64)
    if gather is not None and process_count > 1:
        v, r, i = gather(v, r, i)
    index = {n: [] for n in names}
    if scope == "global":
        keep = select_top(v, r, i, k_each)
        _assign(index, names, r[keep], i[keep])
    else:
        gid = group_ids(names)[r]
        for g in range(len(groups)):
            pos = np.flatnonzero(gid == g)
            keep = pos[select_top(v[pos], r[pos], i[pos], k_each)]
            _assign(index, names, r[keep], i[keep])
    index = {n: np.sort(np.asarray(np.concatenate(ix) if ix else np.zeros(0, np.int64), np.int64)) for n, ix in index.items()}
    spec = {"mode": "top_k", "scope": scope, "top_k": int(top_k), "modules": modules_label(modules),
            "n_groups": len(groups), "n_tensors": len(names)}
    if scope == "group":
        spec["per_group"] = k_each
    return Selection(names, {n: tuple(base.shape(n)) for n in names}, index, spec, thresholds,
                     None if densities is None else tuple(float(p) for p in densities))


def _merge_global(vals, ranks, idxs, k):
    v, r, i = np.concatenate(vals), np.concatenate(ranks), np.concatenate(idxs)
    keep = select_top(v, r, i, k)
    return [v[keep]], [r[keep]], [i[keep]]


def _assign(index, names, ranks, idx):
    for rk in np.unique(ranks):
        index[names[rk]].append(idx[ranks == rk])


def share(names, sizes, count: int) -> list[list[str]]:
    """Split ``names`` into ``count`` contiguous runs of about equal total ``sizes``."""
    if count <= 1:
        return [list(names)]
    total = float(sum(sizes)) or 1.0
    out = [[] for _ in range(count)]
    acc = 0.0
    for n, s in zip(names, sizes):
        p = min(count - 1, int((acc + s / 2) / total * count))
        out[p].append(n)
        acc += s
    return out


# ----------------------------------------------------------------------------------------------
# in-memory helper (same rule)
# ----------------------------------------------------------------------------------------------
def topk_mask(dictionary: list[dict], top_k: int, scope: str = "group") -> dict[str, np.ndarray]:
    """Boolean masks ``{name: mask}`` of the top-k rule for in-memory task vectors.

    Args:
      dictionary: K dicts ``{tensor name: δ array}`` with the same names and shapes.
      top_k: total entries kept (spread over (layer, module) groups with ``scope="group"``).
      scope: ``"group"`` or ``"global"``.

    Same rule and tie-breaking as the streaming pass (tensor order = the first dict's order).
    """
    if not dictionary:
        raise UnmergeError("the dictionary is empty; give at least one task vector")
    names = list(dictionary[0])
    for j, d in enumerate(dictionary):
        if list(d) != names:
            missing = sorted(set(names) ^ set(d))
            raise UnmergeError(f"dictionary entry {j} has other tensors than entry 0 (e.g. {missing[0] if missing else 'order'})")

    shapes = {n: np.shape(dictionary[0][n]) for n in names}
    base = VirtualSource(shapes, lambda n: None, kind=WEIGHTS, label="in-memory dictionary")  # zeros: δ as given
    tvs = [TaskVector(base, MemorySource(d, label=f"in-memory task vector {j}"), name=str(j)) for j, d in enumerate(dictionary)]
    sel = build_selection(base, tvs, top_k, scope=scope, names=names)
    return {n: sel.mask(n) for n in names}
