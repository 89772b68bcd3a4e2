"""Task vectors ``δ = θ_finetuned − θ_base``, produced lazily one tensor at a time.

The fine-tuned side is a model directory (full weights: ``δ = θ − θ_base`` per tensor) or a PEFT
LoRA adapter directory (``δ = B@A·α/r`` for the modules it adapts, zeros elsewhere). The task
vector covers every tensor of the base. Opening one checks, from headers only, that the two sides
share the architecture (same tensor names, same shapes); reading happens in :meth:`delta`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.checkpoint import Checkpoint, open_checkpoint
from unmerge_jax.io.lora import is_adapter_dir, open_adapter


class TaskVector:
    """``source − base`` over the base's tensors. Use :func:`task_vector`.

    Attributes:
      name: a label (the source directory's basename unless given).
      path: the source directory.
      kind: ``"model"`` (full fine-tuned weights) or ``"adapter"`` (PEFT LoRA).
      base: the opened base :class:`~unmerge_jax.io.checkpoint.Checkpoint`.
      names: the base's tensor names.
    """

    def __init__(self, base, source, name: str | None = None, check_names=None):
        self.base = open_checkpoint(base)
        self.path = Path(source)
        self.name = name or self.path.name
        self.names = list(self.base.names)
        if is_adapter_dir(self.path):
            self.kind = "adapter"
            self.adapter = open_adapter(self.path)
            mapping = self.adapter.check_base(self.base)
            self._touched = {base_name: own for own, base_name in mapping.items()}
            self.model = None
        else:
            self.kind = "model"
            self.adapter = None
            self.model = open_checkpoint(self.path)
            check_same_architecture(self.base, self.model, check_names)
            self._touched = None

    def shape(self, name) -> tuple:
        return self.base.shape(name)

    def dtype(self, name) -> str:
        """Stored dtype of the fine-tuned side (the adapter factors' for LoRA)."""
        if self.kind == "model":
            return self.model.dtype(name)
        return self.base.dtype(name)

    def touches(self, name) -> bool:
        """False when ``δ`` of ``name`` is known to be zero without reading (a module the adapter skips)."""
        return self._touched is None or name in self._touched

    def parts(self, name) -> tuple[np.ndarray | None, bool]:
        """``(array, relative)``: the fine-tuned weights with ``relative=True`` (subtract the base),
        ``ΔW`` with ``relative=False``, or ``(None, False)`` for an untouched (all-zero) tensor.

        Lets a streaming pass read the base tensor once for all task vectors.
        """
        if self.kind == "model":
            return self.model.read(name), True
        own = self._touched.get(name)
        if own is None:
            if name not in self.base:
                raise UnmergeError(f"base {self.base.path} has no tensor {name}")
            return None, False
        return self.adapter.delta(own), False

    def delta(self, name) -> np.ndarray:
        """``δ`` of tensor ``name`` as float32 (a new array)."""
        arr, relative = self.parts(name)
        if arr is None:
            return np.zeros(self.base.shape(name), np.float32)
        if relative:
            arr = arr if arr.flags.writeable else arr.copy()  # a fresh array from the reader
            arr -= self.base.read(name)
        return arr

    def __repr__(self) -> str:
        return f"TaskVector({self.name!r}: {self.path} − {self.base.path})"


def check_same_architecture(base: Checkpoint, model: Checkpoint, names=None) -> None:
    """One-line error when ``model`` lacks a tensor of ``base`` or stores one with another shape."""
    have = set(model.names)
    for n in (base.names if names is None else names):
        if n not in have:
            raise UnmergeError(f"{model.path} has no tensor {n} (the base {base.path} has it): missing tensor — the "
                               f"inputs must be fine-tunes of the same architecture")
        if tuple(model.shape(n)) != tuple(base.shape(n)):
            raise UnmergeError(f"shape mismatch for tensor {n}: {model.path} has {tuple(model.shape(n))}, the base "
                               f"{base.path} has {tuple(base.shape(n))} — a different architecture; use fine-tunes "
                               f"of this base")


def task_vector(base, source, name: str | None = None, *, check_names=None) -> TaskVector:
    """The lazy task vector ``source − base``.

    Args:
      base: an opened checkpoint or a model directory path.
      source: a fine-tuned model directory or a PEFT LoRA adapter directory.
      name: label (default: the source directory's basename).
      check_names: base tensors that must exist with the base's shape in a model-directory source
        (default: all of them).
    """
    if not Path(source).exists():
        raise UnmergeError(f"{source} does not exist; pass a fine-tuned model directory or a LoRA adapter directory")
    return TaskVector(base, source, name, check_names)
