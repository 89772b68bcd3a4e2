"""Row-block merges: a tensor streamed from its sources chunk by chunk (``whole_max=0``) gives the
bits of the whole-tensor merge, for every registered method, through ``unmerge_jax.merge`` on tiny
checkpoints; the writer's parts; NaN diagnostics; virtual sources into a discarding writer.

The checkpoints hold a tensor smaller than a chunk, tensors split by chunks inside their rows, and
two tensors above the sampling size of the order statistics (``orderstats.SAMPLE``·4), one with
magnitudes quantised to a few levels (ties at every TIES threshold, across chunks; the bracketed
selection overflows into the radix fallback) and one continuous (the bracket holds).
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.test_merge_registry import N_MODELS, REFERENCES
from unmerge_jax import merge
from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.writer import NullWriter, ShardedWriter
from unmerge_jax.merge.methods import MERGE_METHODS

CHUNK = 4096
SHAPES = {"model.embed_tokens.weight": (601, 500),      # 300,500 entries: sampled order statistics, ties
          "lm_head.weight": (520, 520),                 # 270,400: sampled, continuous magnitudes
          "model.layers.0.mlp.up_proj.weight": (37, 23),
          "model.layers.1.self_attn.q_proj.weight": (23, 23),
          "model.layers.0.input_layernorm.weight": (23,),
          "model.norm.weight": (23,)}
WEIGHTS = (0.5, 1.0, 0.8)
K_OF = {**N_MODELS, "passthrough": 1}


def _save(d, tensors, dtype=np.float32):
    d.mkdir(parents=True)
    save_file({n: np.asarray(t, dtype) for n, t in tensors.items()} | {"model.position_ids": np.arange(7)[None]},
              str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                               "num_hidden_layers": 2, "hidden_size": 23}))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base and three fine-tunes (the third stored as bfloat16)."""
    root = tmp_path_factory.mktemp("rows")
    rng = np.random.default_rng(11)
    base = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    _save(root / "base", base)
    dirs = []
    for i in range(3):
        ft = {}
        for n, s in SHAPES.items():
            d = 0.05 * rng.normal(size=s) * (rng.random(s) < 0.7)
            if n == "model.embed_tokens.weight":
                d = np.round(d * 64) / 64          # a few magnitudes: ties at every threshold
            ft[n] = (base[n] + d).astype(np.float32)
        _save(root / f"ft{i}", ft, dtype=(ml_dtypes.bfloat16 if i == 2 else np.float32))
        dirs.append(root / f"ft{i}")
    return root, dirs


def _config(root, dirs, method, params):
    k = K_OF.get(method, 3)
    p = dict(params)
    per_model = [{"weight": w} for w in WEIGHTS[:k]]
    for key in ("density",):
        if isinstance(p.get(key), list):
            for pm, v in zip(per_model, p.pop(key)):
                pm[key] = v
    if method in ("passthrough",):
        per_model = [{}]
    return {"merge_method": method, "base_model": str(root / "base"), "dtype": "float32", "parameters": p,
            "models": [{"model": str(d), "parameters": pm} for d, pm in zip(dirs[:k], per_model)]}


def _tensors(out):
    return load_file(str(out / "model.safetensors"))


def _assert_same_bits(a, b):
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
        np.testing.assert_array_equal(a[n].view(np.uint8), b[n].view(np.uint8), err_msg=n)


def _cases():
    """Every registry entry's first reference case, and the cases that exercise thresholds, ties,
    random masks and whole-model passes."""
    out = []
    for name in sorted(MERGE_METHODS):
        cases = REFERENCES[name][1]
        picked = [cases[0]]
        if name in ("ties", "dare_ties", "breadcrumbs_ties", "della", "sce", "model_stock", "nuslerp"):
            picked += cases[1:2]
        if name == "ram":
            picked = cases     # every face: percentiles (sampled), whole-model overlap counts
        out += [pytest.param(name, c, id=f"{name}-{i}") for i, c in enumerate(picked)]
    return out


@pytest.mark.parametrize("method,params", _cases())
def test_row_blocks_equal_whole_tensors(models, tmp_path, method, params):
    root, dirs = models
    cfg = _config(root, dirs, method, params)
    whole = merge(cfg, tmp_path / "whole", seed=3, chunk=CHUNK)
    rows = merge(cfg, tmp_path / "rows", seed=3, chunk=CHUNK, whole_max=0)
    assert rows.n_merged == whole.n_merged
    _assert_same_bits(_tensors(tmp_path / "whole"), _tensors(tmp_path / "rows"))


def test_rows_overlap_bf16_output_and_chunk_sizes(models, tmp_path):
    """Streamed with the overlap thread, into bfloat16, at two chunk sizes: the same bits."""
    root, dirs = models
    cfg = _config(root, dirs, "ties", {"density": [0.2, 0.5, 0.9]})
    merge(cfg, tmp_path / "whole", seed=1, dtype="bfloat16")
    want = _tensors(tmp_path / "whole")
    for i, (chunk, overlap) in enumerate(((CHUNK, True), (1 << 20, False), (777, True))):
        merge(cfg, tmp_path / f"rows{i}", seed=1, dtype="bfloat16", chunk=chunk, overlap=overlap, whole_max=0)
        _assert_same_bits(want, _tensors(tmp_path / f"rows{i}"))


def test_rows_threshold_mixes_whole_and_streamed(models, tmp_path):
    """whole_max between the tensor sizes: small tensors whole, large ones streamed, same bits, and
    the output is a valid sharded checkpoint."""
    root, dirs = models
    cfg = _config(root, dirs, "dare_ties", {"density": 0.4})
    merge(cfg, tmp_path / "whole", seed=9, chunk=CHUNK)
    merge(cfg, tmp_path / "mixed", seed=9, chunk=CHUNK, whole_max=1000, shard_bytes=600_000)
    index = json.loads((tmp_path / "mixed" / "model.safetensors.index.json").read_text())
    got = {}
    for f in sorted(set(index["weight_map"].values())):
        got.update(load_file(str(tmp_path / "mixed" / f)))
    _assert_same_bits(_tensors(tmp_path / "whole"), got)


def test_rows_nonfinite_named_like_whole(models, tmp_path):
    """A NaN in a streamed tensor of an input: the same one-line error as the whole-tensor merge."""
    root, dirs = models
    bad = tmp_path / "bad"
    t = load_file(str(dirs[1] / "model.safetensors"))
    t["lm_head.weight"][300, 7] = np.nan
    bad.mkdir()
    save_file(t, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((dirs[1] / "config.json").read_text())
    cfg = _config(root, [dirs[0], bad, dirs[2]], "ties", {"density": 0.3})
    msgs = []
    for i, wm in enumerate((1 << 22, 0)):
        with pytest.raises(UnmergeError) as err:
            merge(cfg, tmp_path / f"o{i}", chunk=CHUNK, whole_max=wm)
        msgs.append(str(err.value))
        assert not (tmp_path / f"o{i}").exists()
    assert msgs[0] == msgs[1] and "lm_head.weight" in msgs[0] and "(300, 7)" in msgs[0] and str(bad) in msgs[0]


def test_rows_output_overflow_named_like_whole(models, tmp_path):
    """A merged value beyond float16 in a streamed tensor: the same error (the value re-run streamed)."""
    root, dirs = models
    cfg = _config(root, dirs, "task_arithmetic", {"lambda": 3.0e6})
    msgs = []
    for i, wm in enumerate((1 << 22, 0)):
        with pytest.raises(UnmergeError) as err:
            merge(cfg, tmp_path / f"o{i}", chunk=CHUNK, whole_max=wm, dtype="float16")
        msgs.append(str(err.value))
    assert msgs[0] == msgs[1] and "float16" in msgs[0]


def test_writer_parts(tmp_path):
    """write_part at known offsets, in any order, gives the file a whole write gives; incomplete
    tensors and overlapping plans are refused."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)).astype(np.float32), rng.normal(size=(11,)).astype(np.float32)
    plan = [("a", a.shape, "BF16"), ("b", b.shape, "F32")]
    (tmp_path / "w").mkdir()
    (tmp_path / "p").mkdir()
    with ShardedWriter(tmp_path / "w", plan) as w:
        w.write("a", a)
        w.write("b", b)
    with ShardedWriter(tmp_path / "p", plan) as w:
        flat = a.reshape(-1)
        w.write_part("a", 20, flat[20:])
        w.write_part("a", 0, flat[:20])
        w.write("b", b)
    assert (tmp_path / "w" / "model.safetensors").read_bytes() == (tmp_path / "p" / "model.safetensors").read_bytes()
    (tmp_path / "q").mkdir()
    w = ShardedWriter(tmp_path / "q", plan)
    w.write_part("a", 0, a.reshape(-1)[:10])
    with pytest.raises(UnmergeError, match="being written in parts"):
        w.write("a", a)
    with pytest.raises(UnmergeError, match="outside"):
        w.write_part("a", 30, a.reshape(-1)[:10])
    with pytest.raises(UnmergeError, match="only 10 of its entries"):
        w.close()
    n = NullWriter(plan)
    n.write_part("a", 0, a.reshape(-1))
    n.write("b", b)
    n.close()
    assert n.written == n.total_size == 35 * 2 + 11 * 4


def test_virtual_sources_into_null_writer():
    """merge_sources on virtual sources with row generators: the same bits streamed as whole, and
    the whole tensor is never generated when streaming."""
    from unmerge_jax.merge.driver import merge_sources
    from unmerge_jax.sources import VirtualSource, WEIGHTS as W

    shapes = {"a.weight": (300, 1000), "b.weight": (40, 30)}
    calls = []

    def make(seed):
        def rows(name, lo, hi):
            g = np.random.default_rng([seed, len(name)])
            full = g.normal(size=shapes[name]).astype(np.float32)   # cheap here; real benches key by row
            return full[lo:hi]

        def whole(name):
            calls.append(name)
            return rows(name, 0, shapes[name][0])
        return VirtualSource(shapes, whole, kind=W, generate_rows=rows)

    srcs = [make(s) for s in range(4)]
    got = {}

    class Keep(NullWriter):
        def write(self, name, array):
            got.setdefault(name, []).append((0, np.array(array).reshape(-1)))
            super().write(name, array)

        def write_part(self, name, start, values):
            got.setdefault(name, []).append((start, np.array(values)))
            super().write_part(name, start, values)

    plan = [(n, shapes[n], "F32") for n in sorted(shapes)]
    outs = []
    for wm in (1 << 22, 0):
        got.clear()
        calls.clear()
        merge_sources(srcs[0], srcs[1:], "ties", Keep(plan), params={"density": 0.3}, chunk=CHUNK, whole_max=wm)
        outs.append({n: np.concatenate([v for _, v in sorted(p, key=lambda x: x[0])]) for n, p in got.items()})
        if wm == 0:
            assert calls == []
    for n in shapes:
        np.testing.assert_array_equal(outs[0][n].view(np.uint32), outs[1][n].view(np.uint32))


def _read_dir(d):
    from tests._tiny_models import stored_state

    return {n: np.asarray(v) for n, v in stored_state(d).items()}


def test_rows_lora_inputs_and_model_plus_lora(tmp_path):
    """PEFT LoRA adapters as inputs, and ``model+lora`` references (the ΔW formed whole for its
    tensor, every other input streamed): the same bits as the whole-tensor merge."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from tests._tiny_models import fine_tune, parity_llama

    parity_llama(0).save_pretrained(tmp_path / "base", max_shard_size="100KB")
    fine_tune(lambda: parity_llama(0), 100).save_pretrained(tmp_path / "ft")
    adapters = []
    for i, r in enumerate((4, 8)):
        torch.manual_seed(300 + i)
        pm = peft.get_peft_model(parity_llama(0), peft.LoraConfig(r=r, lora_alpha=8, init_lora_weights=False,
                                                                  target_modules=["q_proj", "v_proj", "o_proj"]))
        pm.save_pretrained(tmp_path / f"lora{i}")
        adapters.append(str(tmp_path / f"lora{i}"))
    refs = [adapters[0], adapters[1], f"{tmp_path / 'ft'}+{adapters[0]}"]
    for method, params in (("ties", {"density": 0.4}), ("dare_linear", {"density": 0.5}), ("ram", {})):
        cfg = {"merge_method": method, "base_model": str(tmp_path / "base"), "dtype": "float32",
               "parameters": params, "models": [{"model": m, "parameters": {"weight": 0.6}} for m in refs]}
        merge(cfg, tmp_path / f"{method}_whole", seed=2, chunk=500)
        merge(cfg, tmp_path / f"{method}_rows", seed=2, chunk=500, whole_max=0)
        _assert_same_bits(_read_dir(tmp_path / f"{method}_whole"), _read_dir(tmp_path / f"{method}_rows"))


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.2}), ("ram", {"face": "percentile"}),
                                           ("dare_linear", {"density": 0.5})])
def test_row_block_memory_does_not_grow_with_the_tensor(method, params):
    """Host allocations (tracemalloc, which sees NumPy's buffers) of a streamed merge of virtual
    models stay at a few chunks when the tensor grows 4×, while the whole-tensor merge holds the
    1 + K inputs. Shapes above the sampling size, so the order statistics' sample walk and bracket
    are in."""
    import tracemalloc

    from unmerge_jax.analysis.study_memory import virtual_model
    from unmerge_jax.merge.driver import merge_sources
    from unmerge_jax.sources import DELTA, WEIGHTS as W

    chunk = 1 << 16
    peaks = {}
    for rows in (256, 1024):
        shapes = {"t.weight": (rows, 1024)}
        base = virtual_model(shapes, 0, 0.02, W)
        models = [virtual_model(shapes, i + 1, 0.002, DELTA) for i in range(3)]
        plan = [("t.weight", shapes["t.weight"], "BF16")]
        for wm in (1 << 30, 0):
            merge_sources(base, models, method, NullWriter(plan), params=params, chunk=chunk, whole_max=wm)  # compile
            tracemalloc.start()
            merge_sources(base, models, method, NullWriter(plan), params=params, chunk=chunk, whole_max=wm)
            peaks[rows, wm] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    tensor = 1024 * 1024 * 4
    assert peaks[1024, 1 << 30] > 4 * tensor                      # whole: base + 3 inputs of 4 MiB
    # streamed: ≤ 20 chunk buffers (base, inputs, padding, bits, output, generation) + the bracket
    assert peaks[1024, 0] < 20 * chunk * 4 + 0.05 * 3 * tensor
    assert peaks[1024, 0] - peaks[256, 0] < 0.05 * 3 * (tensor - tensor // 4) + 64 * 1024, peaks
