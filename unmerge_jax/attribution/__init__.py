"""Attribution you can trust: which dictionary entries a merged model holds, how it was merged,
and how much of it nothing in the dictionary explains — decisions, not only coefficients.

* :mod:`~unmerge_jax.attribution.signatures` — the per-block statistics a pass accumulates beside
  the Gram statistics (exact zeros, TIES-consistency sums) and the per-tensor trimming thresholds.
* :mod:`~unmerge_jax.attribution.shares` — left-out energy shares, the null and chance ratios, in Gram space.
* :mod:`~unmerge_jax.attribution.ties` — the TIES-consistent weights (method-aware decomposition).
* :mod:`~unmerge_jax.attribution.rules` — the decision rules and their calibrated thresholds.
* :mod:`~unmerge_jax.attribution.decide` — :func:`evidence` (the rule-independent statistics) and
  :func:`attribute`, the decisions for every target.
* :mod:`~unmerge_jax.attribution.calibrate` — synthetic and trained-preset problems, scoring against the truth,
  calibration of the thresholds on some seeds and the hold-out report on others.
"""

from unmerge_jax.attribution.decide import (ABSENT, CALIBRATED_SEEDS, DECISIONS, METHOD_ALIASES, PRESENT,  # noqa: F401
                                            UNCERTAIN, Attribution, Evidence, attribute, dare_noise, evidence)
from unmerge_jax.attribution.rules import DEFAULT_RULES, Rules  # noqa: F401
from unmerge_jax.attribution.shares import (Shares, chance_ratio, drop_shares, fit_subset, group_heterogeneity,  # noqa: F401
                                            nnls_active_set,
                                            null_ratio, null_ratio_matrix)
from unmerge_jax.attribution.signatures import (DENSITY_GRID, SignatureStats, add_signatures, empty_signatures,  # noqa: F401
                                                signature_block, signature_stats, trim_thresholds)
from unmerge_jax.attribution.ties import TiesFit, simplex_qp, ties_drop_shares, ties_fit  # noqa: F401
