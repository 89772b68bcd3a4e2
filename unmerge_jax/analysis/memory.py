"""Peak-memory model of merging K agents (the sparsity-scaling paper's Table 4 / Figure 6) from real tensor shapes.

* naive (paper): ``(1 + K)·d·2`` bytes — base and K fine-tuned models resident in fp16.
* streaming, per tensor (a merge that holds whole tensors): ``(1 + K)·max_t |θ_t|·4`` bytes — one
  float32 tensor of the base and of each agent at a time; the largest tensor of a Llama is the
  embedding (or lm_head), not a transformer layer.
* streaming, excluding embedding/lm_head: the same bound if those two were merged in row chunks.
* streaming, per layer: ``(1 + K)·max_l |θ^(l)|·4`` — one transformer block at a time (the
  paper's eq. 6 says "layer"; its numbers fit none of these readings exactly, see docs).
"""

from __future__ import annotations

import numpy as np

from unmerge_jax.analysis.architectures import PAPER_MEMORY_ARCHS, tensor_shapes
from unmerge_jax.analysis.names import classify

GB = 1e9

# The sparsity-scaling paper's Table 4 (3 agents): FP16, naive, stream (GB) and the reduction.
PAPER_TABLE4 = {
    "3B": (6.0, 24.0, 2.6, 9), "7B": (14.0, 56.0, 3.0, 19), "13B": (26.0, 104.0, 3.6, 29),
    "70B": (140.0, 560.0, 6.0, 93), "405B": (810.0, 3240.0, 18.0, 180),
}


def memory_row(arch: str, n_agents: int = 3) -> dict:
    shapes = tensor_shapes(arch)
    sizes = {n: int(np.prod(s)) for n, s in shapes}
    d = sum(sizes.values())
    biggest = max(sizes, key=sizes.get)
    inner = [v for n, v in sizes.items() if classify(n)[2] not in ("embedding", "lm_head")]
    per_layer = {}
    for n, v in sizes.items():
        layer = classify(n)[0]
        if layer is not None:
            per_layer[layer] = per_layer.get(layer, 0) + v
    k1 = 1 + n_agents
    return {
        "arch": arch, "n_params": d, "fp16_gb": 2 * d / GB, "naive_gb": k1 * d * 2 / GB,
        "largest_tensor": biggest, "largest_tensor_params": sizes[biggest],
        "stream_tensor_gb": k1 * sizes[biggest] * 4 / GB,
        "stream_no_embed_gb": k1 * max(inner) * 4 / GB,
        "stream_layer_gb": k1 * max(per_layer.values()) * 4 / GB,
    }


def memory_table(n_agents: int = 3, archs=None) -> list:
    """Rows of the memory table for the paper's sizes (or ``archs``: label → architecture)."""
    archs = archs or PAPER_MEMORY_ARCHS
    rows = []
    for label, arch in archs.items():
        r = memory_row(arch, n_agents)
        r["size"] = label
        r["reduction_tensor"] = r["naive_gb"] / r["stream_tensor_gb"]
        if label in PAPER_TABLE4 and n_agents == 3:
            fp16, naive, stream, red = PAPER_TABLE4[label]
            r.update(paper_fp16_gb=fp16, paper_naive_gb=naive, paper_stream_gb=stream, paper_reduction=red)
        rows.append(r)
    return rows


def predicted_stream_bytes(shapes, n_agents: int) -> int:
    """``(1 + K)·max tensor·4`` for arbitrary ``(name, shape)`` lists (small-scale validation)."""
    return (1 + n_agents) * max(int(np.prod(s)) for _, s in shapes) * 4


__all__ = ["PAPER_TABLE4", "memory_row", "memory_table", "predicted_stream_bytes"]
