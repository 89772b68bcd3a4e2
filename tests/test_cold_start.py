"""The persistent compilation cache for library users: on at import (per-user directory), the
opt-out, a cache the process chose kept, a read-only location left alone, and a second process
that compiles nothing new (every program a cache hit)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import json, jax, unmerge_jax
    print(json.dumps({"dir": jax.config.jax_compilation_cache_dir}))
""")

SOLVE = textwrap.dedent("""
    import json, os, time
    import numpy as np, jax, unmerge_jax as u
    rng = np.random.default_rng(0)
    D = rng.standard_normal((2000, 5)); V = D @ rng.uniform(0, 1, (5, 3))
    t0 = time.perf_counter()
    r = u.decompose(D, V, "nnls")
    jax.block_until_ready(r.coef)
    print(json.dumps({"s": time.perf_counter() - t0, "dir": jax.config.jax_compilation_cache_dir}))
""")


def _run(script, env_extra, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "UNMERGE_C"))}
    env.update({"PYTHONPATH": str(ROOT), "HOME": str(tmp_path / "home"), "UNMERGE_PROGRESS": "0", **env_extra})
    env.pop("XDG_CACHE_HOME", None)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_cache_on_at_import_in_the_users_cache_dir(tmp_path):
    got = _run(PROBE, {}, tmp_path)
    assert got["dir"] == str(tmp_path / "home" / ".cache" / "unmerge_jax" / "xla")


def test_opt_out_and_a_chosen_cache_are_respected(tmp_path):
    assert _run(PROBE, {"UNMERGE_COMPILE_CACHE": "0"}, tmp_path)["dir"] in (None, "")
    mine = str(tmp_path / "mine")
    assert _run(PROBE, {"JAX_COMPILATION_CACHE_DIR": mine}, tmp_path)["dir"] == mine


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_location_is_left_alone(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert _run(PROBE, {"UNMERGE_CACHE_DIR": str(ro)}, tmp_path)["dir"] in (None, "")
    finally:
        ro.chmod(0o700)


def test_unwritable_location_is_left_alone(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert _run(PROBE, {"UNMERGE_CACHE_DIR": str(blocker)}, tmp_path)["dir"] in (None, "")


def test_second_process_compiles_nothing_new(tmp_path):
    cache = tmp_path / "cache"
    first = _run(SOLVE, {"UNMERGE_CACHE_DIR": str(cache)}, tmp_path)
    entries = sorted(p.name for p in (cache / "unmerge_jax" / "xla").iterdir())
    assert entries, "the first process wrote no cache entry"
    second = _run(SOLVE, {"UNMERGE_CACHE_DIR": str(cache)}, tmp_path)
    assert sorted(p.name for p in (cache / "unmerge_jax" / "xla").iterdir()) == entries  # all hits
    print(f"first process {first['s']:.2f} s, second {second['s']:.2f} s")
