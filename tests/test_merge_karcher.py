"""karcher against a NumPy float64 reference that runs mergekit 0.1.5's iteration step by step on
the whole tensors (here, and as the registry's reference); the method itself iterates on the
coefficients of the units after one Gram pass. Edge cases: one input, parallel inputs, a zero
input, all zero, max_iter 0; the per-tensor convergence report (iterations equal the
reference's, the final step is the reference's gradient norm) and the optimality condition."""

from __future__ import annotations

import numpy as np
import pytest

from unmerge_jax.errors import UnmergeError
from unmerge_jax.merge.methods.karcher import KarcherReport, summary
from unmerge_jax.merge.params import resolve
from unmerge_jax.merge.tensor import merge_resolved, merge_tensors

RTOL = ATOL = 2e-6


def np_karcher(xs, max_iter=10, tol=1e-5):
    """mergekit's ``karcher_merge_tensors`` with equal weights, in float64 on the flattened tensors.
    Returns ``(merged, iterations, final gradient norm)``."""
    shape = np.shape(xs[0])
    xs = [np.asarray(x, np.float64).ravel() for x in xs]
    if len(xs) == 1:
        return xs[0].reshape(shape), 0, 0.0
    norms = [np.linalg.norm(x) for x in xs]
    units = [x / n if n > 0 else np.zeros_like(x) for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return np.zeros(shape), 0, 0.0
    a = 1.0 / len(valid)
    mean = sum(a * units[i] for i in valid)
    mn = np.linalg.norm(mean)
    mean = units[valid[0]].copy() if mn < tol else mean / mn
    its, step = 0, 0.0
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for i in valid:
            dot = np.clip(mean @ units[i], -1.0, 1.0)
            th = np.arccos(dot)
            if th < tol:
                continue
            tangent += a * (th / np.sin(th)) * (units[i] - dot * mean)
        step = np.linalg.norm(tangent)
        if step < tol:
            break
        mean = np.cos(step) * mean + np.sin(step) * (tangent / step)
        un = np.linalg.norm(mean)
        if un > tol:
            mean = mean / un
        its += 1
    return (sum(norms) / len(xs) * mean).reshape(shape), its, step


def _inputs(k=3, shape=(11, 7), seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    common = rng.normal(size=shape)
    return [(common + spread * rng.normal(size=shape)).astype(np.float32) for _ in range(k)]


def _karcher(xs, **params):
    diag = {}
    res = resolve("karcher", len(xs), params)
    got = merge_resolved(res, np.zeros_like(xs[0]), tuple(xs), deltas=False, name="t", diagnostics=diag)
    return got, diag.get("t")


@pytest.mark.parametrize("max_iter,tol", [(10, 1e-5), (0, 1e-5), (1, 1e-5), (3, 1e-5), (50, 1e-9), (10, 1e-2)])
@pytest.mark.parametrize("spread", [0.3, 2.0])
def test_karcher_equals_reference_and_reports_its_iterations(max_iter, tol, spread):
    xs = _inputs(4, spread=spread, seed=int(spread * 10))
    got, report = _karcher(xs, max_iter=max_iter, tol=tol)
    want, its, step = np_karcher(xs, max_iter, tol)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert report.iterations == its
    if max_iter == 0:     # no gradient evaluated: nothing known about convergence
        assert not report.converged and np.isnan(report.step)
        return
    assert report.converged == (step < tol)
    np.testing.assert_allclose(report.step, step, rtol=1e-6, atol=1e-12)


def test_converged_mean_satisfies_the_optimality_condition():
    """At the returned direction the Riemannian gradient Σ α θ_k/sin θ_k (u_k − cos θ_k m) is below tol."""
    xs = _inputs(5, spread=1.5, seed=3)
    got, report = _karcher(xs, max_iter=100, tol=1e-10)
    assert report.converged and report.iterations >= 2
    m = np.asarray(got, np.float64).ravel()
    m /= np.linalg.norm(m)
    grad = np.zeros_like(m)
    for x in xs:
        u = np.asarray(x, np.float64).ravel()
        u /= np.linalg.norm(u)
        th = np.arccos(np.clip(m @ u, -1, 1))
        grad += th / np.sin(th) * (u - np.cos(th) * m) / len(xs)
    assert np.linalg.norm(grad) < 1e-6
    np.testing.assert_allclose(np.linalg.norm(got), np.mean([np.linalg.norm(x.astype(np.float64)) for x in xs]),
                               rtol=1e-6)


def test_one_input_is_returned_unchanged():
    (x,) = _inputs(1)
    got, report = _karcher([x])
    np.testing.assert_array_equal(got, x)
    assert report == KarcherReport(0, 0.0, True)


def test_parallel_inputs_give_their_direction_at_the_mean_norm():
    (x,) = _inputs(1)
    xs = [x, (2 * x).astype(np.float32), (0.5 * x).astype(np.float32)]
    got, report = _karcher(xs)
    np.testing.assert_allclose(got, x.astype(np.float64) * (1 + 2 + 0.5) / 3, rtol=RTOL, atol=ATOL)
    assert report.converged and report.iterations == 0


def test_a_zero_input_leaves_the_direction_but_counts_in_the_norm():
    xs = _inputs(2)
    xs.append(np.zeros_like(xs[0]))
    got, _ = _karcher(xs)
    np.testing.assert_allclose(got, np_karcher(xs)[0], rtol=RTOL, atol=ATOL)
    zero, report = _karcher([np.zeros_like(xs[0])] * 3)
    np.testing.assert_array_equal(zero, 0)


def test_per_model_weight_is_ignored_as_in_mergekit():
    xs = _inputs(3)
    base = np.zeros_like(xs[0])
    a = merge_tensors("karcher", base, xs, [0.1, 0.5, 2.0], deltas=False)
    b = merge_tensors("karcher", base, xs, deltas=False)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_parameters_are_refused():
    xs = _inputs(2)
    for params, match in (({"max_iter": 2.5}, "whole number"), ({"max_iter": -1}, "≥ 0"), ({"tol": -1e-3}, "≥ 0")):
        with pytest.raises(UnmergeError, match=match):
            merge_tensors("karcher", np.zeros_like(xs[0]), xs, deltas=False, **params)


def test_summary_line():
    ok = {"a": KarcherReport(2, 3e-6, True), "b": KarcherReport(4, 7e-6, True)}
    assert summary(ok) == "karcher: 2 tensors, 2-4 iterations, largest final step 7e-06 (b); all converged"
    bad = {**ok, "c": KarcherReport(1, 0.2, False)}
    assert "1 did not converge within max_iter (e.g. c)" in summary(bad)
    assert summary({}) is None
