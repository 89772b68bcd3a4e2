"""Benchmark: a 7B-shaped decomposition end to end, against the time to read the same bytes.

Generates on disk (seeded, no torch, nothing downloaded):

  * a **Qwen2.5-7B-shaped bf16 base** from its config (28 layers, hidden 3584, intermediate 18944,
    GQA with 4 of 28 heads for k/v, q/k/v biases, untied vocabulary of 152,064), sharded into
    ~4 GB files with an index like the Hub repository;
  * **8 rank-32 LoRA adapters** on q/k/v/o in PEFT's layout (``adapter_config.json`` +
    ``adapter_model.safetensors``, α = r);
  * **2 merged targets** written by ``unmerge merge`` from a mergekit YAML: task arithmetic of
    adapters 0, 1, 2 (weights 0.5, 0.3, 0.2) and TIES of adapters 3, 4, 5 (density 0.5);

then, each in a fresh process with its peak RSS sampled every 50 ms:

  * ``read``        — the I/O limit: every byte the decomposition reads (base, targets, adapters),
                      read sequentially with ``readinto`` into one buffer;
  * ``full``        — ``unmerge decompose --full`` (every tensor);
  * ``topk``        — ``unmerge decompose --top-k 1000000 --modules q,k,v,o`` (the paper's setting).

The figures are ratios measured side by side in this run (decompose time / read time, peak RSS),
and whether the recovered weights are right: the task-arithmetic target's coefficients within
0.02 of (0.5, 0.3, 0.2) and below 0.02 elsewhere; for TIES, the adapters in the merge must carry
the largest coefficients (and, where the decomposition reports presence decisions, be the present
set). Targets: full decomposition ≤ 2× the read time at ≤ 3 GB peak RSS.

Needs about (3 × 15.2 + 0.1) GB of free disk at full size (checked first); ``--layers N`` builds a
smaller model of the same shapes per layer for a trial. Everything generated is deleted at the end
(``--keep`` keeps it). Writes ``bench/results/scale.json``.

Usage: ``python bench/scale.py [--layers 28] [--workdir DIR] [--keep]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _shapes import qwen2_shapes  # noqa: E402

# Qwen/Qwen2.5-7B config.json (the fields that fix the tensor shapes).
QWEN25_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
             "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
             "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 131072,
             "torch_dtype": "bfloat16"}
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK = 32
N_ADAPTERS = 8
TA_MODELS, TA_WEIGHTS = (0, 1, 2), (0.5, 0.3, 0.2)
TIES_MODELS, TIES_WEIGHTS, TIES_DENSITY = (3, 4, 5), (0.5, 0.3, 0.4), 0.5
SHARD_BYTES = 4 * 10**9
TOL = 0.02


def write_base(root: Path, cfg: dict) -> int:
    """The bf16 base, sharded; returns its bytes."""
    from unmerge_jax.io.writer import ShardedWriter

    shapes = qwen2_shapes(cfg)
    names = sorted(shapes)
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    with ShardedWriter(root, [(n, shapes[n], "BF16") for n in names], max_shard_bytes=SHARD_BYTES) as w:
        for i, n in enumerate(names):
            rng = np.random.default_rng(i)
            scale = np.float32(1.0 if n.endswith("norm.weight") else 0.02)
            w.write(n, rng.standard_normal(shapes[n], dtype=np.float32) * scale)
    return sum(f.stat().st_size for f in root.iterdir())


def write_adapter(root: Path, cfg: dict, j: int, base_dir: Path) -> int:
    """Rank-32 PEFT LoRA adapter ``j`` on q/k/v/o (ΔW entries of std ≈ 1e-3)."""
    from safetensors.numpy import save_file

    shapes = qwen2_shapes(cfg)
    rng = np.random.default_rng(1000 + j)
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        for m in LORA_MODULES:
            out, inp = shapes[f"model.layers.{i}.self_attn.{m}.weight"]
            key = f"base_model.model.model.layers.{i}.self_attn.{m}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((RANK, inp), dtype=np.float32)
                                               / np.float32(np.sqrt(inp)))
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((out, RANK), dtype=np.float32) * np.float32(0.01)
    root.mkdir(parents=True)
    save_file(tensors, str(root / "adapter_model.safetensors"))
    (root / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": RANK, "target_modules": list(LORA_MODULES),
         "base_model_name_or_path": str(base_dir), "fan_in_fan_out": False, "bias": "none",
         "task_type": "CAUSAL_LM"}, indent=2))
    return sum(f.stat().st_size for f in root.iterdir())


def recipe(method: str, base: Path, adapters: list, models, weights, density=None) -> str:
    lines = [f"merge_method: {method}", f"base_model: {base}", "dtype: bfloat16", "models:"]
    for m, w in zip(models, weights):
        params = f"weight: {w}" + (f", density: {density}" if density is not None else "")
        lines.append(f"  - model: {adapters[m]}\n    parameters: {{{params}}}")
    return "\n".join(lines) + "\n"


def run_measured(cmd: list, env: dict) -> dict:
    """Run ``cmd``; wall time and the peak RSS of it and its children (sampled every 50 ms)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": wall, "peak_rss": peak, "stdout_tail": out[-2000:]}


READ_CHILD = r"""
import sys, json
buf = bytearray(64 << 20); mv = memoryview(buf); total = 0
for path in sys.argv[1:]:
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(mv)
            if not n:
                break
            total += n
print(json.dumps({"bytes": total}))
"""


def drop_page_cache() -> bool:
    """Try to empty the page cache (root only); True when it worked."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def check_weights(doc: dict) -> dict:
    """Recovered weights vs the truth for both targets of a decompose ``--json`` document."""
    by_name = {t["target"]: t for t in doc["targets"]}
    out = {}
    for target, models, weights in (("ta", TA_MODELS, TA_WEIGHTS), ("ties", TIES_MODELS, None)):
        coef = by_name[target]["coefficients"]
        truth = {f"a{m}" for m in models}
        got = np.array([coef[f"a{j}"] for j in range(N_ADAPTERS)])
        entry = {"coefficients": {f"a{j}": float(got[j]) for j in range(N_ADAPTERS)}}
        if weights is not None:
            want = np.zeros(N_ADAPTERS)
            want[list(models)] = weights
            entry["max_abs_error"] = float(np.max(np.abs(got - want)))
            entry["ok"] = entry["max_abs_error"] <= TOL
        else:
            top = {f"a{j}" for j in np.argsort(-got)[:len(models)]}
            entry["top_coefficients_are_the_merged_models"] = top == truth
            present = by_name[target].get("present")
            if present is not None:
                entry["present"] = present
                entry["present_is_truth"] = set(present) == truth
            entry["ok"] = top == truth and (present is None or set(present) == truth)
        out[target] = entry
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=QWEN25_7B["num_hidden_layers"],
                    help="decoder layers (default 28, the 7B model; fewer for a trial)")
    ap.add_argument("--workdir", type=Path, help="where to generate the models (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    args = ap.parse_args(argv)

    cfg = {**QWEN25_7B, "num_hidden_layers": args.layers}
    n_params = sum(int(np.prod(s)) for s in qwen2_shapes(cfg).values())
    need = 3 * 2 * n_params + 200 * 2**20
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    print(f"model: {n_params / 1e9:.2f} B parameters (bf16 {2 * n_params / 1e9:.1f} GB); needs "
          f"{need / 1e9:.1f} GB free in {parent}, has {free / 1e9:.1f} GB", flush=True)
    if free < need * 1.05:
        raise SystemExit(f"not enough free disk in {parent}: need {need / 1e9:.1f} GB (base + 2 merged targets), "
                         f"have {free / 1e9:.1f} GB; free space or use --workdir / --layers")
    root = Path(tempfile.mkdtemp(prefix="unmerge-scale-", dir=parent))
    env = {**os.environ, "UNMERGE_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    result = {"config": {"layers": args.layers, "parameters": n_params, "adapters": N_ADAPTERS, "rank": RANK,
                         "cpu_count": os.cpu_count(), "load_average_at_start": list(os.getloadavg())}}
    try:
        t0 = time.perf_counter()
        base = root / "base"
        base_bytes = write_base(base, cfg)
        adapters = [root / f"a{j}" for j in range(N_ADAPTERS)]
        adapter_bytes = sum(write_adapter(a, cfg, j, base) for j, a in enumerate(adapters))
        result["generate_s"] = time.perf_counter() - t0
        print(f"generated base ({base_bytes / 1e9:.1f} GB) and {N_ADAPTERS} adapters in {result['generate_s']:.0f} s",
              flush=True)

        merges = {}
        for name, text in (("ta", recipe("task_arithmetic", base, adapters, TA_MODELS, TA_WEIGHTS)),
                           ("ties", recipe("ties", base, adapters, TIES_MODELS, TIES_WEIGHTS, TIES_DENSITY))):
            (root / f"{name}.yaml").write_text(text)
            merges[name] = run_measured(["unmerge", "merge", str(root / f"{name}.yaml"), "--out", str(root / name)], env)
            print(f"merged {name}: {merges[name]['wall_s']:.0f} s, peak RSS {merges[name]['peak_rss'] / 1e9:.2f} GB",
                  flush=True)
        result["merge"] = {k: {"wall_s": v["wall_s"], "peak_rss": v["peak_rss"]} for k, v in merges.items()}

        files = [str(p) for d in [base, root / "ta", root / "ties", *adapters] for p in sorted(d.iterdir())
                 if p.suffix == ".safetensors"]
        result["bytes_read"] = sum(Path(f).stat().st_size for f in files)
        dec = ["unmerge", "decompose", "--base", str(base), "--dictionary", *[f"a{j}={a}" for j, a in enumerate(adapters)],
               "--target", f"ta={root / 'ta'}", f"ties={root / 'ties'}"]
        modes = {"read": [sys.executable, "-c", READ_CHILD, *files],
                 "full": dec + ["--full", "--json", str(root / "full.json")],
                 "topk": dec + ["--top-k", "1000000", "--modules", "q,k,v,o", "--json", str(root / "topk.json")]}
        result["page_cache"] = "dropped before each mode" if drop_page_cache() else \
            "not dropped (no permission); the model is larger than RAM, so reads mostly come from disk"
        for mode, cmd in modes.items():
            drop_page_cache()
            r = run_measured(cmd, env)
            result[mode] = {"wall_s": r["wall_s"], "peak_rss": r["peak_rss"]}
            print(f"{mode}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss'] / 1e9:.2f} GB", flush=True)
        for mode in ("full", "topk"):
            doc = json.loads((root / f"{mode}.json").read_text())
            result[mode]["weights"] = check_weights(doc)
        read_s = result["read"]["wall_s"]
        result["ratios"] = {
            "full_over_read_time": result["full"]["wall_s"] / read_s,
            "topk_over_read_time": result["topk"]["wall_s"] / read_s,
            "read_gb_per_s": result["bytes_read"] / read_s / 1e9,
            "full_peak_rss_gb": result["full"]["peak_rss"] / 1e9,
            "topk_peak_rss_gb": result["topk"]["peak_rss"] / 1e9,
        }
        result["targets"] = {"full_within_2x_read": result["ratios"]["full_over_read_time"] <= 2.0,
                             "full_peak_rss_le_3gb": result["full"]["peak_rss"] <= 3e9,
                             "weights_ok": all(e["ok"] for m in ("full", "topk") for e in result[m]["weights"].values())}
        result["config"]["load_average_at_end"] = list(os.getloadavg())
        print(json.dumps({"ratios": result["ratios"], "targets": result["targets"]}, indent=2))
        out = HERE / "results" / ("scale.json" if args.layers == QWEN25_7B["num_hidden_layers"]
                                  else f"scale_{args.layers}layers.json")
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)
        print(f"wrote {out}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
