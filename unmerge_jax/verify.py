"""``unmerge verify``: does a merged model match the recipe it claims?

A recipe is a mergekit YAML (``merge_method``, ``base_model``, ``models`` with their ``weight`` /
``density``, ``parameters``) — given as a file, or as the ```` ```yaml ```` block of the model card
(``README.md``) that mergekit and ``unmerge merge`` write beside the model. :func:`load_recipe`
reads it with the merge engine's own config parser (:func:`~unmerge_jax.merge.config.load_config`,
which validates it and resolves the model paths); the models may be model directories or PEFT
adapter directories, the base is ``base_model``.

:func:`verify_files` decomposes the model against the recipe's models over its base — the
attribution pass (:func:`unmerge_jax.pipeline.attribute_files`: one streaming pass, bootstrap
replicates and method signatures, then the decisions of :mod:`unmerge_jax.attribution`) — and
:func:`check_claims` compares every claim of the recipe with what the attribution found:

* ``present:NAME`` — each listed model is decided *present* (a model listed with weight 0 is
  claimed absent). *Uncertain* does not confirm a claim.
* ``weight:NAME`` — the claimed weight, after the method's normalisation, lies inside the
  attribution's interval widened by ``Tolerance.weight_atol``. What is comparable depends on the
  method (the table in ``docs/verify.md``):

  ======================== ======================================= =====================================
  recipe method            claimed (effective coefficient of δ_k)  found
  ======================== ======================================= =====================================
  ``linear``               ``w_k / Σw`` (``normalize``, default)   NNLS weights, bootstrap CI
  ``task_arithmetic``      ``λ w_k`` (``/ Σw`` with ``normalize``) NNLS weights, bootstrap CI
  ``dare_linear``          ``λ w_k`` (``/ Σw`` with ``normalize``) NNLS weights, bootstrap CI (unbiased:
                                                                   E[mask/ρ] = 1)
  ``ties`` (``normalize``) ``w_k / Σw`` (λ = 1)                    TIES-consistent weights (sum 1), no CI
  ``dare_ties``            ``w_k / Σw``                            NNLS weights / their sum (approximate:
                                                                   sign election drops disagreeing
                                                                   entries)
  ======================== ======================================= =====================================

  Not checkable (stated, not failed): negative weights (the decomposition is non-negative),
  weights that vary per tensor (gradients, ``filter`` lists), TIES without ``normalize``, with
  λ ≠ 1 or with per-model densities that differ (then its unexplained share is not checked either:
  the TIES-consistency sums use one density), and every method the attribution does not model.
* ``density`` — TIES: the identified density ρ̂ (on the signature grid) within half a grid step of
  the claimed one; DARE's density is estimated only roughly (from the zero fraction) and is
  reported, not checked.
* ``unexplained`` — no substantial content beyond the listed models: the attribution's verdict is
  *known* (its unexplained share ``U`` at most the rule's threshold for the identified method).
* ``method`` — the recipe's method family equals the identified one. Task arithmetic and linear
  are one family (with weights summing to 1 they are the same formula, so no statistic tells them
  apart); ``dare_linear`` and ``dare_ties`` are both ``dare``. Methods outside these families
  (``ram``, ``slerp``, ``della``, ``breadcrumbs``, ...) are *not checkable*: presence is still
  checked, weights, method and unexplained content are not.

The model is *consistent* with its recipe when every checkable claim holds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from unmerge_jax.attribution.decide import DECISIONS
from unmerge_jax.errors import UnmergeError
from unmerge_jax.merge.card import CARD_NAME, parse_card
from unmerge_jax.merge.config import MergeConfig, load_config, resolve_for_tensor

# The recipe's merge method → the family the attribution identifies (None: not modelled).
METHOD_FAMILIES = {"linear": "task_arithmetic", "task_arithmetic": "task_arithmetic", "ties": "ties",
                   "dare_linear": "dare", "dare_ties": "dare"}
# Methods whose comparable weights are normalised to sum 1 on both sides.
_NORMALISED = ("ties", "dare_ties")
MAX_CARD_BYTES = 4 << 20


class Tolerance(NamedTuple):
    """How far a found value may sit from the claimed one and still confirm it.

    Attributes:
      weight_atol: absolute slack around the found weight's interval (the interval alone is
        ~1e-10 wide for an exact merge, and TIES-consistent weights have none).
      density_atol: TIES density: half the step of the signature grid (0.1).
    """

    weight_atol: float = 0.02
    density_atol: float = 0.05 + 1e-9


DEFAULT_TOLERANCE = Tolerance()


class RecipeModel(NamedTuple):
    """One model of a recipe: ``name`` (unique, the directory's name), resolved ``path``, its
    ``parameters`` as written."""

    name: str
    path: Path
    parameters: dict


class Recipe(NamedTuple):
    """A merge recipe, parsed and validated.

    Attributes:
      merge_method: mergekit name. base_model: resolved path (None if the recipe has none).
      models: the listed models that contribute a task vector (:class:`RecipeModel`).
      in_base_weight: the summed weight of models that are the base itself (``linear`` averages
        them in: they count in ``Σw`` but add no task vector).
      config: the :class:`~unmerge_jax.merge.config.MergeConfig`.
      source: the file the recipe came from; from_card: whether it was a model card's YAML block.
    """

    merge_method: str
    base_model: Path | None
    models: tuple
    in_base_weight: float
    config: MergeConfig
    source: Path | None
    from_card: bool

    @property
    def family(self) -> str | None:
        return METHOD_FAMILIES.get(self.merge_method)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]


class Claim(NamedTuple):
    """One claim of a recipe and its check.

    Attributes:
      name: ``present:NAME``, ``weight:NAME``, ``density``, ``unexplained`` or ``method``.
      claimed: what the recipe says (a string or a number).
      found: what the attribution found (a string or a number; None when not checkable).
      ok: True (confirmed), False (contradicted) or None (not checkable).
      reason: one line: how the two were compared, or why it cannot be checked.
      interval: ``(lo, hi)`` the found value's interval where one exists.
    """

    name: str
    claimed: Any
    found: Any
    ok: bool | None
    reason: str
    interval: tuple | None = None

    @property
    def verdict(self) -> str:
        return {True: "ok", False: "INCONSISTENT", None: "not checkable"}[self.ok]


class VerifyReport(NamedTuple):
    """The verdicts of :func:`check_claims`.

    Attributes:
      claims: the :class:`Claim` list, in the order presence, weights, density, unexplained, method.
      consistent: every checkable claim holds.
      target: the model's name in the attribution. method: the recipe's merge method.
      attribution: the per-target record of the attribution (``Attribution.records()[t]``).
      recipe: the file the recipe was read from (a YAML or a model card).
      warnings: the statistics' warnings (e.g. two listed models with the same task vector: the
        weight is split between them), one line each.
    """

    claims: tuple
    consistent: bool
    target: str
    method: str
    attribution: dict
    recipe: str = ""
    warnings: tuple = ()

    @property
    def failed(self) -> list[Claim]:
        return [c for c in self.claims if c.ok is False]

    def to_dict(self) -> dict:
        """JSON-ready: ``consistent``, ``target``, ``method``, ``claims`` [{name, claimed, found, ok,
        verdict, reason, interval}], ``failed`` (names) and ``attribution``."""
        return {"consistent": bool(self.consistent), "target": self.target, "method": self.method,
                "recipe": self.recipe,
                "claims": [{"name": c.name, "claimed": _json(c.claimed), "found": _json(c.found), "ok": c.ok,
                            "verdict": c.verdict, "reason": c.reason,
                            "interval": None if c.interval is None else [_json(x) for x in c.interval]}
                           for c in self.claims],
                "failed": [c.name for c in self.failed], "warnings": list(self.warnings),
                "attribution": self.attribution}


def _json(x):
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


# ----------------------------------------------------------------------------------------------
# recipes
# ----------------------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_CARD_BYTES:
            raise UnmergeError(f"recipe {path} is {path.stat().st_size:,} bytes; a recipe or model card is at most "
                               f"{MAX_CARD_BYTES:,} — is this the right file?")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UnmergeError(f"recipe {path} is not UTF-8 text (byte {err.start}); give a YAML file or a README.md") \
            from None
    except OSError as err:
        from unmerge_jax.io.atomic import os_error

        raise os_error(err, path, "read") from None


def _is_card(path: Path, text: str) -> bool:
    return path.suffix.lower() in (".md", ".markdown") or (text.lstrip().startswith("---") and "```" in text)


def load_recipe(recipe=None, model_dir=None, *, base=None) -> Recipe:
    """Parse a recipe: a mergekit YAML file, a model card, or the card inside ``model_dir``.

    Args:
      recipe: a YAML file; a ``README.md`` model card (its ```` ```yaml ```` block); a directory
        (its ``README.md``); or None — then ``model_dir``'s ``README.md``.
      model_dir: the merged model (only used to find its card when ``recipe`` is None).
      base: the base model directory, overriding the recipe's ``base_model`` (needed for a
        recipe without one, e.g. ``linear`` of full weights).

    Returns:
      :class:`Recipe`.

    Raises:
      UnmergeError: no recipe found, a card without a YAML block, or a config the merge engine
        refuses — including a model or base directory that is not on disk, named by its path.
    """
    if recipe is None:
        if model_dir is None:
            raise UnmergeError("give a recipe (a mergekit YAML or a model card) or a model directory with a README.md")
        recipe = Path(model_dir)
    path = Path(recipe)
    if path.is_dir():
        card = path / CARD_NAME
        if not card.is_file():
            raise UnmergeError(f"{path} has no {CARD_NAME} model card to read the recipe from; give the mergekit YAML "
                               f"as RECIPE")
        path = card
    if not path.exists():
        raise UnmergeError(f"recipe {path} does not exist")
    text = _read_text(path)
    from_card = _is_card(path, text)
    if from_card:
        block = parse_card(text, str(path)).config_yaml
        try:
            cfg = load_config(block)
        except UnmergeError as err:
            raise UnmergeError(f"{path}: {err}") from None
    else:
        cfg = load_config(path)
    base_path = Path(base).resolve() if base is not None else cfg.base_model
    if base_path is None:
        raise UnmergeError(f"recipe {path} has no base_model; give --base DIR (the model the listed models were "
                           f"fine-tuned from) to decompose against")
    if not base_path.is_dir():
        raise UnmergeError(f"base model directory {base_path} does not exist")
    res = resolve_for_tensor(cfg, "", 0.0)
    models, in_base, seen = [], 0.0, {}
    for i, (p, prm) in enumerate(cfg.models):
        if Path(p).resolve() == base_path.resolve():
            in_base += float(res.weights[i])
            continue
        name = Path(p).name
        if name in seen:
            name = f"{Path(p).parent.name}/{name}" if Path(p).parent.name else f"{name}#{i}"
        seen[name] = p
        models.append(RecipeModel(name, Path(p), dict(prm)))
    if not models:
        raise UnmergeError(f"recipe {path}: every listed model is the base; there is nothing to verify")
    return Recipe(cfg.merge_method, base_path, tuple(models), in_base, cfg, path.resolve(), from_card)


# ----------------------------------------------------------------------------------------------
# claims
# ----------------------------------------------------------------------------------------------
def _varies(value) -> bool:
    return isinstance(value, (list, dict))


def claimed_weights(recipe: Recipe):
    """The recipe's comparable weights, one per model, after the method's normalisation (module
    docstring's table), or ``(None, reason)`` when they cannot be compared.

    Returns:
      ``(weights (K,) float64 | None, reason)``; ``reason`` states the normalisation used.
    """
    cfg, fam, method = recipe.config, recipe.family, recipe.merge_method
    if fam is None:
        return None, f"the attribution does not model {method}"
    per_model = [p for _, p in cfg.models]
    if any(_varies(v) for v in cfg.parameters.values()) or any(_varies(v) for p in per_model for v in p.values()):
        return None, "weights vary per tensor (gradient or filter list); the decomposition fits one weight per model"
    res = resolve_for_tensor(cfg, "", 0.0)
    base = recipe.base_model.resolve()
    keep = [i for i, (p, _) in enumerate(cfg.models) if Path(p).resolve() != base]
    w = np.asarray(res.weights, np.float64)[keep]
    if np.any(w < 0):
        return None, "a negative weight: the decomposition is non-negative (NNLS), so it is not compared"
    lam = float(res.shared.get("lambda", 1.0))
    normalize = bool(res.shared.get("normalize", False))
    total = float(np.sum(w)) + recipe.in_base_weight
    if method == "ties":
        if np.ptp(np.asarray(res.density, np.float64)[keep]) > 0:
            return None, "per-model TIES densities differ; the TIES-consistency sums use one density for all"
        if not normalize:
            return None, "TIES without normalize is not what the TIES-consistent weights model"
        if abs(lam - 1.0) > 1e-12:
            return None, f"TIES with lambda {lam:g}: the TIES-consistency equations are solved at lambda 1"
        return w / np.sum(w), "w/sum(w), against the TIES-consistent weights (sum 1)"
    if method == "dare_ties":
        return w / np.sum(w), "w/sum(w), against the fitted weights over their sum (approximate for dare_ties)"
    scale = lam / total if normalize else lam
    how = ("w/sum(w)" if method == "linear" else f"{'lambda*' if lam != 1 else ''}w/sum(w)") if normalize else \
        (f"lambda*w (lambda {lam:g})" if lam != 1 else "w")
    return w * scale, f"{how}, against the fitted weights"


def _family_text(fam: str) -> str:
    return {"task_arithmetic": "task_arithmetic/linear", "ties": "ties", "dare": "dare (dare_linear/dare_ties)"}[fam]


def check_claims(recipe: Recipe, attribution, *, target: int | str = 0,
                 tolerance: Tolerance = DEFAULT_TOLERANCE) -> VerifyReport:
    """Compare every claim of ``recipe`` with an attribution of the merged model.

    Args:
      recipe: :class:`Recipe` (:func:`load_recipe`).
      attribution: :class:`~unmerge_jax.attribution.Attribution` whose dictionary holds the
        recipe's models by name (extra entries are allowed and ignored) and whose targets hold the
        model.
      target: the model's index or name among the attribution's targets.
      tolerance: :class:`Tolerance`.

    Returns:
      :class:`VerifyReport`; ``consistent`` is True when no checkable claim is contradicted.
    """
    at = attribution
    t = at.target_names.index(target) if isinstance(target, str) else int(target)
    if not 0 <= t < len(at.target_names):
        raise UnmergeError(f"target {target} is not among the attribution's {len(at.target_names)} targets")
    missing = [n for n in recipe.names if n not in at.atom_names]
    if missing:
        raise UnmergeError(f"recipe model {missing[0]} is not in the attribution's dictionary "
                           f"{list(at.atom_names)}; decompose against the recipe's models")
    idx = [at.atom_names.index(n) for n in recipe.names]
    fam = recipe.family
    found_method = str(at.method[t])
    weights, how = claimed_weights(recipe)
    claims = []

    # Presence: listed with weight > 0 → present; weight 0 → absent.
    raw = np.asarray(resolve_for_tensor(recipe.config, "", 0.0).weights, np.float64)
    base = recipe.base_model.resolve()
    raw = raw[[i for i, (p, _) in enumerate(recipe.config.models) if Path(p).resolve() != base]]
    for m, k, wk in zip(recipe.models, idx, raw):
        dec = DECISIONS[int(at.decision[t, k])]
        share = float(at.share[t, k])
        want = "absent" if wk == 0 else "present"
        ok = (dec != "present") if want == "absent" else (dec == "present")
        if ok:
            reason = f"decided {dec} (share {share:.4g}, floor {float(at.floor[t, k]):.3g})"
        elif dec == "uncertain":
            lo_k, hi_k = float(at.share_lo[t, k]), float(at.share_hi[t, k])
            reason = (f"uncertain: its share's interval [{lo_k:.3g}, {hi_k:.3g}] reaches below the floor "
                      f"{float(at.floor[t, k]):.3g}, so its presence is not confirmed")
        elif want == "present":
            reason = f"decided absent: share {share:.3g} below the floor {float(at.floor[t, k]):.3g}"
        else:
            reason = f"listed with weight 0 but decided present (share {share:.3g})"
        claims.append(Claim(f"present:{m.name}", want, dec, ok, reason))

    # Weights after the method's normalisation.
    if weights is None:
        for m in recipe.models:
            claims.append(Claim(f"weight:{m.name}", None, None, None, how))
    else:
        found = np.asarray(at.weights[t, idx], np.float64)
        lo = np.asarray(at.coef_lo[t, idx], np.float64)
        hi = np.asarray(at.coef_hi[t, idx], np.float64)
        normalised = recipe.merge_method in _NORMALISED
        interval_ok = found_method in ("task_arithmetic", "dare")   # the CI is of the NNLS coefficients
        if normalised:
            s = float(np.sum(found))
            found, lo, hi = (found / s, lo / s, hi / s) if s > 0 else (found, lo, hi)
        for m, wk, fk, lk, hk in zip(recipe.models, weights, found, lo, hi):
            if interval_ok and np.isfinite(lk) and np.isfinite(hk):
                a, b = min(lk, fk), max(hk, fk)
                inside = a - tolerance.weight_atol <= wk <= b + tolerance.weight_atol
                band = f"CI [{lk:.4g}, {hk:.4g}] ± {tolerance.weight_atol:g}"
                interval = (float(lk), float(hk))
            else:
                inside = abs(wk - fk) <= tolerance.weight_atol
                band = f"± {tolerance.weight_atol:g} (no interval for {found_method} weights)"
                interval = None
            reason = f"{how}: claimed {wk:.4g}, found {fk:.4g}, {band}"
            claims.append(Claim(f"weight:{m.name}", float(wk), float(fk), bool(inside), reason, interval))

    # Density.
    res = resolve_for_tensor(recipe.config, "", 0.0)
    dens = np.asarray(res.density, np.float64)
    if recipe.merge_method == "ties":
        if np.ptp(dens) > 0:
            claims.append(Claim("density", dens.tolist(), None, None,
                                "per-model densities differ; the attribution estimates one density"))
        elif found_method != "ties":
            claims.append(Claim("density", float(dens[0]), None, None,
                                f"the model reads as {found_method}, so no TIES density was estimated"))
        else:
            rho = float(at.density[t])
            ok = abs(rho - float(dens[0])) <= tolerance.density_atol
            claims.append(Claim("density", float(dens[0]), rho, bool(ok),
                                f"identified TIES density {rho:g} (grid step 0.1) vs claimed {dens[0]:g}"))
    elif fam == "dare":
        rho = float(at.density[t]) if found_method == "dare" else float("nan")
        claims.append(Claim("density", float(dens[0]) if np.ptp(dens) == 0 else dens.tolist(),
                            None if math.isnan(rho) else rho, None,
                            "DARE's density is estimated roughly from the zero fraction; reported, not checked"))

    # Unexplained content.
    u = float(at.unexplained[t])
    cat = str(at.category[t])
    level = float(at.rules.known(found_method))
    if fam is None:
        claims.append(Claim("unexplained", "none", u, None,
                            f"the rules model task arithmetic, TIES and DARE only, not {recipe.merge_method}"))
    elif recipe.merge_method == "ties" and np.ptp(dens) > 0:
        claims.append(Claim("unexplained", "none", u, None,
                            "per-model TIES densities differ: one TIES density cannot explain the whole model, "
                            "so the remainder is not evidence of other content"))
    else:
        ok = cat == "known"
        reason = (f"verdict {cat}: {u:.3g} of the model's update is not explained by the listed models "
                  f"(known if ≤ {level:g} for {found_method})")
        claims.append(Claim("unexplained", f"<= {level:g}", u, ok, reason))

    # Method.
    if fam is None:
        claims.append(Claim("method", recipe.merge_method, found_method, None,
                            f"{recipe.merge_method} is not one of the methods the attribution identifies "
                            f"(task_arithmetic/linear, ties, dare)"))
    else:
        conf = float(at.method_confidence[t])
        ok = found_method == fam
        note = " (task_arithmetic and linear are indistinguishable)" if fam == "task_arithmetic" else \
            " (dare_linear and dare_ties are both dare)" if fam == "dare" else ""
        claims.append(Claim("method", recipe.merge_method, found_method, bool(ok),
                            f"identified {found_method} with confidence {conf:.2f}; claimed family "
                            f"{_family_text(fam)}{note}"))
    consistent = not any(c.ok is False for c in claims)
    return VerifyReport(tuple(claims), consistent, at.target_names[t], recipe.merge_method, at.records()[t],
                        str(recipe.source or ""))


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------
def verify_files(recipe=None, model_dir=None, *, base=None, seeds: int = 200, key: int = 0, top_k=None,
                 scope: str = "group", modules=None, tolerance: Tolerance = DEFAULT_TOLERANCE, json_out=None,
                 progress: bool = True, **stats_kw) -> VerifyReport:
    """``unmerge verify``: decompose ``model_dir`` against its recipe's models and check every claim.

    Args:
      recipe: as :func:`load_recipe` (None: ``model_dir``'s ``README.md``).
      model_dir: the merged model directory (None: ``recipe`` must be that directory).
      base: override the recipe's ``base_model``.
      seeds, key: bootstrap replicates and their seed (the rules were calibrated with 200).
      top_k, scope, modules, **stats_kw: the statistics pass's options, as ``unmerge decompose``.
      tolerance: :class:`Tolerance`.
      json_out: also write :meth:`VerifyReport.to_dict` as JSON here (atomically, never over an input).

    Returns:
      :class:`VerifyReport` (``consistent`` → exit 0, else 1).
    """
    from unmerge_jax import pipeline
    from unmerge_jax.pipeline import attribute_files

    if model_dir is None:
        if recipe is None or not Path(recipe).is_dir():
            raise UnmergeError("give the merged model directory (MODEL_DIR), or RECIPE MODEL_DIR")
        model_dir = recipe
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UnmergeError(f"model directory {model_dir} does not exist")
    r = load_recipe(recipe, model_dir, base=base)
    inputs = [r.source, r.base_model, model_dir, *[m.path for m in r.models]]
    pipeline.check_options(seeds=seeds, key=key, top_k=top_k, modules=modules, **stats_kw)
    pipeline.check_outputs([inputs], [json_out])
    dictionary = [(m.name, m.path) for m in r.models]
    out = attribute_files(r.base_model, dictionary, [("model", model_dir)], seeds=seeds, key=key, top_k=top_k,
                          scope=scope, modules=modules, progress=progress, **stats_kw)
    report = check_claims(r, out.attribution, target=0, tolerance=tolerance)
    report = report._replace(warnings=tuple(getattr(out.result, "warnings", None) or ()))
    if json_out is not None:
        from unmerge_jax.io.atomic import atomic_file

        with atomic_file(json_out, inputs=inputs) as tmp:
            tmp.write_text(json.dumps({**report.to_dict(), "model": str(model_dir)}, indent=2))
    return report


def format_report(report: VerifyReport, model_name: str = "") -> list[str]:
    """The lines ``unmerge verify`` prints: one per claim, then the overall verdict."""
    lines = [f"verify {model_name or report.target} against {report.recipe or 'its recipe'} "
             f"(merge_method {report.method})"]
    width = max(len(c.name) for c in report.claims)
    for c in report.claims:
        lines.append(f"  {c.name:<{width}}  {c.verdict:<13}  {c.reason}")
    bad = [c.name for c in report.failed]
    if report.consistent:
        n = sum(c.ok is True for c in report.claims)
        lines.append(f"consistent: all {n} checkable claims hold" +
                     (f" ({sum(c.ok is None for c in report.claims)} not checkable)"
                      if any(c.ok is None for c in report.claims) else ""))
    else:
        lines.append(f"INCONSISTENT: {len(bad)} claim(s) contradicted: {', '.join(bad)}")
    return lines
