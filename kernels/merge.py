"""Per-tensor merge kernels: pure jit-compiled functions on the K task vectors of one tensor.

Every kernel works on one tensor at a time and sees

* ``base`` — the base weights, shape ``S`` (zeros when a method merges full weights without a
  base, e.g. ``linear`` with no ``base_model``);
* ``tensors`` — a tuple of K arrays of shape ``S``: fine-tuned weights (``deltas=False``; the
  kernel forms ``δ_k = θ_k − θ_base`` itself, fused, so no stacked copy of the inputs is needed)
  or task vectors (``deltas=True``, e.g. LoRA ``B@A·α/r``);
* per-model arrays ``weights`` (K,), ``density`` (K,) / ``topk`` (K,), and per-tensor scalars.

Everything that fixes the program's structure (sparsification, consensus, rescale rule, RAM
face) is a frozen hashable static argument, so one program is compiled per (config, shape,
dtype) and swept numbers (weights, densities, λ) reuse it. Randomness (DARE) comes from a
``jax.random`` key derived from ``(seed, tensor name, model index)`` by :func:`model_keys`, so a
merge does not depend on the order in which tensors are visited or on sharding.

Computation is float32 (the inputs' precision); L1 norms for DARE's ``l1`` rescale are
accumulated in float64. Semantics follow mergekit's ``generalized_task_arithmetic.py``,
``sparsify.py`` and ``ram.py`` (see ``docs/merge.md`` for each formula and where we differ).
"""

from __future__ import annotations

import zlib
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# mergekit's thresholds: rescaling skipped below this L1 norm; |Σw| below this is "zero".
RESCALE_EPS = 1e-7
WEIGHT_EPS = 1e-8


class GTAConfig(NamedTuple):
    """Static structure of a generalized-task-arithmetic merge (linear/TA/TIES/DARE)."""

    sparsify: str | None = None    # None | "magnitude" | "random"
    rescale: str | None = None     # None | "l1" | "inverse_density"
    consensus: str | None = None   # None | "sum" | "count"
    normalize: bool = False
    deltas: bool = True            # tensors are task vectors (True) or fine-tuned weights


class RAMConfig(NamedTuple):
    """Static structure of a RAM merge (see :func:`ram_kernel`)."""

    face: str = "mergekit"         # "seed003" | "arm" (λ given) | "tensor_local"
    deltas: bool = True


def name_hash(name: str) -> int:
    """A stable 31-bit hash of a tensor name (CRC-32; Python's ``hash`` is salted per process)."""
    return zlib.crc32(str(name).encode("utf-8")) & 0x7FFFFFFF


def _task_vectors(base, tensors, deltas: bool):
    """(K, n) float32 task vectors, flattened."""
    b = base.reshape(-1).astype(jnp.float32)
    rows = [t.reshape(-1).astype(jnp.float32) for t in tensors]
    if not deltas:
        rows = [r - b for r in rows]
    return jnp.stack(rows), b


def _topk_mask(a, k):
    """Keep exactly the ``k`` largest entries of ``a`` (1-D, ≥ 0); ties at the k-th value are
    broken by position (lowest index first), so the mask has exactly ``k`` ones."""
    thr = jnp.sort(a)[a.shape[0] - k]
    gt = a > thr
    eq = a == thr
    need = k - jnp.sum(gt, dtype=jnp.int64)
    return gt | (eq & (jnp.cumsum(eq, dtype=jnp.int64) <= need))


def _rescale(d, kept, density, rule):
    """Apply a keep-mask to one task vector and rescale as ``rule`` says (mergekit's
    ``rescaled_masked_tensor`` for ``l1``; ``1/density`` for ``inverse_density``)."""
    masked = jnp.where(kept, d, 0.0)
    if rule is None:
        return masked
    if rule == "inverse_density":
        return masked / density.astype(jnp.float32)
    before = jnp.sum(jnp.abs(d), dtype=jnp.float64)
    after = jnp.sum(jnp.abs(masked), dtype=jnp.float64)
    skip = (before < RESCALE_EPS) | (after < RESCALE_EPS)
    scale = jnp.where(skip, 1.0, before / jnp.where(skip, 1.0, after)).astype(jnp.float32)
    return masked * scale


def model_keys(seed, nhash, k: int):
    """(k,) keys: model ``i`` of tensor ``nhash`` gets ``fold_in(fold_in(key(seed), nhash), i)``."""
    key = jax.random.fold_in(jax.random.key(seed), nhash)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(k, dtype=jnp.uint32))


def keep_masks(d, density, topk, keys, sparsify):
    """(K, n) boolean keep-masks: top-``topk[k]`` magnitudes or Bernoulli(``density[k]``)."""
    if sparsify == "magnitude":
        return jax.vmap(_topk_mask)(jnp.abs(d), topk)
    return jax.vmap(lambda key, p: jax.random.bernoulli(key, p, d.shape[1:]))(keys, density.astype(jnp.float32))


@partial(jax.jit, static_argnames=("sparsify", "deltas"))
def draw_masks(base, tensors, density, topk, seed, nhash, *, sparsify: str, deltas: bool = True):
    """The (K, n) keep-masks :func:`gta_kernel` would draw for this tensor (for tests/analysis)."""
    d, _ = _task_vectors(base, tensors, deltas)
    return keep_masks(d, density, topk, model_keys(seed, nhash, d.shape[0]), sparsify)


def _sparsified(d, density, topk, keys, cfg: GTAConfig, masks=None):
    if cfg.sparsify is None:
        return d
    if masks is None:
        masks = keep_masks(d, density, topk, keys, cfg.sparsify)
    out = jax.vmap(lambda x, m, p: _rescale(x, m, p, cfg.rescale))(d, masks, density)
    # mergekit: density ≥ 1 returns the task vector untouched (no mask, no rescale).
    return jnp.where((density >= 1.0)[:, None], d, out)


def _gta(base, tensors, weights, density, topk, lam, seed, nhash, masks, cfg: GTAConfig):
    d, b = _task_vectors(base, tensors, cfg.deltas)
    keys = model_keys(seed, nhash, d.shape[0]) if cfg.sparsify == "random" and masks is None else None
    d = _sparsified(d, density, topk, keys, cfg, masks)
    w = weights.astype(jnp.float32)[:, None]
    wd = d * w
    if cfg.consensus is None:
        mixed = jnp.sum(wd, axis=0)
        divisor = jnp.sum(w)
    else:
        sign = jnp.sign(wd)
        votes = jnp.sum(wd, axis=0) if cfg.consensus == "sum" else jnp.sum(sign, axis=0)
        majority = jnp.where(votes >= 0, 1.0, -1.0).astype(jnp.float32)   # ties elect +
        agree = sign == majority                                          # zeros never agree
        mixed = jnp.sum(jnp.where(agree, wd, 0.0), axis=0)
        divisor = jnp.sum(jnp.where(agree, w, 0.0), axis=0)
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    if cfg.normalize:
        mixed = mixed / divisor
    mixed = mixed * lam.astype(jnp.float32)
    return (b + mixed).reshape(base.shape)


@partial(jax.jit, static_argnames=("cfg",))
def gta_kernel(base, tensors, weights, density, topk, lam, seed, nhash, *, cfg: GTAConfig):
    """Generalized task arithmetic on one tensor (mergekit's ``GeneralizedTaskArithmeticMerge``).

    ``δ'_k = sparsify(δ_k)`` (top-``topk[k]`` magnitudes or Bernoulli(``density[k]``) keep, then
    the rescale rule; untouched where ``density[k] ≥ 1``), ``u_k = w_k δ'_k``. Without consensus
    ``m = Σ u_k`` and ``D = Σ w_k``; with consensus the sign ``s = sign(Σ u_k)`` (``sum``; or of
    ``Σ sign(u_k)``, ``count``; ties → +) is elected and ``m = Σ u_k [sign u_k = s]``,
    ``D = Σ w_k [sign u_k = s]`` (``D = 0 → 1``). Returns ``θ_base + λ · (m / D if normalize else
    m)``.

    Args:
      base: base weights, any shape ``S``.
      tensors: tuple of K arrays of shape ``S`` (task vectors if ``cfg.deltas`` else weights).
      weights, density: (K,) float; topk: (K,) int (used for ``magnitude``).
      lam: scalar λ. seed, nhash: uint32 scalars keying ``random`` masks (:func:`model_keys`).
    Returns:
      float32 array of shape ``S``.
    """
    return _gta(base, tensors, weights, density, topk, lam, seed, nhash, None, cfg)


@partial(jax.jit, static_argnames=("cfg",))
def gta_kernel_masked(base, tensors, weights, density, lam, masks, *, cfg: GTAConfig):
    """:func:`gta_kernel` with given (K, n) keep-masks instead of drawn ones (DARE parity tests)."""
    k = masks.shape[0]
    return _gta(base, tensors, weights, density, jnp.ones(k, jnp.int64), lam, 0, 0, masks, cfg)


def _ram_masks(d, eps):
    act = jnp.abs(d) > eps
    return act, jnp.sum(act, axis=0, dtype=jnp.int32)


@partial(jax.jit, static_argnames=("deltas",))
def ram_counts(base, tensors, weights, eps, *, deltas: bool = True):
    """The RAM authors' counting pass for one tensor: per model ``changed_k = #{|w_k δ_k| > ε}``
    and ``overlap_k = #{changed in k and in ≥ 1 other model}``, int64 (K,) each."""
    d, _ = _task_vectors(base, tensors, deltas)
    act, c = _ram_masks(d * weights.astype(jnp.float32)[:, None], eps)
    changed = jnp.sum(act, axis=1, dtype=jnp.int64)
    overlap = jnp.sum(act & (c >= 2)[None, :], axis=1, dtype=jnp.int64)
    return changed, overlap


@partial(jax.jit, static_argnames=("cfg",))
def ram_kernel(base, tensors, weights, lambdas, eps, q, r, alpha, *, cfg: RAMConfig):
    """RAM on one tensor; ``u_k = w_k δ_k`` (weights default to 1).

    * ``seed003`` (seed 003 eq. 4–5): active ``a_k = |u_k| ≥ percentile_q(|u_k|)`` (linear
      interpolation, per model over this tensor); ``c = Σ a_k``; ``c ≥ 2`` → ``(1/K) Σ_k u_k``
      (plain mean over all K); ``c = 1`` → ``λ · u_j`` of the active model (λ = ``lambdas[0]``,
      1.5 in the paper); else 0.
    * ``arm`` (RAM authors / mergekit ``ram``): active ``a_k = |u_k| > ε``; ``c ≥ 2`` →
      ``Σ a_k u_k / c`` (mean over the *active* models); ``c = 1`` → ``λ_j u_j`` with the
      per-model ``lambdas`` (K,) (1 for ``arm``; from a whole-model counting pass for
      ``arm-r``/``arm-r-v2``); else 0.
    * ``tensor_local`` (mergekit ``ramplus_tl``): as ``arm`` with
      ``λ_k = 1 + r·clip(ρ_k, 0, α)``, ``ρ_k = shared_k / max(unique_k, ε)`` counted in this tensor.
    """
    d, b = _task_vectors(base, tensors, cfg.deltas)
    u = d * weights.astype(jnp.float32)[:, None]
    if cfg.face == "seed003":
        mag = jnp.abs(u)
        thr = jnp.percentile(mag, q, axis=1, keepdims=True)
        act = mag >= thr
        c = jnp.sum(act, axis=0, dtype=jnp.int32)
        shared = jnp.mean(u, axis=0)
        unique = lambdas[0].astype(jnp.float32) * jnp.sum(jnp.where(act, u, 0.0), axis=0)
    else:
        act, c = _ram_masks(u, eps)
        if cfg.face == "tensor_local":
            shared_k = jnp.sum(act & (c >= 2)[None, :], axis=1).astype(jnp.float32)
            unique_k = jnp.sum(act & (c == 1)[None, :], axis=1).astype(jnp.float32)
            rho = shared_k / jnp.maximum(unique_k, eps.astype(jnp.float32))
            lambdas = 1.0 + r.astype(jnp.float32) * jnp.clip(rho, 0.0, alpha.astype(jnp.float32))
        ua = jnp.where(act, u, 0.0)
        shared = jnp.sum(ua, axis=0) / jnp.maximum(c, 1).astype(jnp.float32)
        unique = jnp.sum(ua * lambdas.astype(jnp.float32)[:, None], axis=0)
    merged = jnp.where(c >= 2, shared, jnp.where(c == 1, unique, 0.0))
    return (b + merged).reshape(base.shape)


def ram_lambdas(face: str, r: float, changed, overlap) -> np.ndarray:
    """Per-model unique-region scales of the RAM authors' faces from whole-model counts.

    ``arm``: 1. ``arm-r``: ``1 + (r−1)·clip(overlap/changed, 0, 1)``. ``arm-r-v2``:
    ``1 + (r−1)·min(1, overlap/(changed − overlap))`` — where a model's every change overlaps
    (``changed = overlap > 0``) the authors' code divides by zero; we take ρ = ∞ → λ = r.
    A model that changed nothing gets ρ = 0. ``r < 1`` is raised to 1, as in the authors' code.
    """
    changed = np.asarray(changed, dtype=np.float64)
    overlap = np.asarray(overlap, dtype=np.float64)
    r = max(float(r), 1.0)
    if face == "arm":
        return np.ones_like(changed)
    with np.errstate(divide="ignore", invalid="ignore"):
        if face == "arm-r":
            rho = np.where(changed > 0, overlap / np.where(changed > 0, changed, 1.0), 0.0)
        else:
            uniq = changed - overlap
            rho = np.where(changed == 0, 0.0, np.where(uniq > 0, overlap / np.where(uniq > 0, uniq, 1.0), np.inf))
    return 1.0 + (r - 1.0) * np.clip(rho, 0.0, 1.0)
