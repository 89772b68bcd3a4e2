"""The output contract of io/atomic.py: never over an input, one writer at a time, nothing
half-written or left behind (errors, SIGTERM, kill -9), one-line OS errors."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.atomic import atomic_dir, atomic_file, check_disjoint


def _listing(d: Path):
    return sorted(p.name for p in d.iterdir())


def test_outputs_never_overlap_inputs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x")
    for out, what in [(model, "is the input"), (model / "stats.npz", "inside the input"),
                      (model / "model.safetensors", "inside the input")]:
        with pytest.raises(UnmergeError, match=what):
            check_disjoint(out, [model])
    with pytest.raises(UnmergeError, match="contains the input"):   # --force on a parent of an input
        check_disjoint(tmp_path, [model], replacing=True)
    check_disjoint(tmp_path / "out", [model, None])                  # a sibling is fine
    with pytest.raises(UnmergeError, match="is the input"):
        with atomic_file(model / "model.safetensors", inputs=[model / "model.safetensors"]):
            pass
    with pytest.raises(UnmergeError, match="contains the input"):
        with atomic_dir(tmp_path, force=True, inputs=[model]):
            pass
    assert (model / "model.safetensors").read_bytes() == b"x"


def test_failure_leaves_nothing_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert out.read_text() == "old" and _listing(tmp_path) == ["out.json"]
    d = tmp_path / "dir"
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "a").write_text("1")
            raise RuntimeError("boom")
    assert _listing(tmp_path) == ["out.json"]
    with atomic_dir(d) as tmp:
        (tmp / "a").write_text("1")
    assert _listing(d) == ["a"] and _listing(tmp_path) == ["dir", "out.json"]


def test_os_errors_are_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UnmergeError, match="is a file, not a directory"):
        with atomic_file(blocker / "out.json"):
            pass
    with pytest.raises(UnmergeError, match="is a directory; give a file path"):
        with atomic_file(tmp_path):
            pass
    with pytest.raises(UnmergeError, match="is a file; give a directory path"):
        with atomic_dir(blocker, force=True):
            pass


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        with pytest.raises(UnmergeError, match="disk is full"):
            with atomic_file(mnt / "big.bin") as tmp:
                tmp.write_bytes(b"\0" * (1 << 20))
        assert _listing(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from unmerge_jax.io.atomic import atomic_dir
    with atomic_dir(Path(sys.argv[1])) as tmp:
        (tmp / "part").write_text("x")
        print("writing", flush=True)
        time.sleep(60)
""")


def _start_writer(out: Path):
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    return p


def test_a_second_concurrent_run_fails_at_once(tmp_path):
    out = tmp_path / "merged"
    p = _start_writer(out)
    try:
        t0 = time.monotonic()
        with pytest.raises(UnmergeError, match="another unmerge run is writing"):
            with atomic_dir(out):
                pass
        assert time.monotonic() - t0 < 5
    finally:
        p.kill()
        p.wait()


def test_sigterm_removes_the_temporary(tmp_path):
    out = tmp_path / "merged"
    p = _start_writer(out)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 128 + signal.SIGTERM
    assert _listing(tmp_path) == []


def test_a_run_killed_with_sigkill_is_cleaned_up_by_the_next(tmp_path, capsys):
    out = tmp_path / "merged"
    p = _start_writer(out)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    left = _listing(tmp_path)
    assert left and not out.exists()                 # the killed run's temporary (and lock file)
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    assert _listing(tmp_path) == ["merged"]
    assert "left by an earlier run" in capsys.readouterr().err
