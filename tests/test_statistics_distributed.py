"""The statistics pass under ``jax.distributed`` with 2 processes over loopback (CPU, gloo
collectives): each process reads its own share of the tensors, the partial statistics are summed,
and the result equals ``gram_stats`` on the dense concatenation (1e-10 relative, float64).

The merge-method signature sums too: summed over the processes (the mask pass's trimming
thresholds exchanged first) they equal one process's (1e-12 relative, counts exact), no tensor is
read again for its thresholds, and ``decompose`` (under 2 processes, or from their ``stats`` file)
gives one process's decisions."""

import collections
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import unmerge_jax as u
from unmerge_jax.cli.main import main

pytestmark = pytest.mark.models
WORKER = Path(__file__).with_name("_dist_worker.py")



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(tmp_path, args, command="stats"):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "UNMERGE_PROGRESS": "0",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = []
    for i in range(2):
        cmd = [sys.executable, str(WORKER), str(tmp_path / f"reads{i}.json"), "--", command, *args,
               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads((tmp_path / f"reads{i}.json").read_text()) for i in range(2)]


@pytest.mark.parametrize("extra", [["--seeds", "2"], ["--top-k", "3000", "--seeds", "2"]], ids=["full", "topk"])
def test_two_processes_equal_dense_gram_stats(tiny, tmp_path, extra):
    from unmerge_jax.passes.mask import Selection
    from unmerge_jax.passes.statistics import dense_columns, stream_stats

    q = tiny["qwen"]
    dic, tgt = [q / "ft0", q / "ft1", q / "lora0"], [q / "ta", q / "lora_ta"]
    out = tmp_path / "stats.npz"
    args = ["--base", str(q / "base"), "--dictionary", *map(str, dic), "--target", *map(str, tgt),
            "--seed", "5", "--block-rows", "4096", "--out", str(out), "--save-mask", str(tmp_path / "mask.npz"), *extra]
    logs = _run_two(tmp_path, args)
    assert [g["process"] for g in logs] == [0, 1] and all(g["devices"] == 4 and g["local_devices"] == 2 for g in logs)

    stats, prov = u.load_stats(out)
    assert prov["n_processes"] == 2
    sel = Selection.load(tmp_path / "mask.npz")
    # the same selection as one process computes (the top-k mask exchanged only candidates)
    single = stream_stats(q / "base", dic, tgt, top_k=3000 if "--top-k" in extra else None, seeds=2, key=5)
    assert sel.names == single.selection.names
    for n in sel.names:
        a, b = sel.index[n], single.selection.index[n]
        assert (a is None and b is None) or np.array_equal(a, b), n
    D, V = dense_columns(q / "base", dic, tgt, sel)
    want = u.gram_stats(D, V, seeds=2, key=5)
    for f in u.GramStats._fields:
        g, w = np.asarray(getattr(stats, f), np.float64), np.asarray(getattr(want, f), np.float64)
        assert np.max(np.abs(g - w)) <= 1e-10 * np.max(np.abs(w)), f

    # each process read its own share: together, every (input, tensor) exactly as often as one process
    def count(reads):
        return collections.Counter(map(tuple, reads))

    both = count(logs[0]["reads"]) + count(logs[1]["reads"])
    assert logs[0]["reads"] and logs[1]["reads"]
    lora = {n for n in sel.names if ".self_attn." in n and n.endswith("_proj.weight")}
    want = collections.Counter()
    for n in sel.names:
        # the top-k mask pass reads base + dictionary once more; the statistics pass skips tensors
        # the mask keeps nothing of
        kept = sel.rows(n) > 0
        passes = kept + ("--top-k" in extra)
        for src in ("base", "ft0", "ft1"):
            want[(src, n)] = passes
        if kept:
            want[("ta", n)] = want[("lora_ta", n)] = 1
        if n in lora:
            want[("lora0", n)] = passes
    assert both == want


def _decisions(report):
    return [(r["target"], r["verdict"], r["present"], r["method"]["name"] if r["method"] else None,
             r["method"]["density"] if r["method"] else None, r["decisions"])
            for r in report["targets"]]


def _close_numbers(a, b, path=""):
    """Same keys and strings; numbers within 1e-9 relative of the largest (rounding of summed statistics)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close_numbers(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close_numbers(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


def test_signature_sums_over_two_processes_equal_one_process(merges, tmp_path):
    from unmerge_jax.attribution import SignatureStats
    from unmerge_jax.passes.statistics import stream_stats
    from tests._tiny_merges import entries

    dic, tgt = entries(merges)
    out = tmp_path / "stats.npz"
    args = ["--base", str(merges / "base"), "--dictionary", *dic, "--target", *tgt, "--top-k", "4000",
            "--seeds", "200", "--seed", "11", "--block-rows", "1000", "--out", str(out)]
    logs = _run_two(tmp_path, args)
    stats, prov, sig = u.load_stats(out, signatures=True)
    assert prov["n_processes"] == 2 and sig is not None  # 200 replicates: the sums by default
    one = stream_stats(merges / "base", dic, tgt, top_k=4000, seeds=200, key=11, block_rows=1000, signatures=True)
    ref = one.signatures
    for f in ("n_rows", "n_active", "zero_count"):  # counts: exact
        np.testing.assert_array_equal(getattr(sig, f), np.asarray(getattr(ref, f)), err_msg=f)
    np.testing.assert_array_equal(sig.densities, ref.densities)
    assert sig.n_groups == ref.n_groups > 1  # the per-group sums over the same tensor groups
    for f in ("zero_energy", "ties_dd", "ties_dv", "ties_vv", "group_gram", "group_cross"):
        g, w = np.asarray(getattr(sig, f)), np.asarray(getattr(ref, f), np.float64)
        assert np.max(np.abs(g - w)) <= 1e-12 * np.max(np.abs(w)), f
    assert np.max(np.asarray(ref.ties_vv)) > 0 and float(ref.zero_count.sum()) > 0  # sums that say something
    assert len(SignatureStats._fields) == 10

    # no tensor was read again for its TIES thresholds: together the processes read each (input,
    # tensor) as one process does — the mask pass once, the statistics pass once where rows are kept
    sel = one.selection
    both = collections.Counter(map(tuple, logs[0]["reads"])) + collections.Counter(map(tuple, logs[1]["reads"]))
    want = collections.Counter()
    for n in sel.names:
        kept = sel.rows(n) > 0
        for src in ("base", "d0", "d1", "d2", "d3"):
            want[(src, n)] = 1 + kept
        for t in tgt:
            if kept:
                want[(t.split("=")[0], n)] = 1
    assert both == want

    # decisions from the 2-process file equal those of one process's direct run
    assert main(["decompose", "--stats", str(out), "--json", str(tmp_path / "file.json")]) == 0
    direct = tmp_path / "direct.json"
    assert main(["decompose", "--base", str(merges / "base"), "--dictionary", *dic, "--target", *tgt, "--top-k",
                 "4000", "--seed", "11", "--json", str(direct)]) == 0
    a, b = json.loads((tmp_path / "file.json").read_text()), json.loads(direct.read_text())
    assert _decisions(a) == _decisions(b)
    a.pop("provenance"), b.pop("provenance")
    _close_numbers(a, b)


def test_decompose_under_two_processes_gives_one_process_decisions(merges, tmp_path):
    from tests._tiny_merges import MERGES, entries

    dic, tgt = entries(merges)
    args = ["--base", str(merges / "base"), "--dictionary", *dic, "--target", *tgt, "--seed", "11",
            "--block-rows", "20000", "--json", str(tmp_path / "two.json")]
    _run_two(tmp_path, args, command="decompose")
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["provenance"]["n_processes"] == 2
    assert main(["decompose", *args[:-1], str(tmp_path / "one.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    assert _decisions(two) == _decisions(one)
    assert [r["verdict"] for r in two["targets"]] == [m[3] for m in MERGES.values()]
    two.pop("provenance"), one.pop("provenance")
    _close_numbers(two, one)
