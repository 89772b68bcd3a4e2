"""The ``synthetic`` dictionary: random low-rank "LoRA" task vectors in a fake Qwen2-like layout.

No torch, no training: each task gets, for every (layer, q/k/v/o) tensor, ``ΔW = B @ A · α/r`` with
Gaussian factors — the same low-rank structure a real LoRA update has — plus a shared component
(``shared``) so task vectors are correlated as fine-tunes of one base are. Seeded; tensor names
follow Hugging Face Qwen2 naming so the engine maps them to (layer, module).
"""

from __future__ import annotations

import dataclasses

import numpy as np

MODULE_SHAPES = {"q_proj": (1.0, 1.0), "k_proj": (0.5, 1.0), "v_proj": (0.5, 1.0), "o_proj": (1.0, 1.0)}


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    hidden_size: int = 64
    num_hidden_layers: int = 4
    ranks: tuple[int, ...] = (8, 16, 32)
    shared: float = 0.3  # weight of a component common to every task (correlated dictionary)
    scale: float = 1e-2


def tensor_shapes(spec: SyntheticSpec) -> dict[str, tuple[int, int]]:
    h = spec.hidden_size
    return {f"model.layers.{layer}.self_attn.{mod}.weight": (int(h * fo), int(h * fi))
            for layer in range(spec.num_hidden_layers) for mod, (fo, fi) in MODULE_SHAPES.items()}


def _low_rank(rng, shape, rank, scale):
    b = rng.standard_normal((shape[0], rank))
    a = rng.standard_normal((rank, shape[1]))
    return (b @ a) * (scale / np.sqrt(rank * shape[1]))  # α = r, so α/r = 1


def synthetic_deltas(names, spec: SyntheticSpec, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """``{task: {tensor name: float32 ΔW}}`` for each task in ``names`` (seeded per task)."""
    shapes = tensor_shapes(spec)
    common_rng = np.random.default_rng([seed, 7919])
    common = {n: _low_rank(common_rng, s, spec.ranks[-1], spec.scale) for n, s in shapes.items()}
    out = {}
    for i, task in enumerate(names):
        rng = np.random.default_rng([seed, i])
        rank = spec.ranks[i % len(spec.ranks)]
        mag = float(rng.uniform(0.5, 1.5))  # tasks differ in update magnitude, as trained adapters do
        out[task] = {n: (mag * ((1 - spec.shared) * _low_rank(rng, s, rank, spec.scale) + spec.shared * common[n])
                         ).astype(np.float32) for n, s in shapes.items()}
    return out
