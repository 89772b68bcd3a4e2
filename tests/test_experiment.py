"""The UNMERGE experiment: tasks, targets, the synthetic preset end to end, byte-identical
re-runs, and (slow-ish, needs torch/peft) the reduced LoRA preset recovering known TA targets."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from unmerge_jax.errors import UnmergeError
from unmerge_jax.experiment import get_preset, run_experiment
from unmerge_jax.experiment import tasks as T
from unmerge_jax.experiment.attribution import ATTRIBUTION_COLUMNS, PRESENT_COLUMNS
from unmerge_jax.experiment.pipeline import RUN_COLUMNS
from unmerge_jax.experiment.synthetic import SyntheticSpec
from unmerge_jax.experiment.targets import make_targets, truth_matrix

TABLE_FILES = ["tables.md", "runs.csv", "attribution.csv"] + [f"table{i}.csv" for i in range(1, 8)]


def test_tasks_are_seeded_distinct_and_correct():
    assert len(T.TASKS) == 15 and len(set(T.TASK_NAMES)) == 15
    assert T.sample("reverse", 20, 3) == T.sample("reverse", 20, 3)
    assert T.sample("reverse", 20, 3) != T.sample("reverse", 20, 4)
    for p, a in T.sample("add", 50, 0):
        x, y = p.split("+")
        assert int(a) == int(x) + int(y)
    for p, a in T.sample("sort", 50, 0):
        assert a == "".join(sorted(p))
    for p, a in T.sample("brackets", 50, 0):
        depth, ok = 0, True
        for ch in p:
            depth += 1 if ch == "(" else -1
            ok &= depth >= 0
        assert a == ("y" if ok and depth == 0 else "n")
    batch = T.encode_batch("copy", [("abc", "abc")], 12)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert ids[0] == T.BOS and T.decode(ids) == "<task:copy>abcabc"
    assert (labels != -100).sum() == 4 and labels[labels != -100][-1] == T.EOS  # answer + EOS only
    with pytest.raises(UnmergeError, match="max_len"):
        T.encode_batch("copy", [("abcdefghij", "abcdefghij")], 8)


def test_targets_match_the_paper_design():
    d, o = get_preset("tiny").dictionary, get_preset("tiny").outside
    specs = make_targets(d, o, seed=0)
    assert len(specs) == 72 and specs == make_targets(d, o, seed=0) and specs != make_targets(d, o, seed=1)
    assert Counter(s.category for s in specs) == {"known": 24, "mixed": 24, "unknown": 24}
    assert Counter((s.category, s.merge_method) for s in specs) == {(c, m): 6 for c in ("known", "mixed", "unknown")
                                                                    for m in ("task_arithmetic", "linear", "ties", "dare")}
    for s in specs:
        nd, no = sum(t in d for t in s.tasks), sum(t in o for t in s.tasks)
        assert {"known": (2 <= nd <= 5 and no == 0), "mixed": (1 <= nd <= 3 and 1 <= no <= 2),
                "unknown": (nd == 0 and 2 <= no <= 5)}[s.category], s
        assert len(set(s.tasks)) == len(s.tasks) and abs(sum(s.weights) - 1) < 1e-12
    truth = truth_matrix(specs, d)
    assert truth.shape == (72, 8)
    assert np.allclose(truth[:24].sum(1), 1.0) and np.all(truth[48:] == 0)


def _small_synthetic():
    return dataclasses.replace(get_preset("synthetic"), name="synthetic-small", per_category=4, seeds=2,
                               synthetic=SyntheticSpec(hidden_size=32, num_hidden_layers=2), top_k=512,
                               grid={"nnls": {}, "omp": {"n_nonzero_coefs": [1, 2, 3]}, "ridge": {"alpha": [1e-8]}})


def test_synthetic_experiment_outputs_and_byte_identical_rerun(tmp_path):
    p = _small_synthetic()
    a = run_experiment(p, tmp_path / "a", seed=0)
    b = run_experiment(p, tmp_path / "b", seed=0)
    for name in TABLE_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    runs = pd.read_csv(tmp_path / "a" / "runs.csv")
    assert list(runs.columns[:len(RUN_COLUMNS)]) == RUN_COLUMNS
    # 12 targets × (1 NNLS + 3 OMP + 1 Ridge) × 2 seeds × 2 variants
    assert len(runs) == 12 * 5 * 2 * 2 == len(a.runs)
    assert set(runs["variant"]) == {"compressed", "full"}
    for f in ("report.md", "fig_recon_error.png", "fig_precision_recall.png", "targets.json", "timing.json"):
        assert (tmp_path / "a" / f).stat().st_size > 0
    assert "Table 5" in a.tables["table5"] and "Paper" in (tmp_path / "a" / "report.md").read_text()
    # Independent check of one number: Table 4's NNLS/known cell is the mean over those runs.
    known = runs[(runs.variant == "compressed") & (runs.algorithm == "nnls") & (runs.category == "known")]
    t4 = pd.read_csv(tmp_path / "a" / "table4.csv")
    cell = t4[(t4.algorithm == "nnls") & (t4.category == "known")]["recon_error_mean"].item()
    assert cell == pytest.approx(known["recon_error"].mean(), rel=1e-9)
    # Known task-arithmetic targets are exact combinations: NNLS finds their support and weights.
    ta = runs[(runs.algorithm == "nnls") & (runs.category == "known") & (runs.merge_method == "task_arithmetic")]
    assert (ta["precision"] == 1).all() and (ta["recall"] == 1).all() and (ta["weight_error"] <= 1e-3).all()
    _check_attribution(runs, pd.read_csv(tmp_path / "a" / "attribution.csv", keep_default_na=False), a)
    assert "## Attribution" in (tmp_path / "a" / "report.md").read_text()
    # A different seed changes the results.
    c = run_experiment(p, tmp_path / "c", seed=1)
    assert not c.runs["recon_error"].equals(a.runs["recon_error"])


def _names(cell) -> set:
    return set(filter(None, str(cell).split(";")))


def _check_attribution(runs: pd.DataFrame, attr: pd.DataFrame, result) -> None:
    """attribution.csv against the targets' truth, and runs.csv's present_* columns against attribution.csv."""
    assert list(attr.columns) == ATTRIBUTION_COLUMNS
    assert list(runs.columns[len(RUN_COLUMNS):len(RUN_COLUMNS) + 3]) == PRESENT_COLUMNS
    specs = {s.name: s for s in result.targets}
    variants = sorted(set(runs["variant"]))
    assert len(attr) == len(specs) * len(variants) and sorted(set(attr["variant"])) == variants
    dictionary = set(result.attributions[variants[0]].problem.atom_names)
    for _, row in attr.iterrows():
        s = specs[row["target"]]
        assert (row["category"], row["merge_method"]) == (s.category, s.merge_method)
        truth = {t for t in s.tasks if t in dictionary}
        assert _names(row["truth"]) == truth
        assert row["predicted_category"] in ("known", "mixed", "unknown")
        assert row["predicted_method"] in ("task_arithmetic", "ties", "dare")
        assert 0.0 <= row["unexplained"] <= 1.0
        present = _names(row["present"])
        assert present <= dictionary
        # precision / recall / perfect match recomputed from the names (not from the library's scorer)
        tp = len(present & truth)
        assert row["recall"] == pytest.approx(tp / len(truth) if truth else 1.0)
        assert row["precision"] == pytest.approx(tp / len(present) if present else (0.0 if truth else 1.0))
        assert row["perfect_match"] == float(present == truth)
        if s.category == "unknown":
            assert row["predicted_category"] != "known"
        if s.category == "known" and s.merge_method == "task_arithmetic":
            # exact combinations of the dictionary: the decisions find the support, the verdict is known
            assert present == truth and row["predicted_category"] == "known", row.to_dict()
        coef, lo, hi = (np.array([float(x) for x in row[c].split()]) for c in ("coef", "coef_lo", "coef_hi"))
        assert coef.shape == lo.shape == hi.shape == (len(dictionary),) and np.all(lo <= hi)
    # runs.csv: NNLS rows carry the target's present-set scores, other algorithms none.
    merged = runs.merge(attr[["variant", "target", "precision", "recall", "perfect_match"]], on=["variant", "target"],
                        suffixes=("", "_attr"))
    nnls = merged["algorithm"] == "nnls"
    for col, src in zip(PRESENT_COLUMNS, ("precision_attr", "recall_attr", "perfect_match_attr")):
        np.testing.assert_allclose(merged.loc[nnls, col], merged.loc[nnls, src])
        assert merged.loc[~nnls, col].isna().all()


def test_small_preset_sizes_from_its_definition():
    """The small preset's q/k/v/o parameter count (from the Qwen2 module shapes, without training) is
    at least 10x the tiny preset's, it keeps >= 10,000 parameters compressed, with the same tasks and targets."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from unmerge_jax.experiment.models import LORA_MODULES, qwen2_config

    def qkvo(preset):
        model = transformers.Qwen2ForCausalLM(qwen2_config(get_preset(preset).model))
        return sum(p.numel() for n, p in model.named_parameters()
                   if any(f"{m}.weight" in n for m in LORA_MODULES))

    tiny, small = get_preset("tiny"), get_preset("small")
    n_tiny, n_small = qkvo("tiny"), qkvo("small")
    assert n_tiny == 24_576 and tiny.top_k == 1024
    assert n_small >= 10 * n_tiny and n_small == 327_680
    assert small.top_k >= 10_000 and small.top_k < n_small
    assert (small.dictionary, small.outside) == (tiny.dictionary, tiny.outside) and len(small.dictionary + small.outside) == 15
    assert len(make_targets(small.dictionary, small.outside, per_category=small.per_category, seed=0)) == 72
    assert small.source == "lora" and small.full and small.boot >= 200 and small.seeds == 3


def test_experiment_cli_help_lists_every_preset(capsys):
    from unmerge_jax.cli.main import main
    from unmerge_jax.experiment import PRESETS

    with pytest.raises(SystemExit):
        main(["experiment", "--help"])
    text = capsys.readouterr().out
    for name in PRESETS:
        assert f"  {name} " in text


def test_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(UnmergeError, match="unknown experiment preset"):
        run_experiment("huge", tmp_path)


@pytest.mark.models
def test_reduced_lora_preset_nnls_recovers_known_task_arithmetic(tmp_path):
    """End to end on trained adapters: peft LoRA → merge engine → compression → stats → sweep."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    res = run_experiment("reduced", tmp_path / "out", seed=0, cache=tmp_path / "cache")
    runs = res.runs
    ta = runs[(runs.algorithm == "nnls") & (runs.category == "known") & (runs.merge_method == "task_arithmetic")]
    assert len(ta) > 0
    assert (ta["precision"] == 1.0).all() and (ta["recall"] == 1.0).all() and (ta["perfect_match"] == 1.0).all()
    assert ta["weight_error"].max() <= 1e-3
    # The recovered weights are the uniform weights of each target (independent of the sweep's metric code).
    specs = {s.name: s for s in res.targets}
    atoms = list(get_preset("reduced").dictionary)
    for _, row in ta.iterrows():
        s = specs[row["target"]]
        coef = np.array([float(x) for x in row["coef"].split()])
        expect = np.array([s.weights[s.tasks.index(a)] if a in s.tasks else 0.0 for a in atoms])
        np.testing.assert_allclose(coef, expect, atol=1e-3)
    _check_attribution(runs, pd.read_csv(tmp_path / "out" / "attribution.csv", keep_default_na=False), res)
    # Cached: a re-run trains nothing and gives byte-identical tables.
    again = run_experiment("reduced", tmp_path / "out2", seed=0, cache=tmp_path / "cache")
    assert "base" in again.timings and again.timings["adapters"] < res.timings["adapters"]
    for name in ("tables.md", "runs.csv", "attribution.csv"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()
