"""Files written atomically: a temporary file beside the target, then a rename.

A crash mid-write leaves the previous file intact, never half a file; readers see the
old file or the whole new one (``os.replace`` is atomic on POSIX and Windows). A crash
can leave the temporary file behind: :func:`remove_stale_temps` clears those, and every
save calls it first.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def temp_files(path: str | os.PathLike) -> list[Path]:
    """The temporary files :func:`atomic_write` uses (or left behind) for ``path``."""
    path = Path(path)
    return sorted(path.parent.glob(f"{path.name}.*{TEMP_SUFFIX}"))


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files a crashed write of ``path`` left behind; return them.

    Only call it while no other process writes ``path`` (a run holds a lock on its
    output folder for that reason).
    """
    stale = temp_files(path)
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **kwargs):
    """``with atomic_write(path, "w") as f: ...`` writes ``path`` all or nothing.

    The file gets the permissions of any file ``open`` creates (0666 less the umask),
    not the 0600 of ``tempfile.mkstemp``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".",
                               suffix=TEMP_SUFFIX)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
