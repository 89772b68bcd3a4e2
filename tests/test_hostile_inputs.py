"""Hostile inputs: every class of bad input is refused with one line naming the culprit and the fix.

Library-level checks here (readers and sources); the command-line contract (exit code 2, one
line, no traceback, nothing written, inputs byte-identical) is checked through the real CLI in
``test_hostile_cli.py``.
"""

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.checkpoint import open_checkpoint
from unmerge_jax.io.lora import PEFT_DEFAULTS, open_adapter
from unmerge_jax.sources import nonfinite_error, open_source, task_vector

Q = "model.layers.{}.self_attn.q_proj.weight"
CFG = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 4, "vocab_size": 16, "architectures": ["LlamaForCausalLM"]}


def _model(path: Path, seed=0, layers=2, config=CFG, dtype=np.float32, extra=None):
    rng = np.random.default_rng(seed)
    t = {Q.format(i): rng.standard_normal((4, 4)).astype(dtype) for i in range(layers)}
    t["model.embed_tokens.weight"] = rng.standard_normal((16, 4)).astype(dtype)
    t.update(extra or {})
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    return t


def _adapter(path: Path, config: dict, r=2, seed=1, module="model.layers.0.self_attn.q_proj"):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    save_file({f"base_model.model.{module}.lora_A.weight": rng.standard_normal((r, 4)).astype(np.float32),
               f"base_model.model.{module}.lora_B.weight": rng.standard_normal((4, r)).astype(np.float32)},
              str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config) if not isinstance(config, str) else config)
    return path


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


# --- paths stay inside their model ----------------------------------------------------------------
def _sharded(path: Path, target: str):
    path.mkdir(parents=True)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {Q.format(0): target}}))


def test_index_entries_cannot_leave_the_model_directory(tmp_path):
    _model(tmp_path / "other")
    for target in ("../other/model.safetensors", str(tmp_path / "other" / "model.safetensors"), "sub/x.safetensors"):
        d = tmp_path / f"m{abs(hash(target))}"
        _sharded(d, target)
        with pytest.raises(UnmergeError, match="not a file of the model directory"):
            open_checkpoint(d)
    d = tmp_path / "linked"
    _sharded(d, "model-00001.safetensors")
    os.symlink(tmp_path / "other" / "model.safetensors", d / "model-00001.safetensors")
    with pytest.raises(UnmergeError, match="outside the model directory"):
        open_checkpoint(d)


def test_a_hugging_face_cache_snapshot_with_linked_shards_is_read(tmp_path):
    repo = tmp_path / "models--org--m"
    blob = repo / "blobs"
    blob.mkdir(parents=True)
    t = _model(tmp_path / "src")
    os.replace(tmp_path / "src" / "model.safetensors", blob / "abc123")
    snap = repo / "snapshots" / "rev0"
    snap.mkdir(parents=True)
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "model-1.safetensors" for n in t}}))
    os.symlink("../../blobs/abc123", snap / "model-1.safetensors")
    np.testing.assert_array_equal(open_checkpoint(snap).read(Q.format(0)), t[Q.format(0)])


def test_single_file_wins_over_an_index_as_in_transformers(tmp_path):
    t = _model(tmp_path / "m")
    _model(tmp_path / "m" / "shard_src", seed=5)
    os.replace(tmp_path / "m" / "shard_src" / "model.safetensors", tmp_path / "m" / "model-00001-of-00001.safetensors")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "model-00001-of-00001.safetensors" for n in t}}))
    ck = open_checkpoint(tmp_path / "m")
    assert ck.files == ["model.safetensors"]
    np.testing.assert_array_equal(ck.read(Q.format(1)), t[Q.format(1)])


# --- inputs are what they say they are ------------------------------------------------------------
def test_architecture_is_checked_by_config_dtype_and_extra_tensors(tmp_path):
    _model(tmp_path / "base")
    _model(tmp_path / "deeper", layers=3)
    with pytest.raises(UnmergeError, match="num_hidden_layers"):
        task_vector(tmp_path / "base", tmp_path / "deeper")
    _model(tmp_path / "deeper_nocfg", layers=3, config=None)
    with pytest.raises(UnmergeError, match="extra tensor"):
        task_vector(tmp_path / "base", tmp_path / "deeper_nocfg")
    _model(tmp_path / "qwen", config={**CFG, "model_type": "qwen2"})
    with pytest.raises(UnmergeError, match="model_type"):
        task_vector(tmp_path / "base", tmp_path / "qwen")
    ints = _model(tmp_path / "ints", dtype=np.float32)
    save_file({k: (v * 1e3).astype(np.int32) for k, v in ints.items()}, str(tmp_path / "ints" / "model.safetensors"))
    with pytest.raises(UnmergeError, match="stored as I32 but the base .* stores it as F32"):
        task_vector(tmp_path / "base", tmp_path / "ints")
    _model(tmp_path / "biases", extra={"model.layers.0.self_attn.q_proj.bias": np.zeros(4, np.float32)})
    with pytest.raises(UnmergeError, match="lacks"):
        task_vector(tmp_path / "base", tmp_path / "biases")
    _model(tmp_path / "same", seed=3)
    assert task_vector(tmp_path / "base", tmp_path / "same").names == sorted(open_source(tmp_path / "base").names)


def test_nonfinite_errors_name_tensor_file_and_first_index():
    a = np.zeros((3, 4), np.float32)
    a[1, 2] = np.nan
    a[2, 0] = np.inf
    msg = str(nonfinite_error("w", "model.safetensors", a))
    assert "tensor w of model.safetensors" in msg and "(1, 2)" in msg and "nan" in msg


# --- PEFT semantics exactly ------------------------------------------------------------------------
def test_adapter_defaults_are_peft_defaults(tmp_path):
    peft = pytest.importorskip("peft")
    want = peft.LoraConfig()
    assert PEFT_DEFAULTS == {"r": want.r, "lora_alpha": want.lora_alpha, "use_rslora": want.use_rslora,
                             "fan_in_fan_out": want.fan_in_fan_out}
    ad = open_adapter(_adapter(tmp_path / "a", {"peft_type": "LORA", "r": 2}))
    assert math.isclose(ad.scale("model.layers.0.self_attn.q_proj.weight"), want.lora_alpha / 2)


@pytest.mark.parametrize("config,match", [
    ('[1, 2]', "JSON list, not an object"),
    ({"peft_type": "LORA", "r": "2"}, "r is '2'"),
    ({"peft_type": "LORA", "r": 2, "lora_alpha": float("nan")}, "lora_alpha is nan"),
    ({"peft_type": "LORA", "r": 2, "lora_alpha": [8]}, "lora_alpha is \\[8\\]"),
    ({"peft_type": "LORA", "r": 2, "alpha_pattern": {"q_proj(": 4}}, "not a regular expression"),
    ({"peft_type": "LORA", "r": 2, "alpha_pattern": ["x"]}, "expected an object"),
    ({"peft_type": "LORA", "r": 4}, "rank 2 but .* r = 4"),
    ({"peft_type": "LORA", "r": 2, "use_rslora": "yes"}, "expected true or false"),
])
def test_malformed_adapter_configs_are_one_line_errors(tmp_path, config, match):
    path = _adapter(tmp_path / "a", config)
    before = _digest(path)
    with pytest.raises(UnmergeError, match=match) as err:
        open_adapter(path)
    assert "\n" not in str(err.value) and "adapter_config.json" in str(err.value)
    assert _digest(path) == before


def test_fan_in_fan_out_on_a_linear_layer_is_ignored_as_peft_does(tmp_path):
    _model(tmp_path / "base")
    rng = np.random.default_rng(1)
    path = tmp_path / "a"
    path.mkdir()
    # a non-square module so orientation is decidable from the base: embed_tokens is (16, 4)
    save_file({"base_model.model.model.embed_tokens.lora_A.weight": rng.standard_normal((2, 4)).astype(np.float32),
               "base_model.model.model.embed_tokens.lora_B.weight": rng.standard_normal((16, 2)).astype(np.float32)},
              str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                          "fan_in_fan_out": True}))
    tv = task_vector(tmp_path / "base", path)
    got = tv.read("model.embed_tokens.weight")
    f = open_adapter(path)._f
    want = f.get_tensor("base_model.model.model.embed_tokens.lora_B.weight") @ f.get_tensor(
        "base_model.model.model.embed_tokens.lora_A.weight")
    np.testing.assert_allclose(got, want, rtol=1e-6)
