"""Run a function on several processes, one per rank, from a script or a notebook.

``launch(fn, world_size, *args)`` starts ``world_size`` fresh Python processes (the
``spawn`` start method, so it works from Jupyter and on every OS), joins them into one
process group and calls ``fn(rank, world_size, *args)`` in each. What ``fn`` returns
comes back to the parent as a list indexed by rank.

Two rules keep it from ever hanging:

* every collective has a timeout (``timeout`` seconds), after which it raises;
* when one rank raises, the parent stops the others and raises :class:`WorkerError`
  with the failing rank and its remote traceback.

A function defined in a notebook cannot be pickled into a spawned process, so ``fn``
must be importable: the book's workers live in ``llmcore.parallel`` modules.
This module and ``llmcore.runtime`` are the only places that read environment variables.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_lib
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist


class WorkerError(RuntimeError):
    """A rank raised (or died); carries the rank and the remote traceback."""

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


def rank_device(rank: int, backend: str) -> torch.device:
    """The device of ``rank``: its own GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) set by torchrun / accelerate, or None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def _worker(rank, world_size, port, backend, timeout, threads, fn, args, results):
    try:
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


def launch(fn: Callable[..., Any], world_size: int, *args: Any,
           backend: str | None = None, timeout: float = 60.0,
           wall_timeout: float | None = None, threads: int | None = None) -> list:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` processes; return results.

    backend: ``"gloo"`` or ``"nccl"``; None picks NCCL when each rank has a GPU.
    timeout: seconds a collective may wait before it raises (a lost peer is an error).
    wall_timeout: seconds the whole run may take (None: no limit besides ``timeout``).
    threads: torch threads per rank; by default the CPU cores are shared among ranks.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if getattr(fn, "__module__", None) == "__main__" or "<locals>" in getattr(
            fn, "__qualname__", ""):
        raise ValueError(
            f"fn={getattr(fn, '__qualname__', fn)!r} cannot be sent to a spawned "
            "process: define it at the top level of an importable module "
            "(the book's workers live in llmcore.parallel)")
    backend = backend or default_backend(world_size)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, daemon=True, name=f"llmcore-rank{rank}",
                         args=(rank, world_size, port, backend, timeout, threads,
                               fn, args, results))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    grace = 0.0  # on failure the other ranks are stopped at once
    try:
        values = _collect(procs, results, world_size, wall_timeout)
        grace = 10.0  # on success they are only tearing down the process group
        return values
    finally:
        _stop(procs, grace)


def _collect(procs, results, world_size, wall_timeout) -> list:
    values: dict[int, Any] = {}
    start = time.monotonic()
    while len(values) < world_size:
        try:
            rank, status, payload = results.get(timeout=0.1)
        except queue_lib.Empty:
            for rank, p in enumerate(procs):
                # A rank that died without a message (killed, segfault, out of memory).
                if rank not in values and p.exitcode not in (None, 0):
                    raise WorkerError(rank, f"died with exit code {p.exitcode} "
                                      "without a Python error; the other ranks "
                                      "were stopped")
            if wall_timeout is not None and time.monotonic() - start > wall_timeout:
                missing = sorted(set(range(world_size)) - set(values))
                raise TimeoutError(f"ranks {missing} did not finish within "
                                   f"wall_timeout={wall_timeout} s; all were stopped")
            continue
        if status == "error":
            message, remote, kind = pickle.loads(payload)
            for other, p in enumerate(procs):  # a peer that died is the root cause
                p.join(timeout=0.5 if other != rank else 0)
                if other != rank and p.exitcode not in (None, 0):
                    raise WorkerError(other, f"died with exit code {p.exitcode} "
                                      f"(then rank {rank} {message}); the other "
                                      "ranks were stopped")
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
    import inspect
    import textwrap

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
