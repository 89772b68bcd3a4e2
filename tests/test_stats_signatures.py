"""The merge-method signature sums in the statistics file, and decisions from it.

* ``save_stats(..., signatures=sig)`` / ``load_stats(..., signatures=True)`` round-trip the
  :class:`~unmerge_jax.attribution.SignatureStats` bit for bit; a file without them (older files,
  ``--no-signatures``) still loads, with ``None``; a damaged signature section (the per-group sums
  included) or one of format version 1 (before the per-group sums) is a one-line error.
* On real tiny merges made by the merge engine: ``unmerge decompose --stats FILE`` gives the same
  JSON as the direct run that wrote ``FILE`` with ``--stats-out`` (provenance included), and as a
  direct run beside an ``unmerge stats --seeds 200`` file (all but the wall time); a file without
  signature sums asked for decisions is a one-line error naming the file and the fix.
"""

import json

import numpy as np
import pytest

import unmerge_jax as u
from unmerge_jax import UnmergeError
from unmerge_jax.attribution import DENSITY_GRID, SignatureStats, signature_stats, trim_thresholds
from unmerge_jax.cli.main import main
from unmerge_jax.io.arrays import read_npz, write_npz


def _array_problem(seed=0, n=600, k=3, t=2):
    rng = np.random.default_rng(seed)
    D = rng.normal(size=(n, k)).astype(np.float32)
    W = rng.uniform(0.2, 0.8, size=(k, t))
    V = (D @ W).astype(np.float32)
    V[rng.random(V.shape) < 0.2] = 0.0  # some exact zeros, as a trimming merge leaves
    return D, V


def _sig_of(D, V):
    """Sums of two "tensors" in two groups."""
    half = D.shape[0] // 2
    thr = np.stack([trim_thresholds(D[:half].T), trim_thresholds(D[half:].T)])
    return signature_stats(D, V, [(0, half), (half, D.shape[0])], thr, groups=[0, 1])


def test_signatures_round_trip_bit_for_bit(tmp_path):
    D, V = _array_problem()
    st, sig = u.gram_stats(D, V, seeds=3, key=1), _sig_of(D, V)
    u.save_stats(tmp_path / "s.npz", st, {"atom_names": ["a", "b", "c"]}, signatures=sig)
    back, prov, got = u.load_stats(tmp_path / "s.npz", signatures=True)
    assert isinstance(got, SignatureStats) and prov == {"atom_names": ["a", "b", "c"]}
    assert got.n_groups == 2 and got.group_gram.shape == (2, 3, 3) and got.group_cross.shape == (2, 3, 2)
    assert not np.allclose(got.group_gram[0], got.group_gram[1])  # two groups' own sums
    for f in SignatureStats._fields:
        np.testing.assert_array_equal(np.asarray(getattr(got, f)), np.asarray(getattr(sig, f)), err_msg=f)
    np.testing.assert_array_equal(got.densities, DENSITY_GRID)
    np.testing.assert_array_equal(back.gram, st.gram)
    assert len(u.load_stats(tmp_path / "s.npz")) == 2  # the two-value form is unchanged
    _, meta = read_npz(tmp_path / "s.npz")
    assert meta["signatures"] == {"version": 2, "densities": list(DENSITY_GRID)}


def test_a_file_without_signatures_still_loads(tmp_path):
    D, V = _array_problem()
    u.save_stats(tmp_path / "old.npz", u.gram_stats(D, V, seeds=2), {})
    stats, prov, sig = u.load_stats(tmp_path / "old.npz", signatures=True)
    assert sig is None and stats.n_seeds == 2


def _damaged(tmp_path, change):
    D, V = _array_problem()
    u.save_stats(tmp_path / "s.npz", u.gram_stats(D, V), {}, signatures=_sig_of(D, V))
    arrays, meta = read_npz(tmp_path / "s.npz")
    change(arrays, meta)
    write_npz(tmp_path / "bad.npz", arrays, meta)
    return tmp_path / "bad.npz"


@pytest.mark.parametrize("change,match", [
    (lambda a, m: m.update(signatures={"version": 1, "densities": m["signatures"]["densities"]}),
     "format version 1; this unmerge_jax reads version 2 — write it again with `unmerge stats`"),
    (lambda a, m: a.pop("sig_ties_vv"), r"only some signature sums \(missing sig_ties_vv\)"),
    (lambda a, m: a.update(sig_zero_energy=a["sig_zero_energy"][:, :1]), r"sig_zero_energy has shape \(3, 1\)"),
    (lambda a, m: a.update(sig_ties_dd=np.full_like(a["sig_ties_dd"], np.nan)), "sig_ties_dd holds NaN"),
    (lambda a, m: a.update(sig_densities=a["sig_densities"] * 2), "is not fractions in"),
    (lambda a, m: a.update(sig_n_rows=a["sig_n_rows"] + 1), "not sums of the same rows"),
    (lambda a, m: m.pop("signatures"), "format version None"),
    (lambda a, m: a.pop("sig_group_cross"), r"missing sig_group_cross\)"),
    (lambda a, m: a.update(sig_group_gram=a["sig_group_gram"][0]), r"sig_group_gram has shape \(3, 3\), not \(G, 3, 3\)"),
    (lambda a, m: a.update(sig_group_gram=a["sig_group_gram"][:0]), r"sig_group_gram has shape \(0, 3, 3\).*G >= 1"),
    (lambda a, m: a.update(sig_group_cross=a["sig_group_cross"][:1]),
     r"sig_group_cross has shape \(1, 3, 2\) .* 2 groups need \(2, 3, 2\)"),
    (lambda a, m: a.update(sig_group_gram=np.where(np.eye(3), np.inf, a["sig_group_gram"])), "sig_group_gram holds NaN/Inf"),
    (lambda a, m: a.update(sig_group_cross=np.full_like(a["sig_group_cross"], np.nan)), "sig_group_cross holds NaN"),
], ids=["version-1", "missing", "shape", "nan", "densities", "rows", "no-record", "group-missing", "group-2d",
        "no-groups", "group-cross-shape", "group-inf", "group-nan"])
def test_a_damaged_signature_section_is_one_line(tmp_path, change, match):
    bad = _damaged(tmp_path, change)
    with pytest.raises(UnmergeError, match=match) as err:
        u.load_stats(bad, signatures=True)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


# ----------------------------------------------------------------------------------------------
# decisions from a statistics file, on tiny merges
# ----------------------------------------------------------------------------------------------
def _inputs(root):
    from tests._tiny_merges import entries

    d, t = entries(root)
    return ["--base", str(root / "base"), "--dictionary", *d, "--target", *t]


def _json(path):
    return json.loads(path.read_text())


@pytest.mark.models
def test_decompose_from_the_stats_file_equals_the_direct_run(merges, tmp_path, capsys):
    from tests._tiny_merges import MERGES

    args = [*_inputs(merges), "--top-k", "4000", "--seed", "11"]
    assert main(["decompose", *args, "--json", str(tmp_path / "direct.json"),
                 "--stats-out", str(tmp_path / "s.npz")]) == 0
    direct_out = capsys.readouterr().out
    assert main(["decompose", "--stats", str(tmp_path / "s.npz"), "--json", str(tmp_path / "file.json")]) == 0
    assert capsys.readouterr().out == direct_out  # the same tables and verdict lines
    direct, file = _json(tmp_path / "direct.json"), _json(tmp_path / "file.json")
    assert file == direct  # every key, the provenance included
    assert [r["verdict"] for r in direct["targets"]] == [m[3] for m in MERGES.values()]
    assert direct["provenance"]["signatures"] == {"version": 2, "densities": list(DENSITY_GRID), "ties_stride": 1}

    # `unmerge stats` accumulates the sums by default at 200 replicates: the same report
    assert main(["stats", *args, "--seeds", "200", "--out", str(tmp_path / "s2.npz")]) == 0
    assert "signature sums" in capsys.readouterr().out
    assert main(["decompose", "--stats", str(tmp_path / "s2.npz"), "--json", str(tmp_path / "file2.json")]) == 0
    file2 = _json(tmp_path / "file2.json")
    assert file2["provenance"].pop("seconds") > 0
    direct["provenance"].pop("seconds")
    assert file2 == direct

    # the same sums in both files, to the bit (the same pass)
    _, _, a = u.load_stats(tmp_path / "s.npz", signatures=True)
    _, _, b = u.load_stats(tmp_path / "s2.npz", signatures=True)
    for f in SignatureStats._fields:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


@pytest.mark.models
def test_a_file_without_signatures_asked_for_decisions_is_one_line(merges, tmp_path, capsys):
    args = [*_inputs(merges), "--top-k", "4000"]
    assert main(["stats", *args, "--seeds", "200", "--no-signatures", "--out", str(tmp_path / "plain.npz")]) == 0
    assert u.load_stats(tmp_path / "plain.npz", signatures=True)[2] is None
    capsys.readouterr()
    assert main(["decompose", "--stats", str(tmp_path / "plain.npz"), "--json", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and str(tmp_path / "plain.npz") in err
    assert "no merge-method signature sums" in err and "unmerge stats --seeds 200" in err
    assert not (tmp_path / "o.json").exists()

    # fewer replicates: no sums by default, the fit only, with a warning naming the file
    assert main(["stats", *args, "--seeds", "20", "--out", str(tmp_path / "few.npz")]) == 0
    assert u.load_stats(tmp_path / "few.npz", signatures=True)[2] is None
    assert main(["decompose", "--stats", str(tmp_path / "few.npz"), "--json", str(tmp_path / "few.json")]) == 0
    rep = _json(tmp_path / "few.json")
    assert all(r["verdict"] is None for r in rep["targets"])
    assert any("few.npz" in w and "20 bootstrap replicates" in w for w in rep["warnings"])
    # a forced --signatures with few replicates is written, and still gives the fit only
    assert main(["stats", *args, "--seeds", "20", "--signatures", "--out", str(tmp_path / "few_sig.npz")]) == 0
    assert u.load_stats(tmp_path / "few_sig.npz", signatures=True)[2] is not None


@pytest.mark.models
@pytest.mark.parametrize("extra,match", [
    (["--seeds", "200"], "--seeds is an option of the statistics pass"),
    (["--top-k", "10"], "--top-k is an option of the statistics pass"),
    (["--seed", "3"], "--seed is an option of the statistics pass"),
    (["--base", "x"], "give either --stats"),
    (["--stats-out", "again.npz"], "--stats-out and --save-mask"),
    (["--merge-method", "ties", "--density", "0.55"], "not on the signature grid"),
], ids=["seeds", "top-k", "seed", "base", "stats-out", "density"])
def test_pass_options_beside_a_stats_file_are_refused(tmp_path, capsys, extra, match):
    D, V = _array_problem()
    u.save_stats(tmp_path / "s.npz", u.gram_stats(D, V, seeds=200), {}, signatures=_sig_of(D, V))
    capsys.readouterr()
    extra = [str(tmp_path / e) if e.endswith(".npz") else e for e in extra]
    assert main(["decompose", "--stats", str(tmp_path / "s.npz"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and match in err, err
