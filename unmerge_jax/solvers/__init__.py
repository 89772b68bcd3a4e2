"""Registry of Gram-space solvers.

Each entry says which parameters are *swept* (arrays: a whole grid runs through one compiled
program) and which are *static* (they fix shapes or code paths: ``positive``, ``tol``, OMP's
``max_atoms``...). The CLI's ``--method`` choices, :func:`unmerge_jax.solve`, the sweep and the
shared solver tests all read this dict.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from unmerge_jax.solvers.common import (Problem, SolverResult, gram_is_well_posed, masked_solve, psd_solve,
                                        quad_objective)
from unmerge_jax.solvers.dot import cosine_scores, dot
from unmerge_jax.solvers.enet import elastic_net, enet_gap, enet_objective, lasso
from unmerge_jax.solvers.nnls import nnls, nnls_kkt
from unmerge_jax.solvers.omp import omp
from unmerge_jax.solvers.ridge import ridge
from unmerge_jax.solvers.support import support_solve


class SolverSpec(NamedTuple):
    """How to call one solver.

    Attributes:
      fn: ``fn(problem, *swept, **static) -> SolverResult``.
      swept: names of array hyper-parameters, in positional order.
      defaults: default value of every parameter (swept and static).
      summary: one line for ``--help``.
    """

    fn: Callable
    swept: tuple
    defaults: dict
    summary: str


_ITER = {"tol": 1e-10, "max_iter": 20000}

SOLVERS: dict[str, SolverSpec] = {
    "nnls": SolverSpec(nnls, (), dict(_ITER),
                       "non-negative least squares, min_{a>=0} ||v - Da||^2 (no hyper-parameters)"),
    "omp": SolverSpec(omp, ("n_nonzero_coefs",), {"n_nonzero_coefs": None, "max_atoms": None},
                      "orthogonal matching pursuit with n_nonzero_coefs atoms (default: K/10, at least 1, as scikit-learn)"),
    "lasso": SolverSpec(lasso, ("alpha",), {"alpha": 1e-6, "positive": True, **_ITER},
                        "(1/2n)||v - Da||^2 + alpha ||a||_1 (scikit-learn Lasso; positive=True by default)"),
    "elastic_net": SolverSpec(elastic_net, ("alpha", "l1_ratio"),
                              {"alpha": 1e-6, "l1_ratio": 0.5, "positive": True, **_ITER},
                              "(1/2n)||v - Da||^2 + alpha*l1_ratio ||a||_1 + alpha*(1-l1_ratio)/2 ||a||^2 (scikit-learn ElasticNet)"),
    "ridge": SolverSpec(ridge, ("alpha",), {"alpha": 1e-6},
                        "||v - Da||^2 + alpha ||a||^2 (scikit-learn Ridge, Cholesky)"),
    "dot": SolverSpec(dot, ("threshold",), {"threshold": 0.05, "coef": "lstsq"},
                      "select atoms with cosine(v, d_i) >= threshold; least-squares coefficients on them"),
}

# Programs that run several families as lanes of one compiled program (``unmerge_jax.sweep`` maps
# families onto them). Not user-facing methods: ``--method`` and ``solve`` read SOLVERS.
SHARED_PROGRAMS: dict[str, SolverSpec] = {
    "support_solve": SolverSpec(support_solve, ("alpha", "threshold", "by_score"),
                                {"alpha": 0.0, "threshold": 0.0, "by_score": 0.0, "coef": "lstsq"},
                                "ridge and dot-product thresholding as lanes of one masked solve"),
}


def program_spec(name: str) -> SolverSpec:
    """The spec of a compiled solver program: a solver of SOLVERS or a shared program."""
    return SOLVERS[name] if name in SOLVERS else SHARED_PROGRAMS[name]


ALIASES = {"elasticnet": "elastic_net", "enet": "elastic_net", "elastic-net": "elastic_net",
           "dot_product": "dot", "dotproduct": "dot", "dot-product": "dot"}

__all__ = ["SOLVERS", "SHARED_PROGRAMS", "program_spec", "ALIASES", "SolverSpec", "Problem", "SolverResult", "nnls", "omp", "lasso",
           "elastic_net", "ridge", "dot", "nnls_kkt", "enet_gap", "enet_objective", "cosine_scores",
           "masked_solve", "psd_solve", "quad_objective", "gram_is_well_posed"]
