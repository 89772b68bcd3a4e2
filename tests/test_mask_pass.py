"""The top-k mask pass (paper §3.4): the streaming selection against a NumPy stable-argsort
reference (group and global scope), the paper's 8,928 × 112 allocation, and the tie rule."""

import numpy as np
import pytest

from unmerge_jax import UnmergeError
from unmerge_jax.io.names import parse_tensor_name
from unmerge_jax.passes.mask import select_top, topk_mask


def _brute_force_mask(base, dictionary, names, k, scope):
    """Stable argsort of −M over each group's concatenation (tensor order, then index order)."""
    from tests._tiny_models import numpy_state

    b = numpy_state(base)
    sts = [numpy_state(d) for d in dictionary]
    M = {n: np.max([np.abs(s[n] - b[n]).reshape(-1) for s in sts], axis=0) for n in names}
    groups = {}
    for n in names:
        groups.setdefault(parse_tensor_name(n).group if scope == "group" else 0, []).append(n)
    per = k // len(groups) if scope == "group" else k
    keep = {n: [] for n in names}
    for ns in groups.values():
        cat = np.concatenate([M[n] for n in ns])
        owner = np.concatenate([np.full(M[n].size, i) for i, n in enumerate(ns)])
        local = np.concatenate([np.arange(M[n].size) for n in ns])
        top = np.argsort(-cat, kind="stable")[:per]
        for t in top:
            keep[ns[owner[t]]].append(local[t])
    return {n: np.sort(np.asarray(v, np.int64)) for n, v in keep.items()}, per


@pytest.mark.models
@pytest.mark.parametrize("scope,k", [("group", 3000), ("global", 2000)])
def test_topk_mask_matches_numpy_reference(tiny, scope, k):
    from unmerge_jax.io.checkpoint import open_checkpoint
    from unmerge_jax.passes.mask import build_selection
    from unmerge_jax.sources import task_vector

    q = tiny["qwen"]
    dic = [q / "ft0", q / "ft1", q / "ft2"]
    base = open_checkpoint(q / "base")
    sel = build_selection(base, [task_vector(base, d) for d in dic], k, scope=scope)
    want, per = _brute_force_mask(q / "base", dic, sel.names, k, scope)
    for n in sel.names:
        np.testing.assert_array_equal(sel.index[n], want[n], err_msg=n)
    if scope == "group":
        assert sel.spec["per_group"] == per == k // sel.spec["n_groups"]
        assert sel.n_rows == sum(min(per, sum(int(np.prod(base.shape(n))) for n in ns))
                                 for ns in _groups(sel.names).values())
    else:
        assert sel.n_rows == k


def _groups(names):
    out = {}
    for n in names:
        out.setdefault(parse_tensor_name(n).group, []).append(n)
    return out


def test_paper_allocation_and_tie_rule():
    """1M over 28 layers × q,k,v,o = 112 groups → 8,928 each (paper §3.4); ties → lowest index."""
    rng = np.random.default_rng(0)
    d = {f"model.layers.{i}.self_attn.{m}_proj.weight": rng.standard_normal((100, 100)).astype(np.float32)
         for i in range(28) for m in "qkvo"}
    masks = topk_mask([d], 1_000_000)
    assert {int(m.sum()) for m in masks.values()} == {8928}
    assert sum(int(m.sum()) for m in masks.values()) == 999_936
    flat = np.abs(d["model.layers.3.self_attn.v_proj.weight"]).reshape(-1)
    np.testing.assert_array_equal(np.flatnonzero(masks["model.layers.3.self_attn.v_proj.weight"]),
                                  np.sort(np.argsort(-flat, kind="stable")[:8928]))
    # ties: all-equal values keep the lowest flat indices, tensor order first
    z = {"model.layers.0.self_attn.q_proj.weight": np.ones((4, 4), np.float32),
         "model.layers.0.self_attn.q_proj.bias": np.ones(4, np.float32)}
    m = topk_mask([z], 6, scope="global")
    assert m["model.layers.0.self_attn.q_proj.weight"].reshape(-1).tolist() == [True] * 6 + [False] * 10
    assert not m["model.layers.0.self_attn.q_proj.bias"].any()
    v = np.array([3, 1, 3, 2, 3], np.float32)
    assert select_top(v, np.zeros(5, np.int32), np.arange(5), 2).tolist() == [0, 2]
    with pytest.raises(UnmergeError, match="smaller than the number of"):
        topk_mask([d], 100)


def test_group_ids_index_groups_of_in_order_of_first_appearance():
    """``group_ids`` (the mask pass's per-group top-k and the attribution's per-group sums) numbers
    each name's (layer, module) group as ``groups_of`` lists them."""
    from unmerge_jax.io.names import group_ids, groups_of

    names = ["model.layers.1.self_attn.k_proj.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.1.self_attn.k_proj.bias", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias"]
    ids = group_ids(names)
    order = list(groups_of(names))
    assert ids.tolist() == [0, 1, 0, 2, 1]
    assert [order[i] for i in ids] == [parse_tensor_name(n).group for n in names]
