"""Atomic outputs: write to a temporary sibling, then rename, so nothing is ever half-written.

Every output of every command goes through :func:`atomic_file` or :func:`atomic_dir`, which
enforce the output contract in one place:

* **never over an input**: an output may not be an input file, lie inside an input directory, or
  (for ``--force`` on a directory) contain an input — compared as resolved paths;
* **one writer at a time**: an exclusive lock on ``.<name>.lock`` beside the output; a second
  concurrent run to the same output fails at once;
* **nothing half-written, nothing left behind**: the result appears by one ``rename``; on an error,
  SIGINT or SIGTERM the temporary is removed; a temporary left by ``kill -9`` is named and removed
  by the next run to the same output;
* **one-line OS errors**: a full disk, a read-only or missing location, a parent that is a file —
  :class:`~unmerge_jax.errors.UnmergeError` naming the path and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from unmerge_jax.errors import UnmergeError

_HINTS = {
    errno.ENOSPC: "the disk is full — free space or choose another location",
    errno.EDQUOT: "the disk quota is exceeded — free space or choose another location",
    errno.EROFS: "the file system is read-only — choose a writable location",
    errno.EACCES: "permission denied — choose a location you can write to",
    errno.EPERM: "permission denied — choose a location you can write to",
    errno.ENOTDIR: "a parent of the path is a file, not a directory — choose another path",
    errno.EISDIR: "it is a directory — give a file path",
    errno.ENAMETOOLONG: "the name is too long — choose a shorter path",
}


def os_error(err: OSError, path, doing: str = "write") -> UnmergeError:
    """A one-line :class:`UnmergeError` for an OS error on ``path``, saying what to do."""
    if doing == "read" and err.errno in (errno.EACCES, errno.EPERM):
        hint = "permission denied — make it readable (chmod +r) or run as a user who can read it"
    elif doing == "read" and err.errno == errno.ENOENT:
        hint = "it does not exist — check the path"
    else:
        hint = _HINTS.get(err.errno, err.strerror or str(err))
    return UnmergeError(f"cannot {doing} {path}: {hint}")


def check_disjoint(out, inputs=(), *, replacing: bool = False) -> None:
    """Refuse an output that would overwrite or sit inside an input.

    Args:
      out: the output path (file or directory).
      inputs: input paths (files or directories); None entries are ignored.
      replacing: the output will replace an existing directory (``--force``): also refuse when
        it contains an input.
    """
    o = Path(out).resolve()
    for p in inputs or ():
        if p is None:
            continue
        i = Path(p).resolve()
        if o == i:
            raise UnmergeError(f"output {out} is the input {p}; choose a new path (inputs are never overwritten)")
        if i in o.parents:
            raise UnmergeError(f"output {out} is inside the input {p}; write it outside the input directory")
        if o in i.parents and (replacing or o.is_file()):
            raise UnmergeError(f"output {out} contains the input {p}; replacing it would delete that input — choose "
                               f"a new output directory")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.unmerge-"


def _stale_temps(path: Path):
    """Temporaries of earlier runs to ``path``, killed before they could clean up."""
    try:
        return sorted(path.parent.glob(_temp_prefix(path) + "*"))
    except OSError:
        return []


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


@contextlib.contextmanager
def _output_lock(path: Path):
    """Hold an exclusive lock for writing ``path``; remove stale temporaries once it is ours."""
    import fcntl

    lock = path.parent / f".{path.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise os_error(err, path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UnmergeError(f"another unmerge run is writing {path} right now; wait for it to finish or choose "
                               f"another output") from None
        try:  # the holder before us may have removed the file after we opened it: lock the current one
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        for stale in _stale_temps(path):
            print(f"note: removing {stale}, left by an earlier run to {path} that was killed", file=sys.stderr)
            _remove(stale)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


@contextlib.contextmanager
def _terminate_cleanly():
    """Turn SIGTERM into ``SystemExit`` in the main thread while an output is written, so the
    ``finally`` blocks that remove temporaries run (SIGINT already raises KeyboardInterrupt).

    Python swallows an exception a signal handler raises while a garbage-collector callback or a
    ``__del__`` runs (JAX registers a gc callback): it would print "Exception ignored" and go on
    to publish the output. So the signal is recorded, a swallowed exit is not printed but the
    signal sent again 10 ms later (its handler then runs in the command's own code), and
    :func:`_still_absent` raises it before the rename should it be swallowed once more."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, frame):
        _TERMINATED.append(signum)
        raise SystemExit(128 + signum)

    previous_hook = sys.unraisablehook

    def _unraisable(info):
        if not (isinstance(info.exc_value, SystemExit) and _TERMINATED):
            previous_hook(info)
            return
        try:
            threading.Timer(0.01, os.kill, (os.getpid(), _TERMINATED[-1])).start()
        except SystemExit:   # the signal came again while the timer started: _still_absent has it
            pass

    try:
        old = signal.signal(signal.SIGTERM, _exit)
    except (ValueError, OSError):  # not settable here (embedded interpreter)
        yield
        return
    _TERMINATED.clear()
    sys.unraisablehook = _unraisable
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        sys.unraisablehook = previous_hook


def check_output(path, inputs=(), *, directory: bool = False, force: bool = True) -> None:
    """Every check of an output that needs no write, so a command can run them before any work.

    Refuses: an existing output without ``force``; a file where a directory is wanted and the
    reverse; an overlap with ``inputs`` (:func:`check_disjoint`); a parent that is a file; a
    location on a read-only file system or without write permission.

    Args:
      path: the output file (``directory=False``) or directory.
      inputs: input paths the output must not overwrite, sit inside or (replacing a directory)
        contain.
      force: an existing output may be replaced.
    """
    path = Path(path)
    what = "output " if directory else ""
    if path.exists() and not force:
        raise UnmergeError(f"{what}{path} already exists; pass --force to overwrite it")
    if path.exists() and directory and not path.is_dir():
        raise UnmergeError(f"output {path} is a file; give a directory path")
    if path.is_dir() and not directory:
        raise UnmergeError(f"{path} is a directory; give a file path")
    check_disjoint(path, inputs, replacing=directory and path.exists())
    above = next((a for a in path.parents if a.exists()), None)
    if above is not None and not above.is_dir():
        raise UnmergeError(f"cannot write {path}: {above} is a file, not a directory — choose another path")
    if above is not None:
        with contextlib.suppress(OSError):
            if os.statvfs(above).f_flag & os.ST_RDONLY:
                raise os_error(OSError(errno.EROFS, os.strerror(errno.EROFS)), path)
        if not os.access(above, os.W_OK | os.X_OK):
            raise os_error(OSError(errno.EACCES, os.strerror(errno.EACCES)), path)


def _prepare(path: Path, force: bool, inputs, is_dir: bool):
    check_output(path, inputs, directory=is_dir, force=force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise os_error(err, path.parent, "create the directory") from None


_TERMINATED: list = []   # SIGTERMs received while an output was being written


def _still_absent(path: Path, force: bool) -> None:
    """Under the lock, just before the rename: a SIGTERM received meanwhile stops the run (even
    if its exception was swallowed); without ``force``, an output that another run created since
    the first check is kept, not replaced."""
    if _TERMINATED:
        raise SystemExit(128 + _TERMINATED[-1])
    if not force and (path.exists() or path.is_symlink()):
        raise UnmergeError(f"output {path} already exists: another run created it while this one was writing; it is "
                           f"kept — pass --force to replace it or choose another output")


@contextlib.contextmanager
def atomic_file(path, *, force: bool = True, suffix: str = "", inputs=()):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Args:
      path: final file path.
      force: when False, refuse to replace an existing file.
      suffix: suffix for the temporary name (some writers, e.g. ``np.savez``, append ``.npz``
        unless the name already ends with it).
      inputs: paths the output must not overwrite or sit inside (see :func:`check_disjoint`).
    """
    path = Path(path)
    _prepare(path, force, inputs, is_dir=False)
    with _terminate_cleanly(), _output_lock(path):
        try:
            fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=f".tmp{suffix}", dir=path.parent)
        except OSError as err:
            raise os_error(err, path) from None
        os.close(fd)
        try:
            try:
                yield Path(tmp)
                _still_absent(path, force)
                os.replace(tmp, path)
            except OSError as err:
                raise os_error(err, path) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path, *, force: bool = False, inputs=()):
    """Yield a temporary directory beside ``path``; move it onto ``path`` when the block succeeds.

    An existing ``path`` is replaced only with ``force=True`` (and only after success), never when
    it contains one of ``inputs``.
    """
    path = Path(path)
    _prepare(path, force, inputs, is_dir=True)
    with _terminate_cleanly(), _output_lock(path):
        try:
            tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
        except OSError as err:
            raise os_error(err, path) from None
        try:
            try:
                yield tmp
                _still_absent(path, force)
                if path.exists():
                    old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".old", dir=path.parent))
                    os.replace(path, old / "x")
                    os.replace(tmp, path)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, path)
            except OSError as err:
                raise os_error(err, path) from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
