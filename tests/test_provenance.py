"""One provenance record for array and checkpoint inputs: the shared keys mean the same in both
modes, every key of each mode is present, and the version is the installed package's."""

import importlib.metadata

import numpy as np
import pytest

import unmerge_jax as u
from unmerge_jax.pipeline import collect_stats

COMMON = {"created_by", "mode", "dictionary", "targets", "atom_names", "target_names", "n_rows", "seeds", "key",
          "bootstrap_block", "seconds"}
CHECKPOINT_KEYS = COMMON | {"base", "base_dtypes", "n_tensors", "mask", "tensors", "row_order", "compute", "block_rows",
                            "n_processes", "mask_file", "n_blocks"}
ARRAY_KEYS = COMMON | {"dtypes"}


def _check_common(prov, stats, seeds, key):
    assert prov["created_by"] == f"unmerge_jax {u.__version__}"
    assert prov["n_rows"] == int(stats.n_rows)
    assert len(prov["atom_names"]) == stats.n_atoms and len(prov["target_names"]) == stats.n_targets
    assert prov["seeds"] == seeds == stats.n_seeds and prov["key"] == key
    assert prov["bootstrap_block"] == u.bootstrap_unit_rows(prov["n_rows"]) and prov["seconds"] >= 0


def test_version_is_the_installed_package_version():
    assert u.__version__ == importlib.metadata.version("unmerge_jax")


def test_array_inputs(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "D.npy", rng.standard_normal((300, 3)).astype(np.float32))
    np.save(tmp_path / "V.npy", rng.standard_normal(300))
    res = collect_stats(None, [str(tmp_path / "D.npy")], [f"mix={tmp_path / 'V.npy'}"], seeds=2, key=4)
    prov = res.provenance
    assert set(prov) == ARRAY_KEYS and prov["mode"] == "arrays" and res.selection is None
    _check_common(prov, res.stats, 2, 4)
    assert prov["dictionary"] == [str((tmp_path / "D.npy").resolve())] and prov["target_names"] == ["mix"]
    assert prov["atom_names"] == ["0", "1", "2"] and prov["dtypes"] == ["float32", "float64"]


@pytest.mark.models
def test_checkpoint_inputs(tiny):
    q = tiny["qwen"]
    res = collect_stats(q / "base", [q / "ft0", q / "lora0"], [q / "ta"], top_k=600, modules="q,k,v,o", seeds=2, key=4)
    prov = res.provenance
    assert set(prov) == CHECKPOINT_KEYS and prov["mode"] == "checkpoints"
    _check_common(prov, res.stats, 2, 4)
    assert prov["atom_names"] == ["ft0", "lora0"] and prov["target_names"] == ["ta"]
    assert [d["kind"] for d in prov["dictionary"]] == ["model", "adapter"] and prov["targets"][0]["name"] == "ta"
    assert prov["dictionary"][0]["path"] == str((q / "ft0").resolve())
    assert prov["tensors"] == res.selection.names and prov["n_tensors"] == len(res.selection.names)
    assert prov["mask"] == res.selection.spec and prov["base"] == str((q / "base").resolve())
