"""The one-way layout (docs/ARCHITECTURE.md), checked on the source: which module may import which.

* The decompose pipeline: each step's module imports only the steps below it.
* ``unmerge_jax/io/`` reads and writes files: it imports only other io modules and the leaf
  helpers (errors, progress bars, host memory) — no source, solver, statistics, pass or package.
* ``unmerge_jax/kernels/`` holds jit kernels: it imports only other kernels.
* ``unmerge_jax/sources.py`` sits directly on ``io/``.
* Nothing in the library imports the command line.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "unmerge_jax"
KERNELS = ROOT / "kernels"

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


LEAVES = ("unmerge_jax.errors", "unmerge_jax.progress", "unmerge_jax.hostmem")
ALLOWED = {
    "io": LEAVES + ("unmerge_jax.io",),
    "kernels": ("unmerge_jax.kernels",),
    "sources": LEAVES + ("unmerge_jax.io",),
}
LAYER_FILES = {"io": lambda: sorted((ROOT / "io").glob("*.py")), "kernels": lambda: sorted(KERNELS.glob("*.py")),
               "sources": lambda: [ROOT / "sources.py"]}


def _violations(files, allowed) -> list[str]:
    return [f"{path.name} imports {m}" for path in files for m in sorted(_imports(path))
            if not any(m == a or m.startswith(a + ".") for a in allowed)]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_lower_layers_import_nothing_above_them(layer):
    files = LAYER_FILES[layer]()
    assert files
    assert _violations(files, ALLOWED[layer]) == []


def test_the_layer_check_can_fail(tmp_path):
    """A file importing the solver and the package from io/ is reported, function bodies included."""
    f = tmp_path / "bad.py"
    f.write_text("from unmerge_jax.io.names import parse_tensor_name\n"
                 "def g():\n    from unmerge_jax.solve import solve\n    import unmerge_jax\n")
    assert _violations([f], ALLOWED["io"]) == ["bad.py imports unmerge_jax", "bad.py imports unmerge_jax.solve"]


def test_nothing_in_the_library_imports_the_cli():
    for path in sorted(ROOT.rglob("*.py")):
        if "cli" in path.relative_to(ROOT).parts:
            continue
        assert not any(m.startswith("unmerge_jax.cli") for m in _imports(path)), path
