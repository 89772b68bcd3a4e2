"""The experiment's only contact points with the engine's other parts (merge engine, adapter reader, mask pass).

Kept in one small module so the experiment never grows its own copies of merging, adapter reading
or compression: each function here forwards to the public engine API.
"""

from __future__ import annotations

import numpy as np


def merge_deltas(method: str, deltas: list[dict[str, np.ndarray]], weights, *, seed: int, **params) -> dict[str, np.ndarray]:
    """Merge K task vectors ``{tensor: ΔW}`` tensor by tensor with the merge engine, in ΔW space.

    The base passed to the kernel is zero and the inputs are task vectors, so the result is the
    merged task vector itself (``θ_merged − θ_base``). DARE's masks are keyed by (seed, tensor name).
    """
    from unmerge_jax.merge import merge_tensors

    out = {}
    for name in deltas[0]:
        stack = np.stack([d[name] for d in deltas])
        merged = merge_tensors(method, np.zeros_like(stack[0]), stack, list(weights), seed=seed, name=name, **params)
        out[name] = np.asarray(merged, dtype=np.float32)
    return out


def adapter_deltas(adapter_dir) -> dict[str, np.ndarray]:
    """``{base tensor name: ΔW = B@A·α/r}`` of a PEFT LoRA adapter, read by the checkpoint I/O."""
    from unmerge_jax.io.lora import open_adapter

    adapter = open_adapter(adapter_dir)
    return {name: np.asarray(adapter.delta(name), dtype=np.float32) for name in adapter.base_names}


def topk_mask(dictionary: list[dict[str, np.ndarray]], top_k: int) -> dict[str, np.ndarray]:
    """Boolean masks keeping ``top_k`` entries spread uniformly over tensors (one tensor = one
    (layer, module) group here) ranked by ``M = max_i |d_i|`` (paper §3.4): the mask pass's
    compression rule (``unmerge_jax.passes.mask``), applied to in-memory task vectors."""
    from unmerge_jax.passes.mask import topk_mask as mask_pass_topk

    return mask_pass_topk(dictionary, top_k)
