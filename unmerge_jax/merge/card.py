"""The model card a merge writes (``README.md``), in mergekit's layout, and reading a card back.

A card written by ``mergekit-yaml`` (mergekit 0.1.5, ``mergekit/card.py``) is a Markdown file with
YAML front-matter (``base_model``, ``tags: [mergekit, merge]``, ``library_name: transformers``), a
sentence naming the merge method and the base, a bullet list of the merged models and, under
"Configuration", the YAML that produced the model in a fenced ```` ```yaml ```` block. Hub users
and tools read that block to learn how a model was made; ``unmerge verify`` reads it to check the
model against it.

:func:`model_card` writes the same layout (with ``unmerge_jax`` added to the tags). Its YAML block
is the resolved config the engine ran — absolute model paths, every parameter as given, the output
dtype — so it parses with :func:`~unmerge_jax.merge.config.load_config` and reproduces the merge;
the DARE seed, which is not part of mergekit's schema, is stated in the text.
:func:`parse_card` splits any such card (ours or mergekit's) into its front-matter and its YAML
text.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from pathlib import Path

import yaml

from unmerge_jax.errors import UnmergeError

CARD_NAME = "README.md"
CONFIG_NAME = "unmerge_merge_config.yaml"   # the resolved config with the run's own settings (seed, λ)
TAGS = ("mergekit", "merge", "unmerge_jax")

# mergekit's display names and references for the methods it names in a card (its registry's
# ``pretty_name`` / ``reference_url``); a method not listed is shown by its config name.
METHOD_REFERENCES = {
    "linear": ("Linear", "https://arxiv.org/abs/2203.05482"),
    "task_arithmetic": ("Task Arithmetic", "https://arxiv.org/abs/2212.04089"),
    "ties": ("TIES", "https://arxiv.org/abs/2306.01708"),
    "dare_ties": ("DARE TIES", "https://arxiv.org/abs/2311.03099"),
    "dare_linear": ("Linear DARE", "https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": ("Model Breadcrumbs", "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": ("Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795"),
    "model_stock": ("Model Stock", "https://arxiv.org/abs/2403.19522"),
    "ram": ("Reinforced Agent Merging", "https://arxiv.org/abs/2601.13572"),
    "ramplus_tl": ("Reinforced Agent Merging Plus (Tensor-Local)", "https://arxiv.org/abs/2601.13572"),
}

_FRONT = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", re.S)
_YAML_BLOCK = re.compile(r"^```[ \t]*ya?ml[ \t]*\r?\n(.*?)^```[ \t]*$", re.S | re.M)


def _method_md(method: str) -> str:
    name, url = METHOD_REFERENCES.get(method, (method, None))
    return f"[{name}]({url})" if url else name


def _hub_ids(refs) -> list[str]:
    """References written as Hub ids (``org/name``: one slash, not a path from ``/``, ``.`` or
    ``~``) — what mergekit lists under ``base_model``; local directories are not listed."""
    out = []
    for r in refs:
        s = str(r)
        if s.count("/") == 1 and not s.startswith(("/", ".", "~")) and s not in out:
            out.append(s)
    return out


def model_card(config: dict, name: str, *, seed: int | None = None) -> str:
    """The ``README.md`` text for a merge, in mergekit's layout.

    Args:
      config: the resolved config as mergekit YAML (``MergeConfig.to_dict()`` with the output dtype):
        it is written verbatim into the card's ```` ```yaml ```` block.
      name: the model's name (the card's title; mergekit uses the output directory's name).
      seed: the random seed of DARE-style masks, stated under the configuration when given.

    Returns:
      the card as a string (front-matter, method, models, configuration).
    """
    method = str(config.get("merge_method"))
    base = config.get("base_model")
    models = [m.get("model") if isinstance(m, dict) else m for m in config.get("models") or []]
    for sl in config.get("slices") or []:          # a slices: config names its models per source
        models += [src.get("model") for src in sl.get("sources") or [] if src.get("model") not in models]
    front = {"base_model": _hub_ids([base] + models if base else models), "library_name": "transformers",
             "tags": list(TAGS)}
    base_text = f" using {base} as a base" if base else ""
    bullets = "\n".join(f"* {m}" for m in models if m != base)
    text = yaml.safe_dump(config, sort_keys=False).rstrip("\n")
    random = method.startswith(("dare", "della"))      # the methods whose masks are drawn at random
    seed_text = "" if seed is None or not random else f"\nRandom masks were drawn with `--seed {int(seed)}`.\n"
    return (f"---\n{yaml.safe_dump(front, sort_keys=False).rstrip()}\n---\n# {name}\n\n"
            f"This is a merge of pre-trained language models created with unmerge_jax (`unmerge merge`), "
            f"from a configuration in [mergekit](https://github.com/arcee-ai/mergekit)'s format.\n\n"
            f"## Merge Details\n### Merge Method\n\n"
            f"This model was merged using the {_method_md(method)} merge method{base_text}.\n\n"
            f"### Models Merged\n\nThe following models were included in the merge:\n{bullets}\n\n"
            f"### Configuration\n\nThe following YAML configuration was used to produce this model:\n\n"
            f"```yaml\n{text}\n```\n{seed_text}")


def write_recipe(out_dir, config: dict, name: str, *, seed: int, run: dict) -> None:
    """Write what a merge output records of its recipe: the resolved config with the run's own
    settings (``CONFIG_NAME``: ``config`` plus ``unmerge: run``) and the model card (``CARD_NAME``),
    whose YAML block is ``config`` — what ``unmerge verify`` reads back.

    Args:
      out_dir: the (temporary) output directory.
      config: the resolved config as mergekit YAML, with the output dtype.
      name: the model's name (the output directory's).
      seed: the random seed of the masks. run: the run's settings (seed, per-model λ, ...).
    """
    out_dir = Path(out_dir)
    (out_dir / CONFIG_NAME).write_text(yaml.safe_dump({**config, "unmerge": run}, sort_keys=False))
    (out_dir / CARD_NAME).write_text(model_card(config, name, seed=seed), encoding="utf-8")


class Card(NamedTuple):
    """A model card split into its parts.

    Attributes:
      metadata: the YAML front-matter as a dict (empty when the card has none).
      config_yaml: the text of the first ```` ```yaml ```` block (the merge configuration).
    """

    metadata: dict
    config_yaml: str


def parse_card(text: str, where: str = "model card") -> Card:
    """Split a model card into its front-matter and the YAML block of its configuration.

    Args:
      text: the card (``README.md``) as text.
      where: how errors name the card (its path).

    Returns:
      :class:`Card`. The YAML block is returned as text, for
      :func:`~unmerge_jax.merge.config.load_config` to parse and validate.

    Raises:
      UnmergeError: the card has no ```` ```yaml ```` block, or its front-matter is not a YAML mapping.
    """
    meta: dict = {}
    m = _FRONT.match(text)
    if m:
        try:
            loaded = yaml.safe_load(m.group(1))
        except yaml.YAMLError:
            loaded = "invalid"
        if loaded is not None and not isinstance(loaded, dict):
            raise UnmergeError(f"{where}: its front-matter (between the leading '---' lines) is not a YAML mapping")
        meta = loaded or {}
    block = _YAML_BLOCK.search(text, m.end() if m else 0)
    if block is None:
        raise UnmergeError(f"{where} has no ```yaml block with the merge configuration; give the mergekit YAML "
                           f"file as RECIPE")
    return Card(meta, block.group(1))
