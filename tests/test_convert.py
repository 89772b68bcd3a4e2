"""``unmerge convert``: PyTorch .bin checkpoints (single, sharded, adapter) → safetensors, with
torch.load(weights_only=True); hostile pickles refused in one line; atomic; inputs untouched."""

import hashlib
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from unmerge_jax import UnmergeError  # noqa: E402
from unmerge_jax.io.convert import convert_checkpoint  # noqa: E402
from unmerge_jax.sources import CheckpointSource  # noqa: E402


def _llama(seed, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def _digest(d):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(d)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    root = tmp_path_factory.mktemp("bins")
    model = _llama(0)
    single = root / "single"
    single.mkdir()
    model.config.save_pretrained(single)
    (single / "tokenizer_config.json").write_text("{}")
    torch.save(model.state_dict(), single / "pytorch_model.bin")
    # Sharded: two .bin files and an index; bfloat16 and an int buffer among the tensors.
    sharded = root / "sharded"
    sharded.mkdir()
    model.config.save_pretrained(sharded)
    sd = {k: v.to(torch.bfloat16) if "mlp" in k else v for k, v in model.state_dict().items()}
    sd["extra.position_ids"] = torch.arange(16, dtype=torch.int64)
    names = sorted(sd)
    parts = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
             "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for f, ns in parts.items():
        torch.save({n: sd[n] for n in ns}, sharded / f)
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, ns in parts.items() for n in ns}}))
    tied = root / "tied"
    tied.mkdir()
    tm = _llama(1, tie=True)
    tm.config.save_pretrained(tied)
    torch.save(tm.state_dict(), tied / "pytorch_model.bin")
    return {"root": root, "single": single, "sharded": sharded, "sd": sd, "model": model, "tied": tied, "tm": tm}


def test_single_bin_converts_and_loads_with_transformers(bins, tmp_path):
    before = _digest(bins["single"])
    res = convert_checkpoint(bins["single"], tmp_path / "out")
    assert _digest(bins["single"]) == before
    assert res.files == ("pytorch_model.bin",) and "config.json" in res.copied and "tokenizer_config.json" in res.copied
    src = CheckpointSource(tmp_path / "out")
    want = bins["model"].state_dict()
    assert sorted(src.names) == sorted(want)
    for n, v in want.items():
        np.testing.assert_array_equal(src.read(n), v.numpy(), err_msg=n)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.arange(10).reshape(2, 5)
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(ids).logits.numpy(), bins["model"](ids).logits.numpy())


def test_sharded_bins_keep_dtypes_and_shard(bins, tmp_path):
    res = convert_checkpoint(bins["sharded"], tmp_path / "out", shard_bytes=40_000)
    assert len(res.files) == 2
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    src = CheckpointSource(out)
    for n, v in bins["sd"].items():
        want = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        assert src.dtype(n) == {torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}[v.dtype], n
        got = src.read(n) if src.is_float(n) else src.read_raw(n)
        np.testing.assert_array_equal(got, want, err_msg=n)


def test_tied_weights_written_once_each(bins, tmp_path):
    convert_checkpoint(bins["tied"], tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.arange(8).reshape(1, 8)
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(ids).logits.numpy(), bins["tm"](ids).logits.numpy())


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_hostile_pickle_refused_in_one_line_and_not_run(tmp_path, monkeypatch):
    src = tmp_path / "evil"
    src.mkdir()
    torch.save({"w": torch.zeros(2), "payload": _Evil()}, src / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnmergeError, match=r"weights_only=True") as err:
        convert_checkpoint(src, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["no bin", "missing shard", "output inside input", "output exists", "not a dir"])
def test_bad_inputs_one_line_nothing_written(bins, tmp_path, case):
    src, out = bins["single"], tmp_path / "out"
    if case == "no bin":
        src = tmp_path / "empty"
        src.mkdir()
        match = "no PyTorch .bin"
    elif case == "missing shard":
        src = tmp_path / "partial"
        src.mkdir()
        (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "gone.bin"}}))
        match = "missing shard"
    elif case == "output inside input":
        out = bins["single"] / "converted"
        match = "inside"
    elif case == "output exists":
        out.mkdir()
        match = "exists"
    else:
        src = bins["single"] / "pytorch_model.bin"
        match = "not a directory"
    with pytest.raises(UnmergeError, match=match) as err:
        convert_checkpoint(src, out)
    assert "\n" not in str(err.value)
    assert not (bins["single"] / "converted").exists()
    if case != "output exists":
        assert not out.exists()


def test_bin_only_model_refusal_names_convert_and_cli_converts(bins, tmp_path, capsys):
    from unmerge_jax.cli.main import main

    with pytest.raises(UnmergeError, match=r"unmerge convert .* --out"):
        CheckpointSource(bins["single"])
    assert main(["convert", str(bins["single"]), "--out", str(tmp_path / "o")]) == 0
    assert "converted" in capsys.readouterr().out
    CheckpointSource(tmp_path / "o")
    assert main(["convert", str(bins["single"]), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_adapter_bin_converts_to_adapter_safetensors(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    pm = peft.get_peft_model(_llama(0), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                        init_lora_weights=False))
    pm.save_pretrained(tmp_path / "ad")
    sd = {k: v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(tmp_path / "ad" / "adapter_model.safetensors")).items()}
    src = tmp_path / "adbin"
    src.mkdir()
    (src / "adapter_config.json").write_text((tmp_path / "ad" / "adapter_config.json").read_text())
    torch.save(sd, src / "adapter_model.bin")
    convert_checkpoint(src, tmp_path / "adst")
    assert (tmp_path / "adst" / "adapter_model.safetensors").is_file()
    from unmerge_jax.sources import AdapterSource

    a, b = AdapterSource(tmp_path / "ad"), AdapterSource(tmp_path / "adst")
    for n in a.names:
        np.testing.assert_array_equal(a.read(n), b.read(n))
