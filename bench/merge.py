"""Benchmark: the same merge by this engine and by mergekit, side by side, in one run.

Generates a Llama-shaped float32 base and K = 3 fine-tunes (multi-GB in total, sharded
safetensors, seeded), then for each method runs, each in a fresh subprocess:
  * ``plain``    — the I/O limit: read the same input tensors and write the same output bytes;
  * ``unmerge``  — ``unmerge_jax.merge`` (streaming, one tensor at a time, (1 + K) tensors), with
    the persistent XLA cache on as ``unmerge merge`` has it, in a directory fresh for this bench
    run: the first repeat compiles, later ones load (the median is a loaded run);
  * ``unmerge_overlap`` — the same with ``overlap=True`` (reads/computes the next tensor in a
    thread while the previous is written: one more set of inputs in memory);
  * ``mergekit`` — ``mergekit.merge.run_merge`` (lazy loading, CPU), when installed.
Reports wall time, peak RSS (``VmHWM`` of the subprocess) and GB/s of bytes moved
(inputs read + output written), the ratios unmerge/mergekit and unmerge/plain, and compares the
two outputs. Dirty pages are flushed (``os.sync``, untimed) before every run. Timings on this
shared machine vary up to 2× between identical runs, so every kind but mergekit runs
``--repeat`` times (interleaved, in rotating order) and the ratios use the medians; mergekit runs ``--mergekit-repeat``
times (its TIES takes ~90 s). Writes ``bench/results/merge.json``.

Output comparison: task arithmetic must match to float32 rounding. TIES is compared entry by entry
*off the ties*: mergekit's ``argsort`` breaks ties at the top-k threshold arbitrarily where we keep
the first by position, so entries where any model's ``|δ|`` equals its threshold may differ; the
JSON reports the max difference elsewhere (must be float32 rounding) and how many entries differ
at ties. DARE draws its masks from a different generator than mergekit's ``torch.bernoulli``, so
its outputs are not comparable entry by entry (parity given the same mask and in distribution is
in ``tests/test_merge_driver.py``); the JSON reports no diff for it.

``slerp`` (t = 0.4 between the base and the first fine-tune) and ``model_stock`` are compared entry
by entry like task arithmetic; ``della`` (density 0.5, ε = 0.1) draws random masks, so like DARE it
is not.

Usage: ``python bench/merge.py [--hidden 2048] [--layers 2] [--methods task_arithmetic ties slerp della model_stock] [--repeat 3]``
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
    from unmerge_jax.compile_cache import enable_compilation_cache
    enable_compilation_cache()  # as `unmerge merge` does; the bench points it at a fresh directory
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
    dirs = list(dict.fromkeys([cfg["base_model"]] + [m["model"] for m in cfg["models"]]))   # each input once
    handles = [{f.name: safe_open(str(f), framework="numpy") for f in Path(d).glob("*.safetensors")} for d in dirs]
    Path(out).mkdir()
    with open(Path(out) / "copy.bin", "wb") as fh:
        for shard, h in handles[0].items():
            for name in h.keys():
                arrs = [hd[shard].get_tensor(name) for hd in handles]
                fh.write(memoryview(np.ascontiguousarray(arrs[0]).reshape(-1).view(np.uint8)))
                del arrs
t2 = time.perf_counter()
# VmHWM is this process's own high-water mark. ru_maxrss is not: the child is started by vfork +
# exec, and exec folds the parent's high-water mark into it (this script's parent reaches ~6 GB
# comparing outputs, which every later child then reported as its own peak).
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
try:
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    pass
print(json.dumps({"import_s": t1 - t0, "wall_s": t2 - t1, "peak_rss": peak}))
"""


def run_child(kind, cfg_path, out, cache_dir=None):
    # Flush dirty pages first (not timed): otherwise the writeback of the generated checkpoints or
    # of the previous run's output lands in whichever run comes next (measured: the first method's
    # plain copy took 4.2 s, the second's 2.4 s).
    os.sync()
    r = subprocess.run([sys.executable, "-c", CHILD, kind, str(cfg_path), str(out)], capture_output=True, text=True,
                       env={**os.environ, "UNMERGE_PROGRESS": "0",
                            **({"UNMERGE_CACHE_DIR": str(cache_dir)} if cache_dir else {})})
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _tensors(d):
    from safetensors import safe_open

    out = {}
    for f in Path(d).glob("*.safetensors"):
        h = safe_open(str(f), framework="numpy")
        for n in h.keys():
            out[n] = (h, n)
    return out


def compare(a: Path, b: Path, method: str, root: Path, k: int, density: float) -> dict:
    """Entry-wise comparison of two merged checkpoints (see the module docstring)."""
    if method.startswith(("dare", "della")):
        return {"max_abs_diff_vs_mergekit": None,
                "diff_note": "not compared: DARE/DELLA masks come from different generators (jax threefry vs "
                             "torch.bernoulli); parity given the same mask is tested in tests/test_merge_driver.py"}
    ta, tb = _tensors(a), _tensors(b)
    worst, worst_off, n_diff, n_diff_ties, n_ties = 0.0, 0.0, 0, 0, 0
    if method == "ties":
        base, fts = _tensors(root / "base"), [_tensors(root / f"ft{i}") for i in range(k)]
    for n, (h, _) in ta.items():
        x, y = h.get_tensor(n), tb[n][0].get_tensor(n)
        diff = np.abs(x - y)
        worst = max(worst, float(diff.max()))
        if method != "ties":
            continue
        b0 = base[n][0].get_tensor(n)
        tied = np.zeros(x.shape, bool)
        for ft in fts:   # entries whose |δ| equals the model's k-th largest (the top-k threshold)
            d = np.abs(ft[n][0].get_tensor(n) - b0).reshape(-1)
            kk = max(1, int(density * d.size))
            thr = np.partition(d, d.size - kk)[d.size - kk]
            tied |= (d == thr).reshape(x.shape)
        n_ties += int(tied.sum())
        differ = diff > 1e-6
        n_diff += int(differ.sum())
        n_diff_ties += int((differ & tied).sum())
        worst_off = max(worst_off, float(np.max(diff, where=~tied, initial=0.0)))
    out = {"max_abs_diff_vs_mergekit": worst}
    if method == "ties":
        out |= {"max_abs_diff_off_ties": worst_off, "entries_differing": n_diff,
                "entries_differing_at_ties": n_diff_ties, "entries_at_ties": n_ties,
                "diff_note": "mergekit's argsort breaks ties at the top-k threshold arbitrarily; we keep the "
                             "first by position. Off the tied entries the outputs agree to float32 rounding."}
    return out


# Per-method settings: the sparsifying methods keep half, DELLA with mergekit's ε; slerp is
# between the base and the first fine-tune; model_stock takes no weights.
DENSITY_METHODS = ("ties", "dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties")


def method_config(method: str, root: Path, k: int) -> tuple[dict, dict]:
    """The mergekit YAML (as a dict) of ``method`` over the generated models, and its per-model parameters."""
    base = str(root / "base")
    cfg = {"merge_method": method, "base_model": base, "dtype": "float32"}
    if method == "slerp":
        return cfg | {"parameters": {"t": 0.4}, "models": [{"model": base}, {"model": str(root / "ft0")}]}, {}
    params = {} if method == "model_stock" else {"weight": 1.0 / k}
    if method in DENSITY_METHODS:
        params["density"] = 0.5
    if method.startswith("della"):
        params["epsilon"] = 0.1
    return cfg | {"models": [{"model": str(root / f"ft{i}"), "parameters": params} for i in range(k)]}, params


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


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
    ap.add_argument("--repeat", type=int, default=5, help="runs of plain/unmerge/unmerge_overlap (median reported)")
    ap.add_argument("--mergekit-repeat", type=int, default=1, help="runs of mergekit")
    args = ap.parse_args(argv)
    import yaml

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        model_bytes = generate(root, args.k, args.hidden, args.layers, args.vocab, args.inter)
        print(f"generated base + {args.k} models, {model_bytes / 1e9:.2f} GB each, in {time.perf_counter() - t:.0f} s")
        moved = model_bytes * (args.k + 1) + model_bytes
        largest = max(int(np.prod(v)) * 4 for v in llama_shapes(args.hidden, args.layers, args.vocab,
                                                                args.inter).values())
        results = {"model_gb": model_bytes / 1e9, "k": args.k, "bytes_moved": moved, "cpu_count": os.cpu_count(),
                   "largest_tensor_bytes": largest, "memory_bound_1_plus_k_bytes": (1 + args.k) * largest,
                   "repeat": args.repeat, "mergekit_repeat": args.mergekit_repeat, "methods": {}}
        for method in args.methods:
            cfg, params = method_config(method, root, args.k)
            n_inputs = len({cfg["base_model"], *(m["model"] for m in cfg["models"])})
            moved = model_bytes * (n_inputs + 1)   # inputs read + the output written
            cfg_path = root / f"{method}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            runs = {kind: [] for kind in KINDS}
            for rep in range(max(args.repeat, args.mergekit_repeat)):
                # Rotate the order: a run right after another that freed GBs (plain maps all inputs)
                # was measured up to 2× slower here, which a fixed order charges to one kind.
                for kind in KINDS[rep % len(KINDS):] + KINDS[:rep % len(KINDS)]:
                    if rep >= (args.mergekit_repeat if kind == "mergekit" else args.repeat):
                        continue
                    out = root / f"out_{method}_{kind}"
                    subprocess.run(["rm", "-rf", str(out)])   # keep the last run's output to compare
                    r = run_child(kind, cfg_path, out, cache_dir=root / "xla_cache")
                    runs[kind].append(r)
                    print(method, kind, rep, r, flush=True)
            row = {}
            for kind, rs in runs.items():
                ok = [r for r in rs if "wall_s" in r]
                if not ok:
                    row[kind] = rs[-1] if rs else {"error": "not run"}
                    continue
                wall = _median([r["wall_s"] for r in ok])
                row[kind] = {"wall_s": wall, "wall_s_min": min(r["wall_s"] for r in ok),
                             "wall_s_runs": [r["wall_s"] for r in ok], "peak_rss": max(r["peak_rss"] for r in ok),
                             "import_s": _median([r["import_s"] for r in ok]), "gb_per_s": moved / 1e9 / wall}
            if "wall_s" in row["unmerge"] and "wall_s" in row["mergekit"]:
                row["time_ratio_unmerge_over_mergekit"] = row["unmerge"]["wall_s"] / row["mergekit"]["wall_s"]
                row["rss_ratio_unmerge_over_mergekit"] = row["unmerge"]["peak_rss"] / row["mergekit"]["peak_rss"]
                row |= compare(root / f"out_{method}_unmerge", root / f"out_{method}_mergekit", method, root, args.k,
                               params.get("density", 1.0))
            if "wall_s" in row["unmerge"] and "wall_s" in row["plain"]:
                row["bandwidth_fraction_of_plain"] = row["plain"]["wall_s"] / row["unmerge"]["wall_s"]
            if "wall_s" in row["unmerge_overlap"]:
                if "wall_s" in row["plain"]:
                    row["overlap_bandwidth_fraction_of_plain"] = row["plain"]["wall_s"] / row["unmerge_overlap"]["wall_s"]
                if "wall_s" in row["mergekit"]:
                    row["overlap_time_ratio_over_mergekit"] = row["unmerge_overlap"]["wall_s"] / row["mergekit"]["wall_s"]
                    row["overlap_rss_ratio_over_mergekit"] = (row["unmerge_overlap"]["peak_rss"]
                                                              / row["mergekit"]["peak_rss"])
            results["methods"][method] = row
            args.out.parent.mkdir(parents=True, exist_ok=True)   # partial results survive a long method
            args.out.write_text(json.dumps(results, indent=2) + "\n")
            for kind in KINDS:
                subprocess.run(["rm", "-rf", str(root / f"out_{method}_{kind}")])
            diff = row.get("max_abs_diff_off_ties", row.get("max_abs_diff_vs_mergekit"))
            print(f"{method}: unmerge/mergekit time {row.get('time_ratio_unmerge_over_mergekit', float('nan')):.2f}, "
                  f"peak RSS {row.get('rss_ratio_unmerge_over_mergekit', float('nan')):.2f}; "
                  f"{row.get('bandwidth_fraction_of_plain', float('nan')):.0%} of plain copy bandwidth; "
                  f"with overlap: time {row.get('overlap_time_ratio_over_mergekit', float('nan')):.2f}, "
                  f"{row.get('overlap_bandwidth_fraction_of_plain', float('nan')):.0%} of plain; "
                  f"max |diff| {'n/a (different masks)' if diff is None else f'{diff:.2e}'}"
                  + (" off ties" if "max_abs_diff_off_ties" in row else ""), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
