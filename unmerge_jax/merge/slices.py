"""mergekit's ``slices:`` — layer stacking and per-slice merges, streamed tensor by tensor.

A ``slices:`` config lists output slices; each names ``sources`` (a model reference and a
``layer_range: [lo, hi)``, every source of a slice covering the same number of layers), optionally
its own ``base_model`` and ``parameters``. The output's layers are the slices' layers in order:
output layer ``o + j`` of a slice starting at ``o`` merges layer ``lo_k + j`` of each source ``k``
with the config's method (``passthrough`` for plain stacking: one source per slice), with ``t =
j / (n − 1)`` for gradients (``1`` for a one-layer slice). Tensors outside the layer stack come from
the first slice's sources (embeddings) and the last slice's (final norm, LM head), at ``t = 0`` —
of the last slice only its first sources, as many as the first slice has (mergekit 0.1.5 pairs the
last slice's models with the first slice's count of tensor names; a note says so).
Parameters resolve per source ``parameters`` → slice ``parameters`` → top-level, filters and
gradients evaluated per output tensor name — mergekit 0.1.5's ``MergePlanner`` and ``ConfigReader``.
A method that needs a base takes it from the slice's sources (the source whose model is the
slice's or the config's ``base_model``), as mergekit requires.

Output layer tensors are renamed (``model.layers.{lo_k + j}.…`` → ``model.layers.{o + j}.…``) and
``config.json``'s ``num_hidden_layers`` is the number of output layers. Memory: the inputs of one
output tensor at a time.

Tokenizer settings (``tokenizer_source``, ``tokenizer:``, ``chat_template``) work as with
``models:`` (:mod:`unmerge_jax.merge.tokenizer`): the output vocabulary is built from the base (or
the first source's model) and every model the slices reference, in config order; each vocabulary
tensor is aligned over the sources it is merged from — the first slice's for the embeddings, the
last slice's for the head, that slice's base as the base — as mergekit 0.1.5 does, so a token only
the other slices' models have gets the zero row there (``tokens:`` sources must be among them).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.atomic import atomic_dir, check_output
from unmerge_jax.io.dtypes import TORCH_NAMES, dtype_tag
from unmerge_jax.io.lora import is_adapter_dir
from unmerge_jax.io.names import parse_tensor_name
from unmerge_jax.io.writer import ShardedWriter, copy_side_files, write_config
from unmerge_jax.merge.card import write_recipe
from unmerge_jax.merge.base import short
from unmerge_jax.merge.params import per_model_params
from unmerge_jax.merge.refs import ModelRef, parse_ref, weights_source
from unmerge_jax.progress import progress

_LAYER_NAME = re.compile(r"^((?:.*?\.)?(?:layers|h|blocks|layer)\.)(\d+)(\..+)$")
_SLICE_KEYS = {"sources", "base_model", "parameters", "residual_weight"}
_SOURCE_KEYS = {"model", "layer_range", "parameters"}


@dataclass
class SourceSpec:
    """One source of a slice: a model reference, its layers ``[lo, hi)`` and its parameters."""

    ref: ModelRef
    lo: int
    hi: int
    params: dict

    def to_dict(self) -> dict:
        return {"model": str(self.ref), "layer_range": [self.lo, self.hi], **({"parameters": self.params}
                                                                               if self.params else {})}


@dataclass
class SliceSpec:
    """One output slice. ``base_index``: the source that is the base (methods that need one)."""

    sources: list
    base: ModelRef | None
    params: dict
    base_index: int | None = None
    own_base: bool = False      # the slice names its own base_model

    @property
    def n_layers(self) -> int:
        return self.sources[0].hi - self.sources[0].lo

    @property
    def merged_sources(self) -> list:
        """The sources merged as inputs (the base source excluded where it is the base)."""
        return [s for i, s in enumerate(self.sources) if i != self.base_index]

    def to_dict(self) -> dict:
        d = {"sources": [s.to_dict() for s in self.sources]}
        if self.own_base and self.base is not None:
            d["base_model"] = str(self.base)
        if self.params:
            d["parameters"] = self.params
        return d


def _int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def parse_slices(raw, spec, base_ref, resolve_path, where: str) -> list:
    """``slices:`` as :class:`SliceSpec` s, every structural rule checked (one-line errors)."""
    if not isinstance(raw, list) or not raw:
        raise UnmergeError(f"{where}: slices must be a non-empty list of {{sources: [...]}} entries")
    out = []
    for i, sl in enumerate(raw):
        at = f"{where}: slices[{i}]"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            raise UnmergeError(f"{at}: expected {{sources: [{{model: DIR, layer_range: [LO, HI]}}, ...]}}, got "
                               f"{short(sl)}")
        unknown = sorted(set(sl) - _SLICE_KEYS, key=str)
        if unknown:
            raise UnmergeError(f"{at}: unknown key {short(unknown[0])}; a slice takes sources, base_model, parameters")
        if sl.get("residual_weight") is not None:
            raise UnmergeError(f"{at}: residual_weight is not supported (mergekit 0.1.5 does not apply it either)")
        params = sl.get("parameters") or {}
        if not isinstance(params, dict):
            raise UnmergeError(f"{at}: parameters must be a mapping")
        own_base = bool(sl.get("base_model"))
        base = parse_ref(sl["base_model"], resolve_path, f"{at}: base_model") if own_base else base_ref
        sources = []
        for j, src in enumerate(sl["sources"]):
            sat = f"{at}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise UnmergeError(f"{sat}: expected {{model: DIR, layer_range: [LO, HI]}}, got {short(src)}")
            unknown = sorted(set(src) - _SOURCE_KEYS, key=str)
            if unknown:
                raise UnmergeError(f"{sat}: unknown key {short(unknown[0])}; a source takes model, layer_range, "
                                   f"parameters")
            lr = src["layer_range"]
            if not (isinstance(lr, (list, tuple)) and len(lr) == 2 and all(_int(x) for x in lr)):
                raise UnmergeError(f"{sat}: layer_range must be two integers [LO, HI], got {short(lr)}")
            lo, hi = int(lr[0]), int(lr[1])
            if not 0 <= lo < hi:
                raise UnmergeError(f"{sat}: layer_range [{lo}, {hi}] is empty or negative; give 0 <= LO < HI (HI "
                                   f"excluded)")
            sp = per_model_params(src.get("parameters"), spec, sat)
            ref = parse_ref(src["model"], resolve_path, sat)
            if ref.lora is None and is_adapter_dir(ref.model):
                raise UnmergeError(f"{sat}: {ref.model} is a LoRA adapter; a slice source is a model (write "
                                   f"MODEL+ADAPTER to apply it)")
            sources.append(SourceSpec(ref, lo, hi, sp))
        lengths = sorted({s.hi - s.lo for s in sources})
        if len(lengths) > 1:
            raise UnmergeError(f"{at}: its sources cover {' and '.join(map(str, lengths))} layers; every source of a "
                               f"slice must give the same number of layers")
        base_index = None
        if spec.needs_base:
            if base is None:
                raise UnmergeError(f"{at}: merge method {spec.name!r} needs a base_model (top-level or the slice's)")
            idx = [k for k, s in enumerate(sources) if s.ref == base]
            if not idx:
                raise UnmergeError(f"{at}: merge method {spec.name!r} takes its base from the slice's sources, and "
                                   f"{base} is not among them; add {{model: {base}, layer_range: [LO, HI]}}")
            base_index = idx[0]
            if len(sources) < 2:
                raise UnmergeError(f"{at}: only the base model is listed; add the models to merge")
        if spec.name == "passthrough" and len(sources) != 1:
            raise UnmergeError(f"{at}: passthrough takes exactly one source per slice, got {len(sources)}")
        out.append(SliceSpec(sources, base, dict(params), base_index, own_base))
    return out


def _n_layers(src) -> int | None:
    cfg = getattr(src, "config", None) or {}
    n = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    if n:
        return int(n)
    idx = [i for i in (parse_tensor_name(n).layer for n in src.names) if i is not None]
    return max(idx) + 1 if idx else None


class _Job:
    """One output tensor: its name, slice, ``t``, and per source the input tensor name."""

    __slots__ = ("name", "slice", "t", "inputs", "group")

    def __init__(self, name, sl, t, inputs):
        self.name, self.slice, self.t, self.inputs = name, sl, t, inputs
        self.group = None     # a vocabulary tensor's rows aligned to the output tokenizer (VocabGroup)


def _head_slice(last: SliceSpec, n_first: int) -> SliceSpec:
    """The slice the tensors after the layer stack (final norm, head) are merged from: mergekit
    0.1.5 pairs the last slice's sources with as many tensor names as the *first* slice has
    sources, so only the last slice's first ``n_first`` sources take part (refused where that
    leaves out the base the method needs)."""
    if len(last.sources) <= n_first:
        return last
    if last.base_index is not None and last.base_index >= n_first:
        raise UnmergeError(f"merge config: the last slice's base {last.base} is source {last.base_index + 1} of "
                           f"{len(last.sources)}, but mergekit merges the tensors after the layer stack from its first "
                           f"{n_first} sources only (as many as the first slice has); list the base earlier")
    return SliceSpec(last.sources[:n_first], last.base, last.params, last.base_index, last.own_base)


def plan_jobs(cfg, sources: dict, aligned: bool = False) -> tuple[list, list]:
    """The output tensors in order (embeddings, the slices' layers, the rest) and, per output
    layer, ``(reference, input layer)`` of the slice's first source; every input tensor checked to
    exist with one shape (``aligned``: vocabulary tensors, whose rows are aligned to the output
    tokenizer, with one row width)."""
    from unmerge_jax.merge.tokenizer import AlignedVocabulary

    slices = cfg.slices
    for i, sl in enumerate(slices):
        for j, s in enumerate(sl.sources):
            n = _n_layers(sources[s.ref])
            if n is None or s.hi > n:
                raise UnmergeError(f"merge config: slices[{i}].sources[{j}]: layer_range [{s.lo}, {s.hi}] goes beyond "
                                   f"the {n or 0} layers of {s.ref}")
    jobs, o, layer_map = [], 0, []
    first, last = slices[0], slices[-1]
    outside = [n for n in sources[first.sources[0].ref].names if not _LAYER_NAME.match(n)]
    pre = [n for n in outside if parse_tensor_name(n).module_class == "embedding"]
    post = [n for n in outside if n not in pre]
    for name in pre:
        jobs.append(_Job(name, first, 0.0, [name] * len(first.sources)))
    for sl in slices:
        n = sl.n_layers
        template = sources[sl.sources[0].ref]
        for j in range(n):
            t = j / (n - 1) if n > 1 else 1.0
            for name in template.names:
                m = _LAYER_NAME.match(name)
                if not m or int(m.group(2)) != sl.sources[0].lo + j:
                    continue
                prefix, suffix = m.group(1), m.group(3)
                jobs.append(_Job(f"{prefix}{o + j}{suffix}", sl, t, [f"{prefix}{s.lo + j}{suffix}" for s in sl.sources]))
        o += n
        layer_map += [(sl.sources[0].ref, sl.sources[0].lo + j) for j in range(n)]
    tail = _head_slice(last, len(first.sources))
    for name in post:
        jobs.append(_Job(name, tail, 0.0, [name] * len(tail.sources)))
    for job in jobs:
        shapes = set()
        for s, name in zip(job.slice.sources, job.inputs):
            src = sources[s.ref]
            if name not in src:
                raise UnmergeError(f"{s.ref} has no tensor {name} (for output {job.name}); the sources of a slice "
                                   f"must share one architecture")
            shape = tuple(src.shape(name))
            shapes.add(shape[1:] if aligned and AlignedVocabulary.is_vocab_tensor(name, shape) else shape)
        if len(shapes) > 1:
            raise UnmergeError(f"shape mismatch for output tensor {job.name}: the sources hold {sorted(shapes)}; "
                               f"inputs must share one architecture (differing vocabularies: set tokenizer_source)")
    return jobs, layer_map


def merge_slices(cfg, out, *, seed: int, force: bool, dtype, shard_bytes: int, compute: str, chunk: int,
                 notes: list, t0: float):
    """Run a ``slices:`` config (see the module docstring); returns a ``MergeResult``."""
    from unmerge_jax.merge import tokenizer as tokenization
    from unmerge_jax.merge.driver import MergeResult, output_limit
    from unmerge_jax.merge.config import resolve_slice
    from unmerge_jax.merge.mergekit_bf16 import merge_tensor_bf16
    from unmerge_jax.merge.tensor import merge_resolved

    out = Path(out)
    inputs = [*cfg.input_paths, *tokenization.extra_inputs(cfg.tokenizer)]
    check_output(out, inputs, directory=True, force=force)
    sources = {}
    for sl in cfg.slices:
        for s in sl.sources:
            if s.ref not in sources:
                sources[s.ref] = weights_source(s.ref)
    toks = None
    if cfg.tokenizer is not None:   # the models in config order (mergekit's referenced models)
        models = list(dict.fromkeys(s.ref.model for sl in cfg.slices for s in sl.sources))
        toks = tokenization.prepare(cfg.tokenizer, cfg.base_model, models, check_sizes=False)
    vocab = toks if isinstance(toks, tokenization.AlignedVocabulary) else None
    jobs, layer_map = plan_jobs(cfg, sources, aligned=vocab is not None)
    n_first, n_last = len(cfg.slices[0].sources), len(cfg.slices[-1].sources)
    if n_last > n_first:
        notes.append(f"the tensors after the layer stack (final norm, head) are merged from the last slice's first "
                     f"{n_first} of its {n_last} sources (as many as the first slice has), as in mergekit")
    if vocab is not None:
        _align_vocabulary(cfg, jobs, sources, vocab)
    res_of = {}
    for job in jobs:
        src = sources[job.slice.sources[0].ref]
        if src.is_float(job.inputs[0]):
            res = resolve_slice(cfg, job.slice, job.name, job.t)
            if res.method.statistics(res) == "model":
                raise UnmergeError(f"merge method {cfg.merge_method!r} with face {res.shared.get('face')!r} counts the "
                                   f"whole model, which slices do not have; use a per-tensor face")
            res_of[job.name] = res
    first_src = lambda job: sources[job.slice.sources[0].ref]   # noqa: E731
    stored = [first_src(j).dtype(j.inputs[0]) for j in jobs if j.name in res_of]
    tag = dtype_tag(dtype or cfg.out_dtype or cfg.dtype or (max(set(stored), key=stored.count) if stored else "F32"))
    limit = output_limit(tag)
    def out_shape(job):
        shape = tuple(first_src(job).shape(job.inputs[0]))
        return shape if job.group is None else (vocab.n_rows, *shape[1:])

    plan = [(j.name, out_shape(j), tag if j.name in res_of else first_src(j).dtype(j.inputs[0])) for j in jobs]
    src_dir = cfg.base_model if cfg.base_model is not None else cfg.slices[0].sources[0].ref.model
    n_merged = 0
    with atomic_dir(out, force=force, inputs=inputs) as tmp:
        with ShardedWriter(tmp, plan, max_shard_bytes=shard_bytes,
                           metadata={"merged_by": "unmerge_jax", "merge_method": cfg.merge_method}) as writer:
            for job in progress(jobs, desc="merging slices"):
                sl = job.slice
                if job.name not in res_of:
                    writer.write(job.name, first_src(job).read_raw(job.inputs[0]))
                    continue
                res = res_of[job.name]
                if job.group is None:
                    reads = [sources[s.ref].read(n) for s, n in zip(sl.sources, job.inputs)]
                else:
                    reads = [job.group.aligned(pos, n) for pos, n in enumerate(job.inputs)]
                if sl.base_index is not None:
                    b = reads[sl.base_index]
                    b = b if b.flags.writeable else b.copy()
                    ts, deltas = tuple(r for k, r in enumerate(reads) if k != sl.base_index), False
                else:
                    b, ts, deltas = np.zeros(reads[0].shape, np.float32), tuple(reads), True
                if compute == "bfloat16":
                    merged = merge_tensor_bf16(res, b, ts, deltas=deltas, full=sl.base_index is None)
                    bad = ~(np.abs(merged) < limit)
                    if bad.any():
                        raise UnmergeError(f"the merged value of tensor {job.name} is not finite or beyond the output "
                                           f"dtype; check the inputs and weights")
                else:
                    merged = merge_resolved(res, b, ts, seed=seed, name=job.name, deltas=deltas, chunk=chunk, out=b,
                                            limit=limit)
                writer.write(job.name, merged)
                n_merged += 1
                del reads, b, ts, merged
            total = writer.total_size
        write_config(src_dir, tmp, tag)
        _set_layers(tmp / "config.json", [(getattr(sources[r], "config", None) or {}, i) for r, i in layer_map])
        side = copy_side_files(src_dir, tmp)
        if toks is not None:   # a built tokenizer (or the donor's with a chat template) replaces the copied files
            toks.write(tmp)
        write_recipe(tmp, {**cfg.to_dict(), "out_dtype": TORCH_NAMES[tag]}, out.name, seed=seed, run={"seed": int(seed)})
    return MergeResult(out, len(jobs), n_merged, total, time.perf_counter() - t0, None, tuple(side.skipped),
                       tuple(notes) + (tuple(toks.notes) if toks is not None else ()))


def _align_vocabulary(cfg, jobs: list, sources: dict, vocab) -> None:
    """Give each vocabulary tensor's job the alignment of its slice's sources (mergekit aligns the
    models a tensor is gathered from: the first slice's for the embeddings, the last slice's for
    the head, with that slice's base), checked before anything is read."""
    groups = {}
    for job in jobs:
        sl = job.slice
        name = job.inputs[0]
        if not vocab.is_vocab_tensor(name, sources[sl.sources[0].ref].shape(name)):
            continue
        if id(sl) not in groups:
            i = next((k for k, x in enumerate(cfg.slices) if x is sl), len(cfg.slices) - 1)   # else the head's view
            base = next((k for k, s in enumerate(sl.sources) if sl.base is not None and s.ref == sl.base), None)
            groups[id(sl)] = vocab.group([s.ref.model for s in sl.sources], [sources[s.ref] for s in sl.sources], base,
                                         f"the sources of slices[{i}], which tensor {job.name} is merged from")
        job.group = groups[id(sl)]
        job.group.check(name)


def _set_layers(path: Path, layers: list) -> None:
    """``num_hidden_layers`` of the output, and a per-layer ``layer_types`` list rebuilt from the
    source layer each output layer comes from (``layers``: ``(source config, layer)`` per output layer)."""
    if not path.exists():
        return
    cfg = json.loads(path.read_text())
    for key in ("num_hidden_layers", "n_layer"):
        if key in cfg:
            cfg[key] = len(layers)
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = [(c.get("layer_types") or cfg["layer_types"])[i] for c, i in layers]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
