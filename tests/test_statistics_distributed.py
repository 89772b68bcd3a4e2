"""The statistics pass under ``jax.distributed`` with 2 processes over loopback (CPU, gloo
collectives): each process reads its own share of the tensors, the partial statistics are summed,
and the result equals ``gram_stats`` on the dense concatenation (1e-10 relative, float64)."""

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

pytestmark = pytest.mark.models
WORKER = Path(__file__).with_name("_dist_worker.py")



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(tmp_path, args):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "UNMERGE_PROGRESS": "0",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = []
    for i in range(2):
        cmd = [sys.executable, str(WORKER), str(tmp_path / f"reads{i}.json"), "--", "stats", *args,
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
