"""Watching the ranks that :func:`book.workers.launch.launch` started: collect
their results, report the one that raised, died or hung, and stop the others.

What a rank writes to stderr goes to a temporary file, so that the last words of a
rank that died before it could report are part of the error.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_lib
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


def start_logged(p) -> Any:
    """Start ``p`` with its stderr in a temporary file, so that what a rank prints
    before it dies can be shown in the error (and is echoed here afterwards)."""
    log = tempfile.TemporaryFile(mode="w+b")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(log.fileno(), 2)  # the child inherits descriptor 2 as it starts
        p.start()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return log


def _tail(log, chars: int = 3000) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-chars:]


def echo(log) -> None:
    text = _tail(log, 20_000)
    log.close()
    if text.strip():
        sys.stderr.write(text)


def _died(rank: int, p, log, then: str = "") -> WorkerError:
    printed = _tail(log).strip()
    hint = ""
    if "bootstrapping phase" in printed:
        hint = ("; the script that calls launch() must guard it with "
                "`if __name__ == \"__main__\":` (each rank imports the script again)")
    return WorkerError(rank, f"died with exit code {p.exitcode} before it could "
                       f"report{then}{hint}; the other ranks were stopped",
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
