"""The checkpoint statistics pass: equal to ``gram_stats`` on the dense concatenation (1 and 8
devices, every selection mode), masks reused, each tensor read once, bad input, and peak memory
independent of the number of tensors. The top-k rule itself: ``test_mask_pass.py``."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import unmerge_jax as u
from unmerge_jax import UnmergeError
from unmerge_jax.passes.mask import Selection
from unmerge_jax.io.names import parse_tensor_name

pytestmark = pytest.mark.models



def _adapter_delta(path, module):
    """ΔW of one module straight from the adapter file (independent of unmerge_jax.io.lora)."""
    from safetensors.numpy import load_file

    cfg = json.loads((path / "adapter_config.json").read_text())
    t = load_file(str(path / "adapter_model.safetensors"))
    stem = "base_model.model." + module[: -len(".weight")]
    a, b = t.get(stem + ".lora_A.weight"), t.get(stem + ".lora_B.weight")
    if a is None:
        return None
    r = a.shape[0]
    scale = cfg["lora_alpha"] / (np.sqrt(r) if cfg.get("use_rslora") else r)
    return (b.astype(np.float32) @ a.astype(np.float32)) * np.float32(scale)


def reference_columns(base, sources, selection):
    """Dense (rows × sources) float32 task vectors in the documented row order, from NumPy reads."""
    from tests._tiny_models import numpy_state

    b = numpy_state(base)
    cols = []
    for src in sources:
        is_adapter = (src / "adapter_config.json").exists()
        st = None if is_adapter else numpy_state(src)
        parts = []
        for n in selection.names:
            if is_adapter:
                d = _adapter_delta(src, n)
                d = np.zeros_like(b[n]) if d is None else d
            else:
                d = st[n] - b[n]
            d = d.reshape(-1)
            idx = selection.index[n]
            parts.append(d if idx is None else d[idx])
        cols.append(np.concatenate(parts))
    return np.stack(cols, axis=1)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def assert_stats_equal(got, want, tol=1e-10):
    assert got.n_seeds == want.n_seeds
    for f in u.GramStats._fields:
        g, w = getattr(got, f), getattr(want, f)
        if w is None:
            assert g is None
            continue
        assert _rel(g, w) <= tol, f


CASES = {
    "full": dict(),
    "qkvo": dict(modules="q,k,v,o"),
    "group": dict(top_k=3000),
    "global": dict(top_k=2500, scope="global", modules="attn,mlp"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n_dev", [1, 8])
def test_stream_equals_dense_gram_stats(tiny, case, n_dev):
    from unmerge_jax.passes.statistics import dense_columns, stream_stats

    q = tiny["qwen"]
    dic = [q / "ft0", q / "ft1", q / "lora0"]     # full fine-tunes and an adapter mixed
    tgt = [q / "ta", q / "lora_ta"]
    devices = jax.devices()[:n_dev]
    assert len(devices) == n_dev
    # small blocks: rows of several tensors share a block and tensors span blocks
    res = stream_stats(q / "base", dic, tgt, seeds=3, key=11, devices=devices, block_rows=5000, **CASES[case])
    sel = res.selection
    assert res.provenance["n_blocks"] > 1 or case in ("group", "global")
    ref = reference_columns(q / "base", dic + tgt, sel)
    assert ref.shape == (sel.n_rows, 5)
    D, V = dense_columns(q / "base", dic, tgt, sel)
    np.testing.assert_array_equal(np.hstack([D, V]), ref)
    want = u.gram_stats(ref[:, :3], ref[:, 3:], seeds=3, key=11)
    assert_stats_equal(res.stats, want)
    assert int(res.stats.n_rows) == sel.n_rows
    p = res.provenance
    assert p["atom_names"] == ["ft0", "ft1", "lora0"] and p["target_names"] == ["ta", "lora_ta"]
    assert p["n_tensors"] == len(sel.names) and p["n_rows"] == sel.n_rows and p["seeds"] == 3
    assert p["dictionary"][2]["kind"] == "adapter" and p["base_dtypes"] == {"F32": len(sel.names)}
    if case == "qkvo":
        assert {parse_tensor_name(n).short for n in sel.names} == {"q", "k", "v", "o"}


@pytest.mark.parametrize("base_dir", ["base_bf16", "base_fp16"])
def test_half_precision_base_streams_like_its_float32_upcast(tiny, base_dir):
    """Stored bf16/fp16 tensors are staged in their stored dtype and cast to float32 while
    staging: the statistics equal those of the float32-upcast dense columns."""
    from unmerge_jax.passes.statistics import stream_stats

    q = tiny["qwen"]
    dic, tgt = [q / "ft0", q / "lora2"], [q / "ta"]
    res = stream_stats(q / base_dir, dic, tgt, seeds=2, block_rows=3000)
    assert set(res.provenance["base_dtypes"]) == {"BF16" if base_dir == "base_bf16" else "F16"}
    ref = reference_columns(q / base_dir, dic + tgt, res.selection)
    assert_stats_equal(res.stats, u.gram_stats(ref[:, :2], ref[:, 2:], seeds=2))


def test_saved_mask_compresses_targets_identically(tiny, tmp_path):
    from unmerge_jax.passes.statistics import stream_stats

    q = tiny["qwen"]
    dic = [q / "lora0", q / "lora1", q / "lora2"]
    first = stream_stats(q / "base", dic, [q / "lora_ta"], top_k=400, modules="q,k,v,o")
    first.selection.save(tmp_path / "mask.npz")
    loaded = Selection.load(tmp_path / "mask.npz")
    assert loaded.names == first.selection.names and loaded.spec == first.selection.spec
    for n in loaded.names:
        np.testing.assert_array_equal(loaded.index[n], first.selection.index[n])
    again = stream_stats(q / "base", dic, [q / "ta", q / "lora_ta"], mask=tmp_path / "mask.npz", seeds=2)
    ref = reference_columns(q / "base", dic + [q / "ta", q / "lora_ta"], loaded)
    assert_stats_equal(again.stats, u.gram_stats(ref[:, :3], ref[:, 3:], seeds=2))
    np.testing.assert_allclose(np.asarray(again.stats.cross)[:, 1], np.asarray(first.stats.cross)[:, 0], rtol=1e-12)
    assert again.provenance["mask_file"].endswith("mask.npz")
    with pytest.raises(UnmergeError, match=r"the mask has tensor .* with shape \(32,\) but base .*wide has \(16,\)"):
        stream_stats(q / "wide", [q / "wide"], [q / "wide"], mask=tmp_path / "mask.npz")


def test_every_tensor_read_once_per_input(tiny, monkeypatch):
    """Each checkpoint tensor's bytes are read exactly once, in row blocks (flat ranges that tile the
    tensor without overlap, never the whole tensor at once when it spans blocks); each LoRA ΔW is
    formed once."""
    from unmerge_jax.io.checkpoint import Checkpoint
    from unmerge_jax.io.lora import Adapter
    from unmerge_jax.passes.statistics import stream_stats

    ranges, whole, deltas = {}, [], []
    orig_flat, orig_raw, orig_delta = Checkpoint.read_raw_flat, Checkpoint.read_raw, Adapter.delta

    def flat(self, n, start, stop, *a, **kw):
        ranges.setdefault((Path(self.path).name, n), []).append((int(start), int(stop)))
        return orig_flat(self, n, start, stop, *a, **kw)

    monkeypatch.setattr(Checkpoint, "read_raw_flat", flat)
    monkeypatch.setattr(Checkpoint, "read_raw", lambda self, n, *a, **kw: (whole.append(n), orig_raw(self, n, *a, **kw))[1])
    monkeypatch.setattr(Adapter, "delta", lambda self, n, *a, **kw: (deltas.append(n), orig_delta(self, n, *a, **kw))[1])
    q = tiny["qwen"]
    res = stream_stats(q / "base", [q / "ft0", q / "lora0"], [q / "ta"], block_rows=3000)
    names = res.selection.names
    assert not whole
    assert sorted(ranges) == sorted((s, n) for n in names for s in ("base", "ft0", "ta"))
    for (s, n), parts in ranges.items():
        parts.sort()
        size = int(np.prod(res.selection.shapes[n]))
        assert parts[0][0] == 0 and parts[-1][1] == size, (s, n)
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:])), (s, n)  # disjoint, no gap
        assert max(b - a for a, b in parts) <= 3000
    assert sorted(deltas) == sorted(n for n in names if parse_tensor_name(n).short in "qkvo"
                                    and parse_tensor_name(n).param == "weight")


def test_progress_bar_over_tensors(tiny, monkeypatch, capsys):
    from unmerge_jax.passes.statistics import stream_stats

    monkeypatch.setenv("UNMERGE_PROGRESS", "1")
    q = tiny["qwen"]
    stream_stats(q / "base", [q / "ft0"], [q / "ta"], top_k=500)
    err = capsys.readouterr().err
    assert "top-k mask pass" in err and "statistics pass" in err and "tensor" in err


def _nan_copy(src, dst, tensor):
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        t = load_file(str(f))
        if tensor in t:
            t[tensor] = t[tensor].copy()
            t[tensor].reshape(-1)[5] = np.nan
            save_file(t, str(f), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("where", ["target", "dictionary"])
@pytest.mark.parametrize("top_k", [None, 3000])
def test_nan_names_tensor_and_input(tiny, tmp_path, where, top_k):
    from unmerge_jax.passes.statistics import stream_stats

    q = tiny["qwen"]
    bad_name = "model.layers.1.mlp.up_proj.weight"
    src = q / ("ta" if where == "target" else "ft1")
    bad = _nan_copy(src, tmp_path / f"bad_{where}", bad_name)
    dic = [q / "ft0", bad] if where == "dictionary" else [q / "ft0", q / "ft1"]
    tgt = [bad] if where == "target" else [q / "ta"]
    if where == "target" and top_k:  # the NaN entry must be kept for the target to matter: use the full tensor
        top_k = None
    with pytest.raises(UnmergeError, match=rf"tensor {bad_name} of {'target' if where == 'target' else 'dictionary entry'} "
                                           rf"bad_{where} .*holds NaN/Inf") as err:
        stream_stats(q / "base", dic, tgt, top_k=top_k, block_rows=4096)
    assert "\n" not in str(err.value)


def test_empty_inputs(tiny):
    from unmerge_jax.passes.statistics import stream_stats

    q = tiny["qwen"]
    with pytest.raises(UnmergeError, match="dictionary is empty"):
        stream_stats(q / "base", [], [q / "ta"])
    with pytest.raises(UnmergeError, match="targets is empty"):
        stream_stats(q / "base", [q / "ft0"], [])
    with pytest.raises(UnmergeError, match="no floating-point tensor .* matches --modules qkv"):
        stream_stats(q / "base", [q / "ft0"], [q / "ta"], modules="qkv")  # Qwen2 has no fused q/k/v
    with pytest.raises(UnmergeError, match="two dictionary entries are named 'ft0'"):
        stream_stats(q / "base", [q / "ft0", f"ft0={q / 'ft1'}"], [q / "ta"])


MEM_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading, time
    os.environ["UNMERGE_PROGRESS"] = "0"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import unmerge_jax
    from unmerge_jax.passes.statistics import stream_stats

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    root = sys.argv[1]
    peak = [0]; stop = threading.Event()
    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], anon()); time.sleep(0.002)
    # warm up the compiled kernels on a small set with the same block shape (2 x 64 x 1024 rows =
    # one full block) so the measured pass holds no compile memory
    stream_stats(root + "/small/base", [root + "/small/d0", root + "/small/d1"], [root + "/small/t0"], seeds=2)
    before = anon()
    th = threading.Thread(target=sample, daemon=True); th.start()
    stream_stats(root + "/big/base", [root + "/big/d0", root + "/big/d1"], [root + "/big/t0"], seeds=2)
    stop.set(); th.join()
    print(json.dumps({"before": before, "peak": peak[0]}))
""")


def _write_set(root, rows, n_tensors, cols=1024, seed=0):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    for who in ("base", "d0", "d1", "t0"):
        (root / who).mkdir(parents=True)
        ts = {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((rows, cols), dtype=np.float32)
              for i in range(n_tensors)}
        save_file(ts, str(root / who / "model.safetensors"))


def _peak(tmp, rows, n_tensors):
    _write_set(tmp / "small", 64, 2)  # 131072 rows: the default block
    _write_set(tmp / "big", rows, n_tensors)
    r = subprocess.run([sys.executable, "-c", MEM_SCRIPT, str(tmp)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    return m["peak"] - m["before"]


def test_peak_memory_is_one_tensor_per_input_not_the_model(tmp_path):
    """K = 2, T = 1, 32 MiB tensors: 2 tensors vs 6 tensors (3× the model) take the same peak, and
    the peak above the start is ≤ (1 + K + T) × tensor + 64 MiB."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/self/status")
    mib, tensor = 2**20, 8192 * 1024 * 4
    few = _peak(tmp_path / "few", 8192, 2)
    many = _peak(tmp_path / "many", 8192, 6)
    print(f"peak above start: {few / mib:.0f} MiB (2 tensors), {many / mib:.0f} MiB (6 tensors); "
          f"bound (1+K+T) x tensor = {4 * tensor / mib:.0f} MiB")
    assert many <= few + 32 * mib
    assert many <= 4 * tensor + 64 * mib


@pytest.mark.parametrize("block_rows,opts", [(97, dict(top_k=3000)), (97, dict(top_k=900, scope="global")),
                                             (4097, dict()), (10**7, dict())])
def test_row_blocks_equal_whole_tensors(tiny, block_rows, opts):
    """Blocks smaller than a tensor, straddling tensors, or larger than the model; compressed
    selections whose kept entries span many blocks (and many read windows): statistics equal the
    dense whole-tensor reference to 1e-12, the replicates too (weights keyed by global row)."""
    from unmerge_jax.passes.statistics import stream_stats

    q = tiny["qwen"]
    dic, tgt = [q / "ft0", q / "ft1", q / "lora0"], [q / "ta"]
    res = stream_stats(q / "base", dic, tgt, seeds=2, key=5, block_rows=block_rows, **opts)
    sel = res.selection
    ref = reference_columns(q / "base", dic + tgt, sel)
    assert_stats_equal(res.stats, u.gram_stats(ref[:, :3], ref[:, 3:], seeds=2, key=5), tol=1e-12)
    sizes = [int(np.prod(sel.shapes[n])) for n in sel.names]
    if block_rows < min(sizes):
        assert res.provenance["n_blocks"] == -(-sel.n_rows // block_rows)


def test_per_block_hook_sees_every_selected_entry_once(tiny):
    """The hook point of the pass: every staged piece, with its tensor name, base row first; the
    pieces of a tensor concatenate to its selected entries."""
    from unmerge_jax.passes import statistics as st
    from unmerge_jax.sources import open_source

    q = tiny["qwen"]
    pieces = {}

    def hook(name, values, relative):
        assert not values.flags.writeable and values.shape[0] == 3 and list(relative) == [True, True]
        pieces.setdefault(name, []).append(np.array(values))

    base = open_source(q / "base")
    from unmerge_jax.entries import open_entries
    from unmerge_jax.passes.mask import build_selection

    sel = build_selection(base, [], None)
    _, _, tvs = open_entries(base, [q / "ft0"], [q / "ta"], sel.names)
    stats, n_blocks = st._accumulate(base, tvs, 1, sel, seeds=0, key=0, devices=None, block_rows=3000,
                                     compute_dtype="float64", pidx=0, pcount=1, hooks=[hook])
    assert n_blocks > 1 and sorted(pieces) == sorted(sel.names)
    b = open_source(q / "ft0")
    for n in sel.names:
        got = np.concatenate(pieces[n], axis=1)
        np.testing.assert_array_equal(got[0], base.read(n).reshape(-1))
        np.testing.assert_array_equal(got[1], b.read(n).reshape(-1))


def test_source_row_reads_match_whole_reads(tiny, tmp_path):
    """``read_rows`` of every source kind against its whole-tensor read, and the flat byte-range
    read of a checkpoint in a half-precision dtype."""
    from unmerge_jax.sources import AdapterSource, CheckpointSource, MemorySource, VirtualSource, task_vector

    q = tiny["qwen"]
    name = "model.layers.0.self_attn.q_proj.weight"
    ck = CheckpointSource(q / "base_bf16")
    whole = ck.read_raw(name).reshape(-1)
    np.testing.assert_array_equal(ck.read_raw_flat(name, 5, 77), whole[5:77])
    np.testing.assert_array_equal(ck.read_rows(name, 1, 3), ck.read(name)[1:3])
    ad = AdapterSource(q / "lora0", base=q / "base")
    full = ad.read(name)
    np.testing.assert_allclose(ad.read_rows(name, 2, 5), full[2:5], rtol=1e-6, atol=1e-7 * np.abs(full).max())
    arr = np.arange(24, dtype=np.float16).reshape(6, 4)
    mem = MemorySource({"w": arr})
    np.testing.assert_array_equal(mem.read_rows("w", 1, 4), arr[1:4].astype(np.float32))
    calls = []
    gen = VirtualSource({"w": (6, 4)}, lambda n: (calls.append(n), np.ones((6, 4)) * np.arange(6)[:, None])[1])
    for r in range(6):
        np.testing.assert_array_equal(gen.read_rows("w", r, r + 1), np.full((1, 4), r, np.float32))
    assert calls == ["w"]  # generated once for consecutive row reads
    rows = VirtualSource({"w": (6, 4)}, lambda n: None, generate_rows=lambda n, a, b: np.ones((b - a, 4)) * a)
    np.testing.assert_array_equal(rows.read_rows("w", 2, 4), np.full((2, 4), 2, np.float32))
    tv = task_vector(q / "base", q / "ft0")
    np.testing.assert_array_equal(tv.read_rows(name, 3, 9), tv.read(name)[3:9])


@pytest.mark.parametrize("opts,n_dev", [(dict(seeds=3, key=4), 1), (dict(seeds=2, bootstrap_block=1, top_k=3000), 8),
                                        (dict(seeds=0, block_rows=4097), 1)])
def test_float32_only_path_matches_float64(tiny, opts, n_dev):
    """The float32-only statistics (exact split products, double-float32 sums), forced on CPU, agree
    with the float64 path and with the NumPy float64 reference to 1e-12 of the largest entry."""
    from unmerge_jax.passes.statistics import stream_stats

    q = tiny["qwen"]
    dic, tgt = [q / "ft0", q / "ft1", q / "lora0"], [q / "ta", q / "lora_ta"]
    devices = jax.devices()[:n_dev]
    f64 = stream_stats(q / "base", dic, tgt, compute_dtype="float64", devices=devices, **opts)
    f32 = stream_stats(q / "base", dic, tgt, compute_dtype="float32x2", devices=devices, **opts)
    assert_stats_equal(f32.stats, f64.stats, tol=1e-12)
    ref = reference_columns(q / "base", dic + tgt, f64.selection).astype(np.float64)
    np.testing.assert_allclose(np.asarray(f32.stats.gram), ref[:, :3].T @ ref[:, :3], rtol=0,
                               atol=1e-12 * np.abs(ref[:, :3].T @ ref[:, :3]).max())
    # the float32 path without splitting is measurably worse: the test can tell the two apart
    plain = stream_stats(q / "base", dic, tgt, compute_dtype="float32", devices=devices, **opts)
    assert _rel(plain.stats.gram, f64.stats.gram) > 1e-11


def test_compute_dtype_auto_and_unknown(tiny):
    from unmerge_jax.passes.statistics import resolve_compute_dtype, stream_stats

    assert resolve_compute_dtype("auto") == "float64"  # CPU has native float64
    q = tiny["qwen"]
    with pytest.raises(UnmergeError, match="compute_dtype must be one of"):
        stream_stats(q / "base", [q / "ft0"], [q / "ta"], compute_dtype="float16")


@pytest.mark.parametrize("block", [7, 64, 1000, 10**6])
def test_mask_row_blocks_equal_whole_tensor_top_k(block):
    """The mask pass's per-block candidates merged across row blocks equal the whole tensor's top k,
    with many ties at the threshold split across blocks (ties: lowest flat index)."""
    from unmerge_jax.passes import mask as mk
    from unmerge_jax.sources import MemorySource, TaskVector
    from unmerge_jax.staging import RowReader

    rng = np.random.default_rng(3)
    shape = (40, 25)
    base = MemorySource({"w": rng.standard_normal(shape).astype(np.float32)}, kind="weights")
    fts = [MemorySource({"w": base.tensors["w"] + np.round(rng.standard_normal(shape), 0).astype(np.float32) / 8},
                        kind="weights") for _ in range(2)]
    lora = MemorySource({"w": np.round(rng.standard_normal(shape), 1).astype(np.float32)})
    tvs = [TaskVector(base, s, f"d{i}") for i, s in enumerate(fts + [lora])]
    readers = [RowReader(base, window=block)] + [RowReader(tv.source, tv.touches, window=block) for tv in tvs]
    m = np.max(np.stack([np.abs(tv.read("w")) for tv in tvs]), axis=0).reshape(-1)
    for k in (1, 37, 333, 999, 5000):
        v, i = mk._tensor_candidates(base, tvs, "w", k, readers, block=block)
        # the NumPy reference: order by (value desc, index asc), first k
        want = np.lexsort((np.arange(m.size), -m))[:k]
        np.testing.assert_array_equal(np.sort(i), np.sort(want))
        np.testing.assert_array_equal(v[np.argsort(i)], m[np.sort(want)])


@pytest.mark.parametrize("seeds,boot,block", [(3, None, 700), (0, None, 700), (3, 4096, 8192)],
                         ids=["row-weights", "no-replicates", "unit-chunks"])
def test_signature_sums_of_adapter_dictionaries_skip_untouched_blocks_exactly(tiny, monkeypatch, seeds, boot, block):
    """A LoRA dictionary leaves most tensors untouched (D = 0 there): blocks of such rows add
    nothing to the signature sums and skip their kernel, and add only ‖v‖² (and its replicates)
    to the Gram statistics; both still equal the references of the dense columns (NumPy
    ``signature_stats``, ``gram_stats``); each adapter ``ΔW`` is formed once per tensor, for the
    thresholds and the staged rows alike."""
    from unmerge_jax.attribution import signature_stats, trim_thresholds
    from unmerge_jax.entries import open_entries
    from unmerge_jax.passes import signatures as S
    from unmerge_jax.passes.statistics import dense_columns, stream_stats
    from unmerge_jax.sources import WEIGHTS, AdapterSource, open_source

    q = tiny["qwen"]
    dic, tgt = [q / "lora0", q / "lora1", q / "lora2"], [q / "lora_ta", q / "ta"]
    skipped, formed = [], []
    count, read = S.SignatureAccumulator.count, AdapterSource.read
    monkeypatch.setattr(S.SignatureAccumulator, "count", lambda self, n: (skipped.append(n), count(self, n)))
    monkeypatch.setattr(AdapterSource, "read", lambda self, name, out=None: (formed.append((self.path, name)),
                                                                              read(self, name, out))[1])
    res = stream_stats(q / "base", dic, tgt, signatures=True, block_rows=block, seeds=seeds, key=5,
                       bootstrap_block=boot)
    sel, sig = res.selection, res.signatures
    assert skipped and sum(skipped) < sel.n_rows  # some blocks skipped, not all
    assert len(formed) == len(set(formed))  # one ΔW per adapter and tensor
    D, V = dense_columns(q / "base", dic, tgt, selection=sel)
    assert_stats_equal(res.stats, u.gram_stats(D, V, seeds=seeds, key=5, bootstrap_block=boot))
    base = open_source(q / "base", kind=WEIGHTS)
    _, _, tvs = open_entries(base, dic, tgt, sel.names)
    used = [n for n in sel.names if sel.rows(n)]
    thr = np.stack([trim_thresholds([tvs[k].delta(n) for k in range(len(dic))]) for n in used])
    off = sel.offsets()
    ref = signature_stats(D, V, [(off[n], off[n] + sel.rows(n)) for n in used], thr)
    assert int(sig.n_rows) == sel.n_rows and float(sig.n_active) == float(ref.n_active)
    np.testing.assert_array_equal(sig.zero_count, ref.zero_count)
    for f in ("zero_energy", "ties_dd", "ties_dv", "ties_vv"):
        a, b = np.asarray(getattr(sig, f)), np.asarray(getattr(ref, f))
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15 * np.max(np.abs(b)), err_msg=f)
