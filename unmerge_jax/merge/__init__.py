"""Merge engine: method registry, in-memory kernels entry point, config parsing, streaming driver."""

from unmerge_jax.merge.methods import MERGE_METHODS, MethodSpec, merge_tensors  # noqa: F401
from unmerge_jax.merge.config import MergeConfig, load_config  # noqa: F401
from unmerge_jax.merge.driver import MergeResult, merge  # noqa: F401
