"""Minimal stand-in for ``unmerge_jax.io.checkpoint`` / ``lora`` / ``taskvec`` (issue 3), used by
the merge driver only while those modules are not installed. Same contract, fewer checks:
``open_checkpoint(path)`` (``.names``, ``.shape``, ``.dtype``, ``.read`` → float32, ``.config``),
``is_adapter_dir``, ``open_adapter`` (``.base_names``, ``.delta``) and ``task_vector``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from unmerge_jax.errors import UnmergeError


class _Checkpoint:
    def __init__(self, path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            wm = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").exists():
            with safe_open(str(self.path / "model.safetensors"), framework="numpy") as f:
                wm = {k: "model.safetensors" for k in f.keys()}
        else:
            raise UnmergeError(f"{self.path} holds no model.safetensors or model.safetensors.index.json")
        self._where = wm
        self.files = sorted(set(wm.values()))
        self.names = sorted(wm)
        self._handles = {}
        self._meta = {}
        for fname in self.files:
            raw = (self.path / fname).read_bytes()[:8]
            n = int.from_bytes(raw, "little")
            with open(self.path / fname, "rb") as fh:
                fh.seek(8)
                head = json.loads(fh.read(n))
            for k, v in head.items():
                if k != "__metadata__":
                    self._meta[k] = v
        cfg = self.path / "config.json"
        self.config = json.loads(cfg.read_text()) if cfg.exists() else None

    def shape(self, name):
        return tuple(self._meta[name]["shape"])

    def dtype(self, name):
        return self._meta[name]["dtype"]

    def read(self, name):
        fname = self._where[name]
        h = self._handles.get(fname)
        if h is None:
            h = self._handles[fname] = safe_open(str(self.path / fname), framework="numpy")
        arr = h.get_tensor(name)
        return np.asarray(arr, dtype=np.float32)


class _Adapter:
    def __init__(self, path):
        self.path = Path(path)
        self.cfg = json.loads((self.path / "adapter_config.json").read_text())
        self._f = safe_open(str(self.path / "adapter_model.safetensors"), framework="numpy")
        r = self.cfg["r"]
        alpha = self.cfg.get("lora_alpha", r)
        self.scale = alpha / np.sqrt(r) if self.cfg.get("use_rslora") else alpha / r
        self._ab = {}
        for k in self._f.keys():
            if ".lora_A." in k:
                stem = k.split(".lora_A.")[0]
                name = stem.replace("base_model.model.", "", 1) + ".weight"
                self._ab[name] = (k, k.replace(".lora_A.", ".lora_B."))
        self.base_names = sorted(self._ab)

    def delta(self, name):
        a, b = self._ab[name]
        A = np.asarray(self._f.get_tensor(a), np.float32)
        B = np.asarray(self._f.get_tensor(b), np.float32)
        return (B @ A) * np.float32(self.scale)


class _TaskVector:
    def __init__(self, base, path):
        self.name = Path(path).name
        self._a = _Adapter(path)
        self._base = base
        self.names = base.names

    def delta(self, name):
        if name in self._a._ab:
            return self._a.delta(name)
        return np.zeros(self._base.shape(name), np.float32)


def open_checkpoint(path):
    return _Checkpoint(path)


def open_adapter(path):
    return _Adapter(path)


def is_adapter_dir(path):
    return (Path(path) / "adapter_config.json").exists()


def task_vector(base, source):
    return _TaskVector(base, source)
