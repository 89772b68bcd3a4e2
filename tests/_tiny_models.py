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


# --- the pico models of mergekit's own tests (mergekit tests/common.py shapes), seeded ---------------

def merge_config(paths: dict, method: str, names, base=None, params=None, per_model=None,
                 dtype: str = "float32") -> dict:
    """A mergekit config: ``models`` are ``paths[n]`` for ``n`` in ``names``, each with its
    ``parameters`` dict from ``per_model`` (None: none; zipped with ``names``), ``base_model``
    ``paths[base]`` when ``base`` is given, method-wide ``parameters`` when ``params``."""
    per_model = [None] * len(names) if per_model is None else per_model
    models = [{"model": paths[n], **({"parameters": w} if w is not None else {})} for n, w in zip(names, per_model)]
    cfg = {"merge_method": method, "dtype": dtype, "models": models}
    if base is not None:
        cfg["base_model"] = paths[base]
    if params:
        cfg["parameters"] = params
    return cfg


def pico_llama(seed: int, vocab_size: int = 64):
    """mergekit's ``make_picollama``: Llama, vocabulary 64, hidden 32, MLP 48, 16 heads, 2 layers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                        num_attention_heads=16, num_hidden_layers=2)).eval()


def pico_granite(seed: int, vocab_size: int = 64):
    """mergekit's ``make_picogranite``: Granite, vocabulary 64, hidden 32, MLP 48, 2 heads, 2 layers."""
    import torch
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(seed)
    return GraniteForCausalLM(GraniteConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                            num_attention_heads=2, num_key_value_heads=2,
                                            num_hidden_layers=2)).eval()


PICO_LLAVA_IMAGE_TOKEN = 63   # inside the vocabulary, so a forward pass with an image runs


def pico_llava(seed: int):
    """mergekit's ``make_picoLlaVa``: a CLIP vision tower (2 layers, hidden 64, 32×32 images in 4×4
    patches) and a pico Llama text model; the image token is id 63 (mergekit's default, 32000, lies
    outside the 64-token vocabulary)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2,
                              hidden_size=64, intermediate_size=128)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16,
                       num_hidden_layers=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16,
                      image_token_id=PICO_LLAVA_IMAGE_TOKEN)
    return LlavaForConditionalGeneration(cfg).eval()


def tiny_gpt2(seed: int, layers: int = 12):
    """A GPT-2 with mergekit's ``make_gpt2size`` layer count (12) at a tiny width (32, 4 heads, vocabulary 96)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=96, n_positions=16,
                                      bos_token_id=0, eos_token_id=0)).eval()


LLAVA_TEXT_PREFIX = "language_model."


def llava_text_as_llama(src, out) -> str:
    """The text model of a stored LLaVA checkpoint as a Llama checkpoint of its own (tensor names
    without the ``language_model.`` prefix, ``config.json`` from its ``text_config``): the reference
    input for the tensors mergekit 0.1.5 drops from a LLaVA merge. Returns ``out``."""
    from safetensors.numpy import save_file
    from transformers import LlamaConfig

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.loads((src / "config.json").read_text())["text_config"]
    cfg = LlamaConfig(**{k: v for k, v in text.items() if k not in ("architectures", "model_type")})
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(out)
    tensors = {k[len(LLAVA_TEXT_PREFIX):]: v for k, v in stored_state(src).items() if k.startswith(LLAVA_TEXT_PREFIX)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def feed_mergekit_our_dare_masks(monkeypatch, base: dict, models: list, density, seed: int) -> list:
    """Make mergekit 0.1.5's DARE draw (``mergekit.sparsify.bernoulli``) use the keep-masks
    ``unmerge merge --seed seed`` draws for the same task vectors (looked up by the task vector's
    float32 bytes; tensors named as in ``base``), so the two agree entry for entry. ``base`` and
    ``models`` are float32 state dicts; ``density`` one value per model. Returns a list that grows
    by one per mask mergekit took."""
    import mergekit.sparsify as sp
    import torch

    from unmerge_jax.kernels import merge as K
    from unmerge_jax.kernels.random import name_hash

    dens = np.asarray(density, np.float32)
    lookup = {}
    for n, b in base.items():
        if not np.issubdtype(b.dtype, np.floating):
            continue
        d = tuple(m[n] - b for m in models)
        masks = np.asarray(K.draw_masks(b, d, dens, np.ones(len(d), np.int64), np.uint32(seed),
                                        np.uint32(name_hash(n)), sparsify="random"))
        for i in range(len(d)):
            lookup[d[i].tobytes()] = masks[i].reshape(b.shape)
    used = []

    def bernoulli(tensor, density, rescale_norm=None):
        keep = lookup[tensor.detach().numpy().astype(np.float32).tobytes()]
        used.append(1)
        return sp.rescaled_masked_tensor(tensor, torch.from_numpy(keep).to(tensor.dtype), rescale_norm)

    monkeypatch.setattr(sp, "bernoulli", bernoulli)
    return used
