"""mergekit's YAML schema, the part we run: ``models`` or ``slices`` / ``base_model`` /
``merge_method`` / ``parameters`` / ``dtype`` / ``out_dtype``, and the tokenizer settings
``tokenizer_source`` / ``tokenizer`` / ``chat_template`` (parsed and checked by ``merge.tokenizer``).

Parameter values follow mergekit's ``evaluate_setting``: a scalar; a gradient (a list of numbers
interpolated over the layer fraction ``t = layer / (n_layers − 1)``, ``t = 0`` for tensors
outside the layer stack, as mergekit plans them); or a list of ``{filter, value}`` entries
where the first whose ``filter`` is a substring of the tensor name (or is absent / ``*``) wins.
Per-model ``parameters`` override the top-level ones. References may be ``MODEL+LORA`` (a PEFT
adapter applied on the fly, ``merge.refs``), for models and for the base. ``slices`` (layer
stacking, per-slice methods and parameters) are parsed by ``merge.slices``. ``modules`` is
refused with a one-line error. Where mergekit's semantics may surprise a
user, a config gets them and a note says so (:func:`_mergekit_semantics`, :func:`_linear_base`).

The YAML is read defensively: at most :data:`MAX_CONFIG_BYTES`, safe tags only, and at most
:data:`MAX_YAML_NODES` nodes once its aliases are expanded (a few hundred bytes of nested aliases
— "billion laughs" — otherwise stand for gigabytes); values quoted in errors are cut short.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.atomic import os_error
from unmerge_jax.io.names import parse_tensor_name
from unmerge_jax.merge.base import Resolved, short
from unmerge_jax.merge.params import get_method, per_model_params, resolve
from unmerge_jax.merge.refs import ModelRef, parse_ref
from unmerge_jax.merge.tokenizer import TokenizerSpec, parse_spec, spec_to_dict

MAX_CONFIG_BYTES = 1 << 20     # a merge config is a few hundred bytes; a gradient-heavy one a few KB
MAX_YAML_NODES = 100_000       # nodes of the document with every alias expanded

_KNOWN_KEYS = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source",
               "slices", "modules", "tokenizer", "chat_template", "name"}


@dataclass
class MergeConfig:
    """A parsed merge config. ``models[i] = (path, parameters)``; paths are resolved."""

    merge_method: str
    models: list[tuple[Path, dict]]
    base_model: Path | None = None
    parameters: dict = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    source: dict = field(default_factory=dict)
    path: Path | None = None     # the YAML file it was read from (an input the output must not touch)
    tokenizer: TokenizerSpec | None = None   # tokenizer_source / tokenizer / chat_template, if given
    # Parameters the config layer sets to match mergekit (e.g. ``weighted: false`` for ``ram``):
    # applied under the user's, not written back into the config.
    implied: dict = field(default_factory=dict)
    # One line each, printed at run time: where mergekit's semantics may surprise a user.
    notes: list = field(default_factory=list)
    # ``linear`` with a base_model that has a weight: the base is averaged in as a full-weight input
    # (it is then the last of ``models``), as mergekit does; "listed" (with its own parameters) or
    # "appended" (the top-level weight applies); None otherwise.
    base_input: str | None = None
    # ``model+lora`` references: the LoRA adapter applied to ``models[i]`` (None: none), and to the base.
    loras: list = field(default_factory=list)
    base_lora: Path | None = None
    # ``slices:`` (layer stacking, ``merge.slices``): a list of :class:`~unmerge_jax.merge.slices.SliceSpec`;
    # ``models`` is then empty.
    slices: list | None = None

    def __post_init__(self):
        if len(self.loras) != len(self.models):
            self.loras = [None] * len(self.models)

    @property
    def refs(self) -> list:
        """``models`` as :class:`~unmerge_jax.merge.refs.ModelRef` (model, lora)."""
        return [ModelRef(p, lora) for (p, _), lora in zip(self.models, self.loras)]

    @property
    def base_ref(self):
        return None if self.base_model is None else ModelRef(self.base_model, self.base_lora)

    @property
    def input_paths(self) -> list:
        """Every path the merge reads (the output must not touch them)."""
        out = [self.path, self.base_model, self.base_lora]
        for (p, _), lora in zip(self.models, self.loras):
            out += [p, lora]
        for sl in self.slices or ():
            for src in sl.sources:
                out += [src.ref.model, src.ref.lora]
            if sl.base is not None:
                out += [sl.base.model, sl.base.lora]
        return [x for x in out if x is not None]

    def to_dict(self) -> dict:
        """The config as mergekit YAML (paths absolute), written beside the merged model."""
        models = self.models[:-1] if self.base_input == "appended" else self.models
        d = {"merge_method": self.merge_method,
             "models": [{"model": str(ref), **({"parameters": prm} if prm else {})}
                        for ref, (_, prm) in zip(self.refs, models)]}
        if self.base_model is not None:
            d["base_model"] = str(self.base_ref)
        if self.parameters:
            d["parameters"] = self.parameters
        for k in ("dtype", "out_dtype"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        if self.tokenizer is not None:
            d.update(spec_to_dict(self.tokenizer))
        if self.slices is not None:
            del d["models"]
            d["slices"] = [sl.to_dict() for sl in self.slices]
        return d


def _model_path(ref, root: Path, what: str) -> Path:
    if isinstance(ref, dict):
        ref = ref.get("model", ref.get("path"))
    if not isinstance(ref, (str, Path)) or not str(ref) or len(str(ref)) > 4096 or "\0" in str(ref):
        raise UnmergeError(f"{what}: expected a model directory path, got {short(ref)}")
    s = str(ref)
    try:
        p = Path(s).expanduser()
        if not p.is_absolute() and not p.exists() and (root / p).exists():
            p = root / p
        if not p.exists():
            raise UnmergeError(f"{what}: model directory {short(s)} does not exist (no downloads: give a local "
                               f"directory)")
        return p.resolve()
    except OSError as err:   # a name too long for the file system, a loop of links
        raise os_error(err, short(s), "read") from None


def _expanded_nodes(node) -> int:
    """Nodes of a composed YAML document with every alias expanded (an alias is the node it names,
    met again), counted in time linear in the distinct nodes; a recursive alias counts as
    unbounded."""
    memo, busy = {}, set()

    def size(n) -> float:
        key = id(n)
        if key in memo:
            return memo[key]
        if key in busy:
            return float("inf")
        busy.add(key)
        total = 1.0
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(c) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        busy.discard(key)
        memo[key] = total
        return total

    return size(node)


def _parse_yaml(text: str, where: str):
    """``yaml.safe_load`` with the limits of the module docstring, as one-line errors."""
    if len(text) > MAX_CONFIG_BYTES:
        raise UnmergeError(f"{where} is {len(text):,} characters; a merge config is at most {MAX_CONFIG_BYTES:,} — "
                           f"is this the right file?")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_nodes(node)
        if n > MAX_YAML_NODES:
            raise UnmergeError(f"{where}: the YAML expands to {'unbounded' if n == float('inf') else f'{n:,.0f}'} "
                               f"nodes through its aliases (limit {MAX_YAML_NODES:,}); write the values out instead "
                               f"of nesting aliases")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = first if len(first) <= 150 else first[:147] + "..."
        raise UnmergeError(f"cannot parse {where} as YAML: {first}") from None
    except RecursionError:
        raise UnmergeError(f"cannot parse {where} as YAML: it is nested too deeply") from None
    finally:
        loader.dispose()


def _read_config(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise UnmergeError(f"merge config {path} is {size:,} bytes; a merge config is at most "
                               f"{MAX_CONFIG_BYTES:,} — is this the right file?")
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise os_error(err, path, "read") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UnmergeError(f"merge config {path} is not UTF-8 text (byte {err.start}); give a YAML file") from None


def load_config(config) -> MergeConfig:
    """Parse a mergekit config from a path, a YAML string, a dict or a :class:`MergeConfig`."""
    if isinstance(config, MergeConfig):
        return config
    root = Path.cwd()
    where, path = "merge config", None
    if isinstance(config, (str, Path)) and not (isinstance(config, str) and "\n" in config):
        path = Path(config)
        if not path.exists():
            raise UnmergeError(f"merge config {short(str(path))} does not exist")
        if path.is_dir():
            raise UnmergeError(f"merge config {path} is a directory; give the YAML file")
        raw = _parse_yaml(_read_config(path), str(path))
        root, where, path = path.resolve().parent, str(path), path.resolve()
    elif isinstance(config, str):
        raw = _parse_yaml(config, where)
    else:
        raw = config
    if not isinstance(raw, dict):
        raise UnmergeError(f"{where}: expected a mapping with merge_method and models")
    unknown = sorted(set(raw) - _KNOWN_KEYS, key=str)
    if unknown:
        raise UnmergeError(f"{where}: unknown key {short(unknown[0])}; supported: base_model, dtype, merge_method, "
                           f"models, out_dtype, parameters, slices, tokenizer_source, tokenizer, chat_template")
    for key in ("modules",):
        if raw.get(key):
            raise UnmergeError(f"{where}: '{key}' is not supported by this engine (whole-model merges only); "
                               f"use 'models:'")
    tokenizer = parse_spec(raw, lambda ref, what: _model_path(ref, root, what), where)
    if "merge_method" not in raw:
        raise UnmergeError(f"{where}: missing merge_method")
    method = raw["merge_method"]
    spec = get_method(method)
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None and (not isinstance(raw[key], str) or len(raw[key]) > 40):
            raise UnmergeError(f"{where}: {key} must be a dtype name (float32, float16, bfloat16), got "
                               f"{short(raw[key])}")
    def resolve_path(value, what):
        return _model_path(value, root, what)

    base_ref = parse_ref(raw["base_model"], resolve_path, f"{where}: base_model") if raw.get("base_model") else None
    base = base_ref.model if base_ref is not None else None
    if raw.get("slices") is not None:   # a slice may name its own base (checked per slice)
        if raw.get("models"):
            raise UnmergeError(f"{where}: give either 'models:' or 'slices:', not both (as mergekit)")
        return _slices_config(raw, method, spec, base_ref, resolve_path, where, path, tokenizer)
    if base is None and spec.needs_base:
        raise UnmergeError(f"{where}: merge method {method!r} needs a base_model")
    entries = raw.get("models")
    if entries is not None and not isinstance(entries, list):
        raise UnmergeError(f"{where}: models must be a list of entries like {{model: DIR, parameters: {{...}}}}, got "
                           f"{short(entries)}")
    models = []
    for i, entry in enumerate(entries or []):
        what = f"{where}: models[{i}]"
        if not isinstance(entry, (dict, str)):
            raise UnmergeError(f"{what}: expected {{model: DIR, parameters: {{...}}}} or a directory, got {short(entry)}")
        params = per_model_params(entry.get("parameters") if isinstance(entry, dict) else None, spec, what)
        models.append((parse_ref(entry, resolve_path, what), params))
    # mergekit lists the base among the models for GTA methods; it contributes no task vector.
    # The base's role in the methods that take one without task vectors (``MergeMethod.options``):
    # "origin" (nuslerp, multislerp: it is dropped from the models, as a needed base is) or "input"
    # (karcher: mergekit adds it to the inputs when it is not listed).
    role = spec.options.get("base_role")
    models = [(r, prm) for r, prm in models
              if base is None or r != base_ref or not (spec.needs_base or role == "origin")]
    if base is not None and role == "input" and all(r != base_ref for r, _ in models):
        models.append((base_ref, {}))
    if not models:
        raise UnmergeError(f"{where}: no models to merge (list them under 'models:')")
    if method == "passthrough" and len(models) != 1:
        raise UnmergeError(f"{where}: passthrough takes exactly one model, got {len(models)} (as mergekit); stack "
                           f"layers with 'slices:'")
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise UnmergeError(f"{where}: parameters must be a mapping")
    implied, notes = _mergekit_semantics(method, models, base, params)
    base_input = None
    if method == "linear" and base is not None:
        base_input, models, note = _linear_base(models, base_ref, params)
        notes += [note] if note else []
    cfg = MergeConfig(method, [(r.model, prm) for r, prm in models], base, dict(params), raw.get("dtype"),
                      raw.get("out_dtype"), raw, path, tokenizer=tokenizer, implied=implied, notes=notes,
                      base_input=base_input, loras=[r.lora for r, _ in models],
                      base_lora=base_ref.lora if base_ref is not None else None)
    # Resolve once eagerly (t = 0, no tensor name) so a bad value fails before anything is read.
    resolve_for_tensor(cfg, "", 0.0)
    return cfg


def _slices_config(raw: dict, method: str, spec, base_ref, resolve_path, where: str, path,
                   tokenizer=None) -> MergeConfig:
    """A ``slices:`` config: each slice's sources (``model``, ``layer_range``, ``parameters``), its
    own ``base_model`` and ``parameters``, checked as far as the YAML allows (layer counts are
    checked against the models in ``merge.slices``)."""
    from unmerge_jax.merge.slices import parse_slices

    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise UnmergeError(f"{where}: parameters must be a mapping")
    slices = parse_slices(raw["slices"], spec, base_ref, resolve_path, where)
    implied, notes = _mergekit_semantics(method, [(None, s.params) for sl in slices for s in sl.sources], base_ref,
                                         params)
    cfg = MergeConfig(method, [], base_ref.model if base_ref is not None else None, dict(params), raw.get("dtype"),
                      raw.get("out_dtype"), raw, path, tokenizer=tokenizer, implied=implied, notes=notes,
                      base_lora=base_ref.lora if base_ref is not None else None, slices=slices)
    for i, sl in enumerate(slices):   # resolve once eagerly (t = 0, no tensor name)
        resolve_slice(cfg, sl, "", 0.0, f"{where}: slices[{i}]")
    return cfg


def resolve_slice(cfg: MergeConfig, sl, name: str, t: float, where: str = "") -> Resolved:
    """The method's parameters for one tensor of a slice: per source its ``parameters``, then the
    slice's, then the top-level ones (mergekit's precedence), filters and gradients evaluated."""
    shared = {**cfg.implied, **_evaluated(cfg.parameters, name, t), **_evaluated(sl.params, name, t)}
    per_model = [_evaluated(s.params, name, t) for s in sl.merged_sources]
    return resolve(cfg.merge_method, len(per_model), shared, per_model, where=name or where or "merge config")


def _mergekit_semantics(method: str, models, base, params: dict) -> tuple[dict, list]:
    """Parameters implied so that a mergekit YAML gives mergekit's model, and the notes to print.

    ``ram`` / ``ramplus_tl`` (mergekit's faces): mergekit's methods take no per-model weight and
    ignore one given; so does this config, unless it sets ``weighted: true``.
    """
    from unmerge_jax.merge.methods.ram import MERGEKIT_FACES, canonical_face

    implied, notes = {}, []
    if method in MERGEKIT_FACES and "weighted" not in params:
        face = params.get("face", get_method(method).shared["face"])
        if isinstance(face, str) and canonical_face(face) == MERGEKIT_FACES[method]:
            implied["weighted"] = False
            if "weight" in params or any("weight" in prm for _, prm in models):
                notes.append(f"{method} ignores per-model weight, as in mergekit (set parameters: {{weighted: true}} "
                             f"to apply it)")
    return implied, notes


def _linear_base(models, base, params: dict):
    """mergekit's ``linear`` with a ``base_model``: the base is one more input, averaged in with the
    weight it is listed with or the top-level ``weight``. Returns ``(base_input, models, note)``
    (``base_input``: see :class:`MergeConfig`):
    the base is moved to the end of ``models`` (listed or appended with no per-model parameters,
    so the top-level weight applies); without any weight for it (mergekit refuses that config)
    the listed models are merged alone, with a note."""
    listed = [(p, prm) for p, prm in models if p == base]
    others = [(p, prm) for p, prm in models if p != base]
    if listed:
        return "listed", others + listed[:1], None   # only the base listed: the merge is the base (as mergekit)
    if "weight" in params:
        return "appended", others + [(base, {})], None
    return None, models, ("linear: the base_model has no weight, so it is not averaged in (mergekit refuses this "
                           "config; give the base a weight to average it in, as mergekit does)")


def layer_fraction(name: str, n_layers: int | None) -> float:
    """mergekit's ``t`` for a tensor: layer / (n_layers − 1) inside the layer stack, else 0."""
    i = parse_tensor_name(name).layer
    if i is None or not n_layers:
        return 0.0
    return i / (n_layers - 1) if n_layers > 1 else 1.0


def evaluate(setting, name: str, t: float):
    """mergekit's ``evaluate_setting``: scalars, gradients, and ``{filter, value}`` lists."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(not isinstance(e, (dict, list)) for e in setting):
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
                return setting[int(t * (len(setting) - 1))]
            x = t * (len(setting) - 1)
            i0 = int(x)
            i1 = min(len(setting) - 1, i0 + 1)
            f = x - i0
            return (1 - f) * float(setting[i0]) + f * float(setting[i1])
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond:
                raise UnmergeError(f"parameter entry {short(cond)} must be a number, a list of numbers, "
                                   f"or {{filter: ..., value: ...}}")
            flt = cond.get("filter")
            if flt is None or flt == "*" or (name and str(flt) in name):
                return evaluate(cond["value"], name, t)
        return None
    return setting


def _evaluated(params: dict, name: str, t: float) -> dict:
    out = {}
    for k, v in params.items():
        x = evaluate(v, name, t)
        if x is not None:
            out[k] = x
    return out


def resolve_for_tensor(cfg: MergeConfig, name: str, t: float) -> Resolved:
    """The method's parameters for one tensor (filters and gradients evaluated), checked (a
    ``models:`` config; a slice's: :func:`resolve_slice`)."""
    shared = {**cfg.implied, **_evaluated(cfg.parameters, name, t)}
    per_model = [_evaluated(p, name, t) for _, p in cfg.models]
    return resolve(cfg.merge_method, len(cfg.models), shared, per_model, where=name or "merge config")
