"""Tiny seeded Qwen2 / Llama checkpoints and PEFT LoRA adapters for the checkpoint I/O tests.

``tiny_models(root)`` builds everything once under ``root`` (a marker file makes later calls in the
same session, from any test module, reuse the files) and returns a dict of paths and the known
task-arithmetic weights. Needs torch, transformers and peft.

Layout:
  qwen/base           Qwen2, 2 layers, fp32, sharded (model.safetensors.index.json, 4+ shards)
  qwen/ft{0,1,2}      full fine-tunes: base + 0.01·N(0,1) on ~60% of the entries of every tensor
  qwen/ta             task arithmetic 0.6·δ0 + 0.3·δ1 (+ 0·δ2) of the full fine-tunes
  qwen/lora{0,1,2}    LoRA r=4/8/4 on q,k,v,o (random non-zero A and B; lora1 uses rsLoRA)
  qwen/lora{i}_merged the adapters merged into the base with merge_and_unload()
  qwen/lora_ta        base + 0.7·ΔW0 + 0.2·ΔW2 (ΔW as PEFT computes it)
  qwen/base_bf16, qwen/base_fp16  the base stored in bf16 / fp16 (single file)
  qwen/wide           another architecture (hidden 32)
  qwen/cousin         same q/k/v/o shapes, another MLP width (a different base)
  qwen/lora_wide      an adapter trained on ``wide`` (shape mismatch on our base)
  qwen/lora_cousin    an adapter whose adapter_config names ``cousin`` as its base
  llama/base          Llama, 2 layers, fp32, single file
  llama/lora{0,1}     LoRA on q,k,v,o; llama/lora{0,1}_merged; llama/lora_ta = base + 0.4·ΔW0 + 0.9·ΔW1
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QWEN_TA = {"ft0": 0.6, "ft1": 0.3, "ft2": 0.0}
QWEN_LORA_TA = {"lora0": 0.7, "lora1": 0.0, "lora2": 0.2}
LLAMA_LORA_TA = {"lora0": 0.4, "lora1": 0.9}
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MARK = "tiny_models.json"


def _quiet():
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def qwen(seed: int, hidden: int = 64, inter: int = 128):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=128, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False, use_cache=False)
    return Qwen2ForCausalLM(cfg).eval()


def llama(seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def parity_llama(seed: int, hidden: int = 64, layers: int = 2):
    """The tiny Llama of the mergekit parity tests (vocabulary 96, GQA 4/2 heads, untied)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def fine_tune(make, seed: int):
    """``make()`` with about 60 % of its entries moved by 0.01·N(0, 1) (seeded): a stand-in fine-tune."""
    import torch

    m = make()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p) * (torch.rand_like(p) < 0.6))
    return m


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _lora(make, seed, r, alpha, out: Path, rslora=False, base_path=None):
    """A PEFT LoRA adapter with random A and B (seeded); saves it and its merge_and_unload()."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = make()
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=LORA_MODULES, init_lora_weights=False,
                                          use_rslora=rslora, lora_dropout=0.0))
    with torch.no_grad():  # scale B so ΔW is comparable to the full fine-tunes' deltas
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.5)
    pm.save_pretrained(out)
    if base_path is not None:
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(base_path)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    merged = pm.merge_and_unload()
    merged.save_pretrained(str(out) + "_merged")
    return _state(merged)


def _ta(make, base_state, parts, weights, out: Path):
    import torch

    m = make()
    sd = {}
    for k, v in base_state.items():
        acc = v.clone()
        for name, w in weights.items():
            if w:
                acc += w * (parts[name][k] - v)
        sd[k] = acc
    with torch.no_grad():
        m.load_state_dict(sd)
    m.save_pretrained(out)


def _build(root: Path) -> dict:
    import torch

    _quiet()
    q, l = root / "qwen", root / "llama"
    q.mkdir(parents=True, exist_ok=True)
    l.mkdir(parents=True, exist_ok=True)

    base = qwen(0)
    base_state = _state(base)
    base.save_pretrained(q / "base", max_shard_size="60KB")  # sharded, with an index
    base.to(torch.bfloat16).save_pretrained(q / "base_bf16")
    qwen(0).to(torch.float16).save_pretrained(q / "base_fp16")
    fts = {}
    for i in range(3):
        m = fine_tune(lambda: qwen(0), 100 + i)
        m.save_pretrained(q / f"ft{i}")
        fts[f"ft{i}"] = _state(m)
    _ta(lambda: qwen(0), base_state, fts, QWEN_TA, q / "ta")
    loras = {}
    for i, (r, alpha, rs) in enumerate([(4, 8, False), (8, 16, True), (4, 4, False)]):
        loras[f"lora{i}"] = _lora(lambda: qwen(0), 200 + i, r, alpha, q / f"lora{i}", rslora=rs)
    _ta(lambda: qwen(0), base_state, loras, QWEN_LORA_TA, q / "lora_ta")
    qwen(5, hidden=32).save_pretrained(q / "wide")
    qwen(0, inter=96).save_pretrained(q / "cousin")
    _lora(lambda: qwen(5, hidden=32), 300, 4, 8, q / "lora_wide")
    _lora(lambda: qwen(0, inter=96), 301, 4, 8, q / "lora_cousin", base_path=q / "cousin")

    lbase = llama(1)
    lstate = _state(lbase)
    lbase.save_pretrained(l / "base")
    lloras = {f"lora{i}": _lora(lambda: llama(1), 400 + i, 4, 8, l / f"lora{i}") for i in range(2)}
    _ta(lambda: llama(1), lstate, lloras, LLAMA_LORA_TA, l / "lora_ta")

    info = {"root": str(root), "qwen": str(q), "llama": str(l)}
    (root / _MARK).write_text(json.dumps(info))
    return info


def tiny_models(root) -> dict:
    """Build (once) and return ``{"root", "qwen", "llama"}`` directory paths (see module doc)."""
    root = Path(root)
    mark = root / _MARK
    if mark.exists():
        return json.loads(mark.read_text())
    return _build(root)


def session_root(tmp_path_factory) -> Path:
    """One build per pytest session, shared by every test module."""
    return tmp_path_factory.getbasetemp() / "tiny_models"


def stored_state(path) -> dict:
    """All tensors of a model directory as NumPy arrays in their stored dtype (bf16 stays bf16)."""
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def numpy_state(path) -> dict:
    """All tensors of a model directory as float32 NumPy (reference reads with safetensors.numpy)."""
    return {k: v.astype(np.float32) for k, v in stored_state(path).items()}


def run_mergekit(cfg: dict, out, **options):
    """Run mergekit 0.1.5 on a config dict into ``out`` (no tokenizer copy, eager loading, no card
    unless ``options`` say otherwise); returns ``out``."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    opts = {"copy_tokenizer": False, "lazy_unpickle": False, "write_model_card": False, **options}
    run_merge(MergeConfiguration.model_validate(cfg), str(out), options=MergeOptions(**opts))
    return out
