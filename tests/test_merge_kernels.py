"""Merge kernels vs plain-NumPy float64 formulas (the references of tests/test_merge_registry.py):
values, edge cases and bad input."""

import numpy as np
import pytest

from tests.test_merge_registry import np_gta, np_ram, np_topk
from unmerge_jax import UnmergeError, merge_tensors
from unmerge_jax import orderstats as O
from unmerge_jax.kernels import merge as K
from unmerge_jax.kernels.random import bernoulli_at, name_hash
from unmerge_jax.merge.methods import MERGE_METHODS, gta, ram
from unmerge_jax.merge.params import resolve
from unmerge_jax.merge.tensor import merge_resolved

RTOL = 2e-6  # float32 kernels vs float64 references
ATOL = 2e-6


def _data(k=3, shape=(6, 7), seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32)
    deltas = (0.1 * rng.normal(size=(k, *shape))).astype(np.float32)
    return base, deltas


def close(got, want):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- values
def test_linear_is_weighted_mean_of_full_weights():
    base, d = _data()
    theta = base + d
    w = [0.2, 0.5, 0.3]
    want = np.tensordot(np.asarray(w), theta.astype(np.float64), 1) / np.sum(w)
    close(merge_tensors("linear", base, theta, w, deltas=False), want)
    close(merge_tensors("linear", base, d, w), want)           # task vectors: same merge
    close(merge_tensors("linear", None, theta, w), want)       # no base: full weights
    close(merge_tensors("linear", base, d, [1, 1, 2], normalize=False), base + d[0] + d[1] + 2 * d[2])


def test_task_arithmetic():
    base, d = _data()
    close(merge_tensors("task_arithmetic", base, d, [1.0, -0.5, 2.0], **{"lambda": 0.7}),
          np_gta(base, d, [1.0, -0.5, 2.0], lam=0.7))
    close(merge_tensors("task_arithmetic", base, d, [1, 2, 3], normalize=True), np_gta(base, d, [1, 2, 3], normalize=True))


@pytest.mark.parametrize("density", [0.3, [0.2, 0.5, 0.9]])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties(density, normalize):
    base, d = _data()
    w = [0.5, 1.0, 0.8]
    dens = np.broadcast_to(np.asarray(density, float), (3,))
    keeps = [np_topk(d[i], dens[i]) for i in range(3)]
    want = np_gta(base, d, w, keeps=keeps, density=dens, consensus=True, normalize=normalize)
    close(merge_tensors("ties", base, d, w, density=density, normalize=normalize), want)


@pytest.mark.parametrize("method,consensus", [("dare_linear", False), ("dare_ties", True)])
@pytest.mark.parametrize("rule", ["l1", "inverse_density", False])
def test_dare_given_its_keep_mask(method, consensus, rule):
    base, d = _data(shape=(40, 30))
    w = [0.3, 0.3, 0.4]
    dens = np.array([0.3, 0.5, 0.7])
    res = resolve(method, 3, {"rescale": rule}, [{"weight": a, "density": b} for a, b in zip(w, dens)])
    masks = np.asarray(K.draw_masks(base, tuple(d), dens.astype(np.float32), np.ones(3, np.int64), np.uint32(5),
                                    np.uint32(name_hash("x")), sparsify="random"))
    want = np_gta(base, d, w, keeps=[m.reshape(base.shape) for m in masks], density=dens,
                  rule=rule or None, consensus=consensus)
    close(merge_tensors(method, base, d, w, density=list(dens), rescale=rule, seed=5, name="x"), want)
    # DARE's masks are Bernoulli(density): keep fractions within 5 sigma of the density
    n = masks.shape[1]
    for m, p in zip(masks, dens):
        assert abs(m.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)


def test_dare_keyed_by_seed_and_name_not_order():
    base, d = _data(shape=(50, 40))
    a1 = merge_tensors("dare_linear", base, d, density=0.5, seed=1, name="layers.0.q")
    merge_tensors("dare_linear", base, d, density=0.5, seed=1, name="other")
    a2 = merge_tensors("dare_linear", base, d, density=0.5, seed=1, name="layers.0.q")
    b = merge_tensors("dare_linear", base, d, density=0.5, seed=1, name="layers.1.q")
    c = merge_tensors("dare_linear", base, d, density=0.5, seed=2, name="layers.0.q")
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    assert not np.array_equal(np.asarray(a1), np.asarray(b)) and not np.array_equal(np.asarray(a1), np.asarray(c))


@pytest.mark.parametrize("face", ["seed003", "mergekit", "arm", "arm-r", "arm-r-v2", "tensor_local"])
def test_ram_faces(face):
    rng = np.random.default_rng(1)
    base = rng.normal(size=(30, 20)).astype(np.float32)
    d = (rng.normal(size=(3, 30, 20)) * (rng.random((3, 30, 20)) < 0.3)).astype(np.float32)
    kw = {"face": face}
    r = {"arm-r": 1.2, "arm-r-v2": 1.2, "tensor_local": 0.1}.get(face, 1.0)
    if face in ("arm-r", "arm-r-v2"):
        kw["r"] = r
    ref_face = {"mergekit": "arm"}.get(face, face)
    close(merge_tensors("ram", base, d, **kw), np_ram(base, d, face=ref_face, r=r))
    if face == "tensor_local":
        close(merge_tensors("ramplus_tl", base, d), np_ram(base, d, face="tensor_local", r=0.1))


@pytest.mark.parametrize("alias", sorted(ram.ALIASES))
def test_face_aliases_merge_like_their_canonical_face(alias):
    base, d = _data(shape=(30, 20))
    d = d * (np.random.default_rng(2).random(d.shape) < 0.4)
    canonical = ram.ALIASES[alias]
    assert resolve("ram", 3, {"face": alias}).shared["face"] == canonical
    np.testing.assert_array_equal(np.asarray(merge_tensors("ram", base, d, face=alias, r=1.2)),
                                  np.asarray(merge_tensors("ram", base, d, face=canonical, r=1.2)))


def test_ram_authors_global_lambdas_from_counts():
    # λ_j from whole-model counts: two tensors counted together differ from either alone.
    assert np.allclose(ram.ram_lambdas("arm-r-v2", 1.2, [10, 4, 0, 5], [5, 1, 0, 5]), [1.2, 1 + 0.2 / 3, 1.0, 1.2])
    assert np.allclose(ram.ram_lambdas("arm-r", 1.2, [10, 4], [5, 1]), [1.1, 1.05])
    assert np.allclose(ram.ram_lambdas("arm-r", 0.5, [10, 4], [5, 1]), [1.0, 1.0])


# ---------------------------------------------------------------- edge cases
@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_density_one_is_plain_weighted_merge(method):
    base, d = _data()
    w = [0.2, 0.3, 0.5]
    normalize = MERGE_METHODS[method].shared["normalize"]
    want = np_gta(base, d, w, consensus=method.endswith("ties"), normalize=normalize)
    close(merge_tensors(method, base, d, w, density=1.0, seed=3), want)


def _required(method, k):
    """The parameters a method cannot run without (slerp's ``t``, nuslerp's per-model ``weight``),
    from its first case in tests/test_merge_registry.py."""
    from tests.test_merge_registry import REFERENCES

    spec = MERGE_METHODS[method]
    params = {n: v for n, v in REFERENCES[method][1][0].items() if n in spec.options.get("required", ())}
    if spec.per_model.get("weight", 1.0) is None:
        params["weight"] = [1.0] * k
    return params


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_all_zero_deltas_return_base(method):
    from tests.test_merge_registry import _k

    base, d = _data()
    d = d[:_k(method)]
    req = _required(method, len(d))
    got = merge_tensors(method, base, np.zeros_like(d), density=0.5, **req) if "density" in MERGE_METHODS[method].params \
        else merge_tensors(method, base, np.zeros_like(d), **req)
    np.testing.assert_array_equal(np.asarray(got), base)


def test_sign_election_tie_elects_plus():
    base = np.zeros(3, np.float32)
    d = np.array([[1.0, -2.0, 0.5], [-1.0, 1.0, -0.5]], np.float32)  # Σ = 0, -1, 0
    got = np.asarray(merge_tensors("ties", base, d, density=1.0))
    np.testing.assert_allclose(got, [1.0, -2.0, 0.5])                  # ties → +, disjoint mean
    got = np.asarray(merge_tensors("ties", base, d, density=1.0, normalize=False))
    np.testing.assert_allclose(got, [1.0, -2.0, 0.5])


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_single_model(method):
    from tests.test_merge_registry import REFERENCES, _k

    base, d = _data(k=1)
    if method == "model_stock":                  # mergekit: at least 2 models besides the base
        with pytest.raises(UnmergeError, match="at least 2 models"):
            merge_tensors(method, base, d, [0.7])
        return
    if method in REFERENCES and (_k(method) != 3 or MERGE_METHODS[method].options.get("base_role")):
        # The spherical and per-tensor methods: K = 1 is their registry reference, or refused by
        # those that take exactly two models (nuslerp).
        if _k(method) == 2:
            with pytest.raises(UnmergeError, match="exactly two models"):
                merge_tensors(method, base, d, [0.7])
            return
        params = REFERENCES[method][1][0]
        got = np.asarray(merge_tensors(method, base, d, [0.7], **params), np.float64)
        close(got, REFERENCES[method][0](base, d, np.asarray([0.7]), params, None))
        return
    got = np.asarray(merge_tensors(method, base, d, [0.7]), np.float64)
    if method in ("linear", "ties", "della", "sce"):   # normalised (sce: by its own weights): the model
        close(got, base + d[0])
    elif method == "task_arithmetic":
        close(got, base + 0.7 * d[0])
    elif method == "passthrough":                # the one input, unscaled (weight has no effect)
        close(got, base + d[0])
    elif method.startswith("ram"):               # every changed entry is unique, λ = 1 (mergekit face)
        dd = 0.7 * d[0].astype(np.float64)
        close(got, base + np.where(np.abs(dd) > 1e-5, dd, 0))
    else:                                        # DARE at density 1 → task arithmetic
        close(got, base + 0.7 * d[0])


def test_ties_exact_k_with_tied_magnitudes():
    base = np.zeros(6, np.float32)
    d = np.array([[1, 1, 1, 1, 0.5, 0.5]], np.float32)
    got = np.asarray(merge_tensors("ties", base, d, density=0.5))
    np.testing.assert_array_equal(got, [1, 1, 1, 0, 0, 0])   # k = 3 of four tied 1s: first by position


def test_second_call_does_not_recompile():
    base, d = _data()
    merge_tensors("ties", base, d, [1, 1, 1], density=0.5)
    n = K.gta_kernel._cache_size()
    merge_tensors("ties", base, d, [0.2, 3, 1], density=[0.3, 0.4, 0.6])
    assert K.gta_kernel._cache_size() == n


# ---------------------------------------------------------------- streaming statistics
@pytest.mark.parametrize("ties", [False, True])
def test_sampled_topk_on_a_large_tensor_equals_the_in_jit_topk(ties):
    """Above 4 × SAMPLE entries the TIES threshold comes from a sampled bracket and one pass
    (heavy ties overflow the bracket's cap and take the radix fallback); the merge equals the
    whole-tensor kernel given the in-jit bisection top-k masks."""
    n = 4 * O.SAMPLE + 12345
    rng = np.random.default_rng(11)
    base = rng.normal(size=n).astype(np.float32)
    d = (0.01 * rng.normal(size=(3, n))).astype(np.float32)
    if ties:
        d[0, ::3] = d[0, 1]                             # a third of model 0 ties at one magnitude
        d[1] = np.round(d[1], 3)                         # a few hundred distinct magnitudes
    dens = np.array([0.3, 0.5, 0.9])
    res = resolve("ties", 3, {}, [{"weight": w, "density": p} for w, p in zip((0.5, 1.0, 0.8), dens)])
    topk = np.array([max(1, int(p * n)) for p in dens])
    masks = K.draw_masks(base, tuple(d), dens.astype(np.float32), topk, np.uint32(0), np.uint32(0),
                         sparsify="magnitude")
    want = np.asarray(gta.merge_masked(res, base, tuple(d), masks))
    for chunk in (1 << 20, 100_003):
        np.testing.assert_array_equal(merge_resolved(res, base, tuple(d), chunk=chunk), want)


def test_sampled_percentile_on_a_large_tensor_equals_numpy():
    """The percentile RAM face's two order statistics through the sampled bracket (above
    4 × SAMPLE entries) select like ``np.percentile``."""
    n = 4 * O.SAMPLE + 999
    rng = np.random.default_rng(12)
    base = rng.normal(size=n).astype(np.float32)
    d = (0.01 * rng.normal(size=(3, n)) * (rng.random((3, n)) < 0.5)).astype(np.float32)
    close(merge_tensors("ram", base, d, face="percentile"), np_ram(base, d, face="percentile"))


def test_bernoulli_chunks_equal_the_whole_tensor_draw():
    """Chunks at any offset give the slices of ``jax.random.bernoulli`` on the whole tensor."""
    import jax

    key = jax.random.fold_in(jax.random.key(9), 123)
    p = np.float32(0.37)
    whole = np.asarray(jax.random.bernoulli(key, p, (10_007,)))
    draw = jax.jit(bernoulli_at, static_argnames="size")
    for step in (1, 7, 999):
        parts = [np.asarray(draw(key, p, np.int64(s), size=min(step, 10_007 - s))) for s in range(0, 10_007, step)]
        np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_in_jit_topk_mask_matches_numpy():
    base, d = _data(shape=(30, 20))
    d[:, ::3] = d[:, :1]                              # ties at many magnitudes
    dens = np.array([0.3, 0.5, 0.9])
    topk = np.array([max(1, int(p * d[0].size)) for p in dens])
    masks = np.asarray(K.draw_masks(base, tuple(d), dens.astype(np.float32), topk, np.uint32(0), np.uint32(0),
                                    sparsify="magnitude"))
    for i in range(3):
        np.testing.assert_array_equal(masks[i].reshape(base.shape), np_topk(d[i], dens[i]))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,match", [
    (lambda b, d: merge_tensors("linear", b, d, [1, -1, 0]), "sum to zero"),
    (lambda b, d: merge_tensors("ties", b, d, [1, -1, 0], density=0.5), "sum to zero"),
    (lambda b, d: merge_tensors("ties", b, d, density=0.0), "outside"),
    (lambda b, d: merge_tensors("dare_ties", b, d, density=[0.5, 1.5, 0.5]), "outside"),
    (lambda b, d: merge_tensors("frankenmerge", b, d), "unknown merge method"),
    (lambda b, d: merge_tensors("ties", b, d, dencity=0.5), "unknown parameter 'dencity'"),
    (lambda b, d: merge_tensors("ram", b, d, face="nope"), "unknown RAM face"),
    (lambda b, d: merge_tensors("task_arithmetic", b, [d[0], d[1][:3]]), "shape mismatch"),
    (lambda b, d: merge_tensors("ties", None, d, density=0.5), "needs a base"),
    (lambda b, d: merge_tensors("task_arithmetic", b, d, [1, 2]), "one per model"),
    (lambda b, d: merge_tensors("dare_ties", b, d, density=0.5, rescale="l3"), "unknown rescale"),
])
def test_bad_input_one_line(call, match):
    base, d = _data()
    with pytest.raises(UnmergeError, match=match) as err:
        call(base, d)
    assert "\n" not in str(err.value)


def test_row_chunks_hold_whole_rows():
    """``rows=True`` cuts chunks at row ends (a multiple of the last axis, at least one row); a 1-D
    tensor is one row; without it, chunks are flat slices of the requested length."""
    from unmerge_jax.merge.chunks import TensorChunks

    base = np.zeros((5, 7), np.float32)
    ones = (np.ones((5, 7), np.float32),)
    bounds = lambda c: [(s.start, s.stop) for s in c.slices]  # noqa: E731
    assert bounds(TensorChunks(base, ones, deltas=True, chunk=20, rows=True)) == [(0, 14), (14, 28), (28, 35)]
    assert bounds(TensorChunks(base, ones, deltas=True, chunk=3, rows=True)) == [(i, i + 7) for i in range(0, 35, 7)]
    assert bounds(TensorChunks(base.reshape(-1), (ones[0].reshape(-1),), deltas=True, chunk=3, rows=True)) == [(0, 35)]
    assert bounds(TensorChunks(base, ones, deltas=True, chunk=20)) == [(0, 20), (20, 35)]
