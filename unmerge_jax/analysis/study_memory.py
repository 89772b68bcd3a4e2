"""Memory study (the sparsity-scaling paper's Table 4, Figure 6): naive vs streaming peak memory from real shapes,
and the measured peak RSS of actual streaming merges of small generated checkpoints against the
same formula.
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


def _small_layouts():
    def llama(h, inter, layers, vocab):
        out = [("model.embed_tokens.weight", (vocab, h))]
        for i in range(layers):
            p = f"model.layers.{i}."
            out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "mlp.up_proj.weight", (inter, h)),
                    (p + "mlp.down_proj.weight", (h, inter)), (p + "input_layernorm.weight", (h,))]
        return out + [("lm_head.weight", (vocab, h))]
    return {"small-a": llama(512, 2048, 8, 16000), "small-b": llama(1024, 4096, 4, 32000)}


def memory_study(out, *, n_agents: int = 3, measure: bool = True):
    """Write ``table4``, ``memory_measured`` (with ``measure``) and ``fig6_memory.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = memory_table(n_agents)
    keep = ("size", "arch", "n_params", "fp16_gb", "naive_gb", "largest_tensor", "stream_tensor_gb",
            "stream_no_embed_gb", "stream_layer_gb", "reduction_tensor", "paper_fp16_gb", "paper_naive_gb",
            "paper_stream_gb", "paper_reduction")
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
    return {"table4": rows, "measured": measured}


def _plot(path, rows):
    fig, (a1, a2) = figure()
    x = np.arange(len(rows))
    w = 0.2
    for j, (key, lab) in enumerate((("naive_gb", "naive fp16 (paper formula)"), ("stream_tensor_gb", "stream, per tensor (ours)"),
                                    ("stream_layer_gb", "stream, per layer"), ("paper_stream_gb", "paper stream"))):
        a1.bar(x + (j - 1.5) * w, [r.get(key) or 0 for r in rows], w, label=lab)
    a1.set(yscale="log", xticks=x, xticklabels=[r["size"] for r in rows], ylabel="GB", title="(a) peak memory, 3 agents")
    a1.legend(fontsize=7)
    a2.plot([r["size"] for r in rows], [r["reduction_tensor"] for r in rows], "o-", label="naive / stream per tensor")
    a2.plot([r["size"] for r in rows], [r.get("paper_reduction") for r in rows], "s--", label="paper")
    a2.set(yscale="log", ylabel="reduction ×", title="(b) reduction factor")
    a2.legend(fontsize=8)
    save_figure(fig, path)
