"""mergekit model references: ``DIR``, ``DIR+LORA`` and ``{model: DIR, lora: LORA}``, as tensor sources.

``model+lora`` is the model with a PEFT LoRA adapter applied, ``θ = θ_model + B@A·α/r``: mergekit
merges the adapter into a copy of the model on disk first; here :class:`LoraApplied` adds ``ΔW``
to each tensor as it is read (through :class:`~unmerge_jax.sources.AdapterSource`), so nothing is
materialised. It works for ``models:`` entries and for ``base_model:``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.lora import is_adapter_dir
from unmerge_jax.sources import WEIGHTS, AdapterSource, CheckpointSource, TensorSource


class ModelRef(NamedTuple):
    """A resolved reference: the model directory and the LoRA adapter applied to it (or None)."""

    model: Path
    lora: Path | None = None

    def __str__(self) -> str:
        return str(self.model) if self.lora is None else f"{self.model}+{self.lora}"


class LoraApplied(TensorSource):
    """Full weights ``θ_model + ΔW`` of a model with a LoRA adapter applied, formed per tensor.

    Args:
      model: the model (a :class:`CheckpointSource` or a directory).
      lora: the PEFT LoRA adapter directory, checked against ``model`` (names, shapes).
    """

    kind = WEIGHTS

    def __init__(self, model, lora):
        self.model = model if isinstance(model, TensorSource) else CheckpointSource(model)
        self.adapter = AdapterSource(lora, self.model)
        self.path = getattr(self.model, "path", None)
        self.label = f"{self.model.label}+{self.adapter.label}"
        self.names = list(self.model.names)
        self.config = getattr(self.model, "config", None)

    def shape(self, name) -> tuple:
        return self.model.shape(name)

    def dtype(self, name) -> str:
        return self.model.dtype(name)

    def read_raw(self, name, out: np.ndarray | None = None) -> np.ndarray:
        """A tensor the adapter does not change, as stored (non-float tensors are never adapted)."""
        if self.adapter.touches(name):
            return self.read(name)
        return self.model.read_raw(name, out=out)

    def read(self, name, out: np.ndarray | None = None) -> np.ndarray:
        arr = self.model.read(name, out=out)
        if self.adapter.touches(name):
            if not arr.flags.writeable:
                arr = arr.copy()
            with np.errstate(over="ignore", invalid="ignore"):
                arr += self.adapter.read(name)
        return arr

    def read_rows(self, name, start: int, stop: int) -> np.ndarray:
        if self.adapter.touches(name):
            return np.ascontiguousarray(self.read(name)[start:stop])
        return self.model.read_rows(name, start, stop)

    def exact_rows(self, name) -> bool:
        """A tensor the adapter changes is formed whole (see ``AdapterSource.exact_rows``)."""
        return not self.adapter.touches(name) and self.model.exact_rows(name)

    def where(self, name) -> str:
        if self.adapter.touches(name):
            return f"{self.model.where(name)} + the LoRA {self.adapter.where(name)}"
        return self.model.where(name)


def weights_source(ref: ModelRef) -> TensorSource:
    """The full weights a reference stands for."""
    if ref.lora is None:
        return CheckpointSource(ref.model)
    return LoraApplied(ref.model, ref.lora)


def parse_ref(entry, resolve_path, what: str) -> ModelRef:
    """A ``models:`` / ``base_model:`` value as a :class:`ModelRef`.

    Args:
      entry: ``DIR``, ``DIR+LORA``, ``{model: ..., lora: ...}`` (mergekit's serialised form, paths
        as strings or ``{path: ...}``), or a ``models:`` entry ``{model: <any of those>, ...}``.
      resolve_path: ``resolve_path(value, what) -> Path`` — an existing local path, resolved.
      what: context for messages.
    """
    if isinstance(entry, dict) and "lora" in entry:
        model, lora = entry.get("model", entry.get("path")), entry["lora"]
    else:
        if isinstance(entry, dict):
            entry = entry.get("model", entry.get("path"))
        if isinstance(entry, dict):
            return parse_ref(entry, resolve_path, what)
        model, lora = entry, None
        if isinstance(entry, (str, Path)) and "+" in str(entry) and not Path(str(entry)).exists():
            chunks = str(entry).split("+")
            if len(chunks) != 2 or not all(chunks):
                raise UnmergeError(f"{what}: cannot parse model reference {entry!s:.200} (expected MODEL or "
                                   f"MODEL+LORA)")
            model, lora = chunks
    model = resolve_path(model.get("path") if isinstance(model, dict) else model, what)
    if lora is None:
        return ModelRef(model)
    lora = resolve_path(lora.get("path") if isinstance(lora, dict) else lora, f"{what}: lora")
    if not is_adapter_dir(lora):
        raise UnmergeError(f"{what}: {lora} is not a PEFT LoRA adapter directory (no adapter_config.json with "
                           f"adapter weights); give MODEL+ADAPTER_DIR")
    return ModelRef(model, lora)
