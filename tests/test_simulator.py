"""Simulator: exact sparsity and overlap, reproducible per seed, vmap == loop; architecture shapes."""

import itertools
import math

import jax
import numpy as np
import pytest

from unmerge_jax.analysis.architectures import ARCHITECTURES, n_params, tensor_shapes
from unmerge_jax.analysis.overlap import inter_agent
from unmerge_jax.analysis.simulator import (PROFILES, calibrated_sparsity, simulate_agents, simulate_model,
                                            simulate_trials, support_sizes)
from unmerge_jax.errors import UnmergeError


@pytest.mark.parametrize("d,k,s,shared", [(10_000, 3, 0.9, 0.2), (4096, 5, 0.97, 0.2), (1000, 2, 0.6, 0.5),
                                          (999, 1, 0.8, 0.2)])
def test_exact_sparsity_and_overlap(d, k, s, shared):
    x = np.asarray(simulate_agents(jax.random.key(0), d, k, s, shared=shared))
    n_act, n_sh, n_un = support_sizes(d, k, s, shared)
    act = x != 0
    assert x.shape == (k, d) and x.dtype == np.float32
    np.testing.assert_array_equal(act.sum(axis=1), n_act)               # exact sparsity per agent
    assert abs(1 - n_act / d - s) <= 0.5 / d
    c = act.sum(axis=0)
    assert np.count_nonzero(c >= 2) == n_sh and np.count_nonzero((c > 1) & (c < k)) == 0
    assert np.count_nonzero(c == 1) == k * n_un                          # unique supports disjoint
    if k > 1:
        r = inter_agent(x)
        want_j = n_sh / (2 * n_act - n_sh)
        assert r["mean_jaccard"] == pytest.approx(want_j, rel=1e-12)
        assert r["shared_fraction"] == pytest.approx(n_sh / (n_sh + k * n_un))
        # independent reference: set Jaccard per pair
        a, b = set(np.nonzero(x[0])[0]), set(np.nonzero(x[1])[0])
        assert r["jaccard"][0][1] == pytest.approx(len(a & b) / len(a | b))


def test_magnitudes_lognormal_and_signs():
    x = np.asarray(simulate_agents(jax.random.key(1), 200_000, 2, 0.5))
    v = x[x != 0]
    logm = np.log(np.abs(v))
    assert logm.mean() == pytest.approx(-3.0, abs=0.02) and logm.std() == pytest.approx(1.5, abs=0.02)
    assert np.mean(v > 0) == pytest.approx(0.5, abs=0.01)


def test_reproducible_and_vmap_equals_loop():
    a = np.asarray(simulate_trials(7, 4, 2048, 3, 0.9))
    b = np.asarray(simulate_trials(7, 4, 2048, 3, 0.9))
    np.testing.assert_array_equal(a, b)
    keys = jax.random.split(jax.random.key(7), 4)
    loop = np.stack([np.asarray(simulate_agents(kk, 2048, 3, 0.9)) for kk in keys])
    np.testing.assert_array_equal(a, loop)
    c = np.asarray(simulate_trials(8, 4, 2048, 3, 0.9))
    assert not np.array_equal(a, c)


def test_impossible_support_is_an_error():
    with pytest.raises(UnmergeError, match="positions"):
        support_sizes(1000, 3, 0.5, 0.2)  # 3 × 400 unique + 100 shared > 1000


def test_calibration_law_hits_the_ram_points():
    assert calibrated_sparsity([3.0, 7.0]) == pytest.approx([0.85, 0.90])


def test_model_stream_profiles_and_shapes():
    shapes = tensor_shapes("llama-3.2-1b")
    got = list(simulate_model(shapes[:12], jax.random.key(0), 3, 0.95, profile=PROFILES["paper-like"],
                              max_elements=50_000))
    for name, x, s in got:
        assert x.shape[0] == 3
        d = x[0].size
        assert np.count_nonzero(x[0]) == support_sizes(d, 3, s)[0]
    s_of = {n: s for n, _, s in got}
    assert s_of["model.layers.0.self_attn.q_proj.weight"] > s_of["model.layers.0.mlp.up_proj.weight"]
    # lazily generated; a tensor's values depend only on (key, its index), not on earlier ones
    gen = simulate_model(shapes[:12], jax.random.key(0), 3, 0.95, profile=PROFILES["paper-like"], max_elements=50_000)
    third = next(itertools.islice(gen, 2, None))
    np.testing.assert_array_equal(third[1], got[2][1])


def test_architecture_shapes_from_meta_match_layout_and_published_sizes():
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    for arch in ("llama-3-70b", "qwen2.5-7b", "llama-3.2-3b"):
        assert tensor_shapes(arch, use_transformers=True) == tensor_shapes(arch)
    assert len(tensor_shapes("llama-3-70b")) == 723  # the sparsity-scaling paper's Table 3 count
    assert n_params("llama-3-70b") == 70_553_706_496
    assert n_params("llama-3.1-405b") == 405_853_388_800
    assert math.isclose(n_params("qwen2.5-7b") / 1e9, 7.6156, rel_tol=1e-4)
    assert set(ARCHITECTURES) >= {"llama-2-7b", "llama-2-13b", "qwen2.5-72b"}
