"""Merge engine: method registry, in-memory kernels entry point, config parsing, streaming driver."""

from unmerge_jax.merge.methods import MERGE_METHODS, MethodSpec, merge_tensors  # noqa: F401
