"""The output folder of a run: checked before training, claimed with a lock.

Before any training time is spent, ``--out`` must be a folder this process can write
(it is created if missing). A folder that already holds a run is never silently
replaced: ``--resume`` continues it, ``--overwrite`` replaces it, and without either
the run is refused. A lock keeps a second run out of the same folder while the first
is alive; the lock of a process that no longer runs (a killed job) is taken over,
with a message. What a killed save left behind (temporary files, the directories of
an interrupted sharded save) is cleared or recovered before the run starts.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from llmcore.io import remove_stale_temps
from llmcore.parallel import dcp

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK = ".lock"
CKPT, METRICS, TOKENIZER = "ckpt.pt", "metrics.json", "tokenizer.json"
RUN_FILES = (CKPT, METRICS, TOKENIZER)
SHARDS = "ckpt.dcp"  # the sharded checkpoint of a run on a device mesh (a folder)


def check_writable(out: Path) -> None:
    """Create ``out`` if needed and prove it is a writable folder, or raise."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder; pass a folder "
                                 "(it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(f"--out {out} is not a writable folder ({err.strerror}); "
                              "choose another --out") from err


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _read_lock(lock: Path) -> tuple[int, str]:
    try:
        pid, host = lock.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return -1, ""


def acquire_lock(out: Path) -> tuple[Path, int | None]:
    """Take ``out/.lock`` for this process, refusing a live holder; return the path
    and the open descriptor that holds it.

    The lock is an ``flock`` on the file, which the system drops when its holder
    dies, so deciding that a lock is stale and taking it over is one atomic step: of
    two runs that find the same stale lock, one gets it. The file also names its
    holder (pid and host), which is refused while alive even without the ``flock``
    (a lock written by another tool, or one on a file system that ignores locks).
    Without ``fcntl`` (Windows) the lock is the file's existence alone.
    """
    lock = out / LOCK
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(10):
        if fcntl is None:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                refuse(out, lock, *_read_lock(lock))
        else:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                refuse(out, lock, *_read_lock(lock))
            try:  # the holder before us may have finished and unlinked the file
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
        pid, host = _read_lock(lock)
        if pid != os.getpid() and (host not in ("", socket.gethostname())
                                   or (pid > 0 and _alive(pid))):
            os.close(fd)
            refuse(out, lock, pid, host)
        if pid > 0 and pid != os.getpid():
            print(f"taking over the stale lock {lock} of pid {pid}, which no longer "
                  "runs", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.write(fd, me.encode())  # at offset 0: the descriptor is new
        return lock, fd
    raise RuntimeError(f"could not take the lock {lock}; delete it if no run uses "
                       f"{out}")


def refuse(out: Path, lock: Path, pid: int, host: str):
    raise RuntimeError(
        f"another run (pid {pid} on {host or 'this host'}) is writing to {out}; wait "
        f"for it to finish or choose another --out. If no such run exists, delete "
        f"{lock}.") from None


def release_lock(lock: Path, fd: int | None = None) -> None:
    """Remove the lock, then let go of it (in this order, see acquire_lock)."""
    if _read_lock(lock)[0] == os.getpid():
        lock.unlink(missing_ok=True)
    if fd is not None:
        os.close(fd)


@contextmanager
def claim_out(out: str | os.PathLike, *, resume: bool, overwrite: bool):
    """Check and lock ``out`` for one run; yields the folder as a Path.

    Refuses an existing run without ``resume`` or ``overwrite``, and ``resume``
    without a checkpoint; ``overwrite`` deletes the previous run's files; temporary
    files a crashed save left behind are removed.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the "
                         "run in --out, or replace it")
    out = Path(out)
    check_writable(out)
    lock, fd = acquire_lock(out)
    try:
        # a sharded save that a crash stopped: its newest complete checkpoint kept
        notes = dcp.recover(out / SHARDS)
        for note in notes:
            print(note, file=sys.stderr)
        existing = [name for name in (*RUN_FILES, SHARDS) if (out / name).exists()]
        if resume and not ((out / CKPT).exists() or (out / SHARDS).exists()):
            raise FileNotFoundError(
                f"--resume: there is no checkpoint {out / CKPT} or {out / SHARDS} to "
                "continue" + "".join(f"; {note}" for note in notes) +
                "; drop --resume to start a new run")
        if existing and not resume and not overwrite:
            raise FileExistsError(
                f"{out} already holds a run ({', '.join(existing)}). Continue it with "
                "--resume, or replace it with --overwrite (or choose another --out).")
        if overwrite:
            for name in existing:
                if name == SHARDS:
                    shutil.rmtree(out / name)
                else:
                    (out / name).unlink()
        for name in RUN_FILES:
            remove_stale_temps(out / name)
        yield out
    finally:
        release_lock(lock, fd)
