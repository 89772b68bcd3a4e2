"""The tiny dictionary: a Qwen2-architecture base built from a config and LoRA adapters trained on CPU.

Everything here is seeded and cached on disk under a key that hashes every input that decides
the bytes (model config, training config, task, rank, seed, library versions), so a second run
of the same preset reuses the base and all adapters instead of training them again.

Needs torch, transformers and peft (the ``[models]`` extra); imported lazily.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.experiment import tasks as T
from unmerge_jax.io.atomic import atomic_dir

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
CACHE_VERSION = 1  # bump when training code changes what the cached bytes would be


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Qwen2 architecture sizes (the paper's Qwen2.5-7B, scaled down to train on 2 CPU cores)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Pre-training of the base on all tasks mixed, then per-task LoRA fine-tuning."""

    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    lora_steps: int = 150
    lora_lr: float = 3e-3
    batch_size: int = 32
    examples_per_task: int = 1500  # the paper samples 1500 examples per dataset
    max_len: int = 24


def _require_torch():
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers
    except ImportError as err:
        raise UnmergeError(f"the tiny experiment trains LoRA adapters and needs torch, transformers and peft "
                           f"(pip install 'unmerge_jax[models]'): {err}") from None
    from unmerge_jax.progress import progress_enabled

    if not progress_enabled():
        transformers.utils.logging.disable_progress_bar()


def _versions() -> dict:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def cache_key(**parts) -> str:
    """Short stable hash of JSON-serialisable ``parts`` (dataclasses become dicts)."""
    norm = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in parts.items()}
    blob = json.dumps({"cache_version": CACHE_VERSION, **norm}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def qwen2_config(spec: ModelSpec):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=T.VOCAB_SIZE, hidden_size=spec.hidden_size,
                       intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
                       num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
                       max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=True,
                       pad_token_id=T.PAD, bos_token_id=T.BOS, eos_token_id=T.EOS, use_cache=False)


def _task_data(names, train: TrainSpec, seed: int) -> dict:
    out = {}
    for name in names:
        batch = T.encode_batch(name, T.sample(name, train.examples_per_task, seed), train.max_len)
        out[name] = {k: np.asarray(v) for k, v in batch.items()}
    return out


def _train(model, data: dict, steps: int, lr: float, batch_size: int, seed: int) -> list[float]:
    """AdamW over minibatches drawn (seeded) from the pooled examples of ``data``'s tasks."""
    import torch

    pool = {k: torch.from_numpy(np.concatenate([d[k] for d in data.values()])) for k in ("input_ids", "attention_mask", "labels")}
    n = pool["input_ids"].shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        loss = model(**{k: v[idx] for k, v in pool.items()}).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _answer_accuracy(model, name: str, train: TrainSpec, seed: int, n: int = 64) -> float:
    """Teacher-forced exact-match accuracy of the answer tokens on fresh examples (a sanity check)."""
    import torch

    batch = T.encode_batch(name, T.sample(name, n, seed + 10_000), train.max_len)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(batch["input_ids"]),
                       attention_mask=torch.from_numpy(batch["attention_mask"])).logits
    pred = logits[:, :-1].argmax(-1).numpy()
    labels = batch["labels"][:, 1:]
    ok = (pred == labels) | (labels == -100)
    return float(ok.all(axis=1).mean())


def _write_meta(path: Path, meta: dict) -> None:
    (path / "unmerge_experiment.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_meta(path) -> dict:
    return json.loads((Path(path) / "unmerge_experiment.json").read_text())


def build_base(cache: Path, spec: ModelSpec, train: TrainSpec, seed: int) -> Path:
    """A seeded Qwen2 base, briefly pre-trained on all 15 tasks mixed; cached by config hash."""
    _require_torch()
    key = cache_key(kind="base", spec=spec, train=train, seed=seed, tasks=T.TASK_NAMES, versions=_versions())
    path = Path(cache) / f"base-{key}"
    if (path / "unmerge_experiment.json").exists():
        return path
    import torch
    from transformers import Qwen2ForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(spec))
    losses = _train(model, _task_data(T.TASK_NAMES, train, seed), train.pretrain_steps, train.pretrain_lr,
                    train.batch_size, seed)
    with atomic_dir(path, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _write_meta(tmp, {"kind": "base", "key": key, "seed": seed, "spec": dataclasses.asdict(spec),
                          "train": dataclasses.asdict(train), "loss_first": losses[0] if losses else None,
                          "loss_last": losses[-1] if losses else None, "seconds": time.perf_counter() - t0})
    return path


def train_adapter(cache: Path, base: Path, name: str, rank: int, train: TrainSpec, seed: int) -> Path:
    """A LoRA adapter (rank ``rank``, α = r, q/k/v/o) fine-tuned on task ``name``; cached by hash."""
    _require_torch()
    base_key = read_meta(base)["key"]
    key = cache_key(kind="lora", base=base_key, task=name, rank=rank, train=train, seed=seed, modules=LORA_MODULES)
    path = Path(cache) / f"lora-{name}-r{rank}-{key}"
    if (path / "unmerge_experiment.json").exists():
        return path
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    t0 = time.perf_counter()
    task_seed = seed * 1000 + T.TASK_NAMES.index(name) + 1
    torch.manual_seed(task_seed)
    model = Qwen2ForCausalLM.from_pretrained(base, dtype=torch.float32)
    before = _answer_accuracy(model, name, train, seed)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_MODULES),
                                             lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    losses = _train(model, _task_data([name], train, task_seed), train.lora_steps, train.lora_lr,
                    train.batch_size, task_seed)
    after = _answer_accuracy(model, name, train, seed)
    with atomic_dir(path, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _write_meta(tmp, {"kind": "lora", "key": key, "task": name, "rank": rank, "alpha": rank, "seed": task_seed,
                          "base": str(base), "loss_first": losses[0], "loss_last": losses[-1],
                          "accuracy_base": before, "accuracy_lora": after, "seconds": time.perf_counter() - t0})
    return path
