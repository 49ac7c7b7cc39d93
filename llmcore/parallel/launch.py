"""Run a function on several processes, one per rank, from a script or a notebook.

``launch(fn, world_size, *args)`` starts ``world_size`` fresh Python processes (the
``spawn`` start method, so it works from Jupyter and on every OS), joins them into one
process group and calls ``fn(rank, world_size, *args)`` in each. What ``fn`` returns
comes back to the parent as a list indexed by rank.

Three rules keep it from ever hanging or failing in silence:

* every collective has a timeout (``timeout`` seconds), after which it raises;
* the whole run has a wall-clock limit (``wall_timeout``, ten minutes by default):
  a rank stuck outside any collective (an endless loop) is stopped with the others
  and named in the error, as is a rank that exits without returning a result;
* when one rank raises or dies, the parent stops the others and raises
  :class:`WorkerError` with the failing rank and its remote traceback; a rank that
  dies before it could run ``fn`` (``fn`` not importable there, a script that calls
  ``launch`` without ``if __name__ == "__main__":``) shows what it printed.

A function defined in a notebook cannot be pickled into a spawned process, so ``fn``
must be importable: the book's workers live in ``llmcore.parallel.experiments``.
This module and ``llmcore.runtime`` are the only places that read environment variables.
"""

from __future__ import annotations

import inspect
import multiprocessing as mp
import os
import pickle
import queue as queue_lib
import socket
import sys
import tempfile
import textwrap
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

DEFAULT_WALL_TIMEOUT = 600.0  # seconds a whole launch() may take unless told otherwise
EXIT_GRACE = 2.0  # seconds a rank that exited may take for its result to arrive


class WorkerError(RuntimeError):
    """A rank raised, died or never finished; carries the rank and the remote
    traceback."""

    def __init__(self, rank: int, message: str, remote_traceback: str = "",
                 remote_type: str = ""):
        self.rank = rank
        self.remote_traceback = remote_traceback
        self.remote_type = remote_type  # class name of the remote exception
        text = f"rank {rank} {message}"
        if remote_traceback:
            text += f"\n\n--- traceback of rank {rank} ---\n{remote_traceback}"
        super().__init__(text)


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it), for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend(world_size: int) -> str:
    """NCCL when every rank can have a GPU of its own, else gloo (CPU)."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) set by torchrun / accelerate, or None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def _worker(rank, world_size, port, backend, timeout, threads, payload, results):
    try:
        # fn and args travel pickled, so that a function this process cannot import
        # is reported like any other error instead of killing the process unheard.
        fn, args = pickle.loads(payload)
        torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
            world_size=world_size, timeout=timedelta(seconds=timeout))
        value = fn(rank, world_size, *args)
        # Plain pickle copies tensors into the message, so the parent can read them
        # after this process has exited (torch's shared-memory tensors could not).
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException as exc:  # report everything, including KeyboardInterrupt
        message = f"raised {type(exc).__name__}: {exc}"
        report = (message, traceback.format_exc(), type(exc).__name__)
        results.put((rank, "error", pickle.dumps(report)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_fn(fn) -> None:
    if getattr(fn, "__module__", None) == "__main__" or "<locals>" in getattr(
            fn, "__qualname__", ""):
        raise ValueError(
            f"fn={getattr(fn, '__qualname__', fn)!r} cannot be sent to a spawned "
            "process: define it at the top level of an importable module "
            "(the book's workers live in llmcore.parallel.experiments)")


def launch(fn: Callable[..., Any], world_size: int, *args: Any,
           backend: str | None = None, timeout: float = 60.0,
           wall_timeout: float | None = None, threads: int | None = None) -> list:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` processes; return results.

    backend: ``"gloo"`` or ``"nccl"``; None picks NCCL when each rank has a GPU.
    timeout: seconds a collective may wait before it raises (a lost peer is an error).
    wall_timeout: seconds the whole run may take (None: ``DEFAULT_WALL_TIMEOUT``).
    threads: torch threads per rank; by default the CPU cores are shared among ranks.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    _check_fn(fn)
    payload = pickle.dumps((fn, args))
    if wall_timeout is None:
        wall_timeout = DEFAULT_WALL_TIMEOUT
    if not wall_timeout > 0:
        raise ValueError(f"wall_timeout must be > 0 seconds, got {wall_timeout!r}")
    backend = backend or default_backend(world_size)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "nccl" and gpus < world_size:
        # rank r would bind to cuda:r: two ranks must never share a GPU or name one
        # that does not exist
        raise ValueError(f"backend='nccl' needs one GPU per rank: world_size="
                         f"{world_size} but {gpus} GPU(s) visible; use backend='gloo' "
                         "(CPU processes) or fewer ranks")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, daemon=True, name=f"llmcore-rank{rank}",
                         args=(rank, world_size, port, backend, timeout, threads,
                               payload, results))
             for rank in range(world_size)]
    logs = [_start_logged(p) for p in procs]
    grace = 0.0  # on failure the other ranks are stopped at once
    try:
        values = _collect(procs, results, world_size, wall_timeout, logs)
        grace = 10.0  # on success they are only tearing down the process group
        return values
    finally:
        _stop(procs, grace)
        for log in logs:
            _echo(log)


def _start_logged(p) -> Any:
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


def _echo(log) -> None:
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


def _collect(procs, results, world_size, wall_timeout, logs) -> list:
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


def _stop(procs, grace: float) -> None:
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


# ------------------------------------------------- functions written in a notebook


def _run_source(rank: int, world_size: int, source: str, names: list, *args):
    namespace = {"torch": torch, "dist": dist, "nn": torch.nn,
                 "F": torch.nn.functional}
    exec(compile(source, "<notebook>", "exec"), namespace)
    return namespace[names[0]](rank, world_size, *args)


def launch_source(fn: Callable[..., Any], world_size: int, *args: Any,
                  helpers: tuple = (), **kwargs: Any) -> list:
    """:func:`launch` for a function written in a notebook (the labs).

    A notebook's function cannot be pickled into a spawned process, so its source
    (and that of ``helpers``, the functions it calls) is sent and defined again in
    each rank, where ``torch``, ``dist``, ``nn`` and ``F`` are already imported.
    An AssertionError or NotImplementedError in a rank is raised as such here.
    """
    funcs = (fn, *helpers)
    source = "\n\n".join(textwrap.dedent(inspect.getsource(f)) for f in funcs)
    try:
        return launch(_run_source, world_size, source, [fn.__name__], *args, **kwargs)
    except WorkerError as err:
        if err.remote_type in ("AssertionError", "NotImplementedError"):
            cls = AssertionError if err.remote_type == "AssertionError" \
                else NotImplementedError
            raise cls(str(err)) from None
        raise
