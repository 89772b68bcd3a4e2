"""The UNMERGE experiment end to end: synthetic tasks, a tiny Qwen2 base with LoRA adapters,
72 merged targets, compression, one statistics pass, the paper-grid sweep, Tables 1–6 and a report.

Entry point: :func:`run_experiment` (CLI: ``unmerge experiment``; ``unmerge demo`` runs the
``synthetic`` preset).
"""

from unmerge_jax.experiment.pipeline import ExperimentResult, run_experiment
from unmerge_jax.experiment.presets import PRESETS, Preset, get_preset

__all__ = ["ExperimentResult", "run_experiment", "PRESETS", "Preset", "get_preset"]
