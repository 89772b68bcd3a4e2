"""Benchmark: the same merge by this engine and by mergekit, side by side, in one run.

Generates a Llama-shaped float32 base and K = 3 fine-tunes (multi-GB in total, sharded
safetensors, seeded), then for each method runs, each in a fresh subprocess:
  * ``plain``    — the I/O limit: read the same input tensors and write the same output bytes;
  * ``unmerge``  — ``unmerge_jax.merge`` (streaming, one tensor at a time, (1 + K) tensors);
  * ``unmerge_overlap`` — the same with ``overlap=True`` (reads/computes the next tensor in a
    thread while the previous is written: one more set of inputs in memory);
  * ``mergekit`` — ``mergekit.merge.run_merge`` (lazy loading, CPU), when installed.
Reports wall time, peak RSS (``ru_maxrss`` of the subprocess) and GB/s of bytes moved
(inputs read + output written), the ratios unmerge/mergekit and unmerge/plain, and checks the
two outputs agree (for DARE only in distribution: the two draw different masks; for TIES up to
entries tied at the top-k threshold, which mergekit's ``argsort`` picks arbitrarily). Dirty pages
are flushed (``os.sync``, untimed) before every run. Writes ``bench/results/merge.json``.

Usage: ``python bench/merge.py [--hidden 2048] [--layers 2] [--methods task_arithmetic ties]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _shapes import llama_shapes  # noqa: E402
KINDS = ("plain", "unmerge", "unmerge_overlap", "mergekit")


def generate(root: Path, k: int, hidden: int, layers: int, vocab: int, inter: int) -> int:
    from unmerge_jax.io.writer import ShardedWriter

    shapes = llama_shapes(hidden, layers, vocab, inter)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
           "num_key_value_heads": hidden // 64, "vocab_size": vocab, "max_position_embeddings": 512,
           "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32"}
    names = sorted(shapes)
    for j, d in enumerate(["base"] + [f"ft{i}" for i in range(k)]):
        out = root / d
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps(cfg))
        rng = np.random.default_rng(j)
        with ShardedWriter(out, [(n, shapes[n], "F32") for n in names], max_shard_bytes=1 << 30) as w:
            for n in names:
                base = np.random.default_rng(names.index(n)).standard_normal(
                    shapes[n], dtype=np.float32)
                if j:
                    base += np.float32(0.01) * rng.standard_normal(shapes[n], dtype=np.float32)
                w.write(n, base)
                del base
    return sum(int(np.prod(s)) * 4 for s in shapes.values())


CHILD = r"""
import json, resource, sys, time
kind, cfg_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
if kind.startswith("unmerge"):
    import unmerge_jax
    t1 = time.perf_counter()
    unmerge_jax.merge(cfg_path, out, overlap=kind == "unmerge_overlap")
elif kind == "mergekit":
    import os, yaml
    os.environ["HF_HUB_OFFLINE"] = "1"
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    t1 = time.perf_counter()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(cfg_path))), out,
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, lazy_unpickle=True))
else:  # plain: read every input tensor, write output-sized bytes
    import numpy as np, yaml
    from safetensors import safe_open
    from pathlib import Path
    t1 = time.perf_counter()
    cfg = yaml.safe_load(open(cfg_path))
    dirs = [cfg["base_model"]] + [m["model"] for m in cfg["models"]]
    handles = [{f.name: safe_open(str(f), framework="numpy") for f in Path(d).glob("*.safetensors")} for d in dirs]
    Path(out).mkdir()
    with open(Path(out) / "copy.bin", "wb") as fh:
        for shard, h in handles[0].items():
            for name in h.keys():
                arrs = [hd[shard].get_tensor(name) for hd in handles]
                fh.write(memoryview(np.ascontiguousarray(arrs[0]).reshape(-1).view(np.uint8)))
                del arrs
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "wall_s": t2 - t1, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_child(kind, cfg_path, out):
    # Flush dirty pages first (not timed): otherwise the writeback of the generated checkpoints or
    # of the previous run's output lands in whichever run comes next (measured: the first method's
    # plain copy took 4.2 s, the second's 2.4 s).
    os.sync()
    r = subprocess.run([sys.executable, "-c", CHILD, kind, str(cfg_path), str(out)], capture_output=True, text=True,
                       env={**os.environ, "UNMERGE_PROGRESS": "0"})
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare(a: Path, b: Path) -> float:
    from safetensors import safe_open

    def tensors(d):
        out = {}
        for f in Path(d).glob("*.safetensors"):
            h = safe_open(str(f), framework="numpy")
            for n in h.keys():
                out[n] = (h, n)
        return out

    ta, tb = tensors(a), tensors(b)
    worst = 0.0
    for n, (h, _) in ta.items():
        worst = max(worst, float(np.max(np.abs(h.get_tensor(n) - tb[n][0].get_tensor(n)))))
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "merge.json")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    import yaml

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        model_bytes = generate(root, args.k, args.hidden, args.layers, args.vocab, args.inter)
        print(f"generated base + {args.k} models, {model_bytes / 1e9:.2f} GB each, in {time.perf_counter() - t:.0f} s")
        moved = model_bytes * (args.k + 1) + model_bytes
        results = {"model_gb": model_bytes / 1e9, "k": args.k, "bytes_moved": moved, "cpu_count": os.cpu_count(),
                   "methods": {}}
        for method in args.methods:
            params = {"weight": 1.0 / args.k} | ({"density": 0.5} if method in ("ties", "dare_ties", "dare_linear") else {})
            cfg = {"merge_method": method, "base_model": str(root / "base"), "dtype": "float32",
                   "models": [{"model": str(root / f"ft{i}"), "parameters": params} for i in range(args.k)]}
            cfg_path = root / f"{method}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            row = {}
            for kind in KINDS:
                out = root / f"out_{method}_{kind}"
                row[kind] = run_child(kind, cfg_path, out)
                if "wall_s" in row[kind]:
                    row[kind]["gb_per_s"] = moved / 1e9 / row[kind]["wall_s"]
                print(method, kind, row[kind], flush=True)
            if "wall_s" in row["unmerge"] and "wall_s" in row["mergekit"]:
                row["time_ratio_unmerge_over_mergekit"] = row["unmerge"]["wall_s"] / row["mergekit"]["wall_s"]
                row["rss_ratio_unmerge_over_mergekit"] = row["unmerge"]["peak_rss"] / row["mergekit"]["peak_rss"]
                row["max_abs_diff_vs_mergekit"] = compare(root / f"out_{method}_unmerge", root / f"out_{method}_mergekit")
            if "wall_s" in row["unmerge"] and "wall_s" in row["plain"]:
                row["bandwidth_fraction_of_plain"] = row["plain"]["wall_s"] / row["unmerge"]["wall_s"]
            if "wall_s" in row["unmerge_overlap"]:
                if "wall_s" in row["plain"]:
                    row["overlap_bandwidth_fraction_of_plain"] = row["plain"]["wall_s"] / row["unmerge_overlap"]["wall_s"]
                if "wall_s" in row["mergekit"]:
                    row["overlap_time_ratio_over_mergekit"] = row["unmerge_overlap"]["wall_s"] / row["mergekit"]["wall_s"]
            results["methods"][method] = row
            args.out.parent.mkdir(parents=True, exist_ok=True)   # partial results survive a long method
            args.out.write_text(json.dumps(results, indent=2) + "\n")
            for kind in KINDS:
                subprocess.run(["rm", "-rf", str(root / f"out_{method}_{kind}")])
            print(f"{method}: unmerge/mergekit time {row.get('time_ratio_unmerge_over_mergekit', float('nan')):.2f}, "
                  f"peak RSS {row.get('rss_ratio_unmerge_over_mergekit', float('nan')):.2f}; "
                  f"{row.get('bandwidth_fraction_of_plain', float('nan')):.0%} of plain copy bandwidth; "
                  f"with overlap: time {row.get('overlap_time_ratio_over_mergekit', float('nan')):.2f}, "
                  f"{row.get('overlap_bandwidth_fraction_of_plain', float('nan')):.0%} of plain; "
                  f"max |diff| {row.get('max_abs_diff_vs_mergekit', float('nan')):.2e}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
