"""Watching the ranks that :func:`book.workers.launch.launch` started: collect
their results, report the one that raised, died or hung, and stop the others.

Each rank writes its stderr to a log file of its own, so that the last words of a
rank that died are part of the error (and are echoed here afterwards).
"""

from __future__ import annotations

import os
import pickle
import queue as queue_lib
import shutil
import sys
import tempfile
import time
from typing import Any

EXIT_GRACE = 2.0  # seconds a rank that exited may take for its result to arrive


class WorkerError(RuntimeError):
    """A rank raised, died or never finished; carries rank and remote traceback."""

    def __init__(self, rank: int, message: str, remote_traceback: str = "",
                 remote_type: str = ""):
        self.rank = rank
        self.remote_traceback = remote_traceback
        self.remote_type = remote_type  # class name of the remote exception
        text = f"rank {rank} {message}"
        if remote_traceback:
            text += f"\n\n--- traceback of rank {rank} ---\n{remote_traceback}"
        super().__init__(text)


def new_logs(world_size: int) -> list[str]:
    """A path per rank for its stderr, in a fresh folder; a rank creates its file as
    it starts, so a missing file means the rank died before it ran any of our code."""
    folder = tempfile.mkdtemp(prefix="llmcore-ranks-")
    return [os.path.join(folder, f"rank{rank}.log") for rank in range(world_size)]


def _tail(log: str, chars: int = 3000) -> str:
    if not os.path.exists(log):
        return ""
    with open(log, "rb") as f:
        return f.read().decode(errors="replace")[-chars:]


def echo(logs: list[str]) -> None:
    """Write what the ranks printed to this process's stderr; delete their logs."""
    for log in logs:
        text = _tail(log, 20_000)
        if text.strip():
            sys.stderr.write(text)
    shutil.rmtree(os.path.dirname(logs[0]), ignore_errors=True)


def _died(rank: int, p, log: str, then: str = "") -> WorkerError:
    if not os.path.exists(log):  # it died while starting, before any of our code ran
        return WorkerError(rank, f"died with exit code {p.exitcode} while starting, "
                           f"before it could run fn{then}; the other ranks were "
                           "stopped. A script that calls launch() must guard it with "
                           "`if __name__ == \"__main__\":` (each rank imports the "
                           "script again); the rank's own error is on stderr")
    printed = _tail(log).strip()
    return WorkerError(rank, f"died with exit code {p.exitcode} before it could "
                       f"report{then}; the other ranks were stopped",
                       printed and f"(what rank {rank} printed)\n{printed}")


def collect(procs, results, world_size, wall_timeout, logs) -> list:
    values: dict[int, Any] = {}
    start = time.monotonic()
    exited_at: dict[int, float] = {}
    while len(values) < world_size:
        try:
            rank, status, payload = results.get(timeout=0.1)
        except queue_lib.Empty:
            now = time.monotonic()
            for rank, p in enumerate(procs):
                if rank in values or p.exitcode is None:
                    continue
                # A rank that died without a message (killed, segfault, out of
                # memory, or it could not start fn).
                if p.exitcode != 0:
                    raise _died(rank, p, logs[rank])
                # Exit code 0 but no result (os._exit(0), sys.exit() in a thread):
                # wait briefly, the result may still be in the pipe.
                if now - exited_at.setdefault(rank, now) > EXIT_GRACE:
                    raise WorkerError(rank, "exited with code 0 without returning a "
                                      "result (os._exit or a killed process?); the "
                                      "other ranks were stopped")
            if now - start > wall_timeout:
                missing = sorted(set(range(world_size)) - set(values))
                done = sorted(values)
                raise WorkerError(missing[0], f"did not finish within wall_timeout="
                                  f"{wall_timeout} s (unfinished ranks: {missing}; "
                                  f"finished: {done}); every rank was stopped")
            continue
        if status == "error":
            message, remote, kind = pickle.loads(payload)
            for other, p in enumerate(procs):  # a peer that died is the root cause
                p.join(timeout=0.5 if other != rank else 0)
                if other != rank and p.exitcode not in (None, 0):
                    raise _died(other, p, logs[other], f" (then rank {rank} {message})")
            raise WorkerError(rank, message + "; the other ranks were stopped", remote,
                              kind)
        values[rank] = pickle.loads(payload)
    return [values[r] for r in range(world_size)]


def stop(procs, grace: float) -> None:
    """Join the ranks for ``grace`` seconds; terminate (then kill) the rest."""
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():
            p.kill()
            p.join()
