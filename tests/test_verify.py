"""`unmerge verify`: tiny merges made by the merge engine from seeded Qwen2 fine-tunes, described by
mergekit YAMLs. A true recipe passes (task arithmetic, linear, TIES, DARE); a recipe with a model
swapped, a weight changed by 0.2, a hidden extra model, or the wrong method is reported
inconsistent with that claim named; the claimed weights after each method's normalisation equal a
NumPy formula written here; recipes come from YAML files, model cards and model directories; bad
recipes are one-line errors.

``check_claims`` is exercised on attributions built here from the dense task vectors (read through
``unmerge_jax.sources``, Gram statistics by ``gram_stats``, signatures by ``signature_stats``, the
decisions by ``attribute``); ``verify_files`` and the CLI run the library's attribution pass
(``pipeline.attribute_files``).
"""

import json

import numpy as np
import pytest
import yaml

import unmerge_jax
from unmerge_jax.attribution import attribute, signature_stats, trim_thresholds
from unmerge_jax.cli.main import main
from unmerge_jax.errors import UnmergeError
from unmerge_jax.merge.card import CARD_NAME, model_card
from unmerge_jax.sources import CheckpointSource, task_vector
from unmerge_jax.verify import check_claims, claimed_weights, load_recipe

pytestmark = pytest.mark.models

SEEDS = 20          # bootstrap replicates of the dense attributions here (20 keep the compile short)
PASS_SEEDS = 200    # the attribution pass refuses fewer than the rules were calibrated with
W2 = [0.5, 0.3]


def _cfg(q, method, models, weights, **params):
    per = {k: params.pop(k) for k in list(params) if k in ("density",)}
    return {"merge_method": method, "base_model": str(q / "base"), "dtype": "float32",
            "models": [{"model": str(q / m), "parameters": {"weight": w, **per}} for m, w in zip(models, weights)],
            **({"parameters": params} if params else {})}


MERGES = {   # name: (method, models, weights, extra)
    "ta": ("task_arithmetic", ["ft0", "ft1"], W2, {}),
    "linear": ("linear", ["ft0", "ft1"], W2, {}),
    "ties": ("ties", ["ft0", "ft1"], W2, {"density": 0.5}),
    "dare_linear": ("dare_linear", ["ft0", "ft1"], W2, {"density": 0.5}),
    "dare_ties": ("dare_ties", ["ft0", "ft1"], W2, {"density": 0.5}),
    "ta3": ("task_arithmetic", ["ft0", "ft1", "ft2"], [0.5, 0.3, 0.4], {}),
    "ties3": ("ties", ["ft0", "ft1", "ft2"], [0.5, 0.3, 0.4], {"density": 0.5}),
}


@pytest.fixture(scope="module")
def made(tiny, tmp_path_factory):
    """Merges by the engine (unmerge_jax.merge) of the tiny Qwen2 full fine-tunes."""
    q = tiny["qwen"]
    root = tmp_path_factory.mktemp("verify")
    out = {"q": q, "root": root}
    for name, (method, models, weights, extra) in MERGES.items():
        unmerge_jax.merge(_cfg(q, method, models, weights, **extra), root / name)
        out[name] = root / name
    return out


def _recipe(made, tmp_path, method, models, weights, **extra):
    path = tmp_path / f"recipe{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(_cfg(made["q"], method, models, weights, **extra)))
    return load_recipe(path)


def dense_attribution(base, dictionary, target, seeds=SEEDS):
    """The attribution of ``target`` over ``dictionary`` from the dense task vectors (every float
    tensor, all rows): an independent assembly of the same statistics the pass accumulates."""
    b = CheckpointSource(base)
    tvs = [task_vector(b, p) for _, p in dictionary]
    tv = task_vector(b, target)
    cols, tcol, segs, thr, start = [[] for _ in tvs], [], [], [], 0
    for n in b.names:
        if not b.is_float(n):
            continue
        ds = [np.asarray(t.read(n), np.float32).reshape(-1) for t in tvs]
        for c, d in zip(cols, ds):
            c.append(d)
        tcol.append(np.asarray(tv.read(n), np.float32).reshape(-1))
        thr.append(trim_thresholds(ds))
        segs.append((start, start + ds[0].size))
        start += ds[0].size
    D = np.stack([np.concatenate(c) for c in cols], axis=1)
    V = np.concatenate(tcol)[:, None]
    stats = unmerge_jax.gram_stats(D, V, seeds=seeds, key=0)
    return attribute(stats, signature_stats(D, V, segs, np.stack(thr)), atom_names=[n for n, _ in dictionary],
                     target_names=["model"])


def _check(recipe, model_dir):
    return check_claims(recipe, dense_attribution(recipe.base_model, [(m.name, m.path) for m in recipe.models],
                                                  model_dir))


def _claim(report, name):
    return next(c for c in report.claims if c.name == name)


# ---------------------------------------------------------------- true recipes pass
@pytest.mark.parametrize("merged", ["ta", "linear", "ties", "dare_linear", "dare_ties"])
def test_a_true_recipe_is_consistent(made, tmp_path, merged):
    method, models, weights, extra = MERGES[merged]
    rep = _check(_recipe(made, tmp_path, method, models, weights, **extra), made[merged])
    assert rep.consistent, [c for c in rep.claims if c.ok is False]
    for name in ("present:ft0", "present:ft1", "weight:ft0", "weight:ft1", "unexplained", "method"):
        assert _claim(rep, name).ok is True, _claim(rep, name)
    if method == "ties":
        assert _claim(rep, "density").ok is True and _claim(rep, "density").found == pytest.approx(0.5)
    # The found weights equal the effective ones: exact for TA/linear/TIES, within the bootstrap
    # interval (± tolerance) for DARE.
    want = {"task_arithmetic": np.array(W2), "linear": np.array(W2) / sum(W2), "ties": np.array(W2) / sum(W2)}
    if method in want:
        got = [_claim(rep, f"weight:{m}").found for m in models]
        np.testing.assert_allclose(got, want[method], atol=1e-6)


# ---------------------------------------------------------------- false recipes fail, the claim named
@pytest.mark.parametrize("merged", ["ta", "ties", "dare_linear"])
def test_a_weight_changed_by_0_2_is_named(made, tmp_path, merged):
    method, models, weights, extra = MERGES[merged]
    rep = _check(_recipe(made, tmp_path, method, models, [weights[0] + 0.2, weights[1]], **extra), made[merged])
    assert not rep.consistent
    assert _claim(rep, "weight:ft0").ok is False
    assert {c.name for c in rep.failed} <= {"weight:ft0", "weight:ft1"}   # nothing else is blamed


@pytest.mark.parametrize("merged", ["ta", "ties", "dare_ties"])
def test_a_swapped_model_is_named(made, tmp_path, merged):
    method, _, weights, extra = MERGES[merged]
    rep = _check(_recipe(made, tmp_path, method, ["ft0", "ft2"], weights, **extra), made[merged])
    assert not rep.consistent
    failed = {c.name for c in rep.failed}
    assert "unexplained" in failed and "present:ft0" not in failed
    # TIES / task arithmetic: ft2 is decided absent. DARE's presence floor is low (its rule keeps
    # every known entry at the price of false entries in mixed targets), so there ft2 may read
    # present with a tiny share — then its weight claim (found ≈ 0.01 for 0.375) names it.
    assert "present:ft2" in failed or ("weight:ft2" in failed and _claim(rep, "weight:ft2").found < 0.05)
    if method != "dare_ties":
        assert "present:ft2" in failed


@pytest.mark.parametrize("merged", ["ta3", "ties3"])
def test_a_hidden_extra_model_shows_as_unexplained_content(made, tmp_path, merged):
    method, models, weights, extra = MERGES[merged]
    rep = _check(_recipe(made, tmp_path, method, models[:2], weights[:2], **extra), made[merged])
    assert not rep.consistent
    assert _claim(rep, "unexplained").ok is False and _claim(rep, "unexplained").found > 0.01
    assert _claim(rep, "present:ft0").ok
    # The listed models are never called absent. TIES decisions compare a point share with a band
    # (t, 2t) against a floor at 16× chance: here ft1's band straddles it, so it reads uncertain.
    found = _claim(rep, "present:ft1").found
    assert found == "present" if method != "ties" else found in ("present", "uncertain")


@pytest.mark.parametrize("merged,claimed", [("ta", "ties"), ("ties", "task_arithmetic"), ("dare_linear", "ties"),
                                            ("ties", "dare_ties")])
def test_the_wrong_method_is_named(made, tmp_path, merged, claimed):
    _, models, weights, _ = MERGES[merged]
    extra = {"density": 0.5} if claimed in ("ties", "dare_ties") else {}
    rep = _check(_recipe(made, tmp_path, claimed, models, weights, **extra), made[merged])
    assert not rep.consistent and _claim(rep, "method").ok is False
    assert _claim(rep, "method").found == MERGES[merged][0].replace("dare_linear", "dare")


def test_task_arithmetic_and_linear_are_one_family(made, tmp_path):
    """A linear merge claimed as task arithmetic with the normalised weights is the same formula."""
    rep = _check(_recipe(made, tmp_path, "task_arithmetic", ["ft0", "ft1"], [w / sum(W2) for w in W2]),
                 made["linear"])
    assert rep.consistent and _claim(rep, "method").found == "task_arithmetic"
    assert "indistinguishable" in _claim(rep, "method").reason


def test_adapters_as_models_and_a_weight_0_model_claimed_absent(tiny, tmp_path):
    from tests._tiny_models import QWEN_LORA_TA

    q = tiny["qwen"]
    cfg = {"merge_method": "task_arithmetic", "base_model": str(q / "base"),
           "models": [{"model": str(q / n), "parameters": {"weight": w}} for n, w in QWEN_LORA_TA.items()]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    rep = _check(load_recipe(tmp_path / "r.yaml"), q / "lora_ta")
    assert rep.consistent, rep.failed
    assert _claim(rep, "present:lora1").claimed == "absent" and _claim(rep, "present:lora1").found != "present"
    assert _claim(rep, "weight:lora0").found == pytest.approx(0.7, abs=1e-6)


def test_methods_the_attribution_does_not_model_are_not_checkable(made, tmp_path):
    q = made["q"]
    out = made["root"] / "ram"
    if not out.exists():
        unmerge_jax.merge(_cfg(q, "ram", ["ft0", "ft1"], [1.0, 1.0]), out)
    rep = _check(_recipe(made, tmp_path, "ram", ["ft0", "ft1"], [1.0, 1.0]), out)
    for name in ("method", "unexplained", "weight:ft0", "weight:ft1"):
        assert _claim(rep, name).ok is None and _claim(rep, name).verdict == "not checkable"
    assert _claim(rep, "present:ft0").ok is True and rep.consistent


# ---------------------------------------------------------------- the comparable weights per method
def _weights(tmp_path, q, method, weights, **params):
    cfg = {"merge_method": method, "base_model": str(q / "base"),
           "models": [{"model": str(q / f"ft{i}"), "parameters": {"weight": w}} for i, w in enumerate(weights)],
           **({"parameters": params} if params else {})}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(cfg))
    return claimed_weights(load_recipe(tmp_path / "w.yaml"))


def test_claimed_weights_follow_each_methods_normalisation(tiny, tmp_path):
    q, w = tiny["qwen"], np.array([0.5, 0.3, 0.4])
    cases = [("linear", {}, w / w.sum()), ("linear", {"normalize": False}, w),
             ("task_arithmetic", {}, w), ("task_arithmetic", {"lambda": 0.8}, 0.8 * w),
             ("task_arithmetic", {"lambda": 0.8, "normalize": True}, 0.8 * w / w.sum()),
             ("dare_linear", {"lambda": 1.5}, 1.5 * w), ("ties", {}, w / w.sum()), ("dare_ties", {"lambda": 2.0}, w / w.sum())]
    for method, params, want in cases:
        got, how = _weights(tmp_path, q, method, [float(x) for x in w], **params)
        np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=f"{method} {params}: {how}")
    for method, weights, params, why in [("ties", w, {"normalize": False}, "normalize"), ("ties", w, {"lambda": 0.5}, "lambda"),
                                         ("task_arithmetic", [0.5, -0.3, 0.4], {}, "negative"),
                                         ("task_arithmetic", [[0.1, 0.9], 0.3, 0.4], {}, "vary")]:
        got, how = _weights(tmp_path, q, method, [x if isinstance(x, list) else float(x) for x in weights], **params)
        assert got is None and why in how, (method, params, how)


def test_linear_counts_the_base_listed_as_a_model_in_the_normalisation(tiny, tmp_path):
    """mergekit's linear averages a listed base in: θ = (w_b θ_b + Σ w_k θ_k)/(w_b + Σw), so the
    task vectors' coefficients are w_k/(w_b + Σw) and the base adds none."""
    q = tiny["qwen"]
    cfg = {"merge_method": "linear", "base_model": str(q / "base"),
           "models": [{"model": str(q / "base"), "parameters": {"weight": 0.2}},
                      {"model": str(q / "ft0"), "parameters": {"weight": 0.5}},
                      {"model": str(q / "ft1"), "parameters": {"weight": 0.3}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    r = load_recipe(tmp_path / "r.yaml")
    assert r.names == ["ft0", "ft1"] and r.in_base_weight == pytest.approx(0.2)
    np.testing.assert_allclose(claimed_weights(r)[0], [0.5, 0.3], rtol=1e-12)


# ---------------------------------------------------------------- recipes: YAML, card, directory, errors
def test_recipes_from_yaml_card_and_model_directory_agree(made, tmp_path):
    method, models, weights, extra = MERGES["ties"]
    from_yaml = _recipe(made, tmp_path, method, models, weights, **extra)
    from_card = load_recipe(made["ties"] / CARD_NAME)
    from_dir = load_recipe(None, made["ties"])
    for r in (from_card, from_dir):
        assert r.from_card and r.merge_method == "ties" and r.names == ["ft0", "ft1"]
        assert r.base_model == from_yaml.base_model and [m.path for m in r.models] == [m.path for m in from_yaml.models]
        np.testing.assert_array_equal(claimed_weights(r)[0], claimed_weights(from_yaml)[0])
    assert not from_yaml.from_card
    rep = _check(from_dir, made["ties"])
    assert rep.consistent


def test_relative_paths_in_a_yaml_resolve_beside_it(made, tmp_path):
    q = made["q"]
    (tmp_path / "models").symlink_to(q)
    cfg = {"merge_method": "task_arithmetic", "base_model": "models/base",
           "models": [{"model": "models/ft0", "parameters": {"weight": 0.5}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    r = load_recipe(tmp_path / "r.yaml")
    assert r.base_model == (q / "base").resolve() and r.models[0].path == (q / "ft0").resolve()


@pytest.mark.parametrize("case,words", [
    ("missing_model", ["does-not-exist", "does not exist"]),
    ("no_base", ["no base_model", "--base"]),
    ("card_without_yaml", ["no ```yaml block"]),
    ("dir_without_card", ["has no README.md"]),
])
def test_bad_recipes_are_one_line_errors(made, tmp_path, case, words):
    q = made["q"]
    if case == "missing_model":
        arg = tmp_path / "r.yaml"
        arg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(q / "base"),
                                       "models": [{"model": str(tmp_path / "does-not-exist")}]}))
    elif case == "no_base":
        arg = tmp_path / "r.yaml"
        arg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(q / "ft0")},
                                                                             {"model": str(q / "ft1")}]}))
    elif case == "card_without_yaml":
        arg = tmp_path / "README.md"
        arg.write_text("---\ntags: [merge]\n---\n# a model\n\nno configuration here\n")
    else:
        arg = tmp_path / "empty"
        arg.mkdir()
    with pytest.raises(UnmergeError) as err:
        load_recipe(arg)
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_cli_refuses_a_recipe_whose_models_are_not_on_disk(made, tmp_path, capsys):
    arg = tmp_path / "r.yaml"
    arg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(made["q"] / "base"),
                                   "models": [{"model": "gone/ft9", "parameters": {"weight": 1.0, "density": 0.5}}]}))
    assert main(["verify", str(arg), str(made["ties"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "gone/ft9" in err and str(arg) in err and len(err.strip().splitlines()) == 1


def test_the_card_we_write_names_method_models_and_recipe(made):
    text = (made["ties"] / CARD_NAME).read_text()
    assert "[TIES](https://arxiv.org/abs/2306.01708)" in text and f"* {made['q'] / 'ft0'}" in text
    assert model_card({"merge_method": "x", "models": []}, "n").startswith("---\n")


# ---------------------------------------------------------------- the pass and the command line
# The pass with 200 replicates compiles in ~25 s here; the CLI test pays it in the default run,
# the library-level repeats are slow.
@pytest.mark.slow
@pytest.mark.parametrize("merged,weights,consistent", [("ties", W2, True), ("ta", [0.7, 0.3], False)])
def test_verify_files_on_the_attribution_pass(made, tmp_path, merged, weights, consistent):
    from unmerge_jax.verify import verify_files

    method, models, _, extra = MERGES[merged]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_cfg(made["q"], method, models, weights, **extra)))
    rep = verify_files(path, made[merged], seeds=PASS_SEEDS, progress=False)
    assert rep.consistent is consistent
    if not consistent:
        assert [c.name for c in rep.failed] == ["weight:ft0"]


def test_cli_verdicts_json_and_exit_status(made, tmp_path, capsys):
    assert main(["verify", str(made["dare_linear"]), "--seeds", str(PASS_SEEDS)]) == 0
    out = capsys.readouterr().out
    assert "present:ft0" in out and "consistent: all" in out
    method, models, _, extra = MERGES["ties"]
    bad = tmp_path / "r.yaml"
    bad.write_text(yaml.safe_dump(_cfg(made["q"], "task_arithmetic", models, W2)))
    assert main(["verify", str(bad), str(made["ties"]), "--seeds", str(PASS_SEEDS), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["consistent"] is False and "method" in doc["failed"]
    assert {"name", "claimed", "found", "ok", "verdict", "reason"} <= set(doc["claims"][0])
    js = tmp_path / "v.json"
    assert main(["verify", str(bad), str(made["ties"]), "--seeds", str(PASS_SEEDS), "--json", str(js)]) == 1
    assert json.loads(js.read_text())["failed"] == doc["failed"]


@pytest.mark.parametrize("flags,words", [(["--json", "{model}/v.json"], ["inside"]),
                                         (["--weight-tol", "-1"], ["--weight-tol", ">= 0"])])
def test_cli_bad_options_are_refused_before_any_reading(made, flags, words, capsys):
    flags = [f.format(model=made["ties"]) for f in flags]
    before = sorted(p.name for p in made["ties"].iterdir())
    assert main(["verify", str(made["ties"]), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    assert sorted(p.name for p in made["ties"].iterdir()) == before


@pytest.mark.slow
def test_the_pass_warnings_reach_the_user(made, tmp_path, capsys):
    """A model listed twice: the weight is split between two identical task vectors — said once."""
    q = made["q"]
    cfg = {"merge_method": "task_arithmetic", "base_model": str(q / "base"),
           "models": [{"model": str(q / "ft0"), "parameters": {"weight": 0.25}},
                      {"model": str(q / "ft0"), "parameters": {"weight": 0.25}},
                      {"model": str(q / "ft1"), "parameters": {"weight": 0.3}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["verify", str(tmp_path / "r.yaml"), str(made["ta"])]) in (0, 1)
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "ft0" in err, err
