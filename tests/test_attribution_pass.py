"""Attribution inside the checkpoint statistics pass, on real tiny merges made by the merge engine.

* The signature sums fused into the pass (``passes.signatures``, ``kernels/signatures.py``) equal
  the NumPy reference ``signature_stats`` of the dense columns (``dense_columns``) with thresholds
  from the whole tensors' task vectors, to float64 rounding: full and compressed passes, rows
  sharded over 8 devices, tensors split across blocks; the per-group Gram sums too (groups
  ``io.names.group_ids`` of the tensors), over the rows the TIES sums take. The kernel alone equals
  ``signature_block`` with per-row groups on blocks of many tiny tensors and on sampled rows.
* ``attribute_files`` on a dictionary of 4 dense fine-tunes of a tiny Qwen2 and targets merged by
  ``unmerge_jax.merge`` (TIES and DARE of 2 of the 4, task arithmetic of 2, a linear merge with a
  fine-tune outside the dictionary, the outside fine-tune alone): present sets, merge method,
  density and verdict; the TIES weights equal the merge's weights; decisions deterministic per seed.
"""

import numpy as np
import pytest

pytestmark = pytest.mark.models

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from unmerge_jax import UnmergeError  # noqa: E402
from unmerge_jax.attribution import (DENSITY_GRID, signature_block, signature_stats,  # noqa: E402
                                     trim_thresholds)
from unmerge_jax.entries import open_entries  # noqa: E402
from unmerge_jax.io.names import group_ids  # noqa: E402
from unmerge_jax.passes.statistics import dense_columns, stream_stats  # noqa: E402
from unmerge_jax.pipeline import attribute_files  # noqa: E402
from unmerge_jax.sources import WEIGHTS, open_source  # noqa: E402

from tests._tiny_merges import DICT, MERGES, entries as _entries  # noqa: E402


def _dense_reference(root, res, dictionary, targets):
    """``signature_stats`` of the dense columns, thresholds from the whole tensors' task vectors."""
    sel = res.selection
    D, V = dense_columns(root / "base", dictionary, targets, selection=sel)
    base = open_source(root / "base", kind=WEIGHTS)
    _, _, tvs = open_entries(base, dictionary, targets, sel.names)
    used = [n for n in sel.names if sel.rows(n)]
    thr = np.stack([trim_thresholds([tvs[k].delta(n) for k in range(len(dictionary))]) for n in used])
    off = sel.offsets()
    return signature_stats(D, V, [(off[n], off[n] + sel.rows(n)) for n in used], thr, groups=group_ids(used))


@pytest.mark.parametrize("top_k,block_rows", [(None, 3000), (2400, 700)], ids=["full", "compressed"])
def test_fused_signatures_equal_the_dense_reference(merges, top_k, block_rows):
    dictionary, targets = _entries(merges)
    res = stream_stats(merges / "base", dictionary, targets, top_k=top_k, signatures=True, block_rows=block_rows)
    sig, ref = res.signatures, _dense_reference(merges, res, dictionary, targets)
    n = res.selection.n_rows
    assert n > 3 * block_rows  # several blocks, tensors split across them
    assert int(sig.n_rows) == n and float(sig.n_active) == float(ref.n_active)
    np.testing.assert_array_equal(sig.densities, DENSITY_GRID)
    np.testing.assert_array_equal(sig.zero_count, ref.zero_count)
    assert sig.n_groups == ref.n_groups > 8  # more groups than the kernel's smallest padding
    for f in ("zero_energy", "ties_dd", "ties_dv", "ties_vv", "group_gram", "group_cross"):
        a, b = np.asarray(getattr(sig, f)), np.asarray(getattr(ref, f))
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15 * np.max(np.abs(b)), err_msg=f)
    # every row is taken (ties_stride 1): the groups' sums add up to the Gram statistics
    np.testing.assert_allclose(sig.group_gram.sum(0), res.stats.gram, rtol=1e-12)
    np.testing.assert_allclose(sig.group_cross.sum(0), res.stats.cross, rtol=1e-12,
                               atol=1e-15 * np.max(np.abs(res.stats.cross)))
    assert np.all(np.trace(sig.group_gram, axis1=1, axis2=2) > 0)  # every group holds rows
    # the signature sums change nothing in the Gram statistics
    plain = stream_stats(merges / "base", dictionary, targets, top_k=top_k, block_rows=block_rows)
    assert plain.signatures is None
    np.testing.assert_array_equal(np.asarray(plain.stats.gram), np.asarray(res.stats.gram))
    np.testing.assert_array_equal(np.asarray(plain.stats.cross), np.asarray(res.stats.cross))


def test_ties_sums_of_a_large_pass_take_every_sth_unit_of_rows(merges, monkeypatch):
    """Above TIES_MAX_ROWS the TIES sums take the rows of every s-th 4,096-row unit, the zero sums every row."""
    from unmerge_jax.kernels.signatures import TIES_UNIT_ROWS
    from unmerge_jax.passes import signatures as S

    monkeypatch.setattr(S, "TIES_MAX_ROWS", 20000)
    read_whole = []  # tensors whose thresholds were computed (read whole)
    from_reading = S.SignatureAccumulator.from_reading
    monkeypatch.setattr(S.SignatureAccumulator, "from_reading",
                        lambda self, name, *a: (read_whole.append(name), from_reading(self, name, *a)))
    dictionary, targets = _entries(merges)
    res = stream_stats(merges / "base", dictionary, targets, signatures=True, block_rows=5000)
    sel, sig = res.selection, res.signatures
    n = sel.n_rows
    stride = -(-n // 20000)
    assert stride == S.ties_stride(n) >= 4
    # a tensor without a sampled row needs no thresholds: it is not read whole for them
    off0 = sel.offsets()
    sampled = {m for m in sel.names if sel.rows(m) and np.any(
        (np.arange(off0[m], off0[m] + sel.rows(m)) // TIES_UNIT_ROWS) % stride == 0)}
    assert set(read_whole) == sampled and len(sampled) < len([m for m in sel.names if sel.rows(m)])
    full = _dense_reference(merges, res, dictionary, targets)
    np.testing.assert_array_equal(sig.zero_count, full.zero_count)
    np.testing.assert_allclose(sig.zero_energy, full.zero_energy, rtol=1e-12)
    # reference: the TIES sums of the sampled rows alone
    D, V = dense_columns(merges / "base", dictionary, targets, selection=sel)
    keep = (np.arange(n) // TIES_UNIT_ROWS) % stride == 0
    base = open_source(merges / "base", kind=WEIGHTS)
    _, _, tvs = open_entries(base, dictionary, targets, sel.names)
    off, segs, thr, start = sel.offsets(), [], [], 0
    used = [m for m in sel.names if sel.rows(m)]
    for name in used:
        rows = int(np.count_nonzero(keep[off[name]:off[name] + sel.rows(name)]))
        segs.append((start, start + rows))
        thr.append(trim_thresholds([tvs[k].delta(name) for k in range(len(dictionary))]))
        start += rows
    sub = signature_stats(D[keep], V[keep], segs, np.stack(thr), groups=group_ids(used))
    # the per-group sums take the same rows as the TIES sums (a group without sampled rows: zero)
    assert sig.n_groups == full.n_groups and np.any(np.all(sub.group_gram == 0, axis=(1, 2)))
    for f in ("ties_dd", "ties_dv", "ties_vv", "group_gram", "group_cross"):
        a, b = np.asarray(getattr(sig, f)), np.asarray(getattr(sub, f))
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15 * np.max(np.abs(b)), err_msg=f)
    assert not np.allclose(sig.ties_vv, full.ties_vv)  # it is a subset
    assert not np.allclose(sig.group_gram, full.group_gram)


@pytest.mark.parametrize("row_offset,stride", [(0, 1), (3 * 4096 - 1000, 2)], ids=["all-rows", "sampled"])
def test_kernel_group_sums_equal_the_reference_on_tiny_tensors(row_offset, stride):
    """Per-row groups, 8 devices, blocks whose chunks span many tiny tensors (more slots than the
    kernel's window) and few large ones, padding slots and rows, and the sampled-rows mask."""
    import jax

    from unmerge_jax.kernels.signatures import TIES_UNIT_ROWS, WINDOW_SLOTS, padded_groups, signature_block_sums
    from unmerge_jax.kernels.stats import row_mesh

    rng = np.random.default_rng(3)
    K, T, S, B, n_valid = 3, 2, 32, 4800, 4700  # 600 rows per device: a 512-row chunk and a rest
    sizes = [7] * 20 + [900, 1300, 1500, 620, 240]  # 20 tiny tensors: one chunk spans > WINDOW_SLOTS
    assert sum(sizes) == n_valid and len(sizes) < S and 7 * WINDOW_SLOTS < 512
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    tensor_group = rng.integers(0, 11, len(sizes))
    tensor_group[:11] = np.arange(11)  # G = 11: the kernel pads the group axis to 16
    D = rng.normal(size=(B, K)).astype(np.float32)
    D[rng.random(B) < 0.1] = 0
    V = (D @ rng.uniform(0.2, 0.8, (K, T))).astype(np.float32)
    V[rng.random(V.shape) < 0.2] = 0
    D[n_valid:], V[n_valid:] = 0, 0
    thr = np.abs(rng.normal(size=(len(sizes), len(DENSITY_GRID), K)))
    starts, table, slot_group = np.full(S, B, np.int64), np.zeros((S, len(DENSITY_GRID), K)), np.zeros(S, np.int32)
    starts[:len(sizes)], table[:len(sizes)], slot_group[:len(sizes)] = first, thr, tensor_group
    mesh = row_mesh(jax.devices())
    assert mesh.devices.size == 8
    out = signature_block_sums(D, V, starts, table, slot_group, mesh=mesh, n_groups=11, row_offset=row_offset,
                               ties_stride=stride)
    groups = np.array(out[-1])  # a copy: the next call donates out
    assert groups.shape == (padded_groups(11), K, K + T) == (16, K, K + T) and np.all(groups[11:] == 0)
    # reference: the rows the TIES sums take, each with its tensor's thresholds and group
    tensor = np.repeat(np.arange(len(sizes)), sizes)
    keep = ((row_offset + np.arange(n_valid)) // TIES_UNIT_ROWS) % stride == 0
    assert keep.any() and (stride == 1 or not keep.all())
    ref = signature_block(D[:n_valid][keep], V[:n_valid][keep], thr[tensor[keep]], DENSITY_GRID,
                          groups=tensor_group[tensor[keep]], n_groups=11)
    for got, want in ((groups[:11, :, :K], ref.group_gram), (groups[:11, :, K:], ref.group_cross),
                      (np.asarray(out[3])[:, :, :K, :K], ref.ties_dd)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14 * np.max(np.abs(want)))
    assert np.max(np.abs(ref.group_gram)) > 0
    # a running total: adding the block again doubles every sum
    again = signature_block_sums(D, V, starts, table, slot_group, mesh=mesh, n_groups=11, row_offset=row_offset,
                                 ties_stride=stride, total=out)
    np.testing.assert_allclose(np.asarray(again[-1]), 2 * groups, rtol=1e-15)


def test_mask_pass_thresholds_are_the_whole_tensors(merges):
    """The compressed pass's thresholds come from the mask pass: the k-th largest |d| of the whole tensor."""
    from unmerge_jax.passes.mask import build_selection

    dictionary, targets = _entries(merges)
    base = open_source(merges / "base", kind=WEIGHTS)
    _, _, tvs = open_entries(base, dictionary, targets, None)
    sel = build_selection(base, tvs[:4], 2400, densities=(0.3, 0.5))
    assert sel.threshold_densities == (0.3, 0.5) and set(sel.thresholds) == set(sel.names)
    for name in sel.names[:6]:
        for k in range(4):
            d = np.abs(tvs[k].delta(name)).reshape(-1)
            for p, rho in enumerate((0.3, 0.5)):
                assert sel.thresholds[name][p, k] == np.sort(d)[::-1][max(1, int(rho * d.size)) - 1]


@pytest.fixture(scope="module")
def attributions(merges):
    dictionary, targets = _entries(merges)
    return {mode: attribute_files(merges / "base", dictionary, targets, top_k=top_k, key=11, progress=False)
            for mode, top_k in (("full", None), ("compressed", 4000))}


@pytest.mark.parametrize("mode", ["full", "compressed"])
def test_present_sets_methods_and_verdicts(attributions, mode):
    at = attributions[mode].attribution
    assert at.atom_names == tuple(DICT) and at.target_names == tuple(MERGES)
    for t, (target, (_, _, _, verdict, present, method, density)) in enumerate(MERGES.items()):
        assert set(at.present(t)) == present, (target, at.present(t))
        assert at.category[t] == verdict, (target, at.category[t], at.unexplained[t])
        if method is not None:
            assert at.method[t] == method, (target, at.method[t])
        if density is not None:
            assert at.density[t] == pytest.approx(density)


def test_ties_weights_are_the_merges_weights(attributions):
    """For the TIES target the reported weights are the TIES-consistent ones: the merge's normalised weights."""
    for mode in ("full", "compressed"):
        at = attributions[mode].attribution
        t = list(MERGES).index("ties_d0_d1")
        np.testing.assert_allclose(at.weights[t], [0.6, 0.4, 0.0, 0.0], atol=1e-6)
        assert at.unexplained[t] <= 1e-9 and at.evidence["ties_unexplained"][t] <= 1e-9
        # plain NNLS on the untrimmed entries misreads the disjoint mean
        assert np.max(np.abs(at.coef[t] - [0.6, 0.4, 0.0, 0.0])) > 1e-3


def test_decisions_are_deterministic_per_seed(merges, attributions):
    dictionary, targets = _entries(merges)
    again = attribute_files(merges / "base", dictionary, targets, top_k=4000, key=11, progress=False).attribution
    first = attributions["compressed"].attribution
    assert again.records() == first.records()
    np.testing.assert_array_equal(again.share_lo, first.share_lo)
    other = attribute_files(merges / "base", dictionary, targets, top_k=4000, key=12, progress=False).attribution
    assert not np.array_equal(other.coef_lo, first.coef_lo)  # another seed draws other replicates


def test_too_few_replicates_and_bad_options_are_refused_before_reading(merges):
    dictionary, targets = _entries(merges)
    with pytest.raises(UnmergeError, match=r"--seeds 200 or more .* got --seeds 50"):
        attribute_files(merges / "base", dictionary, targets, seeds=50)
    with pytest.raises(UnmergeError, match="not on the signature grid"):
        attribute_files(merges / "base", dictionary, targets, method="ties", density=0.55)
    with pytest.raises(UnmergeError, match="needs --merge-method ties or dare"):
        attribute_files(merges / "base", dictionary, targets, method="linear", density=0.5)
    with pytest.raises(UnmergeError, match="is not one of"):
        attribute_files(merges / "base", dictionary, targets, method="slerp")


def test_given_merge_method_skips_identification(merges):
    dictionary, targets = _entries(merges)
    res = attribute_files(merges / "base", dictionary, targets, method="ties", density=0.5, progress=False)
    at = res.attribution
    assert at.method[0] == "ties" and at.density[0] == pytest.approx(0.5) and at.method_confidence[0] == 1.0
    np.testing.assert_allclose(at.weights[0], [0.6, 0.4, 0.0, 0.0], atol=1e-6)
    assert set(at.present(0)) == {"d0", "d1"} and at.category[0] == "known"
