"""``unmerge simulate``: simulated RL task vectors (the sparsity-scaling paper, §2.6) and their measured sparsity."""

from __future__ import annotations

import argparse
from pathlib import Path

from unmerge_jax.cli.options import seed

HELP = """Simulate K agents' task vectors with exact sparsity, log-normal magnitudes (mu=-3, sigma=1.5),
random signs and a controlled shared/unique support (default 20% of each agent's changed entries
shared by all agents, 80% unique), then measure them (L0, Gini, kurtosis, top-k mass, Jaccard).

Either a flat vector (--length D) or every tensor of a real architecture (--arch, shapes from the
published config; tensors capped at --max-elements entries, 0 = full size), with a per-module /
per-depth sparsity --profile. Sparsity: --sparsity S, or --size N (billions) for the calibrated
law through the RAM paper's points (0.85 at 3B, 0.90 at 7B).
"""


def register(sub) -> None:
    p = sub.add_parser("simulate", help="simulate RL task vectors and measure their sparsity", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--length", type=int, help="flat vector length")
    g.add_argument("--arch", help="architecture name (e.g. llama-3-70b, qwen2.5-7b) or paper size (70B)")
    p.add_argument("--agents", type=int, default=3, help="number of agents K (default 3)")
    p.add_argument("--sparsity", type=float, help="set sparsity s (fraction of unchanged entries)")
    p.add_argument("--size", type=float, help="model size in B for the calibrated sparsity (default 70)")
    p.add_argument("--shared", type=float, default=0.2, help="shared fraction of each agent's support (default 0.2)")
    p.add_argument("--profile", default="flat", help="sparsity profile: flat or paper-like (default flat)")
    p.add_argument("--max-elements", type=int, default=1 << 16, help="cap per tensor with --arch (0 = none)")
    p.add_argument("--seed", type=seed, default=0, help="random seed, 0..2**32-1 (default 0)")
    p.add_argument("--out", type=Path, help="also write agent_<k>.safetensors into this directory")
    p.add_argument("--json", type=Path, help="write the measurements to this JSON file")
    p.set_defaults(func=run)


def run(args) -> int:
    from unmerge_jax.analysis.report import write_json
    from unmerge_jax.analysis.simulator import simulate_and_measure
    from unmerge_jax.io.atomic import check_output

    if args.json:
        check_output(args.json)  # before the work
    r = simulate_and_measure(length=args.length, arch=args.arch, n_agents=args.agents, sparsity=args.sparsity,
                             size_b=args.size, shared=args.shared, profile=args.profile,
                             max_elements=args.max_elements or None, seed=args.seed, out=args.out)
    print(f"set sparsity {r['set_sparsity']:.4f}, {r['n_agents']} agents, profile {r['profile']}")
    for k, a in enumerate(r["agents"]):
        o = a["overall"]
        print(f"agent {k}: n={o['n_params']} exact_zero={o['exact_zero']:.4f} l0={o['l0']:.4f} gini={o['gini']:.4f} "
              f"kurtosis={o['kurtosis']:.1f} top1={o['top1_mass']:.4f}")
    ia = r["inter_agent"]
    print(f"inter-agent: mean Jaccard {ia['mean_jaccard']:.4f}, mean cosine {ia['mean_cosine']:.4f}, "
          f"shared {ia['shared_fraction']:.4f}, unique {ia['unique_fraction']:.4f}")
    if args.json:
        write_json(args.json, r)
    return 0
