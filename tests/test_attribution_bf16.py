"""Merges stored in bfloat16: rounding zeros are not DARE drops.

A task-arithmetic merge written in bfloat16 leaves entries exactly at the base wherever the merged
change is below half a unit in the last place of the base's value, so it has exact zeros like a
DARE merge. The method rule reads them as drops only when the target also holds the rescaling
noise that many drops imply (``Rules.dare_noise_min``). Here the tiny Qwen2 bfloat16 base's PEFT
adapters are merged by the engine (``unmerge_jax.merge``) in bfloat16 and in float32, and the
attribution pass (``pipeline.attribute_files``) must name each merge's method.
"""

import numpy as np
import pytest

import unmerge_jax
from unmerge_jax.attribution import Rules
from unmerge_jax.pipeline import attribute_files

pytestmark = pytest.mark.models

MERGES = {  # name: (mergekit method, parameters, the method the attribution names)
    "ta": ("task_arithmetic", {}, "task_arithmetic"),
    "dare": ("dare_linear", {"density": 0.5}, "dare"),
    "dare9": ("dare_linear", {"density": 0.9}, "dare"),
    "ties": ("ties", {"density": 0.5}, "ties"),
}
WEIGHTS = {"lora0": 0.6, "lora1": 0.4}


@pytest.fixture(scope="module")
def bf16_attribution(tiny, tmp_path_factory):
    q = tiny["qwen"]
    root = tmp_path_factory.mktemp("bf16")
    targets = []
    for name, (method, params, _) in MERGES.items():
        for dtype in ("bfloat16", "float32"):
            cfg = {"merge_method": method, "base_model": str(q / "base_bf16"), "dtype": dtype,
                   "models": [{"model": str(q / m), "parameters": {"weight": w, **params}} for m, w in WEIGHTS.items()]}
            unmerge_jax.merge(cfg, root / f"{name}_{dtype}", seed=7)
            targets.append(f"{name}_{dtype}={root / f'{name}_{dtype}'}")
    dictionary = [f"lora{i}={q / f'lora{i}'}" for i in range(3)]
    return attribute_files(q / "base_bf16", dictionary, targets, progress=False)


def test_bf16_merges_are_named_by_their_method(bf16_attribution):
    at = bf16_attribution.attribution
    ev = at.evidence
    for t, target in enumerate(at.target_names):
        name, dtype = target.split("_")
        expect = MERGES[name][2]
        assert at.method[t] == expect, (target, at.method[t], ev["dare_noise_ratio"][t])
        assert set(at.present(t)) == set(WEIGHTS), (target, at.present(t))
        assert at.category[t] == "known", (target, at.category[t], at.unexplained[t])
    ta = at.target_names.index("ta_bfloat16")
    # The bfloat16 task-arithmetic merge has rounding zeros, but nowhere near DARE's noise.
    assert ev["zero_count"][ta] > 0 and ev["dare_noise_ratio"][ta] < 0.01
    for name in ("dare", "dare9"):
        for dtype in ("bfloat16", "float32"):
            t = at.target_names.index(f"{name}_{dtype}")
            assert ev["dare_noise_ratio"][t] > 0.5, (name, dtype, ev["dare_noise_ratio"][t])
            assert at.density[t] == pytest.approx(float(MERGES[name][1]["density"]), abs=0.03)
    np.testing.assert_allclose(at.weights[ta], [0.6, 0.4, 0.0], atol=1e-3)


def test_without_the_noise_check_rounding_zeros_read_as_dare(bf16_attribution):
    """The check is what separates them: with ``dare_noise_min = 0`` the same statistics call the
    bfloat16 task-arithmetic merge DARE (the misreading the rule exists to stop), and nothing else changes."""
    from unmerge_jax.attribution import attribute

    at, res = bf16_attribution
    loose = attribute(res.stats, res.signatures, rules=Rules(dare_noise_min=0.0), atom_names=at.atom_names,
                      target_names=at.target_names)
    changed = [n for t, n in enumerate(at.target_names) if loose.method[t] != at.method[t]]
    assert changed == ["ta_bfloat16"] and loose.method[at.target_names.index("ta_bfloat16")] == "dare"
