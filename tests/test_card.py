"""The README.md model card: ours (written by every merge) and mergekit 0.1.5's both parse back —
front-matter, method, models, and a YAML block that ``load_config`` turns into the same recipe."""

import os

import numpy as np
import pytest
import yaml

import unmerge_jax
from unmerge_jax.errors import UnmergeError
from unmerge_jax.merge.card import CARD_NAME, TAGS, model_card, parse_card
from unmerge_jax.merge.config import load_config, resolve_for_tensor

pytestmark = pytest.mark.models


def _cfg(q, method="ties"):
    return {"merge_method": method, "base_model": str(q / "base"), "dtype": "float32",
            "parameters": {"normalize": True},
            "models": [{"model": str(q / "ft0"), "parameters": {"weight": 0.6, "density": 0.5}},
                       {"model": str(q / "ft1"), "parameters": {"weight": 0.4, "density": 0.7}}]}


def _same_recipe(a, b):
    assert a.merge_method == b.merge_method and a.base_model == b.base_model
    assert [p for p, _ in a.models] == [p for p, _ in b.models]
    ra, rb = resolve_for_tensor(a, "", 0.0), resolve_for_tensor(b, "", 0.0)
    np.testing.assert_array_equal(ra.weights, rb.weights)
    np.testing.assert_array_equal(ra.density, rb.density)
    assert ra.shared == rb.shared


def test_a_merge_writes_a_card_that_parses_back_to_its_config(tiny, tmp_path):
    q = tiny["qwen"]
    unmerge_jax.merge(_cfg(q), tmp_path / "out", seed=7)
    text = (tmp_path / "out" / CARD_NAME).read_text()
    card = parse_card(text)
    assert card.metadata["library_name"] == "transformers" and card.metadata["tags"] == list(TAGS)
    assert card.metadata["base_model"] == []          # local directories are not Hub ids
    assert text.splitlines()[0] == "---" and "# out\n" in text
    assert f"merge method using {q / 'base'} as a base" in text and "[TIES](https://arxiv.org/abs/2306.01708)" in text
    assert f"* {q / 'ft0'}\n* {q / 'ft1'}\n" in text and "--seed" not in text   # TIES draws no masks
    unmerge_jax.merge(_cfg(q, "dare_ties"), tmp_path / "dare", seed=7)             # DARE does: its seed is stated
    assert "Random masks were drawn with `--seed 7`" in (tmp_path / "dare" / CARD_NAME).read_text()
    back = load_config(card.config_yaml)
    _same_recipe(back, load_config(_cfg(q)))
    assert back.out_dtype == "float32"


def test_cards_list_hub_ids_under_base_model():
    cfg = {"merge_method": "task_arithmetic", "base_model": "org/base",
           "models": [{"model": "org/a"}, {"model": "/abs/b"}, {"model": "./c"}, {"model": "org/base"}]}
    text = model_card(cfg, "m")
    assert parse_card(text).metadata["base_model"] == ["org/base", "org/a"]
    assert "* org/a\n* /abs/b\n* ./c\n" in text and "* org/base" not in text       # the base is named, not listed
    assert yaml.safe_load(parse_card(text).config_yaml) == cfg


def test_a_card_written_by_mergekit_parses_back(tiny, tmp_path):
    pytest.importorskip("mergekit", reason="mergekit is not installed: its card is not checked")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    q = tiny["qwen"]
    cfg = _cfg(q)
    source = yaml.safe_dump(cfg, sort_keys=False)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"), config_source=source,
              options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, write_model_card=True))
    text = (tmp_path / "mk" / CARD_NAME).read_text()
    card = parse_card(text)
    assert card.metadata["tags"] == ["mergekit", "merge"] and card.metadata["library_name"] == "transformers"
    assert card.config_yaml.strip() == source.strip()
    _same_recipe(load_config(card.config_yaml), load_config(cfg))
    from unmerge_jax.verify import load_recipe

    r = load_recipe(None, tmp_path / "mk")
    assert r.from_card and r.names == ["ft0", "ft1"]
    # mergekit's TIES model is consistent with mergekit's card (per-model densities differ: that
    # claim is not checkable; the weights are w/Σw against the TIES-consistent weights).
    from tests.test_verify import dense_attribution
    from unmerge_jax.verify import check_claims

    rep = check_claims(r, dense_attribution(r.base_model, [(m.name, m.path) for m in r.models], tmp_path / "mk"))
    assert rep.consistent, rep.failed
    for name in ("weight:ft0", "weight:ft1", "density", "unexplained"):
        assert next(c for c in rep.claims if c.name == name).ok is None     # one TIES density per model cannot fit
    assert all(next(c for c in rep.claims if c.name == n).ok for n in ("present:ft0", "present:ft1", "method"))


def test_a_mergekit_ties_model_is_consistent_with_its_own_card(tiny, tmp_path):
    pytest.importorskip("mergekit", reason="mergekit is not installed: its card is not checked")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from tests.test_verify import dense_attribution
    from unmerge_jax.verify import check_claims, load_recipe

    q = tiny["qwen"]
    cfg = _cfg(q)
    cfg["models"][1]["parameters"]["density"] = 0.5
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"), config_source=yaml.safe_dump(cfg),
              options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, write_model_card=True))
    r = load_recipe(tmp_path / "mk")
    rep = check_claims(r, dense_attribution(r.base_model, [(m.name, m.path) for m in r.models], tmp_path / "mk"))
    assert rep.consistent and all(c.ok for c in rep.claims), rep.failed
    assert [c.found for c in rep.claims if c.name.startswith("weight:")] == pytest.approx([0.6, 0.4], abs=1e-6)


@pytest.mark.parametrize("text,words", [
    ("# no front-matter, no block\n", ["no ```yaml block"]),
    ("---\n- a list\n---\n```yaml\nmerge_method: linear\n```\n", ["front-matter", "not a YAML mapping"]),
])
def test_bad_cards_are_one_line_errors(text, words):
    with pytest.raises(UnmergeError) as err:
        parse_card(text, "x/README.md")
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words) and "x/README.md" in str(err.value)


def test_the_first_yaml_block_is_the_configuration():
    text = "---\ntags: [merge]\n---\n# m\n\n```python\nprint(1)\n```\n\n```yaml\nmerge_method: ties\n```\n\n```yaml\nx: 1\n```\n"
    assert parse_card(text).config_yaml == "merge_method: ties\n"
