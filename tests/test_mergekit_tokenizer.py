"""Tokenizer handling of ``unmerge merge`` against mergekit 0.1.5 on tiny seeded Llama models with
tiny tokenizers built here: the configurations of mergekit's ``tests/test_tokenizer.py`` and
``tests/test_chat_template.py`` (and a few more: permuted ids, tokens only non-base inputs share,
methods with a base, no base, an input without tokenizer; ``slices:`` layer stacks and per-slice
merges), run through both; every tensor within 1e-5, the same vocabulary / added tokens / chat
template / ``vocab_size``, the same logits. An
independent NumPy construction of the aligned rows, block-size independence, and one-line refusals
of bad tokenizer settings."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from safetensors.numpy import load_file  # noqa: E402
from tests._tiny_models import stored_state as _read  # noqa: E402

from unmerge_jax import UnmergeError, merge  # noqa: E402
from unmerge_jax.merge import MERGE_METHODS  # noqa: E402
from unmerge_jax.merge import tokenizer as tk  # noqa: E402

ATOL = 1e-5
SPECIAL = ["<unk>", "<s>", "</s>"]


def _tokenizer(tokens, added=()):
    """A fast BPE tokenizer whose vocabulary is ``tokens`` (id = position), plus ``added`` tokens."""
    from transformers import PreTrainedTokenizerFast

    model = tokenizers.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>")
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(model), unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    tok.add_tokens(list(added))
    return tok


def _llama(path, vocab_size, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


BASE_TOKENS = SPECIAL + [f"_tok_{i}" for i in range(3, 64)]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokzoo")
    transformers.utils.logging.set_verbosity_error()
    z = {}
    # mergekit's fixtures: a 64-token base, a chatml model (66 rows: two added tokens), a model
    # whose tokenizer has four added tokens beyond its 64 rows (unused padding ids).
    z["base"] = _llama(root / "base", 64, 0)
    _tokenizer(BASE_TOKENS).save_pretrained(z["base"])
    z["chatml"] = _llama(root / "chatml", 66, 1)
    _tokenizer(BASE_TOKENS, ["<|im_start|>", "<|im_end|>"]).save_pretrained(z["chatml"])
    z["padded"] = _llama(root / "padded", 64, 2)
    _tokenizer(BASE_TOKENS, [f"<UNUSED_{i}>" for i in range(4)]).save_pretrained(z["padded"])
    z["b"] = _llama(root / "b", 64, 3)                    # no tokenizer files
    # the same tokens under other ids, and two models sharing two regular tokens the base lacks
    perm = np.random.default_rng(5).permutation(61) + 3
    z["shuffled"] = _llama(root / "shuffled", 64, 4)
    _tokenizer(SPECIAL + [BASE_TOKENS[i] for i in perm]).save_pretrained(z["shuffled"])
    for k, name in enumerate(("extra1", "extra2")):
        z[name] = _llama(root / name, 66, 5 + k)
        _tokenizer(BASE_TOKENS + ["_new_a", "_new_b"]).save_pretrained(z[name])
    z["root"] = root
    return z


def _config(zoo, models, base="base", method="linear", weight=1.0, **top):
    cfg = {"merge_method": method, "dtype": "float32",
           "models": [{"model": zoo[m], "parameters": {"weight": weight}} for m in models], **top}
    if base is not None:
        cfg["base_model"] = zoo[base]
    return cfg


def _config_order(config):
    """The models a mergekit config references, in config order: the base, then ``models:`` (or
    the slices' sources; after mergekit's planner turned them into ``modules:``, those), each once."""
    refs = [config.base_model] if config.base_model else []
    groups = [(config.models, config.slices)] + [(m.models, m.slices) for m in (config.modules or {}).values()]
    for models, slices in groups:
        refs += [m.model for m in models or ()]
        refs += [s.model for sl in slices or () for s in sl.sources]
    return list(dict.fromkeys(refs))


def _mergekit(cfg, out, monkeypatch=None):
    """Run mergekit 0.1.5 on ``cfg`` into ``out``. With ``monkeypatch``: mergekit's
    ``referenced_models()`` in config order.

    mergekit builds that list from a Python set, and without a base_model its first element is the
    donor of the tokenizer the union starts from (whose tokens stay regular while the others' are
    added tokens) and of config.json. The set's order follows the references' hashes, which
    (pydantic, frozen models) mix in the hash of the class object — its address — so it changes
    from process to process even with fixed paths and a fixed PYTHONHASHSEED (fixing the seed for
    a mergekit subprocess would not pin it); pinned to config order
    (``unmerge merge``'s fixed choice: the first model) it is one of the orders mergekit itself
    produces, every time."""
    pytest.importorskip("mergekit", reason="mergekit is not installed: tokenizer parity with mergekit not checked")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    if monkeypatch is not None:
        monkeypatch.setattr(MergeConfiguration, "referenced_models", _config_order)
    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              options=MergeOptions(lazy_unpickle=False, write_model_card=False, quiet=True))
    return out


def _tok(d):
    return transformers.AutoTokenizer.from_pretrained(str(d))


def _added(tok):
    return {i: (a.content, a.special, a.normalized, a.lstrip, a.rstrip, a.single_word)
            for i, a in tok.added_tokens_decoder.items()}


def _same_output(ours, theirs, by_token=False):
    """Every tensor within ATOL, the same tokenizer (vocabulary, added tokens, chat template) and
    vocab_size. ``by_token``: the ids may differ (mergekit numbers the union's new regular tokens in
    its tokenizer's hash-map order, which varies between runs): the same tokens, and the rows of
    the vocabulary tensors compared token by token."""
    got, want = _read(ours), _read(theirs)
    a, b = _tok(ours), _tok(theirs)
    va, vb = a.get_vocab(), b.get_vocab()
    assert set(got) == set(want)
    assert set(va) == set(vb) if by_token else va == vb
    for n in want:
        assert got[n].shape == want[n].shape, n
        g = got[n]
        if by_token and tk.AlignedVocabulary.is_vocab_tensor(n, g.shape):
            perm = np.arange(len(g))
            perm[[vb[t] for t in va]] = [va[t] for t in va]
            g = g[perm]
        np.testing.assert_allclose(g, want[n], rtol=0, atol=ATOL, err_msg=n)
    if by_token:
        assert {x[0] for x in _added(a).values()} == {x[0] for x in _added(b).values()}
    else:
        assert _added(a) == _added(b)
    assert a.chat_template == b.chat_template
    cfg_a, cfg_b = (json.loads((p / "config.json").read_text()) for p in (ours, theirs))
    assert cfg_a["vocab_size"] == cfg_b["vocab_size"]
    return got, a


def _logits(d, ids):
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(str(d)).eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits.numpy()


def _parity(zoo, tmp_path, cfg, by_token=False, **kw):
    theirs = _mergekit(cfg, tmp_path / "mk")
    merge(cfg, tmp_path / "us", **kw)
    return _same_output(tmp_path / "us", theirs, by_token)


# ----------------------------------------------------------------------------------------------
# mergekit's tests/test_tokenizer.py
# ----------------------------------------------------------------------------------------------
def test_legacy_mode_differing_vocabularies_refused_as_by_mergekit(zoo, tmp_path):
    cfg = _config(zoo, ["base", "padded", "chatml"])
    with pytest.raises(UnmergeError, match="tokenizer_source"):
        merge(cfg, tmp_path / "us")
    assert not (tmp_path / "us").exists()
    with pytest.raises(ValueError, match="size mismatch"):
        _mergekit(cfg, tmp_path / "mk")


def test_legacy_mode_same_vocabulary_copies_the_base_tokenizer(zoo, tmp_path):
    merge(_config(zoo, ["base", "padded"]), tmp_path / "us")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "us" / f).read_bytes() == (zoo["root"] / "base" / f).read_bytes()


def test_source_base(zoo, tmp_path):
    got, tok = _parity(zoo, tmp_path, _config(zoo, ["base", "padded", "chatml"], tokenizer_source="base"))
    assert len(tok.get_vocab()) == 64 and len(tok.added_tokens_decoder) == 3
    assert got["model.embed_tokens.weight"].shape == (64, 32)


def test_source_union(zoo, tmp_path):
    got, tok = _parity(zoo, tmp_path, _config(zoo, ["base", "padded", "chatml"], tokenizer_source="union"))
    vocab = tok.get_vocab()
    assert len(vocab) == 66 and len(tok.added_tokens_decoder) == 5
    assert "<|im_start|>" in vocab and not any(f"<UNUSED_{i}>" in vocab for i in range(4))
    chatml = load_file(os.path.join(zoo["chatml"], "model.safetensors"))["model.embed_tokens.weight"]
    ids = _tok(zoo["chatml"]).get_vocab()
    for t in ("<|im_start|>", "<|im_end|>"):   # only chatml has them: its rows, whatever the weights
        np.testing.assert_array_equal(got["model.embed_tokens.weight"][vocab[t]], chatml[ids[t]])


@pytest.mark.parametrize("source", ["base", "union"])
def test_base_with_unused_ids_is_stripped(zoo, tmp_path, source):
    """The base's tokenizer has four added tokens beyond its 64 rows: they leave the vocabulary."""
    cfg = _config(zoo, ["padded", "chatml"], base="padded", tokenizer_source=source)
    _, tok = _parity(zoo, tmp_path, cfg)
    assert not any(f"<UNUSED_{i}>" in tok.get_vocab() for i in range(4))
    assert len(tok.get_vocab()) == (64 if source == "base" else 66)


def test_source_model(zoo, tmp_path):
    _, tok = _parity(zoo, tmp_path, _config(zoo, ["base", "padded", "chatml"], tokenizer_source=zoo["chatml"]))
    assert len(tok.get_vocab()) == 66


def test_slerp_union(zoo, tmp_path):
    if "slerp" not in MERGE_METHODS:
        pytest.skip("slerp is not a registered merge method in this tree")
    cfg = _config(zoo, ["base", "chatml"], tokenizer_source="union", method="slerp", parameters={"t": 0.5})
    _parity(zoo, tmp_path, cfg)


def test_force_token(zoo, tmp_path):
    cfg = _config(zoo, ["base", "chatml"], tokenizer={"source": "union", "tokens": {
        "_tok_10": {"source": zoo["chatml"], "force": True},
        "_tok_11": {"source": zoo["base"], "force": True}}})
    got, tok = _parity(zoo, tmp_path, cfg)
    vocab = tok.get_vocab()
    emb = got["model.embed_tokens.weight"]
    chatml = load_file(os.path.join(zoo["chatml"], "model.safetensors"))["model.embed_tokens.weight"]
    base = load_file(os.path.join(zoo["base"], "model.safetensors"))["model.embed_tokens.weight"]
    np.testing.assert_array_equal(emb[vocab["_tok_10"]], chatml[10])
    np.testing.assert_array_equal(emb[vocab["_tok_11"]], base[11])


def test_model_token_id(zoo, tmp_path):
    cfg = _config(zoo, ["base", "chatml"], tokenizer={"source": "base", "tokens": {
        "_tok_20": {"source": {"kind": "model_token", "model": zoo["chatml"], "token_id": 64}, "force": True},
        "_tok_21": {"source": {"kind": "model_token", "model": zoo["base"], "token": "<s>"}, "force": True}}})
    got, tok = _parity(zoo, tmp_path, cfg)
    emb = got["model.embed_tokens.weight"]
    chatml = load_file(os.path.join(zoo["chatml"], "model.safetensors"))["model.embed_tokens.weight"]
    base = load_file(os.path.join(zoo["base"], "model.safetensors"))["model.embed_tokens.weight"]
    np.testing.assert_array_equal(emb[20], chatml[64])
    np.testing.assert_array_equal(emb[21], base[1])


def test_pad_to_multiple_of(zoo, tmp_path):
    cfg = _config(zoo, ["chatml"], base="chatml", tokenizer={"source": "base", "pad_to_multiple_of": 16})
    got, tok = _parity(zoo, tmp_path, cfg)
    assert len(tok.get_vocab()) == 66
    assert json.loads((tmp_path / "us" / "config.json").read_text())["vocab_size"] == 80
    emb = got["model.embed_tokens.weight"]
    assert emb.shape == (80, 32)
    want = emb[:66].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(emb[66:], np.broadcast_to(want, (14, 32)), rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# mergekit's tests/test_chat_template.py (float32 here: the tensors are compared too)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template,needle", [("chatml", "<|im_start|>"),
                                             ("{{messages[0]['content']}}", "{{messages[0]['content']}}")])
def test_chat_template(zoo, tmp_path, template, needle):
    cfg = {"merge_method": "linear", "base_model": zoo["base"], "dtype": "float32", "chat_template": template,
           "models": [{"model": zoo["base"], "parameters": {"weight": 0.5}},
                      {"model": zoo["b"], "parameters": {"weight": 0.5}}]}
    _, tok = _parity(zoo, tmp_path, cfg)
    assert needle in tok.chat_template


def test_chat_template_auto_takes_the_inputs_template(zoo, tmp_path):
    tpl = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    d = tmp_path / "templated"
    import shutil

    shutil.copytree(zoo["chatml"], d)
    tok = _tok(d)
    tok.chat_template = tpl
    tok.save_pretrained(d)
    cfg = {"merge_method": "linear", "base_model": zoo["chatml"], "dtype": "float32", "chat_template": "auto",
           "models": [{"model": str(d), "parameters": {"weight": 0.5}},
                      {"model": zoo["chatml"], "parameters": {"weight": 0.5}}]}
    _, out = _parity(zoo, tmp_path, cfg)
    assert out.chat_template == tpl


# ----------------------------------------------------------------------------------------------
# beyond mergekit's suite: realigned ids, averaged rows, other methods, no base, logits
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["union", "base"])
def test_permuted_ids_and_shared_new_tokens(zoo, tmp_path, source):
    """``shuffled`` holds the base's tokens under other ids (rows realigned); ``extra1``/``extra2``
    share two tokens the base lacks (union: their rows averaged)."""
    cfg = _config(zoo, ["base", "shuffled", "extra1", "extra2"], tokenizer_source=source, weight=0.7)
    got, tok = _parity(zoo, tmp_path, cfg, by_token=True)
    ours, theirs = tok.get_vocab(), _tok(tmp_path / "mk").get_vocab()
    assert len(ours) == (66 if source == "union" else 64)
    words = ["<s>", "_tok_5", "_tok_17", "_tok_40", "_tok_63"] + (["_new_a", "_new_b"] if source == "union" else [])
    lo_us = _logits(tmp_path / "us", [ours[w] for w in words])[..., [ours[w] for w in words]]
    lo_mk = _logits(tmp_path / "mk", [theirs[w] for w in words])[..., [theirs[w] for w in words]]
    np.testing.assert_allclose(lo_us, lo_mk, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,params", [("task_arithmetic", {"lambda": 0.9}),
                                           ("ties", {"density": 0.5})])
def test_methods_with_a_base(zoo, tmp_path, method, params):
    cfg = _config(zoo, ["shuffled", "chatml"], method=method, weight=0.6, tokenizer_source="union",
                  parameters=params)
    _parity(zoo, tmp_path, cfg, by_token=True)


@pytest.mark.parametrize("models", [["chatml", "shuffled", "extra1"], ["extra1", "chatml", "shuffled"]])
def test_no_base_model(zoo, tmp_path, monkeypatch, models):
    """Without a base the first model's tokenizer is the one the union starts from: chatml first
    (extra1's two new tokens become added tokens) and extra1 first (they stay regular tokens of
    its vocabulary, chatml's two become added ones)."""
    cfg = _config(zoo, models, base=None, weight=0.5, tokenizer_source="union")
    res = merge(cfg, tmp_path / "us")
    assert any("first model" in n for n in res.notes)
    # The union, from the inputs' vocabularies alone (tokens with a row in their model).
    union = set()
    for m in models:
        rows = json.loads(open(os.path.join(zoo[m], "config.json")).read())["vocab_size"]
        union |= {t for t, i in _tok(zoo[m]).get_vocab().items() if i < rows}
    ours = _tok(tmp_path / "us")
    assert set(ours.get_vocab()) == union
    first = _tok(zoo[models[0]])
    first_added = {a.content for a in first.added_tokens_decoder.values()}
    assert {a.content for a in ours.added_tokens_decoder.values()} == first_added | (union - set(first.get_vocab()))
    _same_output(tmp_path / "us", _mergekit(cfg, tmp_path / "mk", monkeypatch), by_token=True)


def test_input_without_tokenizer_has_the_base_vocabulary(zoo, tmp_path):
    cfg = _config(zoo, ["base", "b", "chatml"], tokenizer_source="union")
    _parity(zoo, tmp_path, cfg)
    res = merge(cfg, tmp_path / "again")
    assert any("no tokenizer in" in n for n in res.notes)


def _aligned_reference(zoo, models, tensor):
    """Union alignment with a base, written out with NumPy from the tokenizers' vocabularies (no
    code of the module under test): own row if the input has the token, else the only holder's
    row, else the base's, else the mean of the holders'."""
    vocabs = [{t: i for t, i in _tok(zoo[m]).get_vocab().items()
               if i < json.loads(open(os.path.join(zoo[m], "config.json")).read())["vocab_size"]} for m in models]
    out_vocab = dict(vocabs[0])
    for v in vocabs[1:]:
        for t, _ in sorted(v.items(), key=lambda kv: kv[1]):
            out_vocab.setdefault(t, len(out_vocab))
    rows = [load_file(os.path.join(zoo[m], "model.safetensors"))[tensor].astype(np.float64) for m in models]
    aligned = []
    for k in range(len(models)):
        e = np.zeros((len(out_vocab), rows[0].shape[1]))
        for t, j in out_vocab.items():
            holders = [h for h in range(len(models)) if t in vocabs[h]]
            if t in vocabs[k]:
                e[j] = rows[k][vocabs[k][t]]
            elif len(holders) == 1 or 0 in holders:
                h = holders[0]
                e[j] = rows[h][vocabs[h][t]]
            else:
                e[j] = np.mean([rows[h][vocabs[h][t]] for h in holders], axis=0)
        aligned.append(e)
    return out_vocab, aligned


def test_aligned_rows_match_a_numpy_construction_at_any_block_size(zoo, tmp_path, monkeypatch):
    """The linear merge of union-aligned rows equals the NumPy construction; reading rows a few at a
    time (tiny blocks) gives the same bytes as the default block."""
    models = ["base", "shuffled", "extra1", "extra2"]
    cfg = _config(zoo, models, weight=0.25, tokenizer_source="union")
    merge(cfg, tmp_path / "us")
    monkeypatch.setattr(tk, "ROW_BLOCK_BYTES", 3 * 32 * 4)     # three rows per read
    merge(cfg, tmp_path / "small")
    got, small = _read(tmp_path / "us"), _read(tmp_path / "small")
    vocab = _tok(tmp_path / "us").get_vocab()
    for tensor in ("model.embed_tokens.weight", "lm_head.weight"):
        np.testing.assert_array_equal(got[tensor], small[tensor])
        out_vocab, aligned = _aligned_reference(zoo, models, tensor)
        assert vocab == out_vocab
        np.testing.assert_allclose(got[tensor], np.mean(aligned, axis=0), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# bad tokenizer settings: one line, nothing written
# ----------------------------------------------------------------------------------------------
def _bad_cases(zoo):
    tokens = lambda rule: {"tokenizer": {"source": "union", "tokens": {"_tok_5": rule}}}  # noqa: E731
    return [
        ({"tokenizer_source": "unoin"}, "neither 'base', 'union' nor a model directory"),
        ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "not both"),
        ({"tokenizer": {"source": "union", "pad_to": 8}}, "unknown key 'pad_to'"),
        ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "positive integer"),
        ({"tokenizer": {"source": "union", "tokens": {"<brand_new>": {"force": True}}}}, "no source is given"),
        (tokens({"source": {"kind": "model_token", "model": zoo["chatml"], "token": "<nope>"}, "force": True}),
         "not in the vocabulary"),
        (tokens({"source": {"kind": "model_token", "model": zoo["chatml"], "token_id": 500}, "force": True}),
         "out of range"),
        (tokens({"source": {"kind": "model_token", "model": zoo["chatml"]}}), "exactly one of token_id and token"),
        (tokens({"source": zoo["b"], "force": True}), "not an input of the merge"),
        ({"tokenizer": {"tokens": {"<|im_start|>": {"source": zoo["base"]}}}}, "not in the vocabulary of its source"),
        ({"chat_template": "chatmll"}, "is not a template name"),
        ({"chat_template": "short {x}"}, "is not a template name"),
    ]


def test_bad_settings_are_one_line_errors(zoo, tmp_path):
    for i, (top, words) in enumerate(_bad_cases(zoo)):
        cfg = _config(zoo, ["base", "chatml"], **top)
        with pytest.raises(UnmergeError) as err:
            merge(cfg, tmp_path / f"out{i}")
        msg = str(err.value)
        assert words in msg and "\n" not in msg and len(msg) < 400, (top, msg)
        assert not (tmp_path / f"out{i}").exists()


def test_template_name_without_mergekit_is_refused(zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(tk, "_mergekit_templates", lambda: None)
    with pytest.raises(UnmergeError, match="mergekit is not installed|it is not installed"):
        merge(_config(zoo, ["base"], chat_template="chatml"), tmp_path / "out")
    merge(_config(zoo, ["base"], chat_template="{{ messages[0]['content'] }} inline"), tmp_path / "inline")
    assert _tok(tmp_path / "inline").chat_template == "{{ messages[0]['content'] }} inline"


def test_cli_refuses_an_unknown_tokenizer_source(zoo, tmp_path):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_config(zoo, ["base", "chatml"], tokenizer_source="unoin")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UNMERGE_PROGRESS": "0"}
    r = subprocess.run([sys.executable, "-m", "unmerge_jax.cli.main", "merge", str(path), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "'unoin' is neither" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


class _Vocab:
    """A stand-in output tokenizer (only ``get_vocab`` is used to align rows)."""

    def __init__(self, n):
        self.vocab = {f"t{i}": i for i in range(n)}

    def get_vocab(self):
        return dict(self.vocab)


def test_aligning_streams_rows_in_blocks(tmp_path, monkeypatch):
    """Aligning a 4 MiB embedding into the driver's buffer allocates about one row block (not a
    second tensor): permuted own rows, default rows averaged from two inputs, a zero row, padding
    rows — against NumPy fancy indexing."""
    import tracemalloc

    from safetensors.numpy import save_file

    from unmerge_jax.sources import CheckpointSource

    rng = np.random.default_rng(0)
    n, width, n_rows = 4000, 256, 4096
    mats = [rng.standard_normal((n, width)).astype(np.float32) for _ in range(2)]
    srcs = []
    for k, m in enumerate(mats):
        save_file({"model.embed_tokens.weight": m}, str(tmp_path / f"m{k}.safetensors"))
        srcs.append(CheckpointSource(tmp_path / f"m{k}.safetensors"))
    own0 = rng.permutation(n)
    own0[[7, 8, 9]] = -1                               # input 0 lacks three tokens
    inputs = [tk.VocabInput(tmp_path / "m0", {}, n, own0), tk.VocabInput(tmp_path / "m1", {}, n, np.arange(n))]
    defaults = {7: [(1, 7)], 8: [(0, 3), (1, 8)], 9: []}
    vocab = tk.AlignedVocabulary(_Vocab(n), inputs, defaults, set(), n_rows, None, [])
    wrapped = vocab.wrap(srcs[0], 0)
    vocab.wrap(srcs[1], 1)
    assert wrapped.shape("model.embed_tokens.weight") == (n_rows, width)
    monkeypatch.setattr(tk, "ROW_BLOCK_BYTES", 64 << 10)
    buf = np.empty(n_rows * width, np.float32)
    vocab.default_rows("model.embed_tokens.weight", (width,))    # shared by the inputs: read once, first
    tracemalloc.start()
    got = wrapped.read("model.embed_tokens.weight", out=buf)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.shares_memory(got, buf)
    assert peak < 512 << 10, peak                        # the tensor is 4 MiB
    want = np.zeros((n_rows, width), np.float64)
    keep = own0 >= 0
    want[np.flatnonzero(keep)] = mats[0][own0[keep]]
    want[7] = mats[1][7]
    want[8] = (mats[0][3].astype(np.float64) + mats[1][8]) / 2
    want[n:] = want[:n].mean(axis=0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_lora_adapter_input_has_the_base_vocabulary(zoo, tmp_path):
    """A PEFT adapter among the inputs of a union merge gives what its merged-and-unloaded model
    (with the base's tokenizer) gives: its vocabulary and embedding rows are the base's."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    torch.manual_seed(11)
    pm = peft.get_peft_model(LlamaForCausalLM.from_pretrained(zoo["base"]),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    pm.save_pretrained(tmp_path / "lora")
    pm.merge_and_unload().save_pretrained(tmp_path / "unloaded")
    _tok(zoo["base"]).save_pretrained(tmp_path / "unloaded")
    zoo = {**zoo, "lora": str(tmp_path / "lora"), "unloaded": str(tmp_path / "unloaded")}
    for name in ("lora", "unloaded"):
        merge(_config(zoo, [name, "chatml"], method="task_arithmetic", weight=0.8, tokenizer_source="union"),
              tmp_path / f"out_{name}")
    a, b = _read(tmp_path / "out_lora"), _read(tmp_path / "out_unloaded")
    assert set(a) == set(b) and a["model.embed_tokens.weight"].shape == (66, 32)
    for n in a:
        np.testing.assert_allclose(a[n], b[n], rtol=0, atol=1e-6, err_msg=n)
    assert _tok(tmp_path / "out_lora").get_vocab() == _tok(tmp_path / "out_unloaded").get_vocab()


def test_new_token_with_source_base(zoo, tmp_path):
    """A ``tokens:`` entry new to the base vocabulary under ``source: base`` (mergekit 0.1.5 stops
    with a KeyError here): the token is appended with its source's row, every other row is the
    plain ``source: base`` merge."""
    rule = {"source": {"kind": "model_token", "model": zoo["chatml"], "token": "<|im_end|>"}}
    merge(_config(zoo, ["base", "chatml"], tokenizer={"source": "base", "tokens": {"<brand_new>": rule}}),
          tmp_path / "new")
    merge(_config(zoo, ["base", "chatml"], tokenizer_source="base"), tmp_path / "plain")
    new, plain = _read(tmp_path / "new"), _read(tmp_path / "plain")
    chatml = load_file(os.path.join(zoo["chatml"], "model.safetensors"))
    end = _tok(zoo["chatml"]).get_vocab()["<|im_end|>"]
    assert _tok(tmp_path / "new").get_vocab()["<brand_new>"] == 64
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        assert new[n].shape == (65, 32)
        np.testing.assert_array_equal(new[n][:64], plain[n])
        np.testing.assert_array_equal(new[n][64], chatml[n][end])   # every input takes the source's row


# ----------------------------------------------------------------------------------------------
# tokenizer settings with slices: (layer stacks and per-slice merges)
# ----------------------------------------------------------------------------------------------
def _slices(zoo, method, slices, **top):
    """A ``slices:`` config: ``slices`` lists per slice ``[(model, lo, hi, params), ...]``."""
    return {"merge_method": method, "dtype": "float32", **top,
            "slices": [{"sources": [{"model": zoo[m], "layer_range": [lo, hi], **({"parameters": p} if p else {})}
                                    for m, lo, hi, p in sl]} for sl in slices]}


def _slices_parity(zoo, tmp_path, monkeypatch, cfg, by_token=False):
    theirs = _mergekit(cfg, tmp_path / "mk", monkeypatch)
    res = merge(cfg, tmp_path / "us")
    got, tok = _same_output(tmp_path / "us", theirs, by_token)
    return got, tok, res


STACK = [[("base", 0, 2, None)], [("chatml", 1, 2, None)]]     # 3 layers: base's two, then chatml's second


def test_slices_passthrough_stack_union(zoo, tmp_path, monkeypatch):
    """A layer stack whose models' vocabularies differ: the embeddings are aligned over the first
    slice's model (the base lacks chatml's two tokens: zero rows, as mergekit), the head over the
    last slice's (its own rows); the logits of the loaded outputs equal."""
    cfg = _slices(zoo, "passthrough", STACK, tokenizer_source="union")
    got, tok, res = _slices_parity(zoo, tmp_path, monkeypatch, cfg)
    vocab = tok.get_vocab()
    assert len(vocab) == 66 and got["model.embed_tokens.weight"].shape == (66, 32)
    assert json.loads((tmp_path / "us" / "config.json").read_text())["num_hidden_layers"] == 3
    chatml = load_file(os.path.join(zoo["chatml"], "model.safetensors"))
    ids = _tok(zoo["chatml"]).get_vocab()
    for t in ("<|im_start|>", "<|im_end|>"):
        np.testing.assert_array_equal(got["model.embed_tokens.weight"][vocab[t]], 0)
        np.testing.assert_array_equal(got["lm_head.weight"][vocab[t]], chatml["lm_head.weight"][ids[t]])
    assert not any("in no input" in n for n in res.notes)     # every token is in some input
    words = [vocab[w] for w in ("<s>", "_tok_5", "_tok_40", "<|im_start|>", "<|im_end|>")]
    np.testing.assert_allclose(_logits(tmp_path / "us", words), _logits(tmp_path / "mk", words), rtol=0, atol=1e-5)


def test_slices_per_slice_merge_with_a_base_and_forced_tokens(zoo, tmp_path, monkeypatch):
    """task_arithmetic per slice (the base among each slice's sources), a ``tokenizer:`` block
    with a forced token and a model_token source, and a chat template."""
    cfg = _slices(zoo, "task_arithmetic",
                  [[("base", 0, 1, None), ("chatml", 0, 1, {"weight": 0.7}), ("padded", 0, 1, {"weight": 0.4})],
                   [("base", 1, 2, None), ("chatml", 1, 2, {"weight": 0.5}), ("padded", 1, 2, {"weight": 0.9})]],
                  base_model=zoo["base"], chat_template="chatml", tokenizer={"source": "union", "tokens": {
                      "_tok_10": {"source": zoo["chatml"], "force": True},
                      "<|im_end|>": {"source": {"kind": "model_token", "model": zoo["base"], "token": "</s>"}}}})
    got, tok, _ = _slices_parity(zoo, tmp_path, monkeypatch, cfg)
    assert "<|im_start|>" in tok.chat_template


def test_slices_source_base_with_differing_vocabularies(zoo, tmp_path, monkeypatch):
    """``tokenizer_source: base`` merges sources whose vocabulary sizes and tokens differ (chatml's
    added tokens, extra1's new regular ones, shuffled's 64 rows in another order); without it the
    shapes are refused, naming the fix."""
    sl = [[("chatml", 0, 2, {"weight": 0.6}), ("extra1", 0, 2, {"weight": 0.4}), ("shuffled", 0, 2, {"weight": 0.3})]]
    cfg = _slices(zoo, "linear", sl, base_model=zoo["chatml"], tokenizer_source="base")
    got, tok, _ = _slices_parity(zoo, tmp_path, monkeypatch, cfg)
    assert len(tok.get_vocab()) == 66 and "_new_a" not in tok.get_vocab()
    with pytest.raises(UnmergeError, match="set tokenizer_source"):
        merge(_slices(zoo, "linear", sl, base_model=zoo["chatml"]), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_slices_slerp_union_without_a_top_level_base(zoo, tmp_path, monkeypatch):
    """slerp per slice (each slice naming its own base) and a passthrough-free union with new regular
    tokens (ids compared token by token: mergekit numbers them in hash-map order)."""
    cfg = {"merge_method": "slerp", "dtype": "float32", "tokenizer_source": "union", "parameters": {"t": 0.4},
           "slices": [{"base_model": zoo["extra1"], "sources": [{"model": zoo["extra1"], "layer_range": [0, 2]},
                                                                 {"model": zoo["shuffled"], "layer_range": [0, 2]}]}]}
    _slices_parity(zoo, tmp_path, monkeypatch, cfg, by_token=True)


def test_slices_token_source_outside_the_tensors_sources_is_refused(zoo, tmp_path, monkeypatch):
    """The embeddings of a stack come from the first slice only: a ``tokens:`` source from another
    slice's model cannot give them a row (mergekit stops with a ValueError); one from the first
    slice's model can."""
    rule = lambda m: {"tokenizer": {"source": "union", "tokens": {  # noqa: E731
        "<|im_start|>": {"source": {"kind": "model_token", "model": zoo[m], "token": "<s>"}}}}}
    with pytest.raises(UnmergeError, match=r"is not among the sources of slices\[0\]") as err:
        merge(_slices(zoo, "passthrough", STACK, **rule("chatml")), tmp_path / "refused")
    assert "\n" not in str(err.value) and not (tmp_path / "refused").exists()
    with pytest.raises(ValueError, match="requires a vocabulary weight"):
        _mergekit(_slices(zoo, "passthrough", STACK, **rule("chatml")), tmp_path / "mk_refused", monkeypatch)
    got, tok, _ = _slices_parity(zoo, tmp_path, monkeypatch, _slices(zoo, "passthrough", STACK, **rule("base")))
    base = load_file(os.path.join(zoo["base"], "model.safetensors"))["model.embed_tokens.weight"]
    np.testing.assert_array_equal(got["model.embed_tokens.weight"][tok.get_vocab()["<|im_start|>"]], base[1])


@pytest.mark.parametrize("tokenizer", [{}, {"tokenizer_source": "union"}])
def test_slices_head_from_the_last_slices_first_sources(zoo, tmp_path, monkeypatch, tokenizer):
    """A last slice with more sources than the first: mergekit merges the final norm and the head
    from its first two sources only (a note says so), the vocabulary aligned over those two."""
    cfg = _slices(zoo, "linear", [[("base", 0, 1, {"weight": 0.5}), ("chatml", 0, 1, {"weight": 0.5})],
                                  [("base", 1, 2, {"weight": 0.2}), ("chatml", 1, 2, {"weight": 0.3}),
                                   ("b", 1, 2, {"weight": 0.5})]], **tokenizer)
    if not tokenizer:      # same vocabulary sizes are needed without tokenizer settings
        cfg["slices"][0]["sources"][1]["model"] = cfg["slices"][1]["sources"][1]["model"] = zoo["padded"]
    got, _, res = _slices_parity(zoo, tmp_path, monkeypatch, cfg)
    assert any("first 2 of its 3 sources" in n for n in res.notes)
    head = {m: load_file(os.path.join(zoo[m], "model.safetensors"))["lm_head.weight"] for m in ("base", "padded", "b")}
    if not tokenizer:
        np.testing.assert_allclose(got["lm_head.weight"], 0.4 * head["base"] + 0.6 * head["padded"], rtol=0, atol=1e-6)
