"""Tokenizers of a merge, with mergekit 0.1.5's semantics: the output vocabulary, the embedding rows
each input contributes to it, the chat template, and the tokenizer files written with the output.

Config (mergekit's schema)::

  tokenizer_source: base | union | ./model     # or the block below, not both
  tokenizer:
    source: union                              # default union
    pad_to_multiple_of: 64                     # the embedding grows to a multiple; config.json follows
    tokens:                                    # tokens added to the output vocabulary if missing
      <|im_start|>: {source: ./chat_model, force: true}
      <|im_end|>: {source: {kind: model_token, model: ./chat_model, token: "</s>"}}
      <pad>: {source: {kind: zero}}
  chat_template: chatml                        # a mergekit template name, "auto", or Jinja text

**Output vocabulary** ``V`` (an ordered ``{token: id}``): ``base`` is the base's tokenizer (the first
model's without a base) with every id ``≥`` its ``config.json`` ``vocab_size`` removed (tokens of
unused padding rows); a model directory is that model's tokenizer as it is; ``union`` is the
stripped base tokenizer plus, in input order, each token another input uses (id below its
``vocab_size``) and the base lacks, then every added token of any input (the first input's
settings win). The keys of ``tokens:`` are added last, where missing.

**Rows.** For every vocabulary tensor (an input embedding or an output head: ``embed_tokens``,
``lm_head``, ``wte``, ... — rows indexed by token id) and every input ``m`` with vocabulary ``V_m``
(ids below its ``vocab_size``), row ``j`` of the aligned tensor is::

  E_m[V_m[t]]               if input m has token t = V⁻¹(j) and t is not forced
  default(t)                otherwise, where default(t) is
      the row of the model the token's ``source`` names (at that model's id of t; a ``model_token``
      source: at the given token_id, or the id of the given token in that model's own tokenizer),
      zero for ``{kind: zero}``; without a ``tokens:`` entry: the row of the one input that has t,
      else the base's row, else the mean of the rows of the inputs that have t, else zero
  mean_j' of rows j' < |V|   for the padding rows |V| ≤ j < pad_to_multiple_of·⌈|V|/pad⌉

so every input reaches the merge kernels aligned to ``V`` (the kernels never see a vocabulary).
The rows are built per tensor as it streams (:class:`AlignedVocabulary` wraps each input's
:class:`~unmerge_jax.sources.TensorSource`), reading the input's rows block by block; the default
rows of a tensor are read once (only the rows they use) and shared by all inputs. Extra memory: one
row block, and the default rows of the current tensor.

Without tokenizer settings the base's tokenizer files are copied and inputs whose vocabulary sizes
differ are refused (mergekit fails on the tensor shapes); ``chat_template`` alone re-saves the
base's tokenizer with the template. mergekit's template names are read from the installed mergekit
package (its files are LGPL-3.0 and not shipped here); without it a name is refused and Jinja text
given inline works. The tokenizers are read and written with ``transformers`` (imported only here,
only when a config asks for tokenizer handling).

Where mergekit 0.1.5's order varies from run to run, a fixed one is used: the inputs in config order
(base first, then ``models:``) where mergekit iterates a Python set of models (the union's new ids,
the plurality vote of ``chat_template: auto``, and — without a base — the model whose tokenizer
``base`` / ``union`` start from: the first model here; there, the first in the set's order, which
follows hashes that mix in a class object's address, so mergekit's output changes between
processes; a run-time note says so), and each
input's tokens by id where mergekit iterates the tokenizer's hash map (the ids of the union's new
regular — not added — tokens).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.names import parse_tensor_name
from unmerge_jax.sources import AdapterSource, TensorSource

#: Leaf modules whose rows are indexed by token id (an input embedding or an output head).
VOCAB_MODULES = ("embed_tokens", "wte", "embed_in", "word_embeddings", "tok_embeddings", "lm_head", "embed_out",
                 "output")
#: Tokenizer files a merge with a built tokenizer does not copy from the base (it saves its own).
TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                        "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                        "chat_template.json")
SOURCES = ("base", "union")
ROW_BLOCK_BYTES = 16 << 20     # rows of an input tensor read at a time while aligning it


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenSource:
    """Where a token's embedding row comes from: ``kind`` ``"model"`` (that model's row of the
    token), ``"model_token"`` (that model's row ``token_id``, or of ``token`` in its tokenizer) or
    ``"zero"``."""

    kind: str
    model: Path | None = None
    token_id: int | None = None
    token: str | None = None


@dataclass(frozen=True)
class TokenRule:
    """One entry of ``tokenizer.tokens``: its ``source`` (None: not given) and ``force`` (every
    input takes the source's row, even one that has the token)."""

    source: TokenSource | None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The tokenizer settings of a merge config.

    Attributes:
      source: ``"base"``, ``"union"``, a model directory, or None (no vocabulary alignment: the
        base's tokenizer is copied).
      tokens: ``{token: TokenRule}`` of ``tokenizer.tokens`` (added to the vocabulary if missing).
      pad_to_multiple_of: pad the vocabulary tensors' rows to a multiple (None: no padding).
      chat_template: a template name, ``"auto"``, Jinja text, or None.
      raw: the keys as given (``tokenizer_source`` / ``tokenizer`` / ``chat_template``), for the
        config written beside the output.
    """

    source: str | Path | None = None
    tokens: dict = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None
    raw: dict = field(default_factory=dict)

    @property
    def aligns(self) -> bool:
        """True when the vocabulary tensors are aligned to a built output tokenizer."""
        return self.source is not None


def _short(value, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _token_source(value, model_path: Callable, what: str) -> TokenSource | None:
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        return TokenSource("model", model_path(value, what))
    if not isinstance(value, dict) or value.get("kind") not in ("zero", "model_token"):
        raise UnmergeError(f"{what}: expected a model directory, {{kind: zero}} or {{kind: model_token, model: DIR, "
                           f"token_id: N | token: T}}, got {_short(value)}")
    allowed = {"kind"} if value["kind"] == "zero" else {"kind", "model", "token_id", "token"}
    extra = sorted(set(value) - allowed, key=str)
    if extra:
        raise UnmergeError(f"{what}: unknown key {_short(extra[0])} for kind {value['kind']}; keys: "
                           f"{', '.join(sorted(allowed))}")
    if value["kind"] == "zero":
        return TokenSource("zero")
    if "model" not in value:
        raise UnmergeError(f"{what}: a model_token source needs 'model'")
    token_id, token = value.get("token_id"), value.get("token")
    if (token_id is None) == (token is None):
        raise UnmergeError(f"{what}: give exactly one of token_id and token for a model_token source")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        raise UnmergeError(f"{what}: token_id must be a non-negative integer, got {_short(token_id)}")
    if token is not None and not isinstance(token, str):
        raise UnmergeError(f"{what}: token must be a string, got {_short(token)}")
    return TokenSource("model_token", model_path(value["model"], f"{what}.model"), token_id, token)


def _source(value, model_path: Callable, what: str):
    if value in SOURCES:
        return value
    if not isinstance(value, (str, Path)):
        raise UnmergeError(f"{what} must be 'base', 'union' or a model directory, got {_short(value)}")
    try:
        return model_path(value, what)
    except UnmergeError:
        if "/" in str(value):   # meant as a path: the config's own message says what is wrong with it
            raise
        raise UnmergeError(f"{what} {_short(value)} is neither 'base', 'union' nor a model directory; use one of "
                           f"those (a local directory: nothing is downloaded)") from None


def parse_spec(raw: dict, model_path: Callable, where: str) -> TokenizerSpec | None:
    """The tokenizer settings of a config mapping ``raw``, checked (one-line errors), or None.

    Args:
      raw: the config mapping (``tokenizer_source``, ``tokenizer``, ``chat_template`` are read).
      model_path: ``(reference, what) -> Path`` resolving a model reference as the config does.
      where: the config's name for messages.
    """
    given = {k: raw[k] for k in ("tokenizer_source", "tokenizer", "chat_template") if raw.get(k) is not None}
    if not given:
        return None
    if "tokenizer_source" in given and "tokenizer" in given:
        raise UnmergeError(f"{where}: give either tokenizer_source or a tokenizer block, not both (the block's "
                           f"'source' is the tokenizer source)")
    source, tokens, pad = given.get("tokenizer_source"), {}, None
    if source is not None:
        source = _source(source, model_path, f"{where}: tokenizer_source")
    block = given.get("tokenizer")
    if block is not None:
        if not isinstance(block, dict):
            raise UnmergeError(f"{where}: tokenizer must be a mapping with source, tokens, pad_to_multiple_of")
        extra = sorted(set(block) - {"source", "tokens", "pad_to_multiple_of"}, key=str)
        if extra:
            raise UnmergeError(f"{where}: unknown key {_short(extra[0])} in tokenizer; keys: pad_to_multiple_of, "
                               f"source, tokens")
        source = _source(block.get("source", "union"), model_path, f"{where}: tokenizer.source")
        pad = block.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise UnmergeError(f"{where}: tokenizer.pad_to_multiple_of must be a positive integer, got {_short(pad)}")
        entries = block.get("tokens") or {}
        if not isinstance(entries, dict):
            raise UnmergeError(f"{where}: tokenizer.tokens must map tokens to {{source: ..., force: ...}}")
        for tok, rule in entries.items():
            what = f"{where}: tokenizer.tokens[{_short(tok)}]"
            if not isinstance(tok, str) or not tok:
                raise UnmergeError(f"{what}: a token must be a non-empty string")
            rule = {} if rule is None else rule
            if not isinstance(rule, dict) or set(rule) - {"source", "force"}:
                raise UnmergeError(f"{what}: expected {{source: ..., force: true|false}}, got {_short(rule)}")
            force = rule.get("force", False)
            if not isinstance(force, bool):
                raise UnmergeError(f"{what}: force must be true or false, got {_short(force)}")
            tokens[tok] = TokenRule(_token_source(rule.get("source"), model_path, f"{what}.source"), force)
    template = given.get("chat_template")
    if template is not None:
        check_template(template, f"{where}: chat_template")
    return TokenizerSpec(source, tokens, pad, template, given)


# ----------------------------------------------------------------------------------------------
# chat templates
# ----------------------------------------------------------------------------------------------
def _mergekit_templates() -> Path | None:
    """The directory of the installed mergekit's chat templates (found without importing it)."""
    try:
        spec = importlib.util.find_spec("mergekit")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "_data" / "chat_templates"
    return d if d.is_dir() else None


def _is_name(template: str) -> bool:
    return len(template) < 256 and "\n" not in template and "{" not in template


def check_template(template, what: str) -> None:
    """A one-line error unless ``template`` is ``"auto"``, a mergekit template name (available) or
    Jinja text (as mergekit tells them apart: a name is short, one line, without ``{``)."""
    if not isinstance(template, str) or not template:
        raise UnmergeError(f"{what} must be a template name, 'auto' or Jinja text, got {_short(template)}")
    if template == "auto":
        return
    if _is_name(template):
        d = _mergekit_templates()
        if d is None:
            raise UnmergeError(f"{what} {_short(template)} names one of mergekit's templates, which are read from the "
                               f"installed mergekit package — it is not installed: install mergekit or give the "
                               f"template's Jinja text")
        if not (d / f"{template}.jinja").is_file():
            names = ", ".join(sorted(p.stem for p in d.glob("*.jinja")))
            raise UnmergeError(f"{what} {_short(template)} is not a template name ({names}), 'auto' or Jinja text")
        return
    if len(template) < 20 or "{" not in template:
        raise UnmergeError(f"{what} {_short(template)} is not a template name, 'auto' or Jinja text")


def template_text(template: str, tokenizers: list) -> str | None:
    """The Jinja text of a checked ``template``: a name's file, the inputs' most common template for
    ``"auto"`` (None when no input has one), or the text itself."""
    if template == "auto":
        found = []
        for tok in tokenizers:
            t = getattr(tok, "chat_template", None)
            if isinstance(t, dict):
                t = t.get("default")
            if t:
                found.append(t.strip())
        return collections.Counter(found).most_common(1)[0][0] if found else None
    if _is_name(template):
        return (_mergekit_templates() / f"{template}.jinja").read_text()
    return template


# ----------------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------------
def _config(path: Path) -> dict:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def vocab_size(cfg: dict) -> int | None:
    """``vocab_size`` of a ``config.json`` mapping (or of its ``text_config``)."""
    for c in (cfg, cfg.get("text_config") or {}):
        v = c.get("vocab_size") if isinstance(c, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _load(path: Path, what: str):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as err:   # transformers raises many kinds for a missing/broken tokenizer
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:150]
        raise UnmergeError(f"cannot read the tokenizer of {what} {path}: {first}") from None


def _strip(tok, size: int, path: Path):
    """``tok`` without the tokens whose id is ``≥ size`` (unused rows of the embedding)."""
    import tokenizers

    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    backend = getattr(tok, "_tokenizer", None)
    if backend is None:
        raise UnmergeError(f"the tokenizer of {path} has tokens beyond its vocab_size {size} and no fast (tokenizers) "
                           f"backend to remove them from; save it as tokenizer.json")
    data = json.loads(backend.to_str())
    if data["model"]["type"] != "BPE":
        raise UnmergeError(f"the tokenizer of {path} has tokens beyond its vocab_size {size}; removing them is supported "
                           f"for BPE tokenizers only, it is {data['model']['type']} — use tokenizer_source: union or "
                           f"a model directory")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    vocab = data["model"]["vocab"]
    for t in unused:
        vocab.pop(t, None)

    def keep(m) -> bool:
        parts = m.split(" ") if isinstance(m, str) else list(m)
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def _copy(tok):
    """A fresh copy of a tokenizer (saved and read back), so the inputs' objects stay as read."""
    import tempfile

    import transformers

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return transformers.AutoTokenizer.from_pretrained(d, use_fast=True)


def _union(base_tok, toks: list, sizes: list):
    """The stripped base tokenizer plus every token another input uses (see the module docstring)."""
    regular, added = {}, {}
    for tok, size in zip(toks, sizes):
        decoder = tok.added_tokens_decoder
        added_names = {info.content for info in decoder.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):   # by id: deterministic
            if i < size and t not in added_names:
                regular.setdefault(t, None)
        for i, info in decoder.items():
            if i < size:
                added.setdefault(info.content, info)
    out = _copy(base_tok)
    base_vocab = base_tok.get_vocab()
    for t in regular:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


# ----------------------------------------------------------------------------------------------
# the aligned vocabulary
# ----------------------------------------------------------------------------------------------
@dataclass
class VocabInput:
    """One input of the vocabulary alignment: its directory, the source its rows are read from
    (set by :meth:`AlignedVocabulary.wrap`; an adapter's is the base's), its vocabulary and the
    row of its tensor for every output id (``-1``: it lacks the token)."""

    path: Path
    vocab: dict
    size: int
    rows: np.ndarray
    same_as: int | None = None     # an adapter or a model without tokenizer: the input whose rows it has
    source: TensorSource | None = None


class VocabGroup:
    """The inputs one vocabulary tensor is merged from, and their rows aligned to the output
    vocabulary (built by :meth:`AlignedVocabulary.group`; for a ``models:`` merge, every input).

    Attributes:
      members: the :class:`VocabInput` index of each of the tensor's models.
      sources: the tensor source of each (None: the input's, set by :meth:`AlignedVocabulary.wrap`).
      defaults: ``{output id: [(position in members, row), ...]}`` — the rows averaged (empty:
        zero) for the ids some member takes from elsewhere.
      forced: output ids every member takes from ``defaults``.
    """

    def __init__(self, vocab: "AlignedVocabulary", members: list, defaults: dict, forced: set, sources=None):
        self.vocabulary, self.members, self.defaults, self.forced = vocab, list(members), defaults, forced
        self.sources = list(sources) if sources is not None else None
        self._lock = threading.Lock()
        self._cached: tuple | None = None     # (tensor name, default rows) of the last tensor
        self._fill = []     # per member: (own row per output id, -1 where a default row goes; those ids)
        for k in self.members:
            own = vocab.inputs[k].rows.copy()
            if forced:
                own[sorted(forced)] = -1
            fill = np.array(sorted(j for j in defaults if own[j] < 0), np.int64)
            self._fill.append((own, fill))

    def source(self, pos: int) -> TensorSource:
        """The tensor source of member ``pos`` (an adapter's or a tokenizer-less model's rows are
        read where :class:`VocabInput` ``same_as`` points)."""
        if self.sources is not None:
            return self.sources[pos]
        inputs = self.vocabulary.inputs
        inp = inputs[self.members[pos]]
        while inp.same_as is not None:
            inp = inputs[inp.same_as]
        return inp.source

    def check(self, name: str) -> None:
        """One-line errors before tensor ``name`` is read: a member's rows fewer than its
        ``vocab_size``, or a default row beyond them."""
        inputs = self.vocabulary.inputs
        for pos, k in enumerate(self.members):
            src = self.sources[pos] if self.sources is not None else inputs[k].source
            rows = src.shape(name)[0]
            if rows < inputs[k].size:
                raise UnmergeError(f"tensor {name} of {src.where(name)} has {rows} rows but the model's vocab_size is "
                                   f"{inputs[k].size}: config.json and the weights disagree")
        for parts in self.defaults.values():
            for pos, r in parts:
                src = self.source(pos)
                if r >= src.shape(name)[0]:
                    raise UnmergeError(f"token id {r} is out of range for tensor {name} of {src.where(name)} "
                                       f"({src.shape(name)[0]} rows): check the model_token token_id")

    def default_rows(self, name: str, width: tuple) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, rows)``: the output ids taking a default row in tensor ``name`` and those rows
        (float32, read once per tensor and shared by every member)."""
        with self._lock:
            if self._cached is not None and self._cached[0] == name:
                return self._cached[1]
            ids = np.array(sorted(self.defaults), np.int64)
            rows = np.zeros((len(ids), *width), np.float32)
            need = collections.defaultdict(set)
            for j in ids:
                for pos, r in self.defaults[int(j)]:
                    need[pos].add(r)
            got = {}
            for pos, rs in need.items():
                src = self.source(pos)
                rs = np.array(sorted(rs), np.int64)
                n_rows = src.shape(name)[0]
                if rs[-1] >= n_rows:
                    raise UnmergeError(f"token id {int(rs[-1])} is out of range for tensor {name} of "
                                       f"{src.where(name)} ({n_rows} rows): check the model_token token_id")
                got[pos] = dict(zip(rs.tolist(), gather_rows(src, name, rs)))
            for i, j in enumerate(ids):
                parts = self.defaults[int(j)]
                if parts:
                    acc = np.zeros(width, np.float32)
                    for pos, r in parts:
                        acc = acc + got[pos][r]
                    rows[i] = acc / np.float32(len(parts))
            self._cached = (name, (ids, rows))
            return ids, rows

    def aligned(self, pos: int, name: str, out=None) -> np.ndarray:
        """Tensor ``name`` of member ``pos`` with the output's rows, float32 (a view into ``out``
        if given)."""
        src = self.sources[pos] if self.sources is not None else self.vocabulary.inputs[self.members[pos]].source
        shape = src.shape(name)
        own, fill = self._fill[pos]
        n_rows = self.vocabulary.n_rows
        n = len(self.vocabulary.vocab)
        if len(fill) == 0 and n_rows == n == shape[0] and np.array_equal(own, np.arange(n)):
            return src.read(name, out=out)    # already aligned: no copy
        width = tuple(shape[1:])
        size = n_rows * int(np.prod(width, dtype=np.int64))
        res = (np.empty((n_rows, *width), np.float32) if out is None
               else out.reshape(-1).view(np.uint8)[:4 * size].view(np.float32).reshape(n_rows, *width))
        res[:n] = 0
        dst = np.flatnonzero(own >= 0)
        if len(dst):
            gather_rows(src, name, own[dst], out=res, dst=dst)
        if len(fill):
            ids, rows = self.default_rows(name, width)
            res[fill] = rows[np.searchsorted(ids, fill)]
        if n_rows > n:   # padding rows: the mean of the real ones
            res[n:] = res[:n].mean(axis=0, dtype=np.float64).astype(np.float32)
        return res


class AlignedVocabulary:
    """The output tokenizer of a merge and how each input's vocabulary tensors are aligned to it.

    Built by :func:`build_vocabulary`; :meth:`wrap` turns an input's source into one whose
    vocabulary tensors have the output's rows (every input a member of each tensor, as in a
    ``models:`` merge); :meth:`group` aligns the rows of the models one tensor is merged from (a
    ``slices:`` merge); :meth:`write` saves the tokenizer into the output.

    Attributes:
      tokenizer: the output tokenizer (``transformers``).
      vocab: its ``{token: id}``.
      n_rows: rows of every aligned vocabulary tensor (``|vocab|`` padded).
      inputs: one :class:`VocabInput` per distinct input (base first).
      defaults: ``{output id: [(input index, row), ...]}`` — the rows averaged (empty: zero) for
        the ids some input takes from elsewhere, every input a member.
      forced: output ids every input takes from ``defaults``.
      rules: ``{token: TokenRule}`` of ``tokenizer.tokens`` (for :meth:`group`).
      notes: one-line notes for the user (where mergekit's behaviour may surprise).
    """

    def __init__(self, tokenizer, inputs: list, defaults: dict, forced: set, n_rows: int, chat_template, notes,
                 rules: dict | None = None):
        self.tokenizer, self.inputs, self.defaults, self.forced = tokenizer, inputs, defaults, forced
        self.vocab = tokenizer.get_vocab()
        self.n_rows, self.chat_template, self.notes = n_rows, chat_template, notes
        self.rules = dict(rules or {})
        self.everyone = VocabGroup(self, list(range(len(inputs))), defaults, forced)

    # which tensors ------------------------------------------------------------------------
    @staticmethod
    def is_vocab_tensor(name: str, shape) -> bool:
        """True for a 2-D tensor outside the layer stack whose rows are indexed by token id (by its
        module name)."""
        parsed = parse_tensor_name(name)
        return len(shape) == 2 and parsed.layer is None and parsed.module in VOCAB_MODULES

    def wrap(self, source: TensorSource, index: int) -> TensorSource:
        """``source`` (input ``index``'s full weights) with its vocabulary tensors aligned."""
        inp = self.inputs[index]
        inp.source = source
        wanted = max((r for parts in self.defaults.values() for k, r in parts if k == index), default=-1)
        for name in source.names:
            if self.is_vocab_tensor(name, source.shape(name)):
                rows = source.shape(name)[0]
                if rows < inp.size:
                    raise UnmergeError(f"tensor {name} of {source.where(name)} has {rows} rows but the model's "
                                       f"vocab_size is {inp.size}: config.json and the weights disagree")
                if wanted >= rows:
                    raise UnmergeError(f"token id {wanted} is out of range for tensor {name} of "
                                       f"{source.where(name)} ({rows} rows): check the model_token token_id")
        return AlignedSource(source, self, index)

    def index_of(self, path) -> int:
        p = Path(path).resolve()
        for i, inp in enumerate(self.inputs):
            if inp.path == p:
                return i
        raise UnmergeError(f"{path} is not an input of the merge's tokenizer alignment; give model directories")

    def group(self, paths: list, sources: list, base: int | None, what: str) -> VocabGroup:
        """The alignment of one tensor merged from the models ``paths`` (read from ``sources``; the
        base at position ``base`` or None), with mergekit's rules over those models only: a token
        only one of them has takes that one's row, the base's where it has it, else their mean.

        Args:
          what: the tensor's origin for messages (e.g. "the sources of slices[0]")."""
        members = [self.index_of(p) for p in paths]
        defaults, forced, _ = group_defaults(self.vocab, self.rules, self.inputs, members, base,
                                             outside=f"is not among {what}; a token's source must be one of them")
        return VocabGroup(self, members, defaults, forced, sources)

    # rows ---------------------------------------------------------------------------------
    def default_rows(self, name: str, width: tuple) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`VocabGroup.default_rows` with every input a member."""
        return self.everyone.default_rows(name, width)

    def aligned(self, index: int, name: str, out=None) -> np.ndarray:
        """Tensor ``name`` of input ``index`` with the output's rows, float32 (a view into ``out``
        if given)."""
        return self.everyone.aligned(index, name, out=out)

    # output -------------------------------------------------------------------------------
    def write(self, out_dir: Path) -> None:
        """Save the output tokenizer (with the chat template) into ``out_dir`` and set
        ``config.json``'s ``vocab_size`` to the aligned row count."""
        save_tokenizer(self.tokenizer, self.chat_template, out_dir)
        set_vocab_size(out_dir, self.n_rows)


def gather_rows(src: TensorSource, name: str, rows: np.ndarray, out: np.ndarray | None = None,
                dst: np.ndarray | None = None) -> np.ndarray:
    """Rows ``rows`` (any order, repeats allowed) of tensor ``name`` of ``src`` as float32, read in
    blocks of at most :data:`ROW_BLOCK_BYTES` that hold a wanted row: a new ``(len(rows), ...)``
    array, or written to ``out[dst]`` (``out[dst[i]] = row rows[i]``) without a temporary."""
    shape = src.shape(name)
    width = tuple(shape[1:])
    per_row = max(1, 4 * int(np.prod(width, dtype=np.int64)))
    block = max(1, ROW_BLOCK_BYTES // per_row)
    rows = np.asarray(rows, np.int64)
    if out is None:
        out, dst = np.empty((len(rows), *width), np.float32), np.arange(len(rows))
    order = np.argsort(rows, kind="stable")
    srt, dst = rows[order], np.asarray(dst, np.int64)[order]
    i = 0
    while i < len(srt):
        start = int(srt[i])
        stop = min(shape[0], start + block)
        j = int(np.searchsorted(srt, stop))
        chunk = src.read_rows(name, start, stop)
        out[dst[i:j]] = chunk[srt[i:j] - start]
        i = j
    return out


class AlignedSource(TensorSource):
    """An input's tensor source whose vocabulary tensors have the output vocabulary's rows (see
    :class:`AlignedVocabulary`); every other tensor, and everything else, is the input's."""

    def __init__(self, inner: TensorSource, vocab: AlignedVocabulary, index: int):
        self.inner, self.vocabulary, self.index = inner, vocab, index
        self.kind, self.label, self.names = inner.kind, inner.label, list(inner.names)
        self.path = getattr(inner, "path", None)
        self._vocab_names = {n for n in self.names if vocab.is_vocab_tensor(n, inner.shape(n))}
        cfg = dict(getattr(inner, "config", None) or {})
        if "vocab_size" in cfg or not isinstance(cfg.get("text_config"), dict):
            cfg["vocab_size"] = vocab.n_rows
        else:
            cfg["text_config"] = {**cfg["text_config"], "vocab_size": vocab.n_rows}
        self.config = cfg

    def __contains__(self, name) -> bool:
        return name in self.inner

    def shape(self, name) -> tuple:
        s = tuple(self.inner.shape(name))
        return (self.vocabulary.n_rows, *s[1:]) if name in self._vocab_names else s

    def dtype(self, name) -> str:
        return self.inner.dtype(name)

    def read(self, name, out=None) -> np.ndarray:
        if name in self._vocab_names:
            return self.vocabulary.aligned(self.index, name, out=out)
        return self.inner.read(name, out=out)

    def read_rows(self, name, start: int, stop: int) -> np.ndarray:
        if name in self._vocab_names:
            return np.ascontiguousarray(self.read(name)[start:stop])
        return self.inner.read_rows(name, start, stop)

    def exact_rows(self, name) -> bool:
        return name not in self._vocab_names and self.inner.exact_rows(name)

    def read_raw(self, name, out=None):
        if name in self._vocab_names:
            raise UnmergeError(f"tensor {name} is realigned to the output vocabulary; it has no raw form")
        return self.inner.read_raw(name, out=out)

    def touches(self, name) -> bool:
        return self.inner.touches(name)

    def where(self, name) -> str:
        return self.inner.where(name)


def build_vocabulary(spec: TokenizerSpec, base: Path | None, models: list) -> AlignedVocabulary:
    """The output tokenizer and the row maps of every input (module docstring), from the inputs'
    tokenizers and ``config.json`` files; errors are one line.

    Args:
      spec: the config's tokenizer settings (``spec.aligns``).
      base: the base model directory, or None (the first model's tokenizer is the base one).
      models: the input directories (model directories or LoRA adapters), in config order.
    """
    from unmerge_jax.io.lora import is_adapter_dir

    paths = []
    for p in ([base] if base is not None else []) + list(models):
        p = Path(p).resolve()
        if p not in paths:
            paths.append(p)
    donor = paths[0]
    notes = []
    if base is None and spec.source in SOURCES:
        notes.append(f"no base_model: the {spec.source} tokenizer starts from the first model's, {donor.name} (mergekit "
                     f"0.1.5 takes whichever model its set of models yields first, which varies from run to run)")
    donor_size = vocab_size(_config(donor))
    donor_tok = _load(donor, "the base model")
    donor_size = donor_size or len(donor_tok.get_vocab())
    base_tok = _strip(donor_tok, donor_size, donor)
    toks, sizes, same_as, loaded = [base_tok], [donor_size], [None], [base_tok]
    for p in paths[1:]:
        if is_adapter_dir(p):    # a LoRA adapter has its base's vocabulary and embedding rows
            toks.append(base_tok), sizes.append(donor_size), same_as.append(0)
            continue
        size = vocab_size(_config(p))
        try:
            tok = _load(p, "input")
        except UnmergeError:
            notes.append(f"no tokenizer in {p}: its vocabulary is taken to be the base's, as in mergekit")
            toks.append(base_tok), sizes.append(size or donor_size), same_as.append(None)
            continue
        toks.append(tok), sizes.append(size or len(tok.get_vocab())), same_as.append(None)
        loaded.append(tok)

    if spec.source == "base":
        out_tok = _copy(base_tok)
    elif spec.source == "union":
        out_tok = _union(base_tok, toks, sizes)
    else:
        out_tok = _load(Path(spec.source), "tokenizer_source")
    existing = set(out_tok.get_vocab())
    for t in spec.tokens:
        if t not in existing:
            out_tok.add_tokens(t)
            existing.add(t)
    vocab = out_tok.get_vocab()
    n = len(vocab)
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(n)):
        raise UnmergeError(f"the output tokenizer's ids are not 0..{n - 1} (a gap in its vocabulary); check the "
                           f"tokenizer of {spec.source if isinstance(spec.source, Path) else donor}")
    inputs = []
    for p, tok, size, same in zip(paths, toks, sizes, same_as):
        own = tok.get_vocab()
        rows = np.full(n, -1, np.int64)
        for t, j in vocab.items():
            i = own.get(t)
            if i is not None and i < size:
                rows[j] = i
        inputs.append(VocabInput(p, own, size, rows, same))

    defaults, forced, missing = group_defaults(vocab, spec.tokens, inputs, list(range(len(inputs))),
                                               0 if base is not None else None)
    if missing:
        notes.append(f"{len(missing)} token(s) of the output vocabulary are in no input ({_short(missing[:3])}): "
                     f"their rows are zero, as in mergekit")
    n_rows = n
    if spec.pad_to_multiple_of and n % spec.pad_to_multiple_of:
        n_rows = (n // spec.pad_to_multiple_of + 1) * spec.pad_to_multiple_of
    template = None if spec.chat_template is None else template_text(spec.chat_template, loaded)
    return AlignedVocabulary(out_tok, inputs, defaults, forced, n_rows, template, notes, rules=spec.tokens)


def group_defaults(vocab: dict, rules: dict, inputs: list, members: list, base: int | None,
                   outside: str = "is not an input of the merge; list it under models or base_model") -> tuple:
    """The default rows of the inputs a vocabulary tensor is merged from (mergekit's
    ``PermutedVocabulary`` over the models of one tensor; the module docstring's rules).

    Args:
      vocab: the output ``{token: id}``.
      rules: ``{token: TokenRule}`` of ``tokenizer.tokens``.
      inputs: every :class:`VocabInput`.
      members: the input index of each of the tensor's models (a position in this list is what
        the returned rows refer to).
      base: the position of the tensor's base among ``members``, or None.
      outside: the end of the message for a ``tokens:`` source that is not among the members.

    Returns:
      ``(defaults, forced, missing)``: ``{output id: [(position, row), ...]}`` (rows averaged; empty:
      zero), the forced output ids, the tokens no member has.
    """
    defaults, forced, missing = {}, set(), []
    present = np.stack([inputs[k].rows >= 0 for k in members])      # (members, n)
    index = {}
    for pos, k in enumerate(members):
        index.setdefault(inputs[k].path, pos)
    for t, j in vocab.items():
        rule = rules.get(t)
        if rule is not None and rule.force:
            forced.add(j)
        elif present[:, j].all():
            continue
        if rule is None:
            have = np.flatnonzero(present[:, j])
            if len(have) == 0:
                missing.append(t)
                defaults[j] = []
            elif len(have) == 1:
                defaults[j] = [(int(have[0]), int(inputs[members[have[0]]].rows[j]))]
            elif base is not None and present[base, j]:
                defaults[j] = [(base, int(inputs[members[base]].rows[j]))]
            else:
                defaults[j] = [(int(q), int(inputs[members[q]].rows[j])) for q in have]
            continue
        defaults[j] = _rule_rows(t, j, rule, inputs, members, index, outside)
    return defaults, forced, missing


def _rule_rows(token: str, j: int, rule: TokenRule, inputs: list, members: list, index: dict, outside: str) -> list:
    """The rows averaged for a token with a ``tokens:`` entry (one row, or none for zero)."""
    src = rule.source
    what = f"tokenizer.tokens[{_short(token)}]"
    if src is None:
        raise UnmergeError(f"{what}: some input lacks the token (or it is forced) and no source is given; add "
                           f"source: a model directory, {{kind: zero}} or {{kind: model_token, ...}}")
    if src.kind == "zero":
        return []
    pos = index.get(Path(src.model).resolve())
    if pos is None:
        raise UnmergeError(f"{what}: source model {src.model} {outside}")
    inp = inputs[members[pos]]
    if src.kind == "model":
        if inp.rows[j] < 0:
            raise UnmergeError(f"{what}: the token is not in the vocabulary of its source model {src.model}; give "
                               f"another source ({{kind: model_token, model: ..., token_id: N}} or {{kind: zero}})")
        return [(pos, int(inp.rows[j]))]
    if src.token_id is not None:
        return [(pos, int(src.token_id))]
    if src.token not in inp.vocab:
        raise UnmergeError(f"{what}: token {_short(src.token)} is not in the vocabulary of {src.model}")
    return [(pos, int(inp.vocab[src.token]))]


# ----------------------------------------------------------------------------------------------
# files of the output
# ----------------------------------------------------------------------------------------------
def save_tokenizer(tokenizer, chat_template: str | None, out_dir: Path) -> None:
    """Save ``tokenizer`` into ``out_dir`` (replacing tokenizer files copied there), with
    ``chat_template`` set when given."""
    out_dir = Path(out_dir)
    for f in TOKENIZER_FILE_NAMES:
        (out_dir / f).unlink(missing_ok=True)
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(out_dir))


def set_vocab_size(out_dir: Path, n_rows: int) -> None:
    """``config.json`` of ``out_dir`` with ``vocab_size`` (or ``text_config.vocab_size``) = ``n_rows``."""
    path = Path(out_dir) / "config.json"
    if not path.exists():
        return
    cfg = json.loads(path.read_text())
    if "vocab_size" in cfg or not isinstance(cfg.get("text_config"), dict):
        cfg["vocab_size"] = n_rows
    else:
        cfg["text_config"]["vocab_size"] = n_rows
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


class TemplatedTokenizer:
    """``chat_template`` without vocabulary alignment: the donor's tokenizer (the base's, else the
    first model's), saved again with the template, as mergekit does."""

    def __init__(self, spec: TokenizerSpec, donor: Path, models: list):
        self.tokenizer = _load(Path(donor), "the base model (needed for chat_template)")
        toks = [self.tokenizer]
        if spec.chat_template == "auto":
            for p in models:
                try:
                    toks.append(_load(Path(p), "input"))
                except UnmergeError:
                    continue
        self.chat_template = template_text(spec.chat_template, toks)
        self.notes = [] if self.chat_template is not None else [
            "chat_template: auto found no chat template in the inputs; none is set, as in mergekit"]

    def write(self, out_dir: Path) -> None:
        save_tokenizer(self.tokenizer, self.chat_template, out_dir)


def prepare(spec: TokenizerSpec | None, base: Path | None, models: list, check_sizes: bool = True):
    """What the tokenizer settings make of a merge, before any tensor is read: an
    :class:`AlignedVocabulary` (``tokenizer_source`` / ``tokenizer``), a :class:`TemplatedTokenizer`
    (``chat_template`` alone), or None (the base's tokenizer files are copied; with
    ``check_sizes``, inputs whose ``vocab_size`` differ are refused, as mergekit fails on them —
    a ``slices:`` merge checks the shapes of each tensor's sources instead)."""
    if spec is not None and spec.aligns:
        return build_vocabulary(spec, base, models)
    if check_sizes:
        check_vocab_sizes(base, models)
    if spec is not None and spec.chat_template is not None:
        return TemplatedTokenizer(spec, base if base is not None else models[0], models)
    return None


def check_vocab_sizes(base: Path | None, models: list) -> None:
    """Without tokenizer settings: a one-line error when the inputs' ``vocab_size`` differ."""
    paths = ([base] if base is not None else []) + list(models)
    sizes = [(p, vocab_size(_config(p))) for p in paths]
    sizes = [(p, s) for p, s in sizes if s is not None]
    for p, s in sizes[1:]:
        if s != sizes[0][1]:
            raise UnmergeError(f"{p} has vocab_size {s} but {sizes[0][0]} has {sizes[0][1]}: the embedding rows differ; "
                               f"set tokenizer_source: base (or union, or a model directory) to align them")


def spec_to_dict(spec: TokenizerSpec) -> dict:
    """The tokenizer keys of the config, YAML-safe, model paths absolute (as parsed)."""
    def source(src: TokenSource | None):
        if src is None or src.kind == "model":
            return None if src is None else str(src.model)
        if src.kind == "zero":
            return {"kind": "zero"}
        d = {"kind": "model_token", "model": str(src.model)}
        d.update({"token_id": src.token_id} if src.token_id is not None else {"token": src.token})
        return d

    top = spec.source if spec.source in SOURCES or spec.source is None else str(spec.source)
    d = {}
    if "tokenizer_source" in spec.raw:
        d["tokenizer_source"] = top
    if "tokenizer" in spec.raw:
        block = {"source": top}
        if spec.tokens:
            block["tokens"] = {t: {"source": source(r.source), "force": r.force} for t, r in spec.tokens.items()}
        if spec.pad_to_multiple_of:
            block["pad_to_multiple_of"] = spec.pad_to_multiple_of
        d["tokenizer"] = block
    if spec.chat_template is not None:
        d["chat_template"] = spec.chat_template
    return d


def extra_inputs(spec: TokenizerSpec | None) -> list:
    """Model directories the tokenizer settings read beyond the merge's inputs (a tokenizer_source
    model), which the output must not touch either."""
    if spec is None or spec.source is None or spec.source in SOURCES:
        return []
    return [Path(spec.source)]
