"""Merge engine: the method registry, the in-memory entry point, config parsing, the streaming driver."""

from unmerge_jax.merge.base import MergeMethod  # noqa: F401
from unmerge_jax.merge.methods import MERGE_METHODS  # noqa: F401
from unmerge_jax.merge.tensor import merge_tensors  # noqa: F401
from unmerge_jax.merge.config import MergeConfig, load_config  # noqa: F401
from unmerge_jax.merge.driver import MergeResult, merge  # noqa: F401
