"""CLI of the core engine: `unmerge demo` and `unmerge sweep` call the library and report like it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import unmerge_jax as u
from unmerge_jax.cli.main import main


def test_demo_prints_paper_tables_and_writes_outputs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    for n in range(1, 7):
        assert f"### Table {n}:" in out
    assert "| NNLS |" in out
    runs = pd.read_csv(tmp_path / "demo" / "runs.csv")
    # 72 targets, paper grid (28 configurations), 3 seeds, compressed and full variants.
    assert runs.target.nunique() == 72 and set(runs.seed) == {0, 1, 2}
    assert (tmp_path / "demo" / "tables.md").read_text().count("### Table") >= 6
    # Task-arithmetic targets of known tasks are exactly in the dictionary's span: NNLS recovers them.
    known_ta = runs[(runs.algorithm == "nnls") & (runs.category == "known") & (runs.merge_method == "task_arithmetic")]
    assert len(known_ta) and known_ta.recon_error.max() < 1e-6


def _arrays(tmp_path, n=400, k=5, t=3):
    rng = np.random.default_rng(0)
    d = rng.standard_normal((n, k)).astype(np.float32)
    w = np.zeros((t, k))
    w[0, [0, 2]] = [0.7, 0.3]
    w[1, 1] = 1.0
    w[2, [3, 4]] = 0.5
    v = (d.astype(np.float64) @ w.T).astype(np.float32)
    np.save(tmp_path / "D.npy", d)
    np.save(tmp_path / "V.npy", v)
    np.save(tmp_path / "truth.npy", w)
    return d, v, w


def test_sweep_cli_on_arrays_matches_library(tmp_path, capsys):
    d, v, w = _arrays(tmp_path)
    rc = main(["sweep", "--dictionary", str(tmp_path / "D.npy"), "--targets", str(tmp_path / "V.npy"),
               "--truth", str(tmp_path / "truth.npy"), "--seeds", "2", "--methods", "nnls,omp",
               "--out", str(tmp_path / "runs.csv"), "--json", str(tmp_path / "summary.json")])
    assert rc == 0
    assert "| NNLS |" in capsys.readouterr().out
    runs = pd.read_csv(tmp_path / "runs.csv")
    ref = u.sweep(u.gram_stats(d, v, seeds=2, key=0), grid={"nnls": {}, "omp": u.PAPER_GRID["omp"]}, seeds=2,
                  truth=w)
    assert len(runs) == len(ref) == 3 * (1 + 5) * 2  # OMP k is capped at K = 5
    np.testing.assert_allclose(np.sort(runs.recon_error), np.sort(ref.recon_error), rtol=1e-9, atol=1e-12)
    summary = json.loads((tmp_path / "summary.json").read_text())
    nnls = next(r for r in summary if r["method"] == "nnls")
    assert nnls["precision_mean"] == 1.0 and nnls["recall_mean"] == 1.0


def test_sweep_cli_reads_saved_stats(tmp_path, capsys):
    d, v, _ = _arrays(tmp_path)
    u.save_stats(tmp_path / "s.npz", u.gram_stats(d, v, seeds=2, key=0), {"atom_names": list("abcde")})
    assert main(["sweep", "--stats", str(tmp_path / "s.npz"), "--seeds", "2", "--methods", "ridge",
                 "--out", str(tmp_path / "r.csv")]) == 0
    runs = pd.read_csv(tmp_path / "r.csv")
    assert len(runs) == 3 * 4 * 2 and runs.recon_error.max() < 1e-6


@pytest.mark.parametrize("argv, needle", [
    (["sweep"], "give --stats"),
    (["sweep", "--dictionary", "missing.npy", "--targets", "missing.npy"], "does not exist"),
    (["sweep", "--stats", "s.npz", "--dictionary", "D.npy"], "not both"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    _arrays(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err
    assert not (tmp_path / "runs.csv").exists()


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "sweep", "merge", "sparsity", "experiment"):
        assert cmd in out
