"""The decision rules, written down: every threshold, what it is compared with, and where it came from.

Notation, per target v (all from the Gram statistics, their bootstrap replicates and the
signature sums of :mod:`~unmerge_jax.attribution.signatures`; the truth is never read):

* ``u`` — NNLS unexplained share ``‖v − Da‖²/‖v‖²`` over all entries; ``s_k`` — left-out share of
  entry k (:mod:`~unmerge_jax.attribution.shares`: the drop in fit when k is removed and the rest
  refitted, in Gram space), ``s_k^lo``/``s_k^hi`` its ``lo``/``hi`` bootstrap quantiles.
* ``r_k`` — the chance ratio of entry k (:func:`~unmerge_jax.attribution.shares.chance_ratio`,
  from ``G`` alone): the share k takes of another dictionary entry held out as a target, per unit
  of that target's unexplained energy — the second largest such ratio (the largest is k's closest
  relative *in* the dictionary, which takes its own content back), never below the dictionary's
  median. With ``robust_null=False``, the largest (:func:`~unmerge_jax.attribution.shares.null_ratio`).
* ``q_ρ`` — TIES-unexplained share at density ρ (:mod:`~unmerge_jax.attribution.ties`),
  ``ρ̂ = argmin q_ρ`` over the density grid, ``q = q_ρ̂``; ``t_k`` — the TIES left-out share.
* ``f0`` — fraction of the active rows where the target is exactly zero; ``n`` — active rows.
* ``ν`` — DARE's expected drop-and-rescale share ``(1/ρ_D − 1) Σ_k a_k² G_kk / ‖v‖²`` (NNLS
  coefficients a, capped at u), ``ρ_D = 1 − f0^{1/m}`` with m the entries whose point share is at
  least ``major · max_k s_k`` (an entry is zero where all m merged models dropped it).

**1. Method.** TIES if ``q ≤ ties_ratio · u`` and (``f0 > 0`` or ``q ≤ ties_ratio_nozero · u``): a
TIES merge of dictionary entries satisfies its consistency equations almost exactly, while least
squares on the untrimmed entries leaves the trimming and the disjoint mean unexplained. Otherwise
DARE if ``f0 > 0`` (entries left exactly at the base; DARE drops them whatever their size) and the
target holds the drop noise those zeros imply, ``u ≥ dare_noise_min · ν``; else task arithmetic /
linear (with uniform weights summing to 1 the two are the same formula, so they are reported
together). Dense fine-tunes merged in float32 leave no exact zeros, but a merge *stored* in
bfloat16 or float16 does: wherever the merged change is below half a unit in the last place of the
base's value it rounds back to the base, and fine-tunes published in bfloat16 carry such zeros of
their own. Those zeros are not drops: a DARE merge that drops a fraction ``f0`` of the rows must
also rescale the rows it keeps, which leaves ν of the target unexplained (u/ν ≥ 0.89 on the
synthetic preset's DARE targets, seeds 0–11; sign election and outside content only add to u),
while a rounded task-arithmetic merge leaves only its rounding error (u/ν ≤ 5e-3 on bfloat16
merges of the tests' and ``bench/scale.py``'s adapters). ``dare_noise_min`` is fixed by hand
about an order of magnitude below the DARE targets' lowest ratio. The density: ρ̂ for TIES; for DARE
``1 − f0^{1/n}`` with n the present entries whose share is at least ``major · max_k s_k``.

**2. Presence.** The *outside share* is ``O = u`` (task arithmetic), ``q`` (TIES) or
``max(u − noise_scale · ν, 0)`` (DARE: the drop noise is not outside content; ``noise_scale``
corrects ν's model, which ignores sign election, by the ratio ``u/ν`` of known DARE merges, where
all of u is noise). An absent entry's chance share is ``c_k = r_k · O + noise_dare · ν / n``:
outside content projects onto k at the chance ratio, DARE noise — zero-mean, spread over the n
active rows — at about one direction in n. A target holds dictionary content only if it passes
the *gate*, three conditions on the whole fit:

* some entry's share is far above chance, ``(L_k − eps) / c_k > gate_m``,
* and one such entry enters every tensor group with one weight: its heterogeneity ``η_k ≤
  hetero_m`` (:func:`~unmerge_jax.attribution.shares.group_heterogeneity`: the share of what k
  explains group by group — per (layer, module) — that a single coefficient does not). Content
  merged from k has one weight everywhere (η near 0); an outside fine-tune that projects onto k
  does so with a coefficient that changes from group to group, and can pass the first condition
  with an explained share as large as real content's. With one group (array inputs) η = 0 and the
  condition always holds;
* and the dictionary explains a substantial part of the target: ``E = (1 − u) / (1 − u + O) >
  explained_m`` (:func:`~unmerge_jax.attribution.decide.explained_share`; of the energy NNLS leaves,
  only O is outside content, the rest the method's own distortion or noise). A fine-tune outside
  the dictionary can project onto one entry at many times that entry's chance share (the first
  condition is then met) while the projection explains only a few per cent of the target (the
  ``small`` preset's *dedup* onto *copy*: E ≤ 0.09), where content merged from the dictionary
  explained ≥ 0.10 on every calibration problem.

Then entry k is

* present if the gate passes and ``L_k > φ_k = floor_m · c_k + eps``,
* uncertain if not present but ``H_k > φ_k``,
* absent otherwise,

with ``(L_k, H_k) = (s_k^lo, s_k^hi)`` for task arithmetic and DARE (bootstrap interval of the
share) and ``(t_k, 2 t_k)`` for TIES (a point value; the TIES sums have no replicates, so the band
is a factor of two, not an interval). With ``ties_gate_on_ties=False`` a TIES target's gate uses
the NNLS ``s_k^lo`` against ``r_k · u`` instead.

**3. Unknown content.** With P the present entries, refit the model on P: task arithmetic
``U = u(P)``; TIES ``U = q(P)`` at ρ̂; DARE ``U = u(P) − (1/ρ̂ − 1) Σ_{k∈P} a_k² G_kk / ‖v‖²``
(a DARE merge of the present entries leaves, in expectation, exactly the dropped-and-rescaled
noise ``(1/ρ − 1) Σ w_k² ‖d_k‖²`` unexplained; the rest is content no entry explains). ``U`` (in
[0, 1]) is the reported unexplained share.

**4. Verdict.** unknown if P is empty; known if ``U ≤ known_m``; mixed otherwise.

The thresholds below come from :func:`unmerge_jax.attribution.calibrate.calibrate` on
:data:`CALIBRATION` — the synthetic preset's seeds 0–4, the trained ``tiny`` preset's seeds 0–6
and the ``small`` preset's seed 3, compressed and full problems pooled (each set halfway, in
log scale, between the two classes it separates, or at the fewest weighted errors where they
overlap; ``hetero_m`` on the targets that clear ``gate_m``, ``explained_m`` on those that clear
both; ``noise_dare`` the grid value with the fewest errors, ``noise_scale`` the upper quartile of
``u/ν``); ``ties_ratio_nozero``, ``dare_noise_min``, ``major``, ``eps`` and the quantiles are fixed by hand. The
figures on :data:`HELD_OUT` (tiny seeds 7–8, small seeds 4–5: never run while the rules were chosen)
are ``docs/attribution.md``'s, "Figures at held-out seeds".
"""

from __future__ import annotations

from typing import NamedTuple


class Rules(NamedTuple):
    """Thresholds of the decision rules (module docstring). Hashable; ``_replace`` to change one."""

    ties_ratio: float = 0.4
    ties_ratio_nozero: float = 0.1
    dare_noise_min: float = 0.1
    gate_ta: float = 11.0
    gate_dare: float = 1.8
    gate_ties: float = 22.0
    floor_ta: float = 6.0
    floor_dare: float = 0.37
    floor_ties: float = 16.0
    known_ta: float = 0.0017
    known_dare: float = 0.13
    known_ties: float = 0.0011
    explained_ta: float = 0.0
    explained_dare: float = 0.097
    explained_ties: float = 0.32
    hetero_ta: float = 0.083
    hetero_dare: float = 0.23
    hetero_ties: float = 0.44
    noise_dare: float = 10.0
    noise_scale: float = 1.2
    robust_null: bool = True
    ties_gate_on_ties: bool = True
    major: float = 0.02
    eps: float = 1e-6
    lo: float = 0.05
    hi: float = 0.95
    ci: float = 0.95

    def gate(self, method: str) -> float:
        return getattr(self, f"gate_{_key(method)}")

    def floor(self, method: str) -> float:
        return getattr(self, f"floor_{_key(method)}")

    def known(self, method: str) -> float:
        return getattr(self, f"known_{_key(method)}")

    def explained(self, method: str) -> float:
        return getattr(self, f"explained_{_key(method)}")

    def hetero(self, method: str) -> float:
        return getattr(self, f"hetero_{_key(method)}")


def _key(method: str) -> str:
    return {"task_arithmetic": "ta", "linear": "ta", "ties": "ties", "dare": "dare"}[method]


DEFAULT_RULES = Rules()
# The problems DEFAULT_RULES were calibrated on (reports say whether a run is one of them).
CALIBRATION = {"presets": {"synthetic": (0, 1, 2, 3, 4), "tiny": (0, 1, 2, 3, 4, 5, 6), "small": (3,)},
               "variants": ("compressed", "full")}
# Seeds the rules are reported on and were never run while they were chosen (docs/attribution.md,
# "Figures at held-out seeds").
HELD_OUT = {"tiny": (7, 8), "small": (4, 5)}

# Method names the decisions report (task arithmetic and linear are one formula here).
METHODS = ("task_arithmetic", "ties", "dare")
CATEGORIES = ("known", "mixed", "unknown")
