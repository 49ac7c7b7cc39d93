"""A submission's kernel in a box: what it may see and write, and nothing it leaves.

On Linux, where ``unshare`` can make namespaces (as root, or through a user namespace
for anyone else), the kernel starts in its own mount and PID namespaces:

* the repository is replaced by a skeleton holding only what a kernel needs (the
  package ``llmcore``, its ``data`` folder, the book's folder for its process runner
  in ``book/workers``, the virtual environment if it lives there), so the lab sources,
  their solutions, the tests and the git history are not there to read; the lab's
  folder, the submissions and the grades are hidden by an empty folder wherever they
  are;
* every file system is read-only except the submission's own work folder and a
  fresh ``/dev/shm``, so no submission can plant a module that another one would
  import, or touch the repository, the grades or the Python installation;
* the kernel is process 1 of its PID namespace: when it is killed, every process it
  started dies with it, also one that left its process group (``setsid``).

Without namespaces (macOS, Windows, a container that forbids them) the kernel runs
plainly in its work folder, in a session of its own whose process group is killed
after it; :func:`available` says which, and the grader records it.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

# Run by ``sh`` inside the new namespaces, before the kernel; the paths come in the
# environment (names with spaces or newlines are refused before).
SCRIPT = r"""
set -e
mount --make-rprivate /
for c in $BOX_KEEP; do mount --bind "$BOX_REPO/$c" "$BOX_SKEL/$c"; done
mount --rbind "$BOX_SKEL" "$BOX_REPO"
for d in $BOX_HIDE; do mount --bind "$BOX_EMPTY" "$d"; done
awk '{print $5}' /proc/self/mountinfo | while read -r m; do
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount --bind "$BOX_WORK" "$BOX_WORK"
mount -o remount,bind,rw "$BOX_WORK"
cd "$BOX_WORK"
exec "$@"
"""


def unshare_command() -> list[str]:
    """``unshare`` with the namespaces of the box; under ``setpriv --pdeathsig`` where
    there is one, so that the box dies with the grader even if that is killed (the
    kernel is process 1 of its namespace, so its own watch for a dead parent never
    fires)."""
    flags = ["--mount", "--pid", "--fork", "--kill-child", "--mount-proc"]
    if os.geteuid() != 0:
        flags = ["--user", "--map-root-user", *flags]
    watch = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
    return [*watch, "unshare", *flags]


@functools.cache
def available() -> bool:
    """Whether this machine can box a kernel (tried once, with a real mount)."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    probe = [*unshare_command(), "sh", "-c",
             "mount -t tmpfs tmpfs /dev/shm && test $$ -eq 1"]
    try:
        done = subprocess.run(probe, capture_output=True, timeout=30, check=False)
        return done.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Box:
    """The place of one submission: ``work`` (its only writable folder) and, if
    :func:`available`, the command prefix and environment that box its kernel."""

    def __init__(self, root: Path, repo: Path, keep: list[Path], hide: list[Path]):
        self.root, self.repo = Path(root), Path(repo).resolve()
        self.work = self.root / "work"
        self.work.mkdir(parents=True)
        for sub in ("tmp", ".ipython", ".matplotlib"):
            (self.work / sub).mkdir()
        self.env = {"TMPDIR": str(self.work / "tmp"),
                    "IPYTHONDIR": str(self.work / ".ipython"),
                    "MPLCONFIGDIR": str(self.work / ".matplotlib")}
        self.boxed = available()
        self.prefix: list[str] = []
        if not self.boxed:
            return
        kept = sorted({p.resolve().relative_to(self.repo).parts[0] for p in keep
                       if p.resolve().is_relative_to(self.repo)})
        # (a folder holding this box cannot be hidden from it: it stays, read-only)
        hidden = [p.resolve() for p in hide
                  if p.exists() and not p.resolve().is_relative_to(self.repo)
                  and not self.root.resolve().is_relative_to(p.resolve())]
        for name in kept:
            (self.root / "skel" / name).mkdir(parents=True)
        (self.root / "skel").mkdir(exist_ok=True)
        (self.root / "empty").mkdir()
        paths = [self.repo, self.root, *hidden]
        if any(c.isspace() for p in paths for c in str(p)):
            raise ValueError(f"cannot box a kernel with blanks in these paths: {paths}")
        self.env |= {"BOX_REPO": str(self.repo), "BOX_SKEL": str(self.root / "skel"),
                     "BOX_KEEP": " ".join(kept), "BOX_EMPTY": str(self.root / "empty"),
                     "BOX_HIDE": " ".join(map(str, hidden)),
                     "BOX_WORK": str(self.work)}
        self.prefix = [*unshare_command(), "sh", "-c", SCRIPT, "box"]


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (the kernel's launcher, started in a
    session of its own); call it before the leader is reaped, so that the id cannot
    belong to another group yet."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
