"""The contract every ``MERGE_METHODS`` entry must pass; parametrised over the registry itself, so
registering a method tests it.

For each entry, over the parameter cases listed with its reference below: the merged tensor equals
a NumPy float64 reference formula written here from mergekit 0.1.5's definitions (and the RAM
study's for the ``percentile`` face), on task vectors and on fine-tuned weights; it does not depend
on the chunk size nor on the order in which tensors are visited; a second call with other numbers
does not retrace any kernel; and where the method's masks are drawn by a vmapped kernel, vmap
equals a Python loop over the models. An entry (or a RAM face) without a reference here fails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unmerge_jax.kernels import merge as K
from unmerge_jax.kernels.random import model_keys, name_hash
from unmerge_jax.merge import MERGE_METHODS
from unmerge_jax.merge.base import merge_key
from unmerge_jax.merge.chunks import TensorChunks
from unmerge_jax.merge.methods.ram import FACES, canonical_face
from unmerge_jax.merge.params import resolve
from unmerge_jax.merge.tensor import merge_resolved, merge_tensors
from unmerge_jax.orderstats import topk_counts

RTOL = 2e-6  # float32 kernels vs float64 references
ATOL = 2e-6
WEIGHTS = (0.5, 1.0, 0.8)
SEED, NAME = 2, "model.layers.0.mlp.up_proj.weight"


# ---------------------------------------------------------------- NumPy float64 references
def np_topk(d, density):
    """mergekit ``magnitude``: keep the k = max(1, int(density·n)) largest |d| (ties: first by
    position, our documented choice where mergekit's argsort is arbitrary)."""
    flat = np.abs(d).ravel()
    if density >= 1:
        return np.ones(d.shape, bool)
    k = max(1, int(density * flat.size))
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return keep.reshape(d.shape)


def np_rescale(d, keep, density, rule):
    """mergekit ``rescaled_masked_tensor`` (l1: ‖d‖₁/‖kept‖₁, skipped below 1e-7) or 1/density."""
    m = np.where(keep, d, 0.0)
    if density >= 1:
        return d
    if rule == "inverse_density":
        return m / density
    if rule == "l1":
        before, after = np.abs(d).sum(), np.abs(m).sum()
        return m if before < 1e-7 or after < 1e-7 else m * before / after
    return m


def np_gta(base, deltas, w, *, keeps=None, density=None, rule=None, consensus=False, normalize=False, lam=1.0):
    """mergekit ``GeneralizedTaskArithmeticMerge``: sparsify, weight, sign consensus ("sum"),
    normalise by the (agreeing) weights, scale by λ."""
    d = np.asarray(deltas, np.float64)
    w = np.asarray(w, np.float64)
    if keeps is not None:
        d = np.stack([np_rescale(d[i], keeps[i], density[i], rule) for i in range(len(d))])
    u = w.reshape(-1, *[1] * (d.ndim - 1)) * d
    if consensus:
        maj = np.where(u.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(u) == maj
        mixed = (u * agree).sum(0)
        div = (w.reshape(u.shape[:1] + (1,) * (u.ndim - 1)) * agree).sum(0)
        div[div == 0] = 1
    else:
        mixed, div = u.sum(0), w.sum()
    if normalize:
        mixed = mixed / div
    return base + lam * mixed


def np_ram(base, deltas, *, face, w=None, lam=None, eps=1e-5, q=90, r=1.0, alpha=0.2):
    """RAM on ``u_k = w_k δ_k``: the percentile face (the RAM study) or the ε faces (mergekit
    ``ram``/``ramplus_tl``, the RAM authors' whole-model λ)."""
    face = canonical_face(face)
    d = np.asarray(deltas, np.float64).reshape(len(deltas), -1)
    if w is not None:
        d = np.asarray(w, np.float64)[:, None] * d
    if face == "percentile":
        act = np.abs(d) >= np.percentile(np.abs(d), q, axis=1, keepdims=True)
    else:
        act = np.abs(d) > eps
    c = act.sum(0)
    out = np.zeros(d.shape[1])
    if face == "percentile":
        out[c >= 2] = d[:, c >= 2].mean(0)
        out[c == 1] = (1.5 if lam is None else lam) * (d * act)[:, c == 1].sum(0)
        return base + out.reshape(base.shape)
    changed = act.sum(1)
    overlap = (act & (c >= 2)).sum(1)
    if face == "tensor_local":
        rho = overlap / np.maximum(changed - overlap, eps)
        lam = 1 + r * np.clip(rho, 0, alpha)
    elif face == "overlap_changed":
        lam = 1 + (max(r, 1) - 1) * np.clip(overlap / changed, 0, 1)
    elif face == "overlap_unique":
        lam = 1 + (max(r, 1) - 1) * np.minimum(1, overlap / (changed - overlap))
    elif face == "active_mean":
        lam = np.ones(len(d))
    else:
        raise KeyError(f"no reference for RAM face {face!r}")
    sh = c >= 2
    out[sh] = (d * act)[:, sh].sum(0) / c[sh]
    out[c == 1] = (lam[:, None] * d * act)[:, c == 1].sum(0)
    return base + out.reshape(base.shape)


def _density(p, k):
    return np.broadcast_to(np.asarray(p.get("density", 1.0), float), (k,))


def ref_linear(base, d, w, p, masks):
    return np_gta(base, d, w, normalize=p.get("normalize", True))


def ref_task_arithmetic(base, d, w, p, masks):
    return np_gta(base, d, w, normalize=p.get("normalize", False), lam=p.get("lambda", 1.0))


def ref_ties(base, d, w, p, masks):
    dens = _density(p, len(d))
    keeps = [np_topk(d[i], dens[i]) for i in range(len(d))]
    rule = p.get("rescale", False)
    rule = "l1" if rule is True else (rule or None)
    return np_gta(base, d, w, keeps=keeps, density=dens, rule=rule, consensus=True,
                  normalize=p.get("normalize", True), lam=p.get("lambda", 1.0))


def _ref_dare(consensus):
    def ref(base, d, w, p, masks):
        """DARE given the method's own Bernoulli keep-masks (their distribution is tested in
        test_merge_kernels.py): rescale (mergekit default ``l1``), then TA or TIES."""
        dens = _density(p, len(d))
        rule = p.get("rescale", "l1")
        rule = "l1" if rule is True else (rule or None)
        keeps = [m.reshape(base.shape) for m in masks]
        return np_gta(base, d, w, keeps=keeps, density=dens, rule=rule, consensus=consensus,
                      normalize=p.get("normalize", False), lam=p.get("lambda", 1.0))
    return ref


def ref_ram(base, d, w, p, masks):
    face = p.get("face", "active_mean")
    r = p.get("r", 0.1 if canonical_face(face) == "tensor_local" else 1.0)
    return np_ram(base, d, face=face, w=w, lam=p.get("lambda"), q=p.get("q", 90), r=r, alpha=p.get("alpha", 0.2))


def ref_ramplus_tl(base, d, w, p, masks):
    return np_ram(base, d, face="tensor_local", w=w, r=p.get("r", 0.1), alpha=p.get("alpha", 0.2))


def ref_passthrough(base, d, w, p, masks):
    """mergekit ``passthrough``: scale · θ of the (first) input."""
    return p.get("scale", 1.0) * (base.astype(np.float64) + d[0])


def np_model_stock(base, deltas, filter_wise=False):
    """mergekit ``model_stock``: mean clipped pairwise cosine of the task vectors (per tensor, or per
    row of the last axis), ``t = K cos / (1 + (K−1) cos)`` (0 where the denominator is < 1e-6),
    ``t·mean θ_k + (1 − t)·θ_base``."""
    d = np.asarray(deltas, np.float64)
    k = len(d)
    rows = d.reshape(k, -1, d.shape[-1]) if filter_wise and d.ndim > 2 else d.reshape(k, 1, -1)
    cos = [np.clip((rows[i] * rows[j]).sum(-1) / np.maximum(np.linalg.norm(rows[i], axis=-1)
                                                            * np.linalg.norm(rows[j], axis=-1), 1e-6), -1, 1)
           for i in range(k) for j in range(i + 1, k)]
    c = np.mean(cos, axis=0)
    den = 1 + (k - 1) * c
    t = np.where(np.abs(den) < 1e-6, 0.0, k * c / np.where(np.abs(den) < 1e-6, 1.0, den))
    theta = base.astype(np.float64) + d
    avg = theta.mean(0).reshape(rows.shape[1], -1)
    return (t[:, None] * avg + (1 - t[:, None]) * base.reshape(rows.shape[1], -1)).reshape(base.shape)


def ref_model_stock(base, d, w, p, masks):
    return np_model_stock(base, d, p.get("filter_wise", False))


def np_outliers(d, density, gamma):
    """mergekit ``magnitude_outliers``: with target = int(density·n), n_top = int(gamma·n),
    n_bot = max(0, n − target − n_top), keep ascending ranks n_bot … n_bot + target − 1 of |d|
    (equal magnitudes: the first by position ranks higher, our documented tie rule)."""
    flat = np.abs(d).ravel()
    n = flat.size
    if density >= 1:
        return np.ones(d.shape, bool)
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    desc = np.argsort(-flat, kind="stable")          # decreasing |d|, ties by position
    drop = n - n_bot - target
    keep = np.zeros(n, bool)
    keep[desc[drop:drop + target]] = True
    return keep.reshape(d.shape)


def _ref_breadcrumbs(consensus):
    def ref(base, d, w, p, masks):
        dens = _density(p, len(d))
        gamma = np.broadcast_to(np.asarray(p.get("gamma", 0.01), float), (len(d),))
        keeps = [np_outliers(d[i], dens[i], gamma[i]) for i in range(len(d))]
        rule = "l1" if p.get("rescale", False) else None
        return np_gta(base, d, w, keeps=keeps, density=dens, rule=rule, consensus=consensus,
                      normalize=p.get("normalize", False), lam=p.get("lambda", 1.0))
    return ref


def np_della_probs(d, density, eps):
    """mergekit ``della_magprune``'s keep probabilities, per row of the last axis (a 1-D tensor is
    one row): ascending rank r of |d| in its row (ties by position), p = (density − ε) +
    (r − 1)/(L − 1)·2ε, in float64."""
    a = np.abs(np.asarray(d, np.float64))
    a = a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(1, -1)
    ranks = np.argsort(np.argsort(a, axis=1, kind="stable"), axis=1, kind="stable")
    return ((density - eps) + ranks / (a.shape[1] - 1) * 2 * eps).reshape(np.shape(d))


def _ref_della(consensus):
    def ref(base, d, w, p, masks):
        """DELLA with masks drawn here: Bernoulli(np_della_probs) from ``jax.random.uniform`` under
        the method's per-model keys (the kernel's counter-based draw is tested to equal it)."""
        dens = _density(p, len(d))
        eps = np.broadcast_to(np.asarray(p.get("epsilon", 0.15), float), (len(d),))
        keys = model_keys(np.uint32(SEED), np.uint32(name_hash(NAME)), len(d))
        keeps = []
        for i in range(len(d)):
            u = np.asarray(jax.random.uniform(keys[i], (d[i].size,), jnp.float32)).reshape(d[i].shape)
            keeps.append(u < np_della_probs(d[i], dens[i], eps[i]).astype(np.float32))
        rule = "l1" if p.get("rescale", True) else None
        return np_gta(base, d, w, keeps=keeps, density=dens, rule=rule, consensus=consensus,
                      normalize=p.get("normalize", consensus), lam=p.get("lambda", 1.0))
    return ref


def np_sce(base, deltas, select_topk=1.0):
    """mergekit ``sce``: keep the int(select_topk·#{var ≠ 0}) entries of largest variance across the
    models (population variance; ties first by position), weights mean(δ'²)/Σ (uniform below
    1e-6), sign election on Σ δ', the weighted mean of the agreeing δ' (divisor clamped at 1e-6)."""
    d = np.asarray(deltas, np.float64)
    k = len(d)
    if select_topk < 1:
        var = d.var(axis=0).ravel()
        n_sel = int(np.count_nonzero(var) * select_topk)
        keep = np.zeros(var.size, bool)
        keep[np.argsort(-var, kind="stable")[:n_sel]] = True
        d = d * keep.reshape(d.shape[1:])
    w = (d ** 2).reshape(k, -1).mean(1)
    w = np.full(k, 1 / k) if abs(w.sum()) < 1e-6 else w / w.sum()
    maj = np.where(d.sum(0) >= 0, 1.0, -1.0)
    ew = w.reshape(-1, *[1] * (d.ndim - 1)) * (np.sign(d) == maj)
    return base + (d * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)


def ref_sce(base, d, w, p, masks):
    return np_sce(base, d, p.get("select_topk", 1.0))


_BREADCRUMBS_CASES = [{"density": 0.5}, {"density": [0.3, 0.6, 0.9], "gamma": 0.1},
                      {"density": 0.4, "gamma": 0.0, "rescale": True}, {"density": 0.9, "gamma": 0.3},
                      {"density": 0.5, "lambda": 0.7, "normalize": True}, {"density": 1.0}]
_DELLA_CASES = [{"density": 0.5}, {"density": [0.3, 0.6, 0.8], "epsilon": 0.1}, {"density": 0.4, "rescale": False},
                {"density": 0.5, "epsilon": 0.0, "lambda": 1.3}, {"density": 1.0}]
def np_slerp(t, a, b):
    """mergekit ``slerp`` of whole tensors in float64: norms ≤ 1e-8 count as 1; lerp where
    |cos| > 0.9995, else (sin((1−t)θ) a + sin(tθ) b) / sin θ."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    dot = np.clip(np.sum((a / na) * (b / nb)), -1, 1)
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    th = np.arccos(dot)
    return (np.sin((1 - t) * th) * a + np.sin(t * th) * b) / np.sin(th)


def np_nuslerp(t, v0, v1, axis=None):
    """mergekit ``nuslerp`` in float64 along ``axis`` (None: the flattened tensor): units with norms
    floored at 1e-7, colinear (1 − cos² ≤ 1e-16) → lerp."""
    v0, v1 = np.asarray(v0, np.float64), np.asarray(v1, np.float64)
    shape = v0.shape
    if axis is None:
        v0, v1, axis = v0.reshape(1, -1), v1.reshape(1, -1), -1
    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-7)
    cos = np.clip(np.sum(unit(v0) * unit(v1), axis=axis, keepdims=True), -1, 1)
    col = (1 - cos ** 2) <= 1e-16
    th = np.arccos(np.where(col, 0.0, cos))
    with np.errstate(invalid="ignore", divide="ignore"):
        sph = (np.sin((1 - t) * th) * v0 + np.sin(t * th) * v1) / np.sin(th)
    return np.where(col, (1 - t) * v0 + t * v1, sph).reshape(shape)


def ref_slerp(base, d, w, p, masks):
    return np_slerp(p["t"], base, np.asarray(base, np.float64) + d[0])


def ref_nuslerp(base, d, w, p, masks):
    t = 0.5 if abs(w[0] + w[1]) < 1e-6 else w[1] / (w[0] + w[1])
    flat, row_wise = p.get("nuslerp_flatten", True), p.get("nuslerp_row_wise", False)
    axis = None if flat or base.ndim < 2 else (0 if row_wise else -1)
    return base + np_nuslerp(t, d[0], d[1], axis)


def np_multislerp(x, w, normalize=True, eps=1e-8):
    """mergekit ``multislerp`` of the (K, ...) vectors ``x`` in float64, every step as mergekit writes
    it (units, weighted mean, tangent projection, exponential map, mean norm)."""
    x = np.asarray(x, np.float64)
    flat = x.reshape(len(x), -1)
    w = np.asarray(w, np.float64)
    if normalize:
        w = w / w.sum()
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mn = np.linalg.norm(mean)
    if mn < eps:
        assert len(x) == 2
        return (x[0] * w[0] + x[1] * w[1])
    mean = mean / mn
    tangent = ((units - (units @ mean)[:, None] * mean) * w[:, None]).sum(0)
    tn = np.linalg.norm(tangent) + eps
    res = mean * np.cos(tn) + tangent * (np.sin(tn) / tn)
    return (res * (norms[:, 0] * w).sum()).reshape(x.shape[1:])


def ref_multislerp(base, d, w, p, masks):
    if len(d) == 1:
        return base + np.asarray(d[0], np.float64)
    return base + np_multislerp(d, w, p.get("normalize_weights", True), p.get("eps", 1e-8))


def ref_karcher(base, d, w, p, masks):
    from tests.test_merge_karcher import np_karcher

    return np_karcher(np.asarray(base, np.float64) + d, p.get("max_iter", 10), p.get("tol", 1e-5))[0]


def np_nearswap(t, a, b):
    """mergekit ``nearswap``: w = clip(t / max(|a − b|, 1e-6), 0, 1), w b + (1 − w) a (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0, 1)
    return w * b + (1 - w) * a


def ref_nearswap(base, d, w, p, masks):
    return np_nearswap(p["t"], base, np.asarray(base, np.float64) + d[0])


def np_arcee_fusion(a, b):
    """mergekit ``arcee_fusion`` in float64: importance |b − a|·KL(softmax(b_row)+1e-8 ‖ softmax(a_row)+1e-8),
    threshold median + 1.5·IQR from the sorted importances at ⌊q(n−1)⌋, keep b − a where ≥ it."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(b) + 1e-8, softmax(a) + 1e-8
    imp = np.abs(b - a) * np.sum(p * np.log(p / q), -1, keepdims=True)
    srt = np.sort(imp.ravel())
    q1, med, q3 = (srt[int(np.float32(x) * np.float32(srt.size - 1))] for x in (0.25, 0.5, 0.75))
    return a + (b - a) * (imp >= med + 1.5 * (q3 - q1))


def ref_arcee_fusion(base, d, w, p, masks):
    return np_arcee_fusion(base, np.asarray(base, np.float64) + d[0])


# Methods that take a fixed number of models besides the base (the others get 3).
N_MODELS = {"slerp": 1, "nuslerp": 2, "nearswap": 1, "arcee_fusion": 1}

_DARE_CASES = [{"density": [0.3, 0.5, 0.7]}, {"density": 0.5, "rescale": "inverse_density"},
               {"density": 0.4, "rescale": False}, {"density": 0.6, "lambda": 0.7}, {"density": 1.0}]

# name → (reference, parameter cases). Every registry entry needs one; every RAM face is a case.
REFERENCES = {
    "linear": (ref_linear, [{}, {"normalize": False}]),
    "task_arithmetic": (ref_task_arithmetic, [{}, {"lambda": 0.7}, {"normalize": True}]),
    "ties": (ref_ties, [{"density": 0.3}, {"density": [0.2, 0.5, 0.9], "normalize": False},
                        {"density": 0.4, "lambda": 1.3}, {"density": 0.4, "rescale": "l1"}, {"density": 1.0}]),
    "dare_linear": (_ref_dare(False), _DARE_CASES),
    "dare_ties": (_ref_dare(True), _DARE_CASES),
    "ram": (ref_ram, [{"face": f} for f in FACES] + [
        {"face": "overlap_changed", "r": 1.2}, {"face": "overlap_unique", "r": 1.2},
        {"face": "percentile", "q": 75.0, "lambda": 2.0}, {"face": "tensor_local", "r": 0.3, "alpha": 0.5}]),
    "ramplus_tl": (ref_ramplus_tl, [{}, {"r": 0.3, "alpha": 0.5}]),
    "passthrough": (ref_passthrough, [{}, {"scale": 0.5}]),
    "model_stock": (ref_model_stock, [{}, {"filter_wise": True}]),
    "breadcrumbs": (_ref_breadcrumbs(False), _BREADCRUMBS_CASES),
    "breadcrumbs_ties": (_ref_breadcrumbs(True), _BREADCRUMBS_CASES),
    "della": (_ref_della(True), _DELLA_CASES),
    "della_linear": (_ref_della(False), _DELLA_CASES),
    "sce": (ref_sce, [{}, {"select_topk": 0.3}, {"select_topk": 0.7, "int8_mask": True}, {"select_topk": 0.0}]),
    "slerp": (ref_slerp, [{"t": 0.35}, {"t": 0.0}, {"t": 1.0}, {"t": -0.2}]),
    "nuslerp": (ref_nuslerp, [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}]),
    "multislerp": (ref_multislerp, [{}, {"normalize_weights": False}, {"eps": 1e-3}]),
    "karcher": (ref_karcher, [{}, {"max_iter": 2}, {"max_iter": 40, "tol": 1e-9}]),
    "nearswap": (ref_nearswap, [{"t": 0.0001}, {"t": 0.05}, {"t": 10.0}, {"t": 0.0}]),
    "arcee_fusion": (ref_arcee_fusion, [{}]),
}


# ---------------------------------------------------------------- helpers
def _data(shape=(31, 17), seed=5, k=3):
    """Base and K task vectors with magnitudes tied across chunk boundaries and exact zeros."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32)
    d = (0.1 * rng.normal(size=(k, *shape)) * (rng.random((k, *shape)) < 0.6)).astype(np.float32)
    d[:, 5::4] = d[:, 5:6]
    return base, d


def _resolved(name, params, k=None, weights=WEIGHTS):
    k = _k(name) if k is None else k
    p = dict(params)
    per_model = [{"weight": w} for w in weights[:k]]
    if isinstance(p.get("density"), list):
        for pm, dd in zip(per_model, p.pop("density")):
            pm["density"] = dd
    return resolve(name, k, p, per_model)


def _inputs(base, d, deltas):
    """The tensors handed to the kernels and the task vectors they stand for (float32 exactly as
    the kernel forms ``θ − θ_base`` from fine-tuned weights)."""
    if deltas:
        return tuple(d), d
    theta = (base + d).astype(np.float32)
    return tuple(theta), (theta - base).astype(np.float32)


def _cases(name):
    return REFERENCES[name][1]    # KeyError (a failure) for an entry without a reference


def _k(name):
    """How many models (besides the base) the tests give method ``name``: 3 unless it takes a fixed number."""
    return N_MODELS.get(name, 3)


@pytest.fixture
def traces():
    """Counts jaxpr traces (any jit, anywhere) while the test runs."""
    events = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield events
    jax.monitoring.unregister_event_duration_listener(listen)


METHODS = sorted(MERGE_METHODS)


# ---------------------------------------------------------------- the contract
def test_references_name_registered_methods():
    assert set(REFERENCES) <= set(MERGE_METHODS), sorted(set(REFERENCES) - set(MERGE_METHODS))


@pytest.mark.parametrize("name", METHODS)
def test_entry_has_a_reference(name):
    assert name in REFERENCES, f"merge method {name!r} has no NumPy reference in tests/test_merge_registry.py"
    assert MERGE_METHODS[name].name == name


@pytest.mark.parametrize("deltas", [True, False])
@pytest.mark.parametrize("name", METHODS)
def test_equals_reference(name, deltas):
    ref = REFERENCES[name][0]
    method = MERGE_METHODS[name]
    base, d = _data(k=_k(name))
    for params in _cases(name):
        res = _resolved(name, params)
        ts, dd = _inputs(base, d, deltas)
        masks = None
        if method.masks is not None:
            masks = method.masks(res, base, dd, merge_key(SEED, NAME))
        got = merge_resolved(res, base, ts, seed=SEED, name=NAME, deltas=deltas)
        want = ref(base, dd, np.asarray(WEIGHTS[:len(d)]), params, masks)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=RTOL, atol=ATOL, err_msg=f"{name} {params}")


@pytest.mark.parametrize("name", METHODS)
def test_public_entry_point_equals_resolved_run(name):
    base, d = _data(k=_k(name))
    params = _cases(name)[0]
    res = _resolved(name, params)
    kw = dict(params)
    got = merge_tensors(name, base, d, list(WEIGHTS[:len(d)]), seed=SEED, name=NAME, **kw)
    np.testing.assert_array_equal(np.asarray(got), merge_resolved(res, base, tuple(d), seed=SEED, name=NAME))


@pytest.mark.parametrize("deltas", [True, False])
@pytest.mark.parametrize("name", METHODS)
def test_chunk_size_does_not_change_the_result(name, deltas):
    """Statistics + apply passes over chunks of 2, 7 or 97 entries give exactly the one-chunk
    result (magnitudes tied across chunk boundaries). Not 1: XLA compiles a one-entry chunk to
    scalar code whose division by the scalar Σw (linear, normalised task arithmetic) rounds
    differently in the last bit."""
    base, d = _data(k=_k(name))
    ts, _ = _inputs(base, d, deltas)
    for params in _cases(name):
        res = _resolved(name, params)
        one = merge_resolved(res, base, ts, seed=SEED, name=NAME, deltas=deltas)
        for chunk in (2, 7, 97):
            np.testing.assert_array_equal(merge_resolved(res, base, ts, seed=SEED, name=NAME, deltas=deltas,
                                                         chunk=chunk), one, err_msg=f"{name} {params} chunk {chunk}")


def _merge_model(res, tensors, order, chunk):
    """Merge a 'model' of several tensors visiting them in ``order``, as the driver does: the
    whole-model statistics pass first (if the method has one), then each tensor."""
    method = res.method
    model_stats = None
    if method.statistics(res) == "model":
        totals = 0
        for n in order:
            base, d = tensors[n]
            totals = totals + method.count(res, TensorChunks(base, tuple(d), deltas=True, chunk=chunk, out=base))
        model_stats = method.finish(res, totals)
    return {n: merge_resolved(res, tensors[n][0], tuple(tensors[n][1]), seed=SEED, name=n, model_stats=model_stats,
                              chunk=chunk).copy() for n in order}


@pytest.mark.parametrize("name", METHODS)
def test_visiting_order_does_not_change_the_result(name):
    """Tensors of three shapes (one chunk, several chunks with a padded tail) merged a → b → c and
    c → b → a give identical tensors: no state is carried from one tensor to the next."""
    k = _k(name)
    tensors = {"a.weight": _data((3, 5), seed=1, k=k), "b.weight": _data((40, 9), seed=2, k=k),
               "c.bias": _data((200,), seed=3, k=k)}
    for params in _cases(name):
        res = _resolved(name, params)
        fwd = _merge_model(res, tensors, ["a.weight", "b.weight", "c.bias"], chunk=97)
        rev = _merge_model(res, tensors, ["c.bias", "b.weight", "a.weight"], chunk=97)
        for n in tensors:
            np.testing.assert_array_equal(fwd[n], rev[n], err_msg=f"{name} {params} {n}")


def _other_numbers(params):
    """The same structure with other numbers: densities below 1 moved, λ moved."""
    p = dict(params)
    if "density" in p:
        dens = np.asarray(p["density"], float)
        p["density"] = np.where(dens < 1, dens * 0.9, dens).tolist()
    if "lambda" in p:
        p["lambda"] = p["lambda"] * 1.1
    return p


def test_trace_counter_sees_a_trace(traces):
    jax.jit(lambda x: x + 1)(np.zeros(3))
    assert traces


@pytest.mark.parametrize("name", METHODS)
def test_second_call_does_not_retrace(name, traces):
    base, d = _data(k=_k(name))
    for params in _cases(name):
        merge_resolved(_resolved(name, params), base, tuple(d), seed=SEED, name=NAME)
        traces.clear()
        res = _resolved(name, _other_numbers(params), weights=(0.2, 3.0, 1.0))
        merge_resolved(res, base, tuple(d), seed=SEED + 1, name="another.tensor")
        assert not traces, f"{name} {params}: {len(traces)} retrace(s) on a second call"


MASKED = [n for n in METHODS if MERGE_METHODS[n].masks is not None]


@pytest.mark.parametrize("name", MASKED)
def test_vmapped_masks_equal_a_loop_over_models(name):
    """The method's whole-tensor keep-masks (``keep_masks``, vmapped over the models) equal
    ``keep_mask`` called model by model."""
    base, d = _data()
    method = MERGE_METHODS[name]
    key = merge_key(SEED, NAME)
    for params in _cases(name):
        res = _resolved(name, params)
        got = method.masks(res, base, d, key)
        n = base.size
        topk = topk_counts(res.density, n)
        keys = model_keys(key.seed, key.name, len(d))
        flat = jnp.asarray(d.reshape(len(d), -1))
        loop = np.stack([np.asarray(K.keep_mask(flat[i], jnp.float32(res.density[i]), topk[i], keys[i],
                                                method.options["sparsify"])) for i in range(len(d))])
        np.testing.assert_array_equal(got, loop, err_msg=f"{name} {params}")
