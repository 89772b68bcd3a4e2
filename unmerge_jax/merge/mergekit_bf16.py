"""``--compute-dtype bfloat16``: merge one tensor exactly as mergekit 0.1.5 does with ``dtype: bfloat16``.

By default the engine merges in float32 whatever the inputs' dtype, and rounds once when it
writes the output — more accurate than mergekit, which casts every input to the config's
``dtype`` and runs its arithmetic in it (its ``ties`` differs from the float32 merge by up to
≈0.19 on a tiny Llama: the trim and the sign election see rounded task vectors). This module
reproduces mergekit's bits for every method in :data:`BF16_METHODS`: the tensor-sized arithmetic
in :mod:`unmerge_jax.kernels.merge_bf16` (float32 with explicit bfloat16 rounding after every
operation, as PyTorch does on CPU, in mergekit's order and with its upcasts), and the few
statistics that only PyTorch reproduces computed by PyTorch on the same shapes: reductions over
a tensor (its vectorised summation order is not specified), transcendental functions (XLA's
differ in the last bit) and sorts (tied magnitudes stay in the order PyTorch's unstable sort
leaves them). :data:`NOT_REPRODUCED` says why the other methods are refused.

This mode works on whole tensors (sorts need an index per entry), as mergekit does; the default
float32 path streams chunks.
"""

from __future__ import annotations

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.kernels import merge_bf16 as KB
from unmerge_jax.merge.base import Resolved

COMPUTE_DTYPES = ("float32", "bfloat16")
BF16_METHODS = ("linear", "task_arithmetic", "ties", "passthrough", "slerp", "nuslerp", "multislerp",
                "breadcrumbs", "breadcrumbs_ties", "model_stock", "ram", "ramplus_tl", "sce", "nearswap",
                "arcee_fusion", "karcher")
# Why the other mergekit methods are refused in this mode.
_RANDOM = "mergekit draws its masks with torch.bernoulli, which no seed of ours reproduces"
NOT_REPRODUCED = {"dare_linear": _RANDOM, "dare_ties": _RANDOM, "della": _RANDOM, "della_linear": _RANDOM}
FLOAT32_RESULTS = ("ramplus_tl", "arcee_fusion")   # mergekit's result is float32 even with dtype: bfloat16
FUSION_SAMPLE = 1_000_000   # above this many entries mergekit samples arcee_fusion's quartiles at random
SLERP_CHUNK = 1 << 20   # mergekit's slerp reduces in chunks of this many elements (of one output tensor)


def check_compute_dtype(compute_dtype, method: str) -> str:
    """``compute_dtype`` (None → ``float32``) checked against the method."""
    if compute_dtype is None:
        return "float32"
    if compute_dtype not in COMPUTE_DTYPES:
        raise UnmergeError(f"unknown compute dtype {compute_dtype!r}; choose one of: {', '.join(COMPUTE_DTYPES)}")
    if compute_dtype == "bfloat16" and method not in BF16_METHODS:
        why = NOT_REPRODUCED.get(method, "not one of mergekit's methods")
        raise UnmergeError(f"--compute-dtype bfloat16 reproduces mergekit for every method but "
                           f"{', '.join(NOT_REPRODUCED)}, not {method!r} ({why}); merge it in float32 (the default)")
    return compute_dtype


def output_tag(tag: str, compute: str, method: str, explicit) -> str:
    """The output dtype tag: mergekit writes the results of :data:`FLOAT32_RESULTS` in float32
    whatever the config's ``dtype`` (``ramplus_tl``'s per-model λ and ``arcee_fusion``'s mask are
    float32 and promote the bfloat16 arithmetic), so ``--compute-dtype bfloat16`` does too unless
    ``out_dtype`` (or ``--dtype``) is given explicitly."""
    return "F32" if compute == "bfloat16" and method in FLOAT32_RESULTS and not explicit else tag


def _torch(what: str):
    try:
        import torch
    except ImportError:
        raise UnmergeError(f"--compute-dtype bfloat16 with {what} needs PyTorch (mergekit's float32 reductions); "
                           f"install torch or merge in float32") from None
    return torch


def _slerp_coefs(a: np.ndarray, b: np.ndarray, t: float):
    """mergekit's slerp coefficients ``(c_a, c_b)`` (float32 scalars) of the bfloat16 vectors ``a``, ``b``.

    mergekit upcasts the rounded inputs to float32 and reduces them with PyTorch: ``‖a‖`` as the
    norm of the norms of 2²⁰-element chunks, ``cos`` as the chunked sum of ``(a/‖a‖)(b/‖b‖)``
    (norms ≤ 1e-8 count as 1) clamped to [−1, 1]; linear (``1 − t``, ``t``) where ``|cos| > 0.9995``,
    else ``sin((1 − t)θ)/sin θ`` and ``sin(tθ)/sin θ``. The float32 sums' order is PyTorch's
    (vectorised, not specified), so these few scalars are computed by PyTorch on the same shapes;
    the tensor-sized combination runs in :func:`~unmerge_jax.kernels.merge_bf16.combine2_bf16_kernel`.
    """
    torch = _torch("slerp")
    x, y = torch.from_numpy(np.array(a)).reshape(1, -1), torch.from_numpy(np.array(b)).reshape(1, -1)
    tt = torch.tensor([t], dtype=torch.float32).reshape(-1, 1)
    if x.shape[1] == 0:
        return np.float32(1 - tt.item()), np.float32(tt.item())
    starts = range(0, x.shape[1], SLERP_CHUNK)
    norm = lambda v: torch.linalg.vector_norm(torch.stack(   # noqa: E731
        [torch.linalg.vector_norm(v[:, s:s + SLERP_CHUNK], dim=1, keepdim=True) for s in starts]), dim=0)
    na, nb = norm(x), norm(y)
    na, nb = torch.where(na > 1e-8, na, 1), torch.where(nb > 1e-8, nb, 1)
    dot = torch.stack([(x[:, s:s + SLERP_CHUNK] / na * (y[:, s:s + SLERP_CHUNK] / nb)).sum(dim=1, keepdim=True)
                       for s in starts]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > 0.9995
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    ca = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    cb = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return np.float32(ca.item()), np.float32(cb.item())


def _thetas(res, base, tensors, deltas, full):
    """The base (None without one) and the K fine-tuned tensors, rounded to bfloat16 (float32 arrays)."""
    b = None if full else np.asarray(KB.round_bf16(np.asarray(base, np.float32)))
    if deltas and not full:
        ts = [np.asarray(KB.round_bf16(np.asarray(base, np.float32) + t)) for t in tensors]
    else:
        ts = [np.asarray(KB.round_bf16(np.asarray(t, np.float32))) for t in tensors]
    return b, ts


def _nuslerp(res, base, tensors, *, deltas, full):
    """mergekit's ``nuslerp`` in bfloat16 (it does not upcast): with a base, of the task vectors
    ``bf16(θ_k − b)`` and the base added back. The vectors are the whole tensor (flatten), its rows,
    or (row-wise) its columns as mergekit's ``transpose(0, −1)``. Per vector PyTorch computes (same
    shapes, same order) the norms, ``cos``, ``θ`` and the sines; the combination is
    :func:`~unmerge_jax.kernels.merge_bf16.nuslerp_bf16_kernel`."""
    from unmerge_jax.merge.methods.slerp import nuslerp_t

    torch = _torch("nuslerp")
    shape = np.shape(base)
    b, ts = _thetas(res, base, tensors, deltas, full)
    v = ts if b is None else [np.asarray(KB.sub_bf16_kernel(t, b)) for t in ts]
    t = nuslerp_t(res.weights)
    flatten, row_wise = res.shared["nuslerp_flatten"], res.shared["nuslerp_row_wise"]
    tv = [torch.from_numpy(np.array(x)).to(torch.bfloat16) for x in v]
    if flatten:
        tv = [x.reshape(-1) for x in tv]
    elif row_wise:
        tv = [x.transpose(0, -1) for x in tv]
    unit = [x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7) for x in tv]
    cos = torch.sum(unit[0] * unit[1], dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    lay = lambda x: x.float().reshape(-1, x.shape[-1] if x.ndim else 1).numpy()   # noqa: E731
    rows = [lay(x.contiguous()) for x in tv]
    stat = lambda x: x.float().reshape(-1, 1).numpy()   # noqa: E731
    out = np.asarray(KB.nuslerp_bf16_kernel(rows[0], rows[1], stat(torch.sin((1 - t) * theta)),
                                            stat(torch.sin(t * theta)), stat(torch.sin(theta)),
                                            colinear.reshape(-1, 1).numpy(), np.float32(t)))
    out = out.reshape(tv[0].shape)
    if row_wise and not flatten and out.ndim > 1:
        out = np.swapaxes(out, 0, -1)
    out = np.ascontiguousarray(out).reshape(shape)
    return out if b is None else np.asarray(KB.add_bf16_kernel(b, out))


def _multislerp(res, base, tensors, *, deltas, full):
    """mergekit's ``multislerp`` in bfloat16 (it does not upcast), its tangent-space steps included
    (zero in exact arithmetic, not in bfloat16). Norms, dots and scalars by PyTorch on the same
    shapes; the tensor-sized steps in :mod:`~unmerge_jax.kernels.merge_bf16`."""
    torch = _torch("multislerp")
    shape = np.shape(base)
    b, ts = _thetas(res, base, tensors, deltas, full)
    if len(ts) == 1:
        return ts[0].reshape(shape)
    d = np.stack([(t if b is None else np.asarray(KB.sub_bf16_kernel(t, b))).reshape(-1) for t in ts])
    eps = float(res.shared["eps"])
    bf = lambda x: torch.from_numpy(np.array(x, np.float32)).to(torch.bfloat16)   # noqa: E731
    back = lambda x: x.float().numpy()   # noqa: E731
    w = torch.tensor([float(x) for x in res.weights], dtype=torch.bfloat16)
    if res.shared["normalize_weights"]:
        w = w / w.sum()
    td = bf(d)
    norms = torch.norm(td, dim=-1, keepdim=True)
    u, m = KB.multislerp_units_bf16(d, back(norms + eps), back(w))
    m_norm = torch.norm(bf(m))
    if m_norm < eps:
        if len(ts) != 2:
            raise UnmergeError("multislerp: the weighted sum of the unit task vectors is zero (antipodal vectors with "
                               "balancing weights), as mergekit refuses; change the weights")
        out = np.asarray(KB.lerp2_bf16(d[0], d[1], back(w)))
    else:
        mean, prods = KB.multislerp_direction_bf16(u, m, back(m_norm))
        dots = bf(prods).sum(-1, keepdim=True)
        tangent = KB.multislerp_tangent_bf16(u, mean, back(dots), back(w))
        tn = torch.norm(bf(tangent)) + eps
        avg = (norms.squeeze(-1) * w).sum()
        out = np.asarray(KB.multislerp_result_bf16(mean, tangent, back(torch.cos(tn)), back(torch.sin(tn) / tn),
                                                   back(avg)))
    out = out.reshape(shape)
    return out if b is None else np.asarray(KB.add_bf16_kernel(out, b))


def _sparsified(res, rows):
    """mergekit's ``sparsify`` of each bfloat16 task vector: the keep-masks (``magnitude``: the first
    ``max(1, ⌊density·n⌋)`` of PyTorch's descending ``argsort`` of ``|δ|``; ``magnitude_outliers``:
    ranks ``n_bot … n_bot + ⌊density·n⌋`` of its ascending ``sort``, ``n_bot = max(0, n − ⌊density·n⌋
    − ⌊gamma·n⌋)``; density ≥ 1 keeps all, ≤ 0 none) and, with ``rescale``, the kept entries times
    ``bf16(Σ|δ| / Σ|δ kept|)`` (bfloat16 sums by PyTorch; unscaled where either is below 1e-7)."""
    torch = _torch(f"{res.method.name}'s sparsification")
    rule = res.shared.get("rescale")
    if rule not in (None, "l1"):
        raise UnmergeError(f"--compute-dtype bfloat16 reproduces mergekit's rescale (l1), not {rule!r}; merge in "
                           f"float32 (the default) or set rescale: true")
    gammas = res.columns.get("gamma")
    out_rows, keeps = [], []
    for k, (r, d) in enumerate(zip(rows, res.density)):
        r = np.asarray(r)
        n = r.size
        if d >= 1.0:
            out_rows.append(r)
            keeps.append(np.ones(n, bool))
            continue
        absd = torch.from_numpy(np.abs(r))
        keep = np.zeros(n, bool)
        if res.method.options["sparsify"] == "magnitude":
            if d > 0 and n:
                keep[torch.argsort(absd, descending=True)[:max(1, int(d * n))].numpy()] = True
        elif res.method.options["sparsify"] == "magnitude_outliers":
            target, n_top = int(d * n), int(float(gammas[k]) * n)
            n_bot = max(0, n - target - n_top)
            keep[torch.sort(absd, descending=False).indices[n_bot:n_bot + target].numpy()] = True
        else:
            raise UnmergeError(f"--compute-dtype bfloat16 does not reproduce {res.method.name!r}'s sparsification")
        if rule == "l1" and d > 0:
            tr = torch.from_numpy(r).to(torch.bfloat16)
            masked = tr * torch.from_numpy(keep).to(torch.bfloat16)
            before, after = tr.abs().sum(), masked.abs().sum()
            if not (before < 1e-7 or after < 1e-7):
                r = np.asarray(KB.scale_bf16_kernel(masked.float().numpy(), (before / after).float().numpy()))
                keep = np.ones(n, bool)
        out_rows.append(r)
        keeps.append(keep)
    return tuple(out_rows), tuple(keeps)


def _model_stock(res, base, tensors, *, deltas):
    """mergekit's ``model_stock`` in bfloat16: per vector (the whole tensor, or each row of the last
    axis with ``filter_wise``) PyTorch computes on the same shapes the mean pairwise cosine of the
    offsets ``bf16(θ_k − θ_0)`` and ``t = K cos / (1 + (K − 1) cos)`` (0 where the denominator is
    below 1e-6); :func:`~unmerge_jax.kernels.merge_bf16.model_stock_bf16_kernel` mixes."""
    torch = _torch("model_stock")
    shape = np.shape(base)
    b, ts = _thetas(res, base, tensors, deltas, False)
    if res.shared["filter_wise"]:
        lay = (1, -1) if len(shape) <= 1 else (-1, shape[-1])
    else:
        lay = (1, -1)
    w0 = torch.from_numpy(np.array(b)).to(torch.bfloat16)
    ws = [torch.from_numpy(np.array(t)).to(torch.bfloat16) for t in ts]
    if res.shared["filter_wise"]:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [x.unsqueeze(0) for x in ws]
    else:
        w0, ws = w0.reshape(-1), [x.reshape(-1) for x in ws]
    offsets = [x - w0 for x in ws]
    cos = []
    for i, oa in enumerate(offsets):
        for ob in offsets[i + 1:]:
            norm_product = torch.norm(oa, dim=-1) * torch.norm(ob, dim=-1)
            cos.append(((oa * ob).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta),
                    (count * cos_theta) / torch.where(singular, torch.ones_like(denominator), denominator))
    col = lambda x: x.float().reshape(-1, 1).numpy()   # noqa: E731
    out = KB.model_stock_bf16_kernel(np.array(b).reshape(lay), tuple(np.array(x).reshape(lay) for x in ts),
                                     col(t), col(1 - t))
    return np.asarray(out).reshape(shape)


def _sce(res, base, tensors, *, deltas):
    """mergekit's ``sce`` in bfloat16: with ``select_topk < 1`` the entries of the ⌊topk · #(var ≠ 0)⌋
    largest variances across the models (PyTorch's ``var`` and ``topk``) are kept; the per-model
    weights are the mean squares of the kept task vectors over their sum (PyTorch's reductions;
    1/K where the sum is below 1e-6); :func:`~unmerge_jax.kernels.merge_bf16.sce_bf16_kernel` mixes."""
    torch = _torch("sce")
    shape = np.shape(base)
    b, ts = _thetas(res, base, tensors, deltas, False)
    tv = np.stack([np.asarray(KB.sub_bf16_kernel(t, b)).reshape(-1) for t in ts])
    tvs = torch.from_numpy(tv).to(torch.bfloat16)
    topk = float(res.shared["select_topk"])
    if topk < 1:
        keep = torch.zeros(tv.shape[1], dtype=torch.bool)
        if topk > 0:
            var = torch.var(tvs, dim=0, unbiased=False)
            k = int(torch.count_nonzero(var) * topk)
            if k:
                keep[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = True
        tvs = tvs * keep.to(torch.bfloat16)
        tv = tvs.float().numpy()
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    return np.asarray(KB.sce_bf16_kernel(b.reshape(-1), tv, weights.float().numpy())).reshape(shape)


def _arcee_fusion(res, base, tensors, *, deltas):
    """mergekit's ``arcee_fusion`` on bfloat16 inputs. The importance ``|θ − b| · KL(softmax θ ‖
    softmax b)`` (per row of the last axis, in bfloat16) and its threshold ``median + 1.5 (q3 − q1)``
    (sorted entries at ``⌊q (n − 1)⌋``) are PyTorch's: the mask compares every entry with the
    threshold, and XLA's ``exp``/``log`` differ from PyTorch's in the last bit, which moves entries
    across it. Tensors of more than 10⁶ entries are refused: mergekit draws a random sample of them
    for the quartiles (no seed reproduces it)."""
    torch = _torch("arcee_fusion")
    shape = np.shape(base)
    b, ts = _thetas(res, base, tensors, deltas, False)
    if b.size > FUSION_SAMPLE:
        raise UnmergeError(f"--compute-dtype bfloat16 with arcee_fusion: a tensor of {b.size} entries (> "
                           f"{FUSION_SAMPLE}) gets quartiles from mergekit's random sample, which no run "
                           f"reproduces; merge it in float32 (the default)")
    tb, tp = (torch.from_numpy(np.array(x)).to(torch.bfloat16) for x in (b, ts[0]))
    diff = (tp - tb).abs()
    p = torch.nn.functional.softmax(tp, dim=-1) + 1e-8
    q = torch.nn.functional.softmax(tb, dim=-1) + 1e-8
    importance = diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    ranked, _ = torch.sort(importance.reshape(-1))
    q1, med, q3 = ranked[(torch.tensor([0.25, 0.5, 0.75]) * (ranked.numel() - 1)).long()]
    keep = (importance >= med + 1.5 * (q3 - q1)).numpy()
    return np.asarray(KB.fusion_bf16_kernel(b, ts[0], keep)).reshape(shape)


def _karcher(res, base, tensors, *, deltas, full):
    """mergekit's ``karcher`` on bfloat16 inputs: norms in float32, units, mean and gradient in
    bfloat16, as its loop does (same branches on ``tol``, at most ``max_iter`` steps). PyTorch
    divides a bfloat16 tensor by a float32 0-d tensor's float32 value but multiplies by it rounded
    to bfloat16 (``cos‖g‖``, ``sin‖g‖``, the final norm scale). The norms,
    dots and the scalar chain (``acos``, ``sin``, ``cos``) are PyTorch's; the tensor-sized steps run
    in :mod:`~unmerge_jax.kernels.merge_bf16`."""
    torch = _torch("karcher")
    shape = np.shape(base)
    # The config makes a base_model one more input, last (mergekit's group order).
    xs = [t.reshape(-1) for t in _thetas(res, base, tensors, deltas, full)[1]]
    if len(xs) == 1:
        return xs[0].reshape(shape)
    tol, max_iter = float(res.shared["tol"]), int(res.shared["max_iter"])
    alphas = [1.0 / len(xs)] * len(xs)
    bf = lambda x: torch.from_numpy(np.array(x, np.float32)).to(torch.bfloat16)   # noqa: E731
    rounded = lambda x: x.to(torch.bfloat16).float().numpy()   # noqa: E731
    norms = [torch.linalg.vector_norm(torch.from_numpy(np.array(x))) for x in xs]
    units = [np.zeros_like(x) if n.item() == 0.0 else np.asarray(KB.div_scalar_bf16(x, n.numpy()))
             for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return np.zeros(shape, np.float32)
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [units[i] for i in valid]
    mean = np.zeros_like(units[0])
    for a, u in zip(weights, units):
        mean = np.asarray(KB.axpy_bf16(mean, np.float32(a), u))
    norm = torch.linalg.vector_norm(torch.from_numpy(np.array(mean)))
    mean = units[0].copy() if norm.item() < tol else np.asarray(KB.div_scalar_bf16(mean, norm.numpy()))
    tu = [bf(u) for u in units]
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        tm = bf(mean)
        for a, u, t_u in zip(weights, units, tu):
            dot = torch.clamp(torch.dot(tm, t_u), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            c = a * (theta / torch.sin(theta))
            tangent = np.asarray(KB.karcher_tangent_bf16(tangent, u, mean, dot.float().numpy(), c.float().numpy()))
        tn = torch.linalg.vector_norm(torch.from_numpy(np.array(tangent)))
        if tn.item() < tol:
            break
        # PyTorch multiplies a bfloat16 tensor by a float32 0-d tensor after rounding it to bfloat16
        # (it divides by its float32 value)
        mean = np.asarray(KB.karcher_step_bf16(mean, tangent, rounded(torch.cos(tn)), rounded(torch.sin(tn)),
                                               tn.numpy()))
        un = torch.linalg.vector_norm(torch.from_numpy(np.array(mean)))
        if un.item() > tol:
            mean = np.asarray(KB.div_scalar_bf16(mean, un.numpy()))
    scale = sum(a * n for a, n in zip(alphas, norms))
    return np.asarray(KB.scale_bf16_kernel(mean, rounded(scale))).reshape(shape)


def merge_tensor_bf16(res: Resolved, base: np.ndarray, tensors, *, deltas: bool, full: bool) -> np.ndarray:
    """One tensor merged in mergekit's bfloat16 arithmetic.

    Args:
      res: the resolved method (one of :data:`BF16_METHODS`).
      base: float32 base, shape ``S`` (zeros with ``full``).
      tensors: K float32 arrays of shape ``S``: task vectors if ``deltas`` else fine-tuned weights.
      full: ``linear`` over full weights (no base: ``tensors`` are the weights themselves).
    Returns:
      float32 array of shape ``S`` holding bfloat16 values (for :data:`FLOAT32_RESULTS`, the float32
      values mergekit writes).
    """
    shape = base.shape
    name = res.method.name
    w = np.asarray(res.weights, np.float32)
    if name == "karcher":
        return _karcher(res, base, tensors, deltas=deltas, full=full)
    if name == "arcee_fusion":
        return _arcee_fusion(res, base, tensors, deltas=deltas)
    if name == "nearswap":
        b, ts = _thetas(res, base, tensors, deltas, False)
        out = KB.nearswap_bf16_kernel(b.reshape(-1), ts[0].reshape(-1), np.float32(res.shared["t"]))
        return np.asarray(out).reshape(shape)
    if name == "sce":
        return _sce(res, base, tensors, deltas=deltas)
    if name in ("ram", "ramplus_tl"):
        from unmerge_jax.merge.methods.ram import MERGEKIT_FACES, canonical_face

        face = canonical_face(res.shared["face"])
        if face not in MERGEKIT_FACES.values():
            raise UnmergeError(f"--compute-dtype bfloat16 reproduces mergekit's ram faces "
                               f"({', '.join(MERGEKIT_FACES.values())}), not face {face!r}; merge it in float32")
        b, ts = _thetas(res, base, tensors, deltas, False)
        tv = np.stack([np.asarray(KB.sub_bf16_kernel(t, b)).reshape(-1) for t in ts])
        eps = float(res.shared["epsilon"])
        out = KB.ram_bf16_kernel(b.reshape(-1), tv, np.float32(KB.round_bf16(np.float32(eps))), np.float32(eps),
                                 np.float32(res.shared.get("r") or 0.0),
                                 np.float32(res.shared.get("alpha") or 0.0), plus=face == "tensor_local")
        return np.asarray(out).reshape(shape)
    if name == "model_stock":
        return _model_stock(res, base, tensors, deltas=deltas)
    if name == "multislerp":
        return _multislerp(res, base, tensors, deltas=deltas, full=full)
    if name == "nuslerp":
        return _nuslerp(res, base, tensors, deltas=deltas, full=full)
    if name == "slerp":
        a = np.asarray(base, np.float32).reshape(-1)
        b = np.asarray(tensors[0] if not deltas else base + tensors[0], np.float32).reshape(-1)
        a, b = np.asarray(KB.round_bf16(a)), np.asarray(KB.round_bf16(b))
        ca, cb = _slerp_coefs(a, b, float(res.shared["t"]))
        return np.asarray(KB.combine2_bf16_kernel(a, b, ca, cb)).reshape(shape)
    if name == "passthrough":
        theta = tensors[0] if full or not deltas else base + tensors[0]
        return np.asarray(KB.passthrough_bf16_kernel(np.asarray(theta, np.float32),
                                                     np.float32(res.shared["scale"]))).reshape(shape)
    if name == "linear":
        thetas = tuple(tensors) if full or not deltas else tuple(base + t for t in tensors)
        flat = tuple(np.asarray(t, np.float32).reshape(-1) for t in thetas)
        out = KB.linear_bf16_kernel(flat, w, normalize=bool(res.shared["normalize"]))
        return np.asarray(out).reshape(shape)
    cfg = KB.BF16Config(consensus=res.method.options["consensus"], normalize=bool(res.shared["normalize"]),
                        scale=float(res.shared.get("lambda", 1.0)) != 1.0, deltas=deltas)
    b, rows = KB.task_vectors_bf16(np.asarray(base, np.float32), tuple(np.asarray(t, np.float32) for t in tensors),
                                   cfg=cfg)
    keep = tuple(np.ones(1, bool) for _ in rows)
    sparsify = res.method.options["sparsify"]
    if sparsify is not None and bool(np.any(res.density < 1.0)):
        rows, keep = _sparsified(res, rows)
        cfg = cfg._replace(masked=True)
    out = KB.gta_bf16_kernel(b, rows, keep, w, np.float32(res.shared.get("lambda", 1.0)), cfg=cfg)
    return np.asarray(out).reshape(shape)
