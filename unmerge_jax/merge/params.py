"""A merge method's parameters for one tensor: looked up in the registry, checked and defaulted.

Parameter checks happen here, eagerly, as one-line :class:`UnmergeError`s (the method's own
``check`` for its method-wide parameters); the kernels never raise.
"""

from __future__ import annotations

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.merge.base import MergeMethod, Resolved, as_float, check_name, short
from unmerge_jax.merge.methods import MERGE_METHODS


def get_method(method: str) -> MergeMethod:
    """The registered :class:`MergeMethod` named ``method`` (one-line error listing them otherwise)."""
    check_name("merge method", method, MERGE_METHODS)
    return MERGE_METHODS[method]


def check_params(method: MergeMethod, params: dict, where: str = "") -> None:
    """Raise on a parameter the method does not take (mergekit's spelling)."""
    unknown = sorted(set(params) - set(method.params), key=str)
    if unknown:
        at = f" ({where})" if where else ""
        raise UnmergeError(f"unknown parameter {short(unknown[0])} for merge method {method.name!r}{at}; "
                           f"it accepts: {', '.join(method.params)}")


def resolve(method: str, k: int, shared: dict, per_model: list[dict] | None = None, where: str = "") -> Resolved:
    """Check and default one method's parameters for K models.

    Args:
      method: registered name. k: number of input models (≥ 1).
      shared: method-wide parameters; a per-model parameter given here applies to all models.
      per_model: K dicts of per-model parameters (``weight``, ``density``), overriding ``shared``.
      where: context for error messages (a tensor name or config path).
    Returns:
      a :class:`Resolved`: every method-wide parameter (defaults filled in, normalised by the
      method's ``check``; a per-input parameter other than ``weight``/``density`` is handed to it as
      a (K,) float64 column under its name), and the (K,) float64 ``weights`` and ``density``.
    """
    spec = get_method(method)
    at = f" ({where})" if where else ""
    if k < 1:
        raise UnmergeError(f"merge method {method!r} needs at least one model to merge{at}")
    per_model = per_model or [{} for _ in range(k)]
    check_params(spec, shared, where)
    for p in per_model:
        check_params(spec, p, where)
    out = dict(spec.shared)
    out.update({n: v for n, v in shared.items() if n in spec.shared})
    cols = {}
    for n, default in spec.per_model.items():
        cols[n] = np.asarray([as_float(f"{n} of model {i}", p.get(n, shared.get(n, default)))
                              for i, p in enumerate(per_model)], dtype=np.float64)
    weights = cols.get("weight", np.ones(k))   # methods without per-model weights (slerp, karcher)
    density = cols.get("density", np.ones(k))
    # Other per-input parameters (passthrough's ``scale``) reach the method's check as (K,) columns.
    out.update({n: c for n, c in cols.items() if n not in ("weight", "density")})
    bad = [(i, d) for i, d in enumerate(density) if not 0.0 < d <= 1.0]
    if bad:
        raise UnmergeError(f"density {bad[0][1]} of model {bad[0][0]} is outside (0, 1]{at}; "
                           f"use a fraction of entries to keep, e.g. 0.5")
    res = Resolved(spec, spec.check(spec, out, weights, density, at), weights, density, cols)
    if spec.check_models is not None:
        spec.check_models(res, at)
    return res


def per_model_params(params, spec, what: str) -> dict:
    """A model's (or slice source's) ``parameters:`` checked against the method's per-model names."""
    params = params or {}
    if not isinstance(params, dict):
        raise UnmergeError(f"{what}: parameters must be a mapping")
    unknown = sorted(set(params) - set(spec.per_model), key=str)
    if unknown:
        raise UnmergeError(f"{what}: unknown per-model parameter {short(unknown[0])} for {spec.name!r}; "
                           f"per-model parameters: {', '.join(sorted(spec.per_model))}")
    return dict(params)
