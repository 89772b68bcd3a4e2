"""The decompose pipeline flows one way: each step's module imports only the steps below it,
``unmerge_jax.io`` imports no solver, statistics or pass (nor the package), and nothing in the
library imports the CLI."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "unmerge_jax"

# Bottom to top: a module may import only the modules before it in this list.
STEPS = ["unmerge_jax.version", "unmerge_jax.io", "unmerge_jax.sources", "unmerge_jax.entries", "unmerge_jax.staging",
         "unmerge_jax.stats", "unmerge_jax.passes.mask", "unmerge_jax.provenance", "unmerge_jax.passes.statistics",
         "unmerge_jax.solve", "unmerge_jax.report", "unmerge_jax.pipeline"]


def _file(module: str) -> list[Path]:
    rel = Path(*module.split(".")[1:])
    return sorted((ROOT / rel).glob("*.py")) if (ROOT / rel).is_dir() else [(ROOT / rel).with_suffix(".py")]


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return {m for m in out if m == "unmerge_jax" or m.startswith("unmerge_jax.")}


def _step(module: str):
    """Index of the step ``module`` belongs to (None: not a pipeline step)."""
    for i, step in reversed(list(enumerate(STEPS))):
        if module == step or module.startswith(step + "."):
            return i
    return None


@pytest.mark.parametrize("step", STEPS)
def test_each_step_imports_only_steps_below_it(step):
    i = STEPS.index(step)
    for path in _file(step):
        for m in _imports(path):
            j = _step(m)
            assert m != "unmerge_jax", f"{path.name} imports the top-level package"
            assert j is None or j <= i, f"{path.relative_to(ROOT)} ({step}) imports {m}, a later step"


ABOVE_IO = ("unmerge_jax.solve", "unmerge_jax.solvers", "unmerge_jax.stats", "unmerge_jax.sweep", "unmerge_jax.passes",
            "unmerge_jax.report", "unmerge_jax.pipeline", "unmerge_jax.merge", "unmerge_jax.analysis",
            "unmerge_jax.experiment")


def test_io_imports_no_solver_statistics_or_package():
    for path in (ROOT / "io").glob("*.py"):
        for m in _imports(path):
            assert m != "unmerge_jax" and not any(m == a or m.startswith(a + ".") for a in ABOVE_IO), \
                f"io/{path.name} imports {m}"


def test_nothing_in_the_library_imports_the_cli():
    for path in ROOT.rglob("*.py"):
        if "cli" in path.relative_to(ROOT).parts:
            continue
        assert not any(m.startswith("unmerge_jax.cli") for m in _imports(path)), path
