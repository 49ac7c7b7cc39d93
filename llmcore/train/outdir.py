"""The output folder of a run: checked before training, claimed with a lock.

Before any training time is spent, ``--out`` must be a folder this process can write
(it is created if missing). A folder that already holds a run is never silently
replaced: ``--resume`` continues it, ``--overwrite`` replaces it, and without either
the run is refused. A lock file holding the process id keeps a second run out of the
same folder while the first is alive; the lock of a process that no longer runs (a
killed job) is taken over, with a message.
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


def acquire_lock(out: Path) -> Path:
    """Create ``out/.lock`` with this process's id; refuse a live holder."""
    lock = out / LOCK
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, host = _read_lock(lock)
            if host not in ("", socket.gethostname()) or (pid > 0 and _alive(pid)):
                raise RuntimeError(
                    f"another run (pid {pid} on {host or 'this host'}) is writing to "
                    f"{out}; wait for it to finish or choose another --out. If no such "
                    f"run exists, delete {lock}.") from None
            print(f"taking over the stale lock {lock} of pid {pid}, which no longer "
                  "runs", file=sys.stderr)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return lock
    raise RuntimeError(f"could not take the lock {lock}; delete it if no run uses "
                       f"{out}")


def release_lock(lock: Path) -> None:
    if _read_lock(lock)[0] == os.getpid():
        lock.unlink(missing_ok=True)


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
    lock = acquire_lock(out)
    try:
        existing = [name for name in (*RUN_FILES, SHARDS) if (out / name).exists()]
        if resume and not ((out / CKPT).exists() or (out / SHARDS).exists()):
            raise FileNotFoundError(f"--resume: there is no checkpoint {out / CKPT} to "
                                    "continue; drop --resume to start a new run")
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
        release_lock(lock)
