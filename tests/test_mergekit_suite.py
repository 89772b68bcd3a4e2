"""mergekit 0.1.5's own test suite, every configuration accounted for.

``SUITE`` lists every merge configuration of mergekit's ``tests/test_basic_merges.py``,
``test_tokenizer.py``, ``test_chat_template.py`` and every test of ``test_modelref.py`` and
``test_io.py`` (a test that loops over several configurations has one entry per configuration),
each with the test in our ``tests/`` that runs it and how:

* ``parity``: run through mergekit 0.1.5 and ``unmerge merge`` on tiny seeded models of the
  architecture mergekit's test uses; every tensor within 1e-5 (DARE: mergekit fed our keep-masks;
  DELLA: equal in distribution), logits of the loaded outputs equal where the test loads them.
* ``refused``: mergekit refuses the configuration (its test expects the error, or mergekit 0.1.5
  itself fails on it); ``unmerge merge`` refuses it too, in one line, writing nothing.
* ``ours``: a test of mergekit internals with no merge output (parsing a model reference string,
  its tensor writer); the target tests our equivalent behaviour.
* ``not ported``: no user-visible equivalent; ``note`` says why.

``test_every_target_exists`` collects the named tests with pytest, so the table cannot name a test
that does not exist. The configurations no other file runs exactly are ported here, on mergekit's
pico Llama (``tests/_tiny_models.pico_llama``: three unrelated random models, as mergekit's
fixtures) and a 12-layer tiny GPT-2. mergekit's tests merge in bfloat16; the parity runs use
``dtype: float32`` (both compute in it, so the methods are compared and not bf16 rounding), and
for the methods whose bf16 arithmetic ``--compute-dtype bfloat16`` reproduces, the configuration
as written is also compared bit for bit. Skipped with a visible reason when mergekit is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from unmerge_jax import UnmergeError, merge

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5
DARE_SEED = 7
SLOW = pytest.mark.slow


class Entry(NamedTuple):
    """One configuration of mergekit's suite: where mergekit has it, and where we run it."""

    source: str          # mergekit's test file
    test: str            # its test (with the configuration's variant in brackets where one test loops)
    how: str             # parity | refused | ours | not ported
    target: str | None   # node id in our tests/ (None for "not ported")
    note: str = ""


S = "tests/test_mergekit_suite.py::"
SL = "tests/test_mergekit_slerp.py::"
AR = "tests/test_mergekit_arch.py::"
TK = "tests/test_mergekit_tokenizer.py::"
CF = "tests/test_mergekit_config.py::"
F32 = "float32 (mergekit's test: bfloat16)"
BF = "tests/test_mergekit_bf16.py::test_bfloat16_compute_reproduces_mergekit_bit_for_bit"
ALSO_BF16 = "; also bf16 bit for bit (test_basic_merge_bfloat16_as_written_bit_for_bit)"
NU = [(b, rw, fl) for b in (None, "c") for rw in (False, True) for fl in (False, True)]


def _nu_id(base, rw, fl):
    return f"base={base or 'none'}-row_wise={rw}-flatten={fl}"


def _vlm_nu_id(base, rw, fl):
    return f"base={'vlm_c' if base else 'none'}-row_wise={rw}-flatten={fl}"


BASIC = "test_basic_merges.py"
SUITE = [
    # --- test_basic_merges.py: TestGraniteMerges ------------------------------------------------
    Entry(BASIC, "test_granite_copy", "parity", AR + "test_granite_matches_mergekit[test_granite_copy]",
          "pico Granite; float32 run plus the bfloat16 configuration bit for bit (test_granite_bfloat16_as_written_bit_for_bit)"),
    Entry(BASIC, "test_granite_linear_merge", "parity", AR + "test_granite_matches_mergekit[test_granite_linear_merge]",
          "pico Granite; float32 run plus the bfloat16 configuration bit for bit"),
    Entry(BASIC, "test_granite_slerp", "parity", AR + "test_granite_matches_mergekit[test_granite_slerp]",
          "pico Granite; " + F32),
    # --- TestBasicMerges, Llama and GPT-2 --------------------------------------------------------
    Entry(BASIC, "test_gpt2_copy", "parity", S + "test_basic_merge_matches_mergekit[test_gpt2_copy]",
          "12-layer GPT-2 at width 32 (mergekit: full GPT-2 size); also bf16 bit for bit"),
    Entry(BASIC, "test_gpt2_stack", "parity", S + "test_basic_merge_matches_mergekit[test_gpt2_stack]",
          "layers 0-12 twice: 24 layers in both configs; also bf16 bit for bit"),
    Entry(BASIC, "test_passthrough_scale", "parity", CF + "test_slices_and_passthrough_match_mergekit[passthrough scale filter]",
          "mergekit's check (o_proj zero, the rest untouched) in test_passthrough_scale_zeroes_the_filtered_tensors"),
    Entry(BASIC, "test_linear_merge", "parity", S + "test_basic_merge_matches_mergekit[test_linear_merge]",
          "also bf16 bit for bit"),
    Entry(BASIC, "test_slerp_merge", "parity", SL + "test_slerp_matches_mergekit[names0-a-params0]",
          F32 + "; bf16 bit for bit on a tiny Llama: " + BF + "[slerp unrelated]"),
    *[Entry(BASIC, f"test_nuslerp_merges[{_nu_id(*v)}]", "parity",
            SL + f"test_nuslerp_matches_mergekit[params{i}-{'c' if v[0] else 'None'}-weights{i}]",
            F32 + ("; slow" if v[0] is None and (v[1] or v[2]) else "")
            + f"; bf16 bit for bit: {BF}[nuslerp base={v[0] and 'base'} row_wise={v[1]} flatten={v[2]}]")
      for i, v in enumerate(NU)],
    Entry(BASIC, "test_nuslerp_merges[weights sum to zero]", "parity",
          SL + "test_nuslerp_matches_mergekit[params8-c-weights8]",
          F32 + "; bf16 bit for bit: " + BF + "[nuslerp weights sum to zero]"),
    Entry(BASIC, "test_task_arithmetic_merge", "parity", S + "test_basic_merge_matches_mergekit[test_task_arithmetic_merge]",
          "also bf16 bit for bit"),
    Entry(BASIC, "test_breadcrumbs_merge", "parity", S + "test_basic_merge_matches_mergekit[test_breadcrumbs_merge]",
          F32 + ALSO_BF16),
    Entry(BASIC, "test_ties_merge", "parity", S + "test_basic_merge_matches_mergekit[test_ties_merge]",
          "also bf16 bit for bit"),
    Entry(BASIC, "test_sce_merge", "parity", S + "test_basic_merge_matches_mergekit[test_sce_merge]", F32 + ALSO_BF16),
    Entry(BASIC, "test_ram_merge", "parity", S + "test_basic_merge_matches_mergekit[test_ram_merge]",
          F32 + "; the per-model weights are ignored as by mergekit, with a note" + ALSO_BF16),
    Entry(BASIC, "test_ramplus_tl_merge", "parity", S + "test_basic_merge_matches_mergekit[test_ramplus_tl_merge]",
          F32 + "; the per-model weights are ignored as by mergekit, with a note" + ALSO_BF16
          + " (written in float32, as mergekit writes it)"),
    Entry(BASIC, "test_multislerp_merge", "parity", SL + "test_multislerp_matches_mergekit[names0-c-None-weights0]",
          F32 + "; bf16 bit for bit: " + BF + "[multislerp]"),
    Entry(BASIC, "test_dare_ties_merge", "parity", S + "test_basic_merge_matches_mergekit[test_dare_ties_merge]",
          F32 + "; mergekit draws our keep-masks (different generators)"),
    Entry(BASIC, "test_model_stock_merge", "parity", S + "test_basic_merge_matches_mergekit[test_model_stock_merge]",
          F32 + ALSO_BF16),
    Entry(BASIC, "test_model_stock_filterwise_merge", "parity",
          S + "test_basic_merge_matches_mergekit[test_model_stock_filterwise_merge]", F32 + ALSO_BF16),
    Entry(BASIC, "test_arcee_fusion_merge", "parity",
          SL + "test_arcee_fusion_matches_mergekit_away_from_the_threshold[names0]",
          F32 + "; also given mergekit's importance, test_arcee_fusion_matches_mergekit_given_the_same_importance[names0]"
          + "; bf16 bit for bit: " + BF + "[arcee_fusion unrelated]"),
    Entry(BASIC, "test_nearswap_merge", "parity", SL + "test_nearswap_matches_mergekit[names0-0.0001]",
          F32 + "; bf16 bit for bit: " + BF + "[nearswap]"),
    Entry(BASIC, "test_della_merge", "parity", S + "test_della_merge_equal_in_distribution_to_mergekit",
          F32 + "; equal in distribution (the generators differ)"),
    Entry(BASIC, "test_della_invalid_epsilon", "refused", S + "test_della_invalid_epsilon_refused_by_both",
          "mergekit raises ValueError; we refuse in one line, nothing written"),
    Entry(BASIC, "test_karcher_merge", "parity", SL + "test_karcher_matches_mergekit[names0-c-params0]",
          F32 + "; bf16 bit for bit: " + BF + "[karcher]"),
    # --- TestBasicMerges, LLaVA ------------------------------------------------------------------
    *[Entry(BASIC, t, "parity", AR + f"test_llava_matches_mergekit[{t}]",
            "pico LLaVA; " + F32 + "; mergekit drops the language model: compared with mergekit on the text models"
            + ("; also bf16 bit for bit (the tensors mergekit writes)"
               if t in ("test_linear_VLM_merge", "test_task_arithmetic_VLM_merge", "test_ties_VLM_merge") else ""))
      for t in ("test_linear_VLM_merge", "test_slerp_VLM_merge")],
    *[Entry(BASIC, f"test_nuslerp_VLM_merges[{_vlm_nu_id(*v)}]", "parity",
            AR + f"test_llava_matches_mergekit[test_nuslerp_VLM_merges[{_vlm_nu_id(*v)}]]",
            "pico LLaVA; " + F32 + ("" if _vlm_nu_id(*v) in ("base=none-row_wise=False-flatten=False",
                                                              "base=vlm_c-row_wise=True-flatten=True") else "; slow"))
      for v in NU],
    Entry(BASIC, "test_nuslerp_VLM_merges[weights sum to zero]", "parity",
          AR + "test_llava_matches_mergekit[test_nuslerp_VLM_merges[weights sum to zero]]", "pico LLaVA; " + F32),
    *[Entry(BASIC, t, "parity", AR + f"test_llava_matches_mergekit[{t}]",
            "pico LLaVA; " + F32 + ("; also bf16 bit for bit (the tensors mergekit writes)"
                                     if t in ("test_task_arithmetic_VLM_merge", "test_ties_VLM_merge") else "")
            + ("; mergekit draws our keep-masks" if "dare" in t else ""))
      for t in ("test_task_arithmetic_VLM_merge", "test_breadcrumbs_VLM_merge", "test_ties_VLM_merge",
                "test_dare_ties_VLM_merge", "test_model_stock_VLM_merge", "test_model_stock_filterwise_VLM_merge")],
    # --- test_tokenizer.py ---------------------------------------------------------------------
    Entry("test_tokenizer.py", "test_legacy_mode", "refused",
          TK + "test_legacy_mode_differing_vocabularies_refused_as_by_mergekit",
          "mergekit 0.1.5 fails on its own test (embedding size mismatch, 64 vs 66 rows); we refuse naming "
          "tokenizer_source; same-vocabulary legacy mode in test_legacy_mode_same_vocabulary_copies_the_base_tokenizer"),
    Entry("test_tokenizer.py", "test_source_base", "parity", TK + "test_source_base"),
    Entry("test_tokenizer.py", "test_source_union", "parity", TK + "test_source_union"),
    Entry("test_tokenizer.py", "test_source_model", "parity", TK + "test_source_model"),
    Entry("test_tokenizer.py", "test_slerp_union", "parity", TK + "test_slerp_union"),
    Entry("test_tokenizer.py", "test_force_token", "parity", TK + "test_force_token"),
    Entry("test_tokenizer.py", "test_model_token_id", "parity", TK + "test_model_token_id"),
    Entry("test_tokenizer.py", "test_pad_to_multiple_of", "parity", TK + "test_pad_to_multiple_of"),
    # --- test_chat_template.py -----------------------------------------------------------------
    Entry("test_chat_template.py", "test_template_chatml", "parity", TK + "test_chat_template[chatml-<|im_start|>]", F32),
    Entry("test_chat_template.py", "test_template_literal_jinja", "parity",
          TK + "test_chat_template[{{messages[0]['content']}}-{{messages[0]['content']}}]", F32),
    # --- test_modelref.py: ModelReference.parse, no merge output ----------------------------------
    Entry("test_modelref.py", "test_parse_simple", "ours", S + "test_model_reference[simple]",
          "our parser (merge/refs.py) on a local directory; round trip through str"),
    Entry("test_modelref.py", "test_parse_lora", "ours", S + "test_model_reference[lora]",
          "MODEL+LORA on local directories; merged results in test_mergekit_config.py::test_model_plus_lora_matches_mergekit"),
    Entry("test_modelref.py", "test_parse_revision", "ours", S + "test_hub_references_are_refused_in_one_line[revision]",
          "Hub ids and @revision are not resolved (nothing is downloaded): refused, naming the path"),
    Entry("test_modelref.py", "test_parse_lora_plus_revision", "ours",
          S + "test_hub_references_are_refused_in_one_line[lora plus revision]", "as test_parse_revision"),
    Entry("test_modelref.py", "test_parse_bad", "ours", S + "test_bad_model_references_are_refused_in_one_line",
          "the three malformed strings are refused in one line"),
    # --- test_io.py: TensorWriter, no merge ---------------------------------------------------------
    Entry("test_io.py", "test_safetensors", "ours", S + "test_writer_single_shard_is_model_safetensors",
          "our ShardedWriter and a merge's output: model.safetensors, no index"),
    Entry("test_io.py", "test_pickle", "not ported", None,
          "we write safetensors only (no pickle output); reading .bin goes through `unmerge convert` "
          "(tests/test_convert.py)"),
    Entry("test_io.py", "test_duplicate_tensor", "ours", S + "test_writer_same_tensor_under_two_names",
          "one array written under two names: both stored, equal"),
    Entry("test_io.py", "test_async_writer", "ours", S + "test_writer_one_tensor_per_shard",
          "max shard size 1: model-0000i-of-0000n.safetensors and the index; a merge sharded that way equals "
          "the single-file merge"),
]
HOW = ("parity", "refused", "ours", "not ported")


# ----------------------------------------------------------------------------------------------
# the inventory
# ----------------------------------------------------------------------------------------------
def test_inventory_is_complete_and_well_formed():
    keys = [(e.source, e.test) for e in SUITE]
    assert len(keys) == len(set(keys)), "an entry is listed twice"
    assert all(e.how in HOW for e in SUITE)
    assert all((e.target is None) == (e.how == "not ported") for e in SUITE)
    assert all(e.note for e in SUITE if e.how != "parity" or not e.target.startswith(TK))
    per_file = {f: sum(e.source == f for e in SUITE) for f in {e.source for e in SUITE}}
    # mergekit's files as they are: 33 tests in test_basic_merges.py, two of which loop over nine
    # nuslerp configurations; 8 + 2 tokenizer / chat-template tests; 5 + 4 reference / writer tests.
    assert per_file == {BASIC: 33 - 2 + 2 * 9, "test_tokenizer.py": 8, "test_chat_template.py": 2,
                        "test_modelref.py": 5, "test_io.py": 4}
    # the counts docs/merge.md quotes
    assert {h: sum(e.how == h for e in SUITE) for h in HOW} == {"parity": 57, "refused": 2, "ours": 8, "not ported": 1}


def _collected(files) -> set:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "", "-p", "no:cacheprovider",
                          *files], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    ids = {line.strip() for line in run.stdout.splitlines() if "::" in line}
    assert ids, run.stdout[-2000:] + run.stderr[-2000:]
    return ids


def test_every_target_exists():
    """Every named test is collected by pytest (slow ones included), so the inventory cannot rot."""
    targets = {e.target for e in SUITE if e.target}
    files = sorted({t.split("::")[0] for t in targets})
    missing = sorted(targets - _collected(files))
    assert not missing, f"the inventory names tests that do not exist: {missing}"


# ----------------------------------------------------------------------------------------------
# the configurations of test_basic_merges.py not run exactly elsewhere (pico Llama, tiny GPT-2)
# ----------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pico(tmp_path_factory):
    """mergekit's fixtures: model_a, model_b, model_c (unrelated random pico Llamas) and gpt2_like."""
    from tests._tiny_models import pico_llama, tiny_gpt2

    root = tmp_path_factory.mktemp("pico")
    out = {}
    for name, seed in (("model_a", 0), ("model_b", 1), ("model_c", 2)):
        pico_llama(seed).save_pretrained(root / name)
        out[name] = str(root / name)
    tiny_gpt2(3).save_pretrained(root / "gpt2_like")
    out["gpt2_like"] = str(root / "gpt2_like")
    return out


def _two(m, a, b, method, base=None, params=None, dtype="float32"):
    """mergekit's ``two_model_config``."""
    cfg = {"merge_method": method, "dtype": dtype,
           "models": [{"model": m[a], "parameters": {"weight": 0.6}}, {"model": m[b], "parameters": {"weight": 0.4}}]}
    if base:
        cfg["base_model"] = m[base]
    if params:
        cfg["parameters"] = params
    return cfg


BASIC_CASES = {   # mergekit's test -> config(models, dtype)
    "test_gpt2_copy": lambda m, dt: {"merge_method": "passthrough", "models": [{"model": m["gpt2_like"]}], "dtype": dt},
    "test_gpt2_stack": lambda m, dt: {"merge_method": "passthrough", "dtype": dt, "slices": [
        {"sources": [{"model": m["gpt2_like"], "layer_range": [0, 12]}]}] * 2},
    "test_linear_merge": lambda m, dt: _two(m, "model_a", "model_b", "linear", dtype=dt),
    "test_task_arithmetic_merge": lambda m, dt: _two(m, "model_a", "model_b", "task_arithmetic", "model_c", dtype=dt),
    "test_breadcrumbs_merge": lambda m, dt: _two(m, "model_a", "model_b", "breadcrumbs", "model_c", dtype=dt),
    "test_ties_merge": lambda m, dt: _two(m, "model_a", "model_b", "ties", "model_c", {"density": 0.3}, dtype=dt),
    "test_sce_merge": lambda m, dt: _two(m, "model_a", "model_b", "sce", "model_c", {"select_topk": 0.5}, dtype=dt),
    "test_ram_merge": lambda m, dt: _two(m, "model_a", "model_b", "ram", "model_c", dtype=dt),
    "test_ramplus_tl_merge": lambda m, dt: _two(m, "model_a", "model_b", "ramplus_tl", "model_c",
                                                {"r": 0.05, "alpha": 1.0}, dtype=dt),
    "test_dare_ties_merge": lambda m, dt: _two(m, "model_a", "model_b", "dare_ties", "model_c", {"density": 0.66},
                                               dtype=dt),
    "test_model_stock_merge": lambda m, dt: _two(m, "model_b", "model_c", "model_stock", "model_a", dtype=dt),
    "test_model_stock_filterwise_merge": lambda m, dt: _two(m, "model_b", "model_c", "model_stock", "model_a",
                                                            {"filter_wise": True}, dtype=dt),
}
BF16_BITS = ["test_gpt2_copy", "test_gpt2_stack", "test_linear_merge", "test_task_arithmetic_merge", "test_ties_merge",
             "test_breadcrumbs_merge", "test_sce_merge", "test_ram_merge", "test_ramplus_tl_merge",
             "test_model_stock_merge", "test_model_stock_filterwise_merge"]


def _mergekit(cfg, out):
    pytest.importorskip("mergekit", reason="mergekit is not installed: parity with mergekit not checked")
    from tests._tiny_models import run_mergekit

    return run_mergekit(cfg, out)


def _logits(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = (torch.arange(12).reshape(2, 6) * 5) % 64
    with torch.no_grad():
        return model(ids).logits.numpy()


@pytest.mark.parametrize("case", list(BASIC_CASES))
def test_basic_merge_matches_mergekit(pico, tmp_path, monkeypatch, case):
    from tests._tiny_models import feed_mergekit_our_dare_masks, numpy_state

    cfg = BASIC_CASES[case](pico, "float32")
    if case == "test_dare_ties_merge":
        used = feed_mergekit_our_dare_masks(monkeypatch, numpy_state(pico["model_c"]),
                                            [numpy_state(pico[k]) for k in ("model_a", "model_b")], [0.66, 0.66],
                                            DARE_SEED)
    want = numpy_state(_mergekit(cfg, tmp_path / "mk"))
    if case == "test_dare_ties_merge":
        assert len(used) == 2 * len(want)
    res = merge(cfg, tmp_path / "us", seed=DARE_SEED)
    got = numpy_state(tmp_path / "us")
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=0, atol=ATOL, err_msg=n)
    np.testing.assert_allclose(_logits(tmp_path / "us"), _logits(tmp_path / "mk"), rtol=0, atol=1e-5)
    if case == "test_gpt2_stack":   # mergekit's own check
        assert json.loads((tmp_path / "us" / "config.json").read_text())["n_layer"] == 24
    if case.startswith("test_ram"):
        assert any("ignores per-model weight, as in mergekit" in n for n in res.notes)


@pytest.mark.parametrize("case", BF16_BITS)
def test_basic_merge_bfloat16_as_written_bit_for_bit(pico, tmp_path, case):
    from tests._tiny_models import stored_state

    cfg = BASIC_CASES[case](pico, "bfloat16")
    want = stored_state(_mergekit(cfg, tmp_path / "mk"))
    merge(cfg, tmp_path / "us", compute_dtype="bfloat16")
    got = stored_state(tmp_path / "us")
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == want[n].dtype, n
        assert np.array_equal(got[n].view(np.uint16), want[n].view(np.uint16)), n


DELLA = {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}


def test_della_merge_equal_in_distribution_to_mergekit(pico, tmp_path):
    """mergekit's test_della_merge. The generators differ, the law is the same: the fraction of
    entries left at the base agrees within 5 two-sample s.d., the merged task vectors' L1 mass
    within 3 %, and the same tensors differ from the base."""
    from tests._tiny_models import numpy_state

    cfg = _two(pico, "model_a", "model_b", "della", "model_c", DELLA)
    want = numpy_state(_mergekit(cfg, tmp_path / "mk"))
    merge(cfg, tmp_path / "us", seed=3)
    got = numpy_state(tmp_path / "us")
    assert set(got) == set(want)
    base = numpy_state(pico["model_c"])
    at_base = [np.concatenate([(o[n] == base[n]).ravel() for n in base]) for o in (got, want)]
    frac = [a.mean() for a in at_base]
    pooled = np.mean(frac)
    assert 0 < pooled < 1
    assert abs(frac[0] - frac[1]) < 5 * np.sqrt(2 * pooled * (1 - pooled) / at_base[0].size)
    l1 = [sum(np.abs(o[n].astype(np.float64) - base[n]).sum() for n in base) for o in (got, want)]
    assert l1[0] == pytest.approx(l1[1], rel=0.03)
    assert ({n for n in got if not np.array_equal(got[n], base[n])}
            == {n for n in want if not np.array_equal(want[n], base[n])})
    assert not all(np.array_equal(got[n], want[n]) for n in base)


def test_della_invalid_epsilon_refused_by_both(pico, tmp_path):
    cfg = _two(pico, "model_a", "model_b", "della", "model_c", {**DELLA, "epsilon": 1.35})
    with pytest.raises(ValueError):
        _mergekit(cfg, tmp_path / "mk")
    with pytest.raises(UnmergeError, match="epsilon") as err:
        merge(cfg, tmp_path / "us")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "us").exists()


# ----------------------------------------------------------------------------------------------
# test_modelref.py: our model references (local directories; nothing is downloaded)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora(pico, tmp_path_factory):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from tests._tiny_models import pico_llama

    path = tmp_path_factory.mktemp("ref_lora") / "lora"
    torch.manual_seed(9)
    get_peft_model(pico_llama(0), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                             init_lora_weights=False)).save_pretrained(path)
    return str(path)


def _resolve(value, what):
    from unmerge_jax.merge.config import _model_path

    return _model_path(value, Path.cwd(), what)


@pytest.mark.parametrize("kind", ["simple", "lora"])
def test_model_reference(pico, lora, kind):
    from unmerge_jax.merge.refs import ModelRef, parse_ref

    model = str(Path(pico["model_a"]).resolve())
    text = model if kind == "simple" else f"{model}+{Path(lora).resolve()}"
    ref = parse_ref(text, _resolve, "models[0]")
    assert ref == (ModelRef(Path(model)) if kind == "simple" else ModelRef(Path(model), Path(lora).resolve()))
    assert str(ref) == text
    # mergekit's serialised form is the same reference
    if kind == "lora":
        assert parse_ref({"model": {"path": model}, "lora": {"path": lora}}, _resolve, "models[0]") == ref


@pytest.mark.parametrize("ref", [pytest.param("hf_user/model@v0.0.1", id="revision"),
                                 pytest.param("hf_user/model@v0.0.1+hf_user/lora@main", id="lora plus revision")])
def test_hub_references_are_refused_in_one_line(pico, tmp_path, ref):
    cfg = {"merge_method": "task_arithmetic", "base_model": pico["model_c"], "models": [{"model": ref}]}
    with pytest.raises(UnmergeError, match="does not exist .no downloads") as err:
        merge(cfg, tmp_path / "out")
    assert "\n" not in str(err.value) and "hf_user/model@v0.0.1" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bad_model_references_are_refused_in_one_line(pico, tmp_path):
    """mergekit's test_parse_bad strings."""
    for ref, match in (("@@@@@", "does not exist"), ("a+b+c", "cannot parse model reference"),
                       ("a+b+c@d+e@f@g", "cannot parse model reference")):
        cfg = {"merge_method": "task_arithmetic", "base_model": pico["model_c"], "models": [{"model": ref}]}
        with pytest.raises(UnmergeError, match=match) as err:
            merge(cfg, tmp_path / "out")
        assert "\n" not in str(err.value)
        assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# test_io.py: our writer
# ----------------------------------------------------------------------------------------------
def _write(out, tensors, **kw):
    from unmerge_jax.io.writer import ShardedWriter

    out.mkdir()
    w = ShardedWriter(out, [(n, a.shape, "F32") for n, a in tensors], **kw)
    for n, a in tensors:
        w.write(n, a)
    w.close()
    return w


def test_writer_single_shard_is_model_safetensors(pico, tmp_path):
    from safetensors.numpy import load_file

    x = np.random.default_rng(0).standard_normal(4).astype(np.float32)
    _write(tmp_path / "w", [("steve", x)])
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["model.safetensors"]
    np.testing.assert_array_equal(load_file(str(tmp_path / "w" / "model.safetensors"))["steve"], x)
    merge({"merge_method": "passthrough", "models": [{"model": pico["model_a"]}]}, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert not list((tmp_path / "m").glob("*.index.json"))


def test_writer_same_tensor_under_two_names(tmp_path):
    from safetensors.numpy import load_file

    jim = np.random.default_rng(1).standard_normal(4).astype(np.float32)
    _write(tmp_path / "w", [("jim", jim), ("jimbo", jim)])
    got = load_file(str(tmp_path / "w" / "model.safetensors"))
    np.testing.assert_array_equal(got["jim"], jim)
    np.testing.assert_array_equal(got["jimbo"], jim)


def test_writer_one_tensor_per_shard(pico, tmp_path):
    from safetensors.numpy import load_file

    from tests._tiny_models import numpy_state

    rng = np.random.default_rng(2)
    ts = [(f"t{i + 1}", rng.standard_normal(16).astype(np.float32)) for i in range(4)]
    _write(tmp_path / "w", ts, max_shard_bytes=1)
    files = [f"model-{i + 1:05d}-of-00004.safetensors" for i in range(4)]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == sorted(files + ["model.safetensors.index.json"])
    index = json.loads((tmp_path / "w" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {n: f for (n, _), f in zip(ts, files)}
    for (n, a), f in zip(ts, files):
        np.testing.assert_array_equal(load_file(str(tmp_path / "w" / f))[n], a)
    # A merge sharded one tensor per file: the same tensors as the single-file merge, and it loads.
    cfg = _two(pico, "model_a", "model_b", "linear")
    merge(cfg, tmp_path / "one")
    merge(cfg, tmp_path / "many", shard_bytes=1)
    shards = sorted((tmp_path / "many").glob("model-*-of-*.safetensors"))
    one = numpy_state(tmp_path / "one")
    assert len(shards) == len(one)
    many = numpy_state(tmp_path / "many")
    assert set(many) == set(one) and all(np.array_equal(many[n], one[n]) for n in one)
    np.testing.assert_array_equal(_logits(tmp_path / "many"), _logits(tmp_path / "one"))
