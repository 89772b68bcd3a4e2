"""The tensor-source protocol: every implementation reads the same tensors the same way."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from unmerge_jax.errors import UnmergeError
from unmerge_jax.sources import (AdapterSource, CheckpointSource, MemorySource, TaskVector, VirtualSource,
                                 open_source, task_vector)

Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"
NORM = "model.norm.weight"


def _weights(seed, shift=0.0):
    rng = np.random.default_rng(seed)
    return {Q: rng.standard_normal((6, 4)).astype(np.float32) + shift,
            UP: rng.standard_normal((8, 4)).astype(np.float32) + shift,
            NORM: rng.standard_normal(4).astype(np.float32) + shift}


@pytest.fixture
def files(tmp_path):
    base, ft = _weights(0), _weights(0, 0.25)
    ft[UP] = ft[UP].astype(np.float16).astype(np.float32)
    (tmp_path / "base").mkdir()
    (tmp_path / "ft").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    save_file({**ft, UP: ft[UP].astype(np.float16)}, str(tmp_path / "ft" / "model.safetensors"))
    rng = np.random.default_rng(1)
    A, B = rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((6, 2)).astype(np.float32)
    ad = tmp_path / "lora"
    ad.mkdir()
    save_file({f"base_model.model.{Q[:-len('.weight')]}.lora_A.weight": A,
               f"base_model.model.{Q[:-len('.weight')]}.lora_B.weight": B}, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    return {"dir": tmp_path, "base": base, "ft": ft, "dW": (B @ A) * 2.0}


def test_checkpoint_source_reads_float32_rows_and_into_buffers(files):
    src = open_source(files["dir"] / "ft")
    assert isinstance(src, CheckpointSource) and src.kind == "weights"
    assert src.names == sorted(files["ft"]) and src.dtype(UP) == "F16" and src.shape(UP) == (8, 4)
    for n, want in files["ft"].items():
        got = src.read(n)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(src.read_rows(n, 1, 3), want[1:3])
        buf = np.empty(src.nbytes(n) + 8, np.uint8)
        view = src.read(n, out=buf)
        np.testing.assert_array_equal(view, want)
        assert np.shares_memory(view, buf)
    np.testing.assert_array_equal(src.read_rows(Q, 4, 99), files["ft"][Q][4:])  # clipped at the end
    assert src.where(Q).endswith("model.safetensors")


def test_task_vector_of_a_model_and_of_an_adapter(files):
    tv = task_vector(files["dir"] / "base", files["dir"] / "ft")
    assert isinstance(tv, TaskVector) and tv.relative and tv.origin == "model" and tv.kind == "delta"
    for n in tv.names:
        np.testing.assert_array_equal(tv.read(n), files["ft"][n] - files["base"][n])
    tl = task_vector(files["dir"] / "base", files["dir"] / "lora", "mine")
    assert (tl.name, tl.origin, tl.relative) == ("mine", "adapter", False)
    assert tl.names == sorted(files["base"]) and tl.touches(Q) and not tl.touches(UP)
    np.testing.assert_allclose(tl.read(Q), files["dW"], rtol=1e-6)
    assert not tl.read(UP).any() and tl.read(UP).shape == (8, 4)
    assert tl.parts(UP) == (None, False)


def test_adapter_source_alone_uses_its_own_names(files):
    src = AdapterSource(files["dir"] / "lora")
    assert src.names == [Q] and src.kind == "delta"
    np.testing.assert_allclose(src.read(Q), files["dW"], rtol=1e-6)


def test_memory_and_virtual_sources_do_not_touch_the_callers_arrays(files):
    arrs = {k: v.copy() for k, v in files["base"].items()}
    mem = open_source(arrs)
    assert isinstance(mem, MemorySource) and mem.kind == "delta" and mem.dtype(Q) == "F32"
    out = mem.read(Q)
    out += 1
    np.testing.assert_array_equal(arrs[Q], files["base"][Q])
    tv = TaskVector(MemorySource(files["base"], kind="weights"), MemorySource(files["ft"], kind="weights"))
    np.testing.assert_array_equal(tv.read(NORM), files["ft"][NORM] - files["base"][NORM])
    calls = []
    virt = VirtualSource({Q: (6, 4), UP: (8, 4)}, lambda n: calls.append(n) or (None if n == UP else np.ones((6, 4))))
    np.testing.assert_array_equal(virt.read(Q), np.ones((6, 4), np.float32))
    assert not virt.read(UP).any() and calls == [Q, UP]
    np.testing.assert_array_equal(virt.read_rows(Q, 2, 4), np.ones((2, 4), np.float32))


def test_bad_inputs_are_one_line_errors(files, tmp_path):
    with pytest.raises(UnmergeError, match="does not exist"):
        open_source(tmp_path / "nope")
    with pytest.raises(UnmergeError, match="has no tensor"):
        open_source(files["base"]).read("missing")
    other = tmp_path / "other"
    other.mkdir()
    save_file({**files["base"], Q: np.zeros((5, 4), np.float32)}, str(other / "model.safetensors"))
    with pytest.raises(UnmergeError, match="shape mismatch for tensor"):
        task_vector(files["dir"] / "base", other)
    with pytest.raises(UnmergeError, match="real-valued"):
        MemorySource({"x": np.array(["a"])}).read("x")
    with pytest.raises(UnmergeError, match="kind must be one of"):
        MemorySource({}, kind="weight")
