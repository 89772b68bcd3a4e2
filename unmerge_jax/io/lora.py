"""PEFT LoRA adapter directories as task vectors: ``ΔW = B @ A · α/r`` (``α/√r`` with rsLoRA).

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (r × in) and ``…lora_B.weight`` (out × r). The task
vector of the module's weight ``<module>.weight`` is ``B @ A`` times the scale (per-module ``r`` from
A's shape, checked against ``r``/``rank_pattern``; ``α`` from ``alpha_pattern`` or ``lora_alpha``;
missing fields take PEFT's ``LoraConfig`` defaults, ``r = lora_alpha = 8``), transposed for
``fan_in_fan_out`` where PEFT applies it (GPT-2 Conv1D weights stored (in, out); PEFT resets the flag
on Linear layers) and for embedding LoRA (``lora_embedding_A/B``). Computed in float32 from the
stored factors, one module at a time. Malformed config values (a JSON list, strings for numbers,
NaN, a pattern that is not a regex) are one-line errors naming the file and key.

Not supported (one-line error with the fix): DoRA magnitude vectors, ``modules_to_save`` and
trained biases — merge such adapters with ``merge_and_unload()`` and pass the merged model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.checkpoint import ARCH_KEYS, _safe_open

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+?)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])"
                  r"(?:\.(?P<adapter>(?!weight$)[^.]+))?(?:\.weight)?$")
def is_adapter_dir(path) -> bool:
    """True when ``path`` is a directory holding ``adapter_config.json``."""
    return (Path(path) / CONFIG_NAME).is_file()


def _pattern_value(patterns: dict, module: str, default):
    for pat, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return val
    return default


# PEFT's LoraConfig defaults for the fields that change ΔW.
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8, "use_rslora": False, "fan_in_fan_out": False}


def _number(cfg_path, key, value, *, integer=False):
    """A finite positive config number, or a one-line error naming the file and key."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) and value > 0
    if ok and integer:
        ok = float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a finite positive number"
        raise UnmergeError(f"{cfg_path}: {key} is {value!r}, which is not {kind}; fix the adapter config")
    return value


def _flag(cfg_path, key, value):
    if not isinstance(value, bool):
        raise UnmergeError(f"{cfg_path}: {key} is {value!r}, expected true or false; fix the adapter config")
    return value


def _patterns(cfg_path, key, value) -> dict:
    """``alpha_pattern``/``rank_pattern``: ``{regex: number}``, each regex compiled up front."""
    if value in (None, {}):
        return {}
    if not isinstance(value, dict):
        raise UnmergeError(f"{cfg_path}: {key} is {type(value).__name__}, expected an object {{pattern: number}}; "
                           f"fix the adapter config")
    for pat, val in value.items():
        try:
            re.compile(pat)
        except re.error as err:
            raise UnmergeError(f"{cfg_path}: {key} pattern {pat!r} is not a regular expression ({err}); fix the "
                               f"adapter config") from None
        _number(cfg_path, f"{key}[{pat!r}]", val, integer=key == "rank_pattern")
    return value


class Adapter:
    """An opened PEFT LoRA adapter (factors are read lazily). Use :func:`open_adapter`.

    Attributes:
      path: the adapter directory.
      config: ``adapter_config.json`` as a dict.
      base_names: base-model weight names the adapter changes, sorted.
      base_model: ``base_model_name_or_path`` from the config (may be None).
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise UnmergeError(f"{self.path} does not exist; pass a PEFT LoRA adapter directory")
        cfg_path = self.path / CONFIG_NAME
        if not cfg_path.is_file():
            raise UnmergeError(f"{self.path} has no {CONFIG_NAME}; it is not a PEFT adapter directory")
        try:
            self.config = json.loads(cfg_path.read_text())
        except ValueError as err:
            raise UnmergeError(f"cannot parse {cfg_path}: {err}; re-save the adapter") from None
        except OSError as err:
            raise UnmergeError(f"cannot read {cfg_path}: {err.strerror or err}") from None
        if not isinstance(self.config, dict):
            raise UnmergeError(f"{cfg_path} holds a JSON {type(self.config).__name__}, not an object; re-save the "
                               f"adapter")
        ptype = str(self.config.get("peft_type", "LORA")).upper()
        if ptype != "LORA":
            raise UnmergeError(f"{cfg_path} is a {ptype} adapter; only LoRA adapters are supported")
        if self.config.get("use_dora"):
            raise UnmergeError(f"{self.path} is a DoRA adapter (use_dora=true), which is not a plain B@A update; "
                               f"merge it with merge_and_unload() and pass the merged model directory")
        wfile = self.path / WEIGHTS_NAME
        if not wfile.is_file():
            extra = f" (only adapter_model.bin: convert it with `unmerge convert {self.path} --out NEW_DIR`)" if (
                self.path / "adapter_model.bin").exists() else ""
            raise UnmergeError(f"{self.path} has no {WEIGHTS_NAME}{extra}")
        self.file = wfile
        self._f = _safe_open(wfile)
        self.base_model = self.config.get("base_model_name_or_path")
        cfg = {**PEFT_DEFAULTS, **{k: v for k, v in self.config.items() if v is not None}}
        self._r = int(_number(cfg_path, "r", cfg["r"], integer=True))
        self._alpha = _number(cfg_path, "lora_alpha", cfg["lora_alpha"])
        self._rslora = _flag(cfg_path, "use_rslora", cfg["use_rslora"])
        self._fan = _flag(cfg_path, "fan_in_fan_out", cfg["fan_in_fan_out"])
        alpha_pattern = _patterns(cfg_path, "alpha_pattern", self.config.get("alpha_pattern"))
        rank_pattern = _patterns(cfg_path, "rank_pattern", self.config.get("rank_pattern"))
        pairs: dict[str, dict] = {}
        for key in self._f.keys():
            m = _KEY.match(key)
            if m is None:
                raise UnmergeError(f"{wfile} holds {key}, which is not a LoRA factor (modules_to_save, a trained bias "
                                   f"or DoRA); merge the adapter with merge_and_unload() and pass the merged model "
                                   f"directory instead")
            mod = m.group("mod")
            entry = pairs.setdefault(mod, {"emb": bool(m.group("emb"))})
            if m.group("ab") in entry:
                raise UnmergeError(f"{wfile} holds two lora_{m.group('ab')} factors for {mod} (several adapters in one "
                                   f"file); save each adapter to its own directory")
            entry[m.group("ab")] = key
        self._mods: dict[str, tuple] = {}
        for mod, e in pairs.items():
            if "A" not in e or "B" not in e:
                raise UnmergeError(f"{wfile} has lora_{'A' if 'A' in e else 'B'} but no lora_{'B' if 'A' in e else 'A'} "
                                   f"for {mod}; the adapter file is incomplete — re-save it")
            a_shape = tuple(self._f.get_slice(e["A"]).get_shape())
            b_shape = tuple(self._f.get_slice(e["B"]).get_shape())
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise UnmergeError(f"{wfile}: LoRA factors of {mod} have shapes A {a_shape}, B {b_shape}; expected "
                                   f"A (r, in) and B (out, r)")
            r = a_shape[0]
            want_r = int(_pattern_value(rank_pattern, mod, self._r))
            if r != want_r:
                raise UnmergeError(f"{wfile}: the LoRA factors of {mod} have rank {r} but {cfg_path} gives r = {want_r}"
                                   f"{' (rank_pattern)' if want_r != self._r else ''}; the config does not belong to "
                                   f"these weights — re-save the adapter")
            alpha = _pattern_value(alpha_pattern, mod, self._alpha)
            scale = float(alpha) / (np.sqrt(r) if self._rslora else r)
            transpose = e["emb"] or self._fan
            shape = (b_shape[0], a_shape[1])
            self._mods[mod + ".weight"] = (e["A"], e["B"], np.float32(scale), transpose,
                                           shape[::-1] if transpose else shape)
        if not self._mods:
            raise UnmergeError(f"{wfile} holds no LoRA factors")
        self.base_names = sorted(self._mods)

    def factor_dtypes(self) -> dict:
        """``{stored dtype tag: number of LoRA factors}``."""
        out: dict[str, int] = {}
        for a_key, b_key, *_ in self._mods.values():
            for k in (a_key, b_key):
                tag = str(self._f.get_slice(k).get_dtype())
                out[tag] = out.get(tag, 0) + 1
        return out

    def shape(self, name) -> tuple:
        """Shape of ``ΔW`` for base weight ``name``."""
        return self._mods[self._key(name)][4]

    def scale(self, name) -> float:
        """The LoRA scale (α/r or α/√r) applied to ``name``."""
        return float(self._mods[self._key(name)][2])

    def _key(self, name):
        if name not in self._mods:
            raise UnmergeError(f"adapter {self.path} does not change tensor {name}")
        return name

    def delta(self, name, out: np.ndarray | None = None) -> np.ndarray:
        """``ΔW`` of base weight ``name`` as float32 (the base weight's shape).

        Args:
          out: optional reusable float32 1-D buffer (at least the weight's size); the result is
            then a view into it.
        """
        a_key, b_key, scale, transpose, shape = self._mods[self._key(name)]
        try:
            A = np.asarray(self._f.get_tensor(a_key), np.float32)
            B = np.asarray(self._f.get_tensor(b_key), np.float32)
        except Exception as err:
            raise UnmergeError(f"cannot read {a_key} from {self.file}: {err}; re-save the adapter") from None
        if transpose:
            full = (B @ A).T
            d = np.empty(full.shape, np.float32) if out is None else out[:full.size].reshape(full.shape)
            np.copyto(d, full)
        else:
            d = B @ A if out is None else np.matmul(B, A, out=out[:B.shape[0] * A.shape[1]].reshape(B.shape[0], A.shape[1]))
        d *= scale
        return d

    def delta_rows(self, name, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``ΔW`` of base weight ``name`` as float32, without forming the rest:
        ``B[start:stop] @ A · scale`` (``(B @ A[:, start:stop])ᵀ · scale`` for a transposed layer)."""
        a_key, b_key, scale, transpose, shape = self._mods[self._key(name)]
        start, stop = max(0, int(start)), min(int(shape[0]), int(stop))
        try:
            A = np.asarray(self._f.get_tensor(a_key), np.float32)
            B = np.asarray(self._f.get_tensor(b_key), np.float32)
        except Exception as err:
            raise UnmergeError(f"cannot read {a_key} from {self.file}: {err}; re-save the adapter") from None
        d = np.ascontiguousarray((B @ A[:, start:stop]).T) if transpose else B[start:stop] @ A
        d *= scale
        return d

    def resolve(self, base_names) -> dict[str, str]:
        """``{adapter weight name: base tensor name}``, allowing a ``model.`` prefix difference."""
        have = set(base_names)
        out = {}
        for n in self.base_names:
            for cand in (n, "model." + n, n[len("model."):] if n.startswith("model.") else None):
                if cand is not None and cand in have:
                    out[n] = cand
                    break
        return out

    def check_base(self, base) -> dict[str, str]:
        """Check that the adapter fits ``base`` (an opened checkpoint); returns :meth:`resolve`'s map.

        Raises a one-line error when the adapter names a tensor the base lacks, when a ``ΔW`` shape
        differs from the base weight, or when ``base_model_name_or_path`` is a local model
        directory whose architecture (config.json) differs from the base's.
        """
        mapping = self.resolve(base.names)
        for n in self.base_names:
            if n not in mapping:
                raise UnmergeError(f"adapter {self.path} changes tensor {n}, which base {base.path} lacks: the adapter was "
                                   f"trained on a different base model; pass that base with --base")
            want, got = tuple(base.shape(mapping[n])), self.shape(n)
            a_key, b_key, scale, transpose, shape = self._mods[n]
            if want != got and want == got[::-1] and self._fan and ".lora_embedding_" not in a_key:
                # PEFT honours fan_in_fan_out only for Conv1D layers (weights stored (in, out)); on a
                # Linear layer it resets the flag and ΔW keeps B@A's (out, in) orientation.
                self._mods[n] = (a_key, b_key, scale, not transpose, shape[::-1])
                got = want
            if want != got:
                raise UnmergeError(f"adapter {self.path} gives {n} shape {got} but base {base.path} has {want}: the "
                                   f"adapter was trained on a different base model (shape mismatch); pass that base")
        self._check_declared_base(base)
        return mapping

    def _check_declared_base(self, base) -> None:
        declared = self.base_model
        base_cfg = getattr(base, "config", None) or {}
        cls = (self.config.get("auto_mapping") or {}).get("base_model_class")
        archs = base_cfg.get("architectures") or []
        if cls and archs and cls not in archs:
            raise UnmergeError(f"adapter {self.path} was trained on a {cls} but base {base.path} is a {archs[0]}; "
                               f"pass the adapter's own base with --base")
        if not declared:
            return
        p = Path(declared)
        if not p.is_absolute():
            p = (self.path / declared) if (self.path / declared).exists() else p
        if not (p.is_dir() and (p / "config.json").is_file()) or not base_cfg:
            return  # a hub id (or no config to compare): the shape checks above are what we can verify
        if p.resolve() == Path(base.path).resolve():
            return
        try:
            theirs = json.loads((p / "config.json").read_text())
        except ValueError:
            return
        diff = [k for k in ARCH_KEYS if k in theirs and k in base_cfg and theirs[k] != base_cfg[k]]
        if diff:
            k = diff[0]
            raise UnmergeError(f"adapter {self.path} declares base_model_name_or_path {declared} whose {k} is {theirs[k]}, "
                               f"but base {base.path} has {k} {base_cfg[k]}: the adapter belongs to a different base; "
                               f"pass {declared} with --base")

    def __repr__(self) -> str:
        return f"Adapter({str(self.path)!r}, {len(self.base_names)} modules)"


def open_adapter(path) -> Adapter:
    """Open a PEFT LoRA adapter directory (config and factor shapes only). See :class:`Adapter`."""
    if isinstance(path, Adapter):
        return path
    return Adapter(path)
