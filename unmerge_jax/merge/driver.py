"""Streaming merge driver: base + K inputs, one tensor at a time, into a sharded safetensors dir.

For every tensor of the base model (in sorted name order): read the base tensor and the K
inputs as float32 (fine-tuned weights from model directories, or ``ΔW = B@A·α/r`` from PEFT
LoRA adapters — adapters are merged in ΔW space, never A and B separately), run the method's
jit-compiled kernel chunk by chunk into the base buffer (methods with a per-tensor statistic —
TIES/DARE below density 1, RAM ``seed003``/``tensor_local`` — make a statistics pass over the
chunks first, with O(K) state), cast to the output dtype and append to the output shard. Only the
current tensor's inputs are alive, so peak memory is ≈ (1 + K) × largest tensor × 4 bytes + a
constant for every method (measured in ``tests/test_merge_driver.py`` and ``bench/merge.py``).
The RAM authors' global faces (``arm-r``, ``arm-r-v2``) need a counting pass over all tensors
first (it reads the inputs once more).

Everything is checked before the output directory is created (unknown method/parameter, density,
weights summing to zero, shapes, missing tensors, existing output); the output is written to a
temporary directory and renamed at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.atomic import atomic_dir
from unmerge_jax.io.writer import (DEFAULT_SHARD_BYTES, ShardedWriter, copy_side_files, dtype_tag,
                                   write_config)
from unmerge_jax.kernels import merge as K
from unmerge_jax.merge.config import MergeConfig, layer_fraction, layer_index, load_config, resolve_for_tensor
from unmerge_jax.hostmem import aligned_empty
from unmerge_jax.merge.methods import CHUNK, GLOBAL_FACES, check_shapes, run_kernel
from unmerge_jax.progress import progress

CONFIG_NAME = "unmerge_merge_config.yaml"
_FLOAT_TAGS = ("F32", "F16", "BF16", "F64")


@dataclass
class MergeResult:
    """What :func:`merge` wrote."""

    out: Path
    n_tensors: int
    n_merged: int          # tensors that went through the kernel (others are the base, unchanged)
    bytes_written: int
    seconds: float
    lambdas: list | None = None   # per-model unique-region scales of a global RAM face


def _readers():
    """The checkpoint readers of ``unmerge_jax.io`` (issue 3): open_checkpoint, is_adapter_dir,
    open_adapter, task_vector."""
    from unmerge_jax.io.checkpoint import open_checkpoint
    from unmerge_jax.io.lora import is_adapter_dir, open_adapter
    from unmerge_jax.sources import task_vector

    return open_checkpoint, is_adapter_dir, open_adapter, task_vector


class _Inputs:
    """The base and the K inputs of a merge, opened (headers only) and checked."""

    def __init__(self, cfg: MergeConfig):
        open_checkpoint, is_adapter_dir, open_adapter, task_vector = _readers()

        self.base = open_checkpoint(cfg.base_model) if cfg.base_model is not None else None
        self.models, self.kinds, self.touched = [], [], []
        for path, _ in cfg.models:
            if is_adapter_dir(path):
                if self.base is None:
                    raise UnmergeError(f"{path} is a LoRA adapter; merging it needs base_model")
                self.models.append(task_vector(self.base, path))
                self.kinds.append("delta")
                self.touched.append(set(open_adapter(path).base_names))
            else:
                self.models.append(open_checkpoint(path))
                self.kinds.append("weights")
                self.touched.append(None)
        ref = self.base if self.base is not None else self.models[0]
        self.ref = ref
        self.names = list(ref.names)
        self.shapes = {n: tuple(ref.shape(n)) for n in self.names}
        self.dtypes = {n: ref.dtype(n) for n in self.names}
        for (path, _), m, kind in zip(cfg.models, self.models, self.kinds):
            if kind != "weights" or m is ref:
                continue
            have = set(m.names)
            missing = [n for n in self.names if n not in have]
            if missing:
                raise UnmergeError(f"{path} has no tensor {missing[0]} (the base has it); inputs must share "
                                   f"the base architecture")
            for n in self.names:
                check_shapes(self.shapes[n], [m.shape(n)], [str(path)], n)
        # Full-weight inputs only: the kernel forms δ = θ − θ_base itself (no extra copy).
        self.weights_mode = self.base is not None and all(k == "weights" for k in self.kinds)
        self._bufs: dict[int, np.ndarray] = {}   # per-input float32 read buffers, kept across tensors

    def untouched(self, name: str) -> bool:
        """True when every input is an adapter that does not touch ``name`` (the merge is the base)."""
        return self.base is not None and all(t is not None and name not in t for t in self.touched)

    def _read(self, ckpt, slot: int, name: str):
        """One float32 tensor of a checkpoint. Stored-float32 tensors are read into buffer ``slot``
        (grown to the largest tensor once): ``pread`` into pages already mapped runs at ≈ 7–9 GB/s
        here against ≈ 1.5 GB/s into a fresh allocation, whose page faults dominated the merge's
        time. The result is only valid until the next read into the same slot.

        Buffers are 64-byte aligned (:func:`aligned_empty`), and so is every chunk of them: XLA:CPU
        takes an aligned NumPy argument without copying, but copies a misaligned one on every
        kernel call (measured 1.7 ns per float, more than the TIES kernel itself)."""
        if ckpt.dtype(name) != "F32" or not hasattr(ckpt, "read_raw"):
            return ckpt.read(name)
        need = ckpt.nbytes(name)
        buf = self._bufs.get(slot)
        if buf is None or buf.size < need:
            buf = self._bufs[slot] = aligned_empty(max(need, self._largest()))
        return ckpt.read_raw(name, out=buf)

    def _largest(self) -> int:
        return max((int(np.prod(s, dtype=np.int64)) * 4 for s in self.shapes.values()), default=0)

    def read(self, name: str, base_slot: int = 0):
        """(base, tensors, deltas) for one tensor, float32; the base is read into buffer
        ``base_slot`` (``overlap`` alternates two, see :func:`merge`)."""
        if self.base is None:  # linear without a base: full weights onto zeros
            ts = tuple(self._read(m, i + 1, name) for i, m in enumerate(self.models))
            return np.zeros(self.shapes[name], np.float32), ts, True
        base = self._read(self.base, base_slot, name)
        if self.weights_mode:
            return base, tuple(self._read(m, i + 1, name) for i, m in enumerate(self.models)), False
        ts = []
        for i, (m, kind) in enumerate(zip(self.models, self.kinds)):
            if kind == "delta":
                ts.append(np.asarray(m.delta(name), np.float32))
            else:
                t = self._read(m, i + 1, name)
                t = t if t.flags.writeable else t.copy()
                t -= base
                ts.append(t)
        return base, tuple(ts), True


def _n_layers(inputs: _Inputs):
    cfg = getattr(inputs.ref, "config", None) or {}
    n = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    if n:
        return int(n)
    idx = [i for i in map(layer_index, inputs.names) if i is not None]
    return max(idx) + 1 if idx else None


def _global_lambdas(cfg: MergeConfig, inputs: _Inputs, res_by_name, face: str, r: float):
    changed = np.zeros(len(cfg.models), np.int64)
    overlap = np.zeros(len(cfg.models), np.int64)
    for name in progress(inputs.names, desc="RAM counting pass"):
        if name not in res_by_name or inputs.untouched(name):
            continue
        res = res_by_name[name]
        base, ts, deltas = inputs.read(name)
        c, o = K.ram_counts(base, ts, np.asarray(res.weights, np.float32), np.float32(res.shared["epsilon"]),
                            deltas=deltas)
        changed += np.asarray(c)
        overlap += np.asarray(o)
        del base, ts
    return K.ram_lambdas("arm-r-v2" if face == "authors" else face, r, changed, overlap)


def merge(config, out, *, seed: int = 0, force: bool = False, dtype: str | None = None,
          shard_bytes: int = DEFAULT_SHARD_BYTES, overlap: bool = False, chunk: int = CHUNK) -> MergeResult:
    """Merge the models of a mergekit-style config into ``out`` (a new directory).

    Args:
      config: path to a YAML file, a YAML string, a dict in mergekit's schema, or a
        :class:`MergeConfig`.
      out: output directory; refused if it exists unless ``force``.
      seed: keys DARE's random masks together with each tensor's name.
      dtype: output dtype (``float32``/``float16``/``bfloat16``); default the config's
        ``out_dtype``, then ``dtype``, then the base's stored dtype. Computation is float32.
      shard_bytes: maximum bytes per output shard.
      overlap: read the next tensor and write the previous one in threads while the kernel runs
        (faster, at the price of one more set of (1 + K) tensors in memory).
      chunk: elements per kernel call (results do not depend on it).
    Returns:
      a :class:`MergeResult`.
    """
    t0 = time.perf_counter()
    cfg = load_config(config)
    out = Path(out)
    if out.exists() and not force:
        raise UnmergeError(f"output {out} already exists; pass --force to overwrite it")
    for p in [cfg.base_model, *[p for p, _ in cfg.models]]:
        if p is not None and out.resolve() == Path(p).resolve():
            raise UnmergeError(f"output {out} is one of the inputs; choose a new directory")
    inputs = _Inputs(cfg)
    n_layers = _n_layers(inputs)
    res_by_name = {}
    for name in inputs.names:
        if inputs.dtypes[name] in _FLOAT_TAGS:
            res_by_name[name] = resolve_for_tensor(cfg, name, layer_fraction(name, n_layers))
    stored = [inputs.dtypes[n] for n in inputs.names if n in res_by_name]
    tag = dtype_tag(dtype or cfg.out_dtype or cfg.dtype or (max(set(stored), key=stored.count) if stored else "F32"))
    lambdas = None
    first = next(iter(res_by_name.values()), None)
    face = first.shared.get("face") if first is not None else None
    if face in GLOBAL_FACES:  # one λ per model for the whole model: the face and r must not vary per tensor
        lambdas = _global_lambdas(cfg, inputs, res_by_name, face, first.shared["r"])
    plan = [(n, inputs.shapes[n], tag if n in res_by_name else inputs.dtypes[n]) for n in inputs.names]
    n_merged = 0
    with atomic_dir(out, force=force) as tmp:
        with ShardedWriter(tmp, plan, max_shard_bytes=shard_bytes,
                           metadata={"merged_by": "unmerge_jax", "merge_method": cfg.merge_method}) as writer:
            # The merged tensor overwrites the base buffer it was computed in, so that buffer is busy
            # until the output is written. Serially one base buffer is enough; with overlap the next
            # tensor is read while the previous one is written, into the other of two base buffers:
            # the K input buffers are free again once the kernel has run, so overlap costs one tensor
            # (2 + K), not a second input set.
            free_slots: queue.Queue = queue.Queue()
            for slot in ((0, -1) if overlap else (0,)):
                free_slots.put(slot)

            def produce(name):
                if name not in res_by_name or inputs.untouched(name):
                    out = inputs.ref.read(name) if name in res_by_name else _raw(inputs.ref, name)
                    return name, out, False, None
                slot = free_slots.get()
                base, ts, deltas = inputs.read(name, base_slot=slot)
                res = res_by_name[name]
                # Every method runs chunk by chunk (a statistics pass first where it needs one) and
                # overwrites the base in place: the only tensor-sized buffers are the 1 + K inputs.
                out = base if base.flags.writeable else base.copy()
                run_kernel(res, out, ts, seed=seed, name=name, deltas=deltas, lambdas=lambdas, chunk=chunk, out=out)
                return name, out, True, slot

            def written(slot):
                if slot is not None:
                    free_slots.put(slot)

            for merged in _stream(inputs.names, produce, writer, overlap, written):
                n_merged += merged
            total = writer.total_size
        src = cfg.base_model if cfg.base_model is not None else cfg.models[0][0]
        write_config(src, tmp, tag)
        copy_side_files(src, tmp)
        resolved = {**cfg.to_dict(), "out_dtype": {v: k for k, v in _TORCH.items()}[tag],
                    "unmerge": {"seed": int(seed), "lambdas": None if lambdas is None else [float(x) for x in lambdas]}}
        (tmp / CONFIG_NAME).write_text(yaml.safe_dump(resolved, sort_keys=False))
    return MergeResult(out, len(inputs.names), n_merged, total, time.perf_counter() - t0,
                       None if lambdas is None else [float(x) for x in lambdas])


_TORCH = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def _raw(ckpt, name):
    """A non-float tensor, copied through unchanged (read as stored)."""
    raw = getattr(ckpt, "read_raw", None)
    if raw is None:
        raise UnmergeError(f"tensor {name} has dtype {ckpt.dtype(name)}; only floating-point tensors can be merged")
    return raw(name)


def _stream(names, produce, writer, overlap: bool, written):
    """Produce and write every tensor, yielding whether it was merged; ``written(slot)`` is called
    once an output is on disk (its buffer may then be reused). With ``overlap`` the next
    read+compute runs in a thread while the main thread writes. Nothing tensor-sized is yielded or
    kept: serially the written output is released before the next tensor is read, so the peak
    stays at the 1 + K inputs; with overlap at 2 + K (two base buffers)."""
    desc = "merging"
    if not overlap:
        for name in progress(names, desc=desc):
            item = produce(name)
            writer.write(item[0], item[1])
            merged = item[2]
            written(item[3])
            del item
            yield merged
        return
    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def worker():
        try:
            for name in names:
                if stop.is_set():
                    return
                q.put(produce(name))
            q.put(None)
        except BaseException as err:  # hand the error to the main thread
            q.put(err)

    th = threading.Thread(target=worker, daemon=True)
    th.start()
    try:
        for _ in progress(range(len(names)), desc=desc, total=len(names)):
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            writer.write(item[0], item[1])
            merged = item[2]
            written(item[3])
            del item
            yield merged
    finally:
        stop.set()
        while th.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                th.join(0.05)
