"""The sparsity-scaling paper's studies by name: each writes Markdown/CSV/JSON tables and PNG figures into a
directory (atomically: a temporary sibling renamed into place when the study finishes)."""

from __future__ import annotations

from pathlib import Path

from unmerge_jax.errors import check_choice
from unmerge_jax.io.atomic import atomic_dir, check_output


def _scaling(out, **kw):
    from unmerge_jax.analysis.study_scaling import scaling_law_study
    return scaling_law_study(out, **kw)


def _merge(out, **kw):
    from unmerge_jax.analysis.study_merge import merge_quality_study
    return merge_quality_study(out, **kw)


def _memory(out, **kw):
    from unmerge_jax.analysis.study_memory import memory_study
    return memory_study(out, **kw)


def _anatomy(out, **kw):
    from unmerge_jax.analysis.study_anatomy import anatomy_study
    return anatomy_study(out, **kw)


STUDIES = {"merge-quality": _merge, "scaling-law": _scaling, "memory": _memory, "anatomy": _anatomy}


def run_study(name: str, out, *, force: bool = False, **params):
    """Run study ``name`` (one of :data:`STUDIES`) writing into directory ``out``; returns its results.

    ``out`` is checked before the study runs: it may not exist (unless ``force``), be a file, or
    be, sit inside or contain the study's inputs (``target``/``base`` of the anatomy study).
    """
    check_choice("study", name, STUDIES)
    inputs = [params.get("target"), params.get("base")]
    check_output(out, inputs, directory=True, force=force)
    with atomic_dir(Path(out), force=force, inputs=inputs) as tmp:
        return STUDIES[name](tmp, **params)
