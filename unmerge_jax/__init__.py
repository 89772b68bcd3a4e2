"""unmerge_jax: take LLM checkpoints apart and put them together, in JAX.

Importing the package turns on ``jax_enable_x64``: Gram statistics are accumulated and solved in
float64 (κ(G) = κ(D)², so float32 Gram solves are useless beyond κ(D) ≈ 1e3). Kernels that work
on weights keep explicit float32/bf16 dtypes, so this does not make merges run in float64.
It also turns on JAX's persistent compilation cache in ``~/.cache/unmerge_jax/xla``
(``unmerge_jax.compile_cache``; ``UNMERGE_COMPILE_CACHE=0`` opts out).
"""

import jax as _jax

_jax.config.update("jax_enable_x64", True)

from unmerge_jax.errors import UnmergeError  # noqa: E402
from unmerge_jax.compile_cache import enable_by_default as _enable_cache  # noqa: E402

_enable_cache()  # the persistent compilation cache, per user; UNMERGE_COMPILE_CACHE=0 opts out

# --- core engine: statistics, solvers, sweeps ---
from unmerge_jax.stats import (GramStats, accumulate_block, add_stats, bootstrap_unit_rows, gram_stats, iter_gram_stats,  # noqa: E402
                                load_stats, save_stats)
from unmerge_jax.solve import Decomposition, SOLVERS, decompose, solve  # noqa: E402
from unmerge_jax.sweep import PAPER_GRID, summarize, sweep  # noqa: E402

# --- tensor sources and checkpoints ---
from unmerge_jax.io.checkpoint import Checkpoint, open_checkpoint  # noqa: E402
from unmerge_jax.passes.mask import Selection, topk_mask  # noqa: E402
from unmerge_jax.io.lora import open_adapter  # noqa: E402
from unmerge_jax.io.names import parse_tensor_name  # noqa: E402
from unmerge_jax.passes.statistics import StreamResult, stream_stats  # noqa: E402
from unmerge_jax.report import decomposition_report  # noqa: E402
from unmerge_jax.attribution import Attribution, attribute  # noqa: E402
from unmerge_jax.sources import (AdapterSource, CheckpointSource, MemorySource, TaskVector, TensorSource,  # noqa: E402
                                 VirtualSource, open_source, task_vector)

# --- merge engine ---
from unmerge_jax.merge import MERGE_METHODS, load_config, merge_tensors  # noqa: E402
from unmerge_jax.merge.driver import MergeResult, merge  # noqa: E402  (shadows the subpackage name on purpose)

# --- sparsity analysis ---
from unmerge_jax.analysis.metrics import sparsity_metrics  # noqa: E402
from unmerge_jax.analysis.overlap import inter_agent  # noqa: E402
from unmerge_jax.analysis.scaling import ScalingFit, fit_scaling_law  # noqa: E402
from unmerge_jax.analysis.simulator import simulate_agents, simulate_and_measure, simulate_model, simulate_trials  # noqa: E402
from unmerge_jax.analysis.studies import STUDIES, run_study  # noqa: E402

# --- experiment ---
from unmerge_jax.experiment import ExperimentResult, run_experiment  # noqa: E402

from unmerge_jax.version import __version__  # noqa: E402,F401
