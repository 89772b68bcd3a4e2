"""Memory study (the sparsity-scaling paper's Table 4, Figure 6): naive vs streaming peak memory from real shapes,
the measured peak RSS of actual streaming merges of small generated checkpoints against the
per-tensor formula, and the measured peak RSS of row-block merges of **virtual** models of the
real shapes (tensors generated on the fly from seeds, never on disk; :func:`measure_virtual_merge`)
beside mergekit's per-tensor bound from the same shapes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

from unmerge_jax.analysis.memory import memory_table, predicted_stream_bytes
from unmerge_jax.analysis.report import figure, save_figure, write_table

# A child process builds K+1 random F32 checkpoints of the given layout, then samples its
# anonymous RSS (RssAnon, every 2 ms) during a streaming `unmerge_jax.merge`: peak − before.
# File-backed pages of the mmap'd inputs are excluded — they are page cache, not held memory.
_CHILD = textwrap.dedent("""
    import json, resource, sys, pathlib
    import numpy as np
    from safetensors.numpy import save_file
    spec = json.loads(sys.argv[1]); root = pathlib.Path(spec["dir"])
    import unmerge_jax
    rng = np.random.default_rng(0)
    dirs = []
    for m in range(spec["k"] + 1):
        d = root / f"m{m}"; d.mkdir(parents=True, exist_ok=True)
        for i, (name, shape) in enumerate(spec["shapes"]):
            save_file({name: rng.standard_normal(shape, dtype=np.float32)}, str(d / f"t{i:04d}.safetensors"))
        dirs.append(str(d))
    from unmerge_jax.analysis.study_memory import write_index
    for d in dirs: write_index(d)
    import gc, threading, time; gc.collect()
    def anon():  # anonymous RSS: mmap'd input pages (file-backed, reclaimable) are not counted
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    base_anon, peak, done = anon(), [0], [False]
    def poll():
        while not done[0]:
            peak[0] = max(peak[0], anon()); time.sleep(0.002)
    th = threading.Thread(target=poll); th.start()
    cfg = {"merge_method": spec["method"], "base_model": dirs[0],
           "models": [{"model": d, "parameters": {"weight": 1.0}} for d in dirs[1:]], "dtype": "float32"}
    unmerge_jax.merge(cfg, str(root / "out"))
    done[0] = True; th.join()
    print(json.dumps({"anon_before": base_anon, "anon_peak": max(peak[0], anon())}))
""")


def write_index(d):
    """A ``model.safetensors.index.json`` for a directory of one-tensor shards."""
    from safetensors import safe_open

    d = Path(d)
    wm = {}
    for f in sorted(d.glob("t*.safetensors")):
        with safe_open(str(f), "numpy") as fh:
            for k in fh.keys():
                wm[k] = f.name
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def measure_merge_rss(shapes, n_agents: int, workdir, *, method: str = "task_arithmetic") -> dict:
    """Peak RSS growth of one streaming merge in a fresh process vs the ``(1+K)·max·4`` formula."""
    spec = {"dir": str(workdir), "k": n_agents, "shapes": [[n, list(s)] for n, s in shapes], "method": method}
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True)
    if r.returncode != 0:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit status {r.returncode}"
        raise RuntimeError(f"the streaming merge measured in a child process failed: {last}")
    m = json.loads(r.stdout.strip().splitlines()[-1])
    pred = predicted_stream_bytes(shapes, n_agents)
    total = sum(int(np.prod(s)) for _, s in shapes)
    grow = max(m["anon_peak"] - m["anon_before"], 0)
    return {"n_params": total, "largest_tensor_mb": max(int(np.prod(s)) for _, s in shapes) * 4 / 1e6,
            "agents": n_agents, "method": method, "naive_f32_mb": (1 + n_agents) * total * 4 / 1e6,
            "predicted_stream_mb": pred / 1e6, "measured_peak_anon_growth_mb": grow / 1e6,
            "ratio_measured_to_predicted": grow / pred}


# Virtual models: every tensor a seeded function of (seed, tensor name, group of GROUP flat entries),
# so any row block is generated on its own and equals the same rows of the whole tensor.
GROUP = 1 << 16
# Each group is a slice of one seeded pool of POOL uniform values, at an offset hashed from (name,
# group): a copy, ~40x faster here than drawing every value (PCG64 per group), so a 70B-class model
# can be generated in minutes. The pool (4 MiB per model) is the only thing a virtual model holds.
POOL = 1 << 20


def _group_offsets(key: int, g0: int, g1: int) -> np.ndarray:
    """Pool offsets of groups ``g0 .. g1 − 1`` of the tensor whose name hashes to ``key`` (splitmix64)."""
    with np.errstate(over="ignore"):
        h = np.arange(g0, g1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(key)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(32)
    return (h % np.uint64(POOL)).astype(np.int64)


def virtual_model(shapes, seed: int, scale: float, kind: str):
    """A :class:`~unmerge_jax.sources.VirtualSource` of ``shapes`` (``{name: shape}``) whose values are
    uniform with mean 0 and standard deviation ``scale``: group g of :data:`GROUP` flat entries of
    tensor ``name`` is the slice of a pool of :data:`POOL` + GROUP values drawn once from ``seed``
    (NumPy PCG64) that starts at an offset hashed from ``(crc32(name), g)``, so row blocks are exact
    (``generate_rows``) and nothing but the pool is stored."""
    from unmerge_jax.kernels.random import name_hash
    from unmerge_jax.sources import VirtualSource

    shapes = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
    half = np.float32(scale * np.sqrt(3.0))
    pool = np.random.Generator(np.random.PCG64(seed)).random(POOL + GROUP, dtype=np.float32)
    pool -= np.float32(0.5)
    pool *= np.float32(2.0) * half

    def rows(name, lo, hi):
        shape = shapes[name]
        row = int(np.prod(shape[1:], dtype=np.int64))
        a, b = lo * row, hi * row
        out = np.empty(b - a, np.float32)
        g0, g1 = a // GROUP, -(-b // GROUP)
        for g, off in zip(range(g0, g1), _group_offsets(int(name_hash(name)), g0, g1).tolist()):
            s0, s1 = max(a, g * GROUP), min(b, (g + 1) * GROUP)
            start = off + s0 - g * GROUP
            out[s0 - a:s1 - a] = pool[start:start + s1 - s0]
        return out.reshape((hi - lo,) + shape[1:])

    def whole(name):
        shape = shapes[name]
        return rows(name, 0, shape[0]) if shape else rows(name, 0, 1).reshape(())

    return VirtualSource(shapes, whole, kind=kind, label=f"virtual model (seed {seed})", generate_rows=rows)


def virtual_layout(arch: str, layers: int | None = None) -> dict:
    """``{name: shape}`` of ``arch`` (:func:`~unmerge_jax.analysis.architectures.tensor_shapes`) with
    its embeddings, final norm and lm_head and the first ``layers`` transformer layers (all: None)."""
    from unmerge_jax.analysis.architectures import tensor_shapes
    from unmerge_jax.analysis.names import classify

    out = {}
    for name, shape in tensor_shapes(arch):
        layer = classify(name)[0]
        if layers is None or layer is None or layer < layers:
            out[name] = tuple(shape)
    return out


def _anon_and_rss():
    got = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("RssAnon:", "VmRSS:", "VmHWM:")):
                key, val = line.split(":")
                got[key] = int(val.split()[0]) * 1024
    return got


def run_virtual_merge(spec: dict) -> dict:
    """Run one row-block merge of virtual models in this process and sample its memory (the body of
    :func:`measure_virtual_merge`'s child process; call it in a fresh process).

    ``spec``: ``arch``, ``layers`` (None: all), ``k`` (inputs besides the base), ``method``,
    ``params`` (method-wide), ``chunk``, ``whole_max``. The base is a virtual weights model (std
    0.02), each input a virtual task vector (std 0.002, its own seed); the merged tensors go to a
    :class:`~unmerge_jax.io.writer.NullWriter` (cast to bfloat16, discarded). Returns the peak RSS
    (``VmHWM``), the peak anonymous RSS sampled every 5 ms, both before the merge, the time, and the
    generated values.
    """
    import gc
    import threading
    import time

    from unmerge_jax.io.writer import NullWriter
    from unmerge_jax.merge.chunks import CHUNK
    from unmerge_jax.merge.driver import WHOLE_MAX, merge_sources
    from unmerge_jax.sources import DELTA, WEIGHTS

    shapes = virtual_layout(spec["arch"], spec.get("layers"))
    base = virtual_model(shapes, 0, 0.02, WEIGHTS)
    models = [virtual_model(shapes, 1 + i, 0.002, DELTA) for i in range(spec["k"])]
    plan = [(n, shapes[n], "BF16") for n in sorted(shapes)]
    gc.collect()
    before = _anon_and_rss()
    peak, done = [before["RssAnon"]], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _anon_and_rss()["RssAnon"])
            time.sleep(0.005)
    th = threading.Thread(target=poll, daemon=True)
    th.start()
    t0 = time.perf_counter()
    writer = NullWriter(plan)
    n_merged = merge_sources(base, models, spec["method"], writer, params=spec.get("params") or {},
                             chunk=spec.get("chunk") or CHUNK, whole_max=spec.get("whole_max", WHOLE_MAX),
                             tag="BF16")
    writer.close()
    seconds = time.perf_counter() - t0
    done.set()
    th.join()
    after = _anon_and_rss()
    n_params = sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())
    return {"arch": spec["arch"], "layers": spec.get("layers"), "k": spec["k"], "method": spec["method"],
            "params": spec.get("params") or {}, "n_tensors": len(shapes), "n_merged": n_merged,
            "n_params": n_params, "largest_tensor_params": max(int(np.prod(s, dtype=np.int64)) for s in shapes.values()),
            "bytes_discarded": writer.written, "seconds": seconds,
            "rss_before": before["VmRSS"], "anon_before": before["RssAnon"],
            "peak_rss": after["VmHWM"], "peak_anon_sampled": max(peak[0], after["RssAnon"])}


_VIRTUAL_CHILD = textwrap.dedent("""
    import json, sys
    from unmerge_jax.analysis.study_memory import run_virtual_merge
    print(json.dumps(run_virtual_merge(json.loads(sys.argv[1]))))
""")


def measure_virtual_merge(arch: str, *, layers: int | None = None, n_agents: int = 3, method: str = "ties",
                          params: dict | None = None, chunk: int | None = None, whole_max: int | None = None) -> dict:
    """Peak memory of a row-block merge of base + ``n_agents`` virtual models of ``arch`` (the first
    ``layers`` layers plus embeddings and lm_head; all: None), measured in a fresh process
    (:func:`run_virtual_merge`), beside the per-tensor bounds from the same shapes: ours when
    tensors are held whole, ``(1 + K)·max·4``, and mergekit's, whose loader holds the K + 1 input
    tensors and the output of the largest tensor, ``(K + 2)·max·b`` (b = 2 for bfloat16, 4 for
    float32). Sizes in GB (1e9 bytes)."""
    import os

    spec = {"arch": arch, "layers": layers, "k": n_agents, "method": method, "params": params or {}}
    if chunk is not None:
        spec["chunk"] = chunk
    if whole_max is not None:
        spec["whole_max"] = whole_max
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    r = subprocess.run([sys.executable, "-c", _VIRTUAL_CHILD, json.dumps(spec)], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit status {r.returncode}"
        raise RuntimeError(f"the virtual merge measured in a child process failed: {last}")
    m = json.loads(r.stdout.strip().splitlines()[-1])
    big = m["largest_tensor_params"]
    gb = 1e9
    m.update(peak_rss_gb=m["peak_rss"] / gb, peak_anon_gb=m["peak_anon_sampled"] / gb,
             runtime_gb=m["rss_before"] / gb, growth_gb=(m["peak_anon_sampled"] - m["anon_before"]) / gb,
             per_tensor_f32_gb=(1 + n_agents) * big * 4 / gb,
             mergekit_bf16_gb=(n_agents + 2) * big * 2 / gb, mergekit_f32_gb=(n_agents + 2) * big * 4 / gb)
    m["ratio_mergekit_bf16_to_measured"] = m["mergekit_bf16_gb"] / m["peak_rss_gb"]
    m["ratio_per_tensor_to_measured"] = m["per_tensor_f32_gb"] / m["peak_rss_gb"]
    return m


def _small_layouts():
    def llama(h, inter, layers, vocab):
        out = [("model.embed_tokens.weight", (vocab, h))]
        for i in range(layers):
            p = f"model.layers.{i}."
            out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "mlp.up_proj.weight", (inter, h)),
                    (p + "mlp.down_proj.weight", (h, inter)), (p + "input_layernorm.weight", (h,))]
        return out + [("lm_head.weight", (vocab, h))]
    return {"small-a": llama(512, 2048, 8, 16000), "small-b": llama(1024, 4096, 4, 32000)}


# The order statistics of TIES / RAM keep the values inside a sampled bracket around each wanted rank:
# about this fraction of a tensor's entries per model (6 binomial standard deviations of a 2¹⁶ sample
# either side of rank 0.2·n) — the one buffer of a row-block merge that grows with the largest tensor.
BRACKET_FRACTION = 0.019


def rows_formula_bytes(largest: int, n_agents: int) -> float:
    """The buffers of a row-block merge (no runtime): the whole-read tensors, ``(1 + K)·min(max,
    WHOLE_MAX)·4``; ``(K + 4)`` chunks (base and K inputs, padding, output, writer); the order
    statistics' bracket, ``K·BRACKET_FRACTION·max·4`` bytes."""
    from unmerge_jax.merge.chunks import CHUNK
    from unmerge_jax.merge.driver import WHOLE_MAX

    return ((1 + n_agents) * min(largest, WHOLE_MAX) * 4 + (n_agents + 4) * CHUNK * 4
            + n_agents * BRACKET_FRACTION * largest * 4)


def table4(n_agents: int = 3, measured: dict | None = None) -> list:
    """Table 4 rows (:func:`~unmerge_jax.analysis.memory.memory_table`) with mergekit's per-tensor
    bound ``(K + 2)·max·2`` (bfloat16) and the row-block column: ``measured[size]`` (a
    :func:`measure_virtual_merge` result: its peak RSS) where given, else :func:`rows_formula_bytes`
    plus the runtime of the largest measured run (or none), labelled by ``stream_rows_source``."""
    measured = measured or {}
    runtime = max((m["rss_before"] for m in measured.values()), default=0)
    rows = []
    for r in memory_table(n_agents):
        big = r["largest_tensor_params"]
        m = measured.get(r["size"])
        if m is not None:
            got, how = m["peak_rss"] / 1e9, f"measured ({m['method']}, {m['layers']} layer(s) + embeddings)"
        else:
            got = (rows_formula_bytes(big, n_agents) + runtime) / 1e9
            how = "formula (buffers" + (" + measured runtime)" if runtime else ", without the runtime)")
        rows.append({**r, "mergekit_bf16_gb": (n_agents + 2) * big * 2 / 1e9, "stream_rows_gb": got,
                     "stream_rows_source": how, "reduction_rows": r["naive_gb"] / got})
    return rows


def memory_study(out, *, n_agents: int = 3, measure: bool = True, virtual: bool = False, virtual_sizes="70B",
                 virtual_layers: int = 1, virtual_method: str = "ties"):
    """Write ``table4``, ``memory_measured`` (with ``measure``), ``memory_virtual`` (with ``virtual``:
    row-block merges of virtual models of ``virtual_sizes``, their embeddings, lm_head and first
    ``virtual_layers`` layers, in fresh processes; minutes per size) and ``fig6_memory.png``."""
    from unmerge_jax.analysis.architectures import PAPER_MEMORY_ARCHS

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    virt = {}
    if virtual:
        sizes = [s.strip() for s in (virtual_sizes.split(",") if isinstance(virtual_sizes, str) else virtual_sizes)]
        for size in sizes:
            virt[size] = measure_virtual_merge(PAPER_MEMORY_ARCHS[size], layers=virtual_layers, n_agents=n_agents,
                                               method=virtual_method, params=VIRTUAL_PARAMS[virtual_method])
        write_table(out, "memory_virtual", [{"size": k, **{c: v[c] for c in _VIRTUAL_KEYS}} for k, v in virt.items()],
                    title="Measured peak RSS of row-block merges of virtual models", floatfmt=".4g")
    rows = table4(n_agents, virt)
    keep = ("size", "arch", "n_params", "fp16_gb", "naive_gb", "largest_tensor", "stream_tensor_gb",
            "stream_no_embed_gb", "stream_layer_gb", "mergekit_bf16_gb", "stream_rows_gb", "stream_rows_source",
            "reduction_tensor", "reduction_rows", "paper_fp16_gb", "paper_naive_gb", "paper_stream_gb",
            "paper_reduction")
    write_table(out, "table4", [{k: r.get(k) for k in keep} for r in rows],
                title=f"Table 4 — peak memory of merging {n_agents} agents (GB = 1e9 bytes)", floatfmt=".4g")
    measured = []
    if measure:
        for label, shapes in _small_layouts().items():
            with tempfile.TemporaryDirectory(dir=out) as tmp:
                row = measure_merge_rss(shapes, n_agents, tmp)
            measured.append({"layout": label, **row})
        write_table(out, "memory_measured", measured, title="Measured peak RSS of streaming merges", floatfmt=".4g")
    _plot(out / "fig6_memory.png", rows)
    return {"table4": rows, "measured": measured, "virtual": virt}


VIRTUAL_PARAMS = {"ties": {"density": 0.2}, "ram": {"face": "percentile"}}
_VIRTUAL_KEYS = ("arch", "layers", "method", "n_params", "largest_tensor_params", "seconds", "runtime_gb",
                 "peak_rss_gb", "peak_anon_gb", "per_tensor_f32_gb", "mergekit_bf16_gb",
                 "ratio_per_tensor_to_measured", "ratio_mergekit_bf16_to_measured")


def _plot(path, rows):
    fig, (a1, a2) = figure()
    x = np.arange(len(rows))
    w = 0.16
    for j, (key, lab) in enumerate((("naive_gb", "naive fp16 (paper formula)"), ("stream_tensor_gb", "stream, per tensor"),
                                    ("stream_layer_gb", "stream, per layer"), ("stream_rows_gb", "stream, row blocks"),
                                    ("paper_stream_gb", "paper stream"))):
        a1.bar(x + (j - 2) * w, [r.get(key) or 0 for r in rows], w, label=lab)
    a1.set(yscale="log", xticks=x, xticklabels=[r["size"] for r in rows], ylabel="GB", title="(a) peak memory, 3 agents")
    a1.legend(fontsize=7)
    a2.plot([r["size"] for r in rows], [r["reduction_tensor"] for r in rows], "o-", label="naive / stream per tensor")
    a2.plot([r["size"] for r in rows], [r["reduction_rows"] for r in rows], "^-", label="naive / stream row blocks")
    a2.plot([r["size"] for r in rows], [r.get("paper_reduction") for r in rows], "s--", label="paper")
    a2.set(yscale="log", ylabel="reduction ×", title="(b) reduction factor")
    a2.legend(fontsize=8)
    save_figure(fig, path)
