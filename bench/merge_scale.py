"""Benchmark: a virtual 70B-class merge under 2 GB — row-block merges measured against the per-tensor bounds.

Base + K = 3 inputs of Llama-3-70B's shapes (from its config: hidden 8192, GQA with 8 of 64 heads
for k/v, intermediate 28672, vocabulary 128,256, untied lm_head) are ``VirtualSource`` models:
every tensor generated on the fly from seeds (``unmerge_jax.analysis.study_memory.virtual_model``),
never on disk. They are merged with TIES (density 0.2) and with RAM (the sparsity-scaling paper's
face: 90th-percentile activity, λ = 1.5), each in a fresh process with its memory sampled every 5 ms,
into a discarding writer (``NullWriter``: cast to bfloat16, checked, dropped). Every tensor above
``WHOLE_MAX`` entries is streamed by row blocks: each walk of the method regenerates its chunks.

The full 80 layers would be 4 × 70.6e9 generated values per walk (the generation rate is measured
first and the full-model time estimated); when that is too long for the machine, the run merges the
largest tensors (embeddings, lm_head) plus the first 1 and 2 full layers of the real shapes and shows
that the peak does not grow with the number of layers. Beside it: the per-tensor bounds from the same
shapes — ours when tensors are held whole, ``(1 + K)·max·4``, and mergekit's, whose loader holds the
K + 1 input tensors and the output of the largest tensor, ``(K + 2)·max·2`` in bfloat16 — as ratios to
the measured peak. Then the sparsity-scaling paper's Table 4 (3 agents; 3B/7B/13B/70B/405B: FP16,
naive, per-tensor stream, row-block stream), the row-block column measured where run (one layer plus
embeddings for 3B/7B/13B) and by formula elsewhere, labelled.

Writes ``bench/results/merge_scale.json``.

Usage: ``python bench/merge_scale.py [--layers 1,2] [--ram-layers 1] [--methods ties,ram] [--sizes 3B,7B,13B]
[--jobs 2] [--full] [--reuse]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from _shapes import llama3_70b  # noqa: E402

from unmerge_jax.analysis.architectures import PAPER_MEMORY_ARCHS, tensor_shapes  # noqa: E402
from unmerge_jax.analysis.study_memory import measure_virtual_merge, table4, virtual_model  # noqa: E402

K = 3
METHODS = {"ties": {"density": 0.2}, "ram": {"face": "percentile"}}
GB = 1e9


def generation_rate(n: int = 1 << 25, repeats: int = 3) -> float:
    """Values per second that ``virtual_model`` generates here (rows of a 70B embedding; the best of
    ``repeats``, as the machine is shared)."""
    src = virtual_model({"e": (128256, 8192)}, 0, 0.02, "weights")
    rows = n // 8192
    src.read_rows("e", 0, 64)
    best = np.inf
    for i in range(repeats):
        t0 = time.perf_counter()
        src.read_rows("e", 1000 + i * rows, 1000 + (i + 1) * rows)
        best = min(best, time.perf_counter() - t0)
    return rows * 8192 / best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="1,2", help="layer counts of the 70B runs (comma-separated)")
    ap.add_argument("--methods", default="ties,ram")
    ap.add_argument("--ram-layers", default="1", help="layer counts of the 70B RAM runs")
    ap.add_argument("--jobs", type=int, default=1, help="measurements run side by side (each its own process)")
    ap.add_argument("--sizes", default="3B,7B,13B", help="other Table 4 sizes measured (one layer + embeddings)")
    ap.add_argument("--full", action="store_true", help="merge all 80 layers of the 70B (long)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "merge_scale.json")
    ap.add_argument("--reuse", action="store_true", help="rebuild the tables from the runs already in --out")
    ap.add_argument("--add", type=Path, action="append", default=[],
                    help="with --reuse: also take the runs of this JSON (another run of this bench)")
    args = ap.parse_args(argv)
    old = json.loads(args.out.read_text()) if args.reuse else None
    for extra in args.add if old is not None else ():
        more = json.loads(extra.read_text())
        old["runs"] += more["runs"]
        old["other_sizes"] += [m for m in more["other_sizes"] if m["size"] not in {o["size"] for o in old["other_sizes"]}]

    arch = "llama-3-70b"
    assert dict(llama3_70b()) == dict(tensor_shapes(arch)), "bench/_shapes.llama3_70b differs from the library table"
    n_full = sum(int(np.prod(s)) for s in llama3_70b().values())
    rate = generation_rate() if old is None else old["generation_values_per_s"]
    walks = 3    # TIES/RAM: the sample gather, the bracketed selection, the apply pass
    est = (1 + K) * n_full * walks / rate
    print(f"generation: {rate / 1e6:.0f} M values/s here; the full 70B merge would generate "
          f"{(1 + K) * n_full / 1e9:.0f}e9 values per walk, ~{est / 60:.0f} min for {walks} walks")
    layer_counts = [None] if args.full else [int(x) for x in args.layers.split(",") if x]
    ram_layers = [None] if args.full else [int(x) for x in args.ram_layers.split(",") if x]
    jobs = [(arch, layers, "ties", None) for layers in layer_counts if "ties" in args.methods.split(",")]
    jobs += [(arch, layers, "ram", None) for layers in ram_layers if "ram" in args.methods.split(",")]
    jobs += [(PAPER_MEMORY_ARCHS[size], 1, "ties", size) for size in args.sizes.split(",") if size]
    if old is not None:
        jobs = []

    def run(job):
        a, layers, method, size = job
        m = measure_virtual_merge(a, layers=layers, n_agents=K, method=method, params=METHODS[method])
        m["size"] = size or "70B"
        print(f"{m['size']} {method} {'all' if layers is None else layers} layer(s): {m['n_params'] / 1e9:.2f}e9 "
              f"params per model in {m['seconds']:.0f} s, peak RSS {m['peak_rss_gb']:.3f} GB (runtime before "
              f"{m['runtime_gb']:.3f} GB); per-tensor f32 bound {m['per_tensor_f32_gb']:.2f} GB "
              f"({m['ratio_per_tensor_to_measured']:.1f}x), mergekit bf16 {m['mergekit_bf16_gb']:.2f} GB "
              f"({m['ratio_mergekit_bf16_to_measured']:.1f}x)", flush=True)
        return m
    # Each measurement is its own process (its peak RSS is its own); --jobs runs some side by side,
    # which changes their times, not their memory. The JSON is rewritten after each measurement, so
    # an interrupted run keeps what it measured.
    done = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for fut in as_completed([pool.submit(run, job) for job in jobs]):
            done.append(fut.result())
            write(args, rate, est, n_full, arch, [d for d in done if d["size"] == "70B"],
                  [d for d in done if d["size"] != "70B"], final=False)
    runs = ([m for m in done if m["size"] == "70B"] if old is None else old["runs"])
    others = ([m for m in done if m["size"] != "70B"] if old is None else old["other_sizes"])
    write(args, rate, est, n_full, arch, runs, others, final=True)
    return 0


def write(args, rate, est, n_full, arch, runs, others, *, final: bool) -> None:
    """Build Table 4 from the runs so far and write the JSON (printing the tables when ``final``)."""
    # Table 4: the row-block column measured where run (70B: the TIES run with the most layers), by
    # formula elsewhere (study_memory.rows_formula_bytes + the measured runtime), labelled.
    ties70 = max((r for r in runs if r["method"] == "ties"), key=lambda r: r["layers"] or 1 << 30, default=None)
    measured = {o["size"]: o for o in others}
    if ties70 is not None:
        measured["70B"] = ties70
    table = [{k: r.get(k) for k in ("size", "arch", "n_params", "fp16_gb", "naive_gb", "stream_tensor_gb",
                                    "mergekit_bf16_gb", "stream_rows_gb", "stream_rows_source", "paper_stream_gb")}
             | {"reduction_naive_to_rows": r["naive_gb"] / r["stream_rows_gb"],
                "ratio_tensor_to_rows": r["stream_tensor_gb"] / r["stream_rows_gb"],
                "ratio_mergekit_to_rows": r["mergekit_bf16_gb"] / r["stream_rows_gb"]}
             for r in table4(K, measured)]
    for t in table if final else ():
        print(f"{t['size']:>5}: fp16 {t['fp16_gb']:7.1f}  naive {t['naive_gb']:7.1f}  per-tensor {t['stream_tensor_gb']:6.2f}  "
              f"mergekit {t['mergekit_bf16_gb']:6.2f}  rows {t['stream_rows_gb']:.3f} GB [{t['stream_rows_source']}]  "
              f"(paper {t['paper_stream_gb']})")
    peaks = [r["peak_rss_gb"] for r in runs]
    by_layers = {m: {str(r["layers"]): r["peak_rss_gb"] for r in runs if r["method"] == m} for m in METHODS}
    for m, got in by_layers.items() if final else ():
        if len(got) > 1:
            print(f"70B {m}: peak RSS by layer count {got} (GB)")
    result = {"arch": arch, "k": K, "methods": METHODS, "generation_values_per_s": rate,
              "full_model_generation_estimate_s": est, "full_model_params": n_full,
              "measured": "the full model" if args.full else (f"embeddings, final norm, lm_head and the first "
                                                               f"{args.layers} layers, full shapes"),
              "runs": runs, "peak_rss_gb_by_layers": by_layers, "other_sizes": others, "table4": table,
              "max_peak_rss_gb": max(peaks, default=None), "target_gb": 2.0,
              "target_met": bool(peaks) and max(peaks) < 2.0, "complete": final}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if final and peaks:
        print(f"peak RSS {max(peaks):.3f} GB (target < 2 GB: {'met' if result['target_met'] else 'NOT met'}); "
              f"wrote {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
