"""Sparsity-metric throughput on a generated multi-GB sharded checkpoint vs a plain read of the
same bytes, side by side in one run.

    python bench/sparsity.py [--gb 2] [--dir /tmp/unmerge_bench_sparsity] [--keep]

Writes F32 shards of a sparse log-normal task vector (Llama-like tensor names), warms the page
cache with one plain read, then times (best of --repeat):
  * plain read: every tensor read as float32 through the tensor source the metrics read
    (``CheckpointSource(dir, kind="delta")``) + one max (so the bytes are actually touched);
  * metrics in hist mode, 2 passes (exact L0: reads twice), hist mode 1 pass, and exact mode;
  * the same on tensors already in memory (compute only), beside an in-memory max.
Prints GB/s (checkpoint bytes / seconds) and the ratio to the plain read; writes JSON under
bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np


def make_checkpoint(root: Path, gb: float, seed: int = 0) -> tuple[int, int]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    h, inter = 2048, 8192
    per_layer = [("self_attn.q_proj.weight", (h, h)), ("self_attn.o_proj.weight", (h, h)),
                 ("mlp.up_proj.weight", (inter, h)), ("mlp.down_proj.weight", (h, inter)),
                 ("input_layernorm.weight", (h,))]
    layer_bytes = sum(int(np.prod(s)) for _, s in per_layer) * 4
    n_layers = max(1, int(gb * 1e9 // layer_bytes))
    root.mkdir(parents=True, exist_ok=True)
    wm, total = {}, 0
    for i in range(n_layers):
        shard = {}
        for m, shape in per_layer:
            n = int(np.prod(shape))
            x = np.zeros(n, np.float32)
            k = int(0.05 * n)
            idx = rng.choice(n, k, replace=False)
            x[idx] = (np.exp(rng.normal(-3, 1.5, k)) * rng.choice([-1, 1], k)).astype(np.float32)
            shard[f"model.layers.{i}.{m}"] = x.reshape(shape)
            total += x.nbytes
        fn = f"model-{i + 1:05d}-of-{n_layers:05d}.safetensors"
        save_file(shard, str(root / fn))
        wm.update({k: fn for k in shard})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}))
    return total, len(wm)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/unmerge_bench_sparsity"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    args = ap.parse_args()
    os.environ.setdefault("UNMERGE_PROGRESS", "0")
    from unmerge_jax.analysis.metrics import sparsity_metrics
    from unmerge_jax.sources import CheckpointSource

    t0 = time.perf_counter()
    nbytes, ntensors = make_checkpoint(args.dir, args.gb)
    gen_s = time.perf_counter() - t0
    src = CheckpointSource(args.dir, kind="delta")
    how, names = "unmerge_jax.sources.CheckpointSource", src.names

    def plain():
        s = 0.0
        for n in names:
            s += float(src.read(n).max())  # touch every byte (SIMD max: cheaper than any metric)
        return s

    cases = {
        "plain_read": plain,
        "metrics_hist_2pass": lambda: sparsity_metrics(src, mode="hist", passes=2, per_tensor=False),
        "metrics_hist_1pass": lambda: sparsity_metrics(src, mode="hist", passes=1, per_tensor=False),
        "metrics_exact": lambda: sparsity_metrics(src, mode="exact", per_tensor=False),
    }
    plain()  # warm the page cache: every case reads warm bytes
    held = {n: src.read(n) for n in names}  # compute-only cases: tensors already in memory (read in place)
    cases["in_memory_max"] = lambda: sum(float(v.max()) for v in held.values())
    cases["in_memory_metrics_hist_1pass"] = lambda: sparsity_metrics(held, mode="hist", passes=1, per_tensor=False)
    cases["in_memory_metrics_exact"] = lambda: sparsity_metrics(held, mode="exact", per_tensor=False)
    results = {}
    for name, fn in cases.items():
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        results[name] = {"seconds": min(times), "gb_per_s": nbytes / min(times) / 1e9}
        if isinstance(out, dict):
            results[name]["overall"] = {k: out["overall"][k] for k in ("l0", "gini", "top1_mass")}
            results[name]["mode"] = out["mode"]
    base = results["plain_read"]["gb_per_s"]
    print(f"checkpoint: {nbytes / 1e9:.2f} GB F32, {ntensors} tensors (generated in {gen_s:.0f}s); reader: {how}")
    print(f"{'case':<22}{'seconds':>10}{'GB/s':>10}{'vs plain read':>16}")
    for name, r in results.items():
        r["ratio_to_plain_read"] = r["gb_per_s"] / base
        print(f"{name:<22}{r['seconds']:>10.2f}{r['gb_per_s']:>10.3f}{r['ratio_to_plain_read']:>15.3f}x")
    ex, h2 = results["metrics_exact"]["overall"], results["metrics_hist_2pass"]["overall"]
    print("hist vs exact: " + ", ".join(f"{k} {h2[k] - ex[k]:+.2e}" for k in ex))
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    rec = {"bench": "sparsity", "bytes": nbytes, "tensors": ntensors, "reader": how, "results": results,
           "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = out_dir / "sparsity.json"
    path.write_text(json.dumps(rec, indent=2))
    print(f"wrote {path}")
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
