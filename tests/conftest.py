"""Test set-up shared by every test file.

* 8 forced host devices, so sharded code paths run on CPU exactly as on a multi-device host
  (must be set before JAX initialises its backend).
* No progress bars in test logs.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("UNMERGE_PROGRESS", "0")

import unmerge_jax  # noqa: E402,F401  (turns on x64 before any test builds arrays)
from unmerge_jax.compile_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of the tiny seeded Qwen2/Llama checkpoints and PEFT adapters (built once per session,
    see ``tests/_tiny_models.py``); skips when torch/transformers/peft are not installed."""
    from pathlib import Path

    for mod in ("torch", "transformers", "peft"):
        pytest.importorskip(mod)
    from tests._tiny_models import session_root, tiny_models

    return {k: Path(v) for k, v in tiny_models(session_root(tmp_path_factory)).items()}


@pytest.fixture(scope="session")
def merges(tmp_path_factory):
    """Root of the tiny merges made by the merge engine with their recipes (built once per session,
    see ``tests/_tiny_merges.py``); skips when torch/transformers are not installed."""
    for mod in ("torch", "transformers"):
        pytest.importorskip(mod)
    from tests._tiny_merges import tiny_merges

    return tiny_merges(tmp_path_factory.getbasetemp() / "tiny_merges")
