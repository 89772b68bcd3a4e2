"""``unmerge convert``: a PyTorch ``.bin`` checkpoint directory rewritten as safetensors.

The engine reads safetensors only: a ``.bin`` file is a pickle, and unpickling can run code. This
is the one explicit step that reads one, with ``torch.load(weights_only=True)`` (PyTorch's
restricted unpickler: tensors and plain containers only, no arbitrary objects) — refused files
are a one-line error. Input layouts: ``pytorch_model.bin``, or shards listed by
``pytorch_model.bin.index.json`` (also any single ``*.bin``/``*.pt`` weights file, and PEFT's
``adapter_model.bin``, which becomes ``adapter_model.safetensors``). The output directory gets the
same tensors, names, shapes and dtypes in ``model.safetensors`` (or size-capped shards plus
``model.safetensors.index.json``), and every other small file of the input (``config.json``,
tokenizer, generation and adapter configs) copied; tensors that share storage (tied embeddings)
are written once each. It is written atomically (``io.atomic.atomic_dir``): nothing is left
behind on failure, the input is never modified, and an output inside or over the input is refused.

Memory: one input shard at a time (loaded memory-mapped where the file is in PyTorch's zip format).
torch is imported inside the function (it is not on the core import path).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.atomic import atomic_dir, check_output, os_error
from unmerge_jax.io.writer import DEFAULT_SHARD_BYTES, ShardedWriter

BIN_INDEX = "pytorch_model.bin.index.json"
# The torch dtypes a checkpoint holds → safetensors tags.
_TAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64", "int32": "I32",
         "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
         "float8_e5m2": "F8_E5M2"}
MAX_SIDE_FILE = 64 << 20   # other files copied beside the weights are configs and tokenizers


class ConvertResult(NamedTuple):
    """What :func:`convert_checkpoint` wrote."""

    out: Path
    n_tensors: int
    bytes_written: int
    files: tuple         # the .bin files read
    copied: tuple        # side files copied


def _bin_files(src: Path) -> tuple[list[str], str]:
    """The ``.bin`` files to read, in order, and the output's base name (``model``/``adapter_model``)."""
    index = src / BIN_INDEX
    if index.is_file():
        try:
            wm = json.loads(index.read_text()).get("weight_map")
        except (OSError, ValueError) as err:
            raise UnmergeError(f"cannot read {index}: {err}") from None
        if not isinstance(wm, dict) or not wm:
            raise UnmergeError(f"{index} has no weight_map; is this a PyTorch sharded checkpoint?")
        files = sorted({str(v) for v in wm.values()})
        for f in files:
            p = (src / f)
            if Path(f).name != f or not p.is_file():
                raise UnmergeError(f"{index} lists shard {f!r}, which is not a file in {src}; download the missing "
                                   f"shard")
        return files, "model"
    if (src / "adapter_model.bin").is_file():
        return ["adapter_model.bin"], "adapter_model"
    if (src / "pytorch_model.bin").is_file():
        return ["pytorch_model.bin"], "model"
    found = sorted(p.name for p in src.iterdir() if p.suffix in (".bin", ".pt") and p.is_file())
    if len(found) == 1:
        return found, "model"
    if not found:
        raise UnmergeError(f"{src} holds no PyTorch .bin/.pt weights (pytorch_model.bin or {BIN_INDEX}); nothing to "
                           f"convert")
    raise UnmergeError(f"{src} holds several .bin/.pt files ({', '.join(found[:4])}) and no {BIN_INDEX}; convert a "
                       f"directory with one checkpoint")


def _load(path: Path) -> dict:
    """``{name: tensor}`` of one file with PyTorch's restricted unpickler."""
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):   # the legacy (non-zip) format cannot be memory-mapped
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise os_error(err, path, "read") from None
    except Exception as err:   # pickle.UnpicklingError (a refused global), a damaged file, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UnmergeError(f"cannot load {path} with torch.load(weights_only=True): {first[:200]} — it is not a "
                           f"plain tensor checkpoint, or it is damaged") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UnmergeError(f"{path} is not a mapping of tensor names to tensors; cannot convert it")
    return state


def _tag(name: str, tensor, path: Path) -> str:
    tag = _TAGS.get(str(tensor.dtype).replace("torch.", ""))
    if tag is None:
        raise UnmergeError(f"tensor {name} of {path} has dtype {tensor.dtype}, which safetensors cannot hold here")
    return tag


def _numpy(tensor) -> np.ndarray:
    """A CPU tensor's values as NumPy (bfloat16 and float8 through their bit patterns)."""
    import ml_dtypes
    import torch

    t = tensor.detach().contiguous()
    special = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16)}
    for name, np_dt in (("float8_e4m3fn", ml_dtypes.float8_e4m3fn), ("float8_e5m2", ml_dtypes.float8_e5m2)):
        if hasattr(torch, name):
            special[getattr(torch, name)] = (torch.uint8, np_dt)
    if t.dtype in special:
        int_dt, np_dt = special[t.dtype]
        return t.view(int_dt).numpy().view(np_dt)
    return t.numpy()


def convert_checkpoint(src, out, *, force: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES) -> ConvertResult:
    """Rewrite the PyTorch ``.bin`` checkpoint in ``src`` as safetensors in the new directory ``out``.

    Args:
      src: a model (or PEFT adapter) directory holding ``.bin`` weights (see the module docstring).
      out: the output directory; refused if it exists (unless ``force``) or overlaps ``src``.
      shard_bytes: maximum bytes per output shard.
    Returns:
      a :class:`ConvertResult`.
    Raises:
      UnmergeError: a missing or unreadable input, a pickle ``weights_only`` refuses, a tensor name
        in two shards, an output that overlaps the input (one line; nothing written).
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UnmergeError(f"{src} is not a directory; give the model directory holding the .bin weights")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UnmergeError("unmerge convert needs PyTorch to read .bin checkpoints; pip install torch") from None
    files, stem = _bin_files(src)
    check_output(out, [src], directory=True, force=force)
    # Pass 1: names, shapes and dtypes (memory-mapped loads touch no tensor data).
    plan, seen = [], {}
    for f in files:
        state = _load(src / f)
        for name, t in state.items():
            if name in seen:
                raise UnmergeError(f"tensor {name} is in both {seen[name]} and {f} of {src}; the checkpoint is "
                                   f"inconsistent")
            seen[name] = f
            plan.append((name, tuple(t.shape), _tag(name, t, src / f)))
        del state
    copied = []
    with atomic_dir(out, force=force, inputs=[src]) as tmp:
        # An adapter stays one file (PEFT reads adapter_model.safetensors only).
        cap = shard_bytes if stem == "model" else 1 << 62
        with ShardedWriter(tmp, plan, max_shard_bytes=cap) as writer:
            for f in files:
                state = _load(src / f)
                for name, t in state.items():
                    writer.write(name, _numpy(t))
                del state
            total = writer.total_size
        if stem != "model":   # a PEFT adapter: adapter_model.safetensors, one file
            (tmp / "model.safetensors").rename(tmp / f"{stem}.safetensors")
        skip = set(files) | {BIN_INDEX}
        for p in sorted(src.iterdir()):
            if p.name in skip or not p.is_file() or p.is_symlink() or p.suffix in (".bin", ".pt", ".safetensors"):
                continue
            if p.stat().st_size <= MAX_SIDE_FILE:
                shutil.copyfile(p, tmp / p.name)
                copied.append(p.name)
    return ConvertResult(out, len(plan), total, tuple(files), tuple(copied))
