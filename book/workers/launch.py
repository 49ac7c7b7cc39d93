"""Run a function on several processes, one per rank, from a script or a notebook.

``launch(fn, world_size, *args)`` starts ``world_size`` Python processes, joins them
into one process group and calls ``fn(rank, world_size, *args)`` in each. What ``fn``
returns comes back to the parent as a list indexed by rank.

The processes start from a *fork server*: the first launch of a session starts one
clean process that imports torch once; every rank of every later launch is a fork of
it, ready in a fraction of a second instead of the second or more a fresh
``import torch`` takes. The server is forked before it runs any torch code (no
threads, no CUDA), which is what makes forking it safe, and it works from Jupyter.
Where the operating system has no fork server (Windows), ranks are spawned fresh.

Three rules keep it from ever hanging or failing in silence:

* every collective has a timeout (``timeout`` seconds), after which it raises;
* the whole run has a wall-clock limit (``wall_timeout``, ten minutes by default):
  a rank stuck outside any collective (an endless loop) is stopped with the others
  and named in the error, as is a rank that exits without returning a result;
* when one rank raises or dies, the parent stops the others and raises
  :class:`WorkerError` with the failing rank and its remote traceback; a rank that
  dies before it could run ``fn`` (``fn`` not importable there, a script that calls
  ``launch`` without ``if __name__ == "__main__":``) is reported as such, with what
  it printed.

A notebook's function cannot be pickled into another process, so ``fn`` must be
importable (the book's workers live in ``book.workers``). Which backend and device
each rank uses comes from :mod:`llmcore.parallel.ranks`. The library itself never
starts processes: a training script runs under ``torchrun``; this runner is how the
book's notebooks, labs and tests start theirs.
"""

from __future__ import annotations

import inspect
import multiprocessing as mp
import os
import pickle
import socket
import textwrap
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from book.workers.supervise import WorkerError, collect, echo, new_logs, stop
from llmcore.parallel.ranks import default_backend, rank_device

DEFAULT_WALL_TIMEOUT = 600.0  # seconds a whole launch() may take unless told otherwise


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it), for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, log, env, setup, payload, results):
    # What this rank writes to stderr (Python's or a C library's) goes to its log.
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 2)
    os.close(fd)
    # The fork server kept the environment of the first launch; a rank runs in the
    # parent's environment of now, as a freshly started process would.
    os.environ.clear()
    os.environ.update(env)
    world_size, port, backend, timeout, threads = setup
    try:
        # fn and args travel pickled, so that a function this process cannot import
        # is reported like any other error instead of killing the process unheard.
        fn, args = pickle.loads(payload)
        torch.set_num_threads(threads)
        device = rank_device(rank, backend)  # every rank on this machine
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
            world_size=world_size, timeout=timedelta(seconds=timeout))
        value = _to_cpu(fn(rank, world_size, *args))  # the parent compares on the CPU
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


def _context():
    """The fork server where the OS has one (torch imported in it once), else spawn."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed"])  # before it starts
    return ctx


def _to_cpu(value):
    """``value`` with every tensor in its dicts, lists and tuples on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if type(value) in (list, tuple):  # plain ones; a namedtuple comes back as is
        return type(value)(_to_cpu(v) for v in value)
    return value


def _check_fn(fn) -> None:
    if getattr(fn, "__module__", None) == "__main__" or "<locals>" in getattr(
            fn, "__qualname__", ""):
        raise ValueError(
            f"fn={getattr(fn, '__qualname__', fn)!r} cannot be sent to another "
            "process: define it at the top level of an importable module "
            "(the book's workers live in book.workers)")


def launch(fn: Callable[..., Any], world_size: int, *args: Any,
           backend: str | None = None, timeout: float = 60.0,
           wall_timeout: float | None = None, threads: int | None = None) -> list:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` processes; return results.

    backend: ``"gloo"`` or ``"nccl"``; None: :func:`default_backend` (NCCL when each
    rank can have a GPU of its own). Under NCCL rank r works on ``cuda:r``.
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
    rank_device(world_size - 1, backend)  # NCCL: a GPU of its own for every rank
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world_size)
    ctx = _context()
    results = ctx.Queue()
    setup = (world_size, free_port(), backend, timeout, threads)
    logs = new_logs(world_size)
    procs = [ctx.Process(target=_worker, daemon=True, name=f"llmcore-rank{rank}",
                         args=(rank, logs[rank], dict(os.environ), setup, payload,
                               results))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    grace = 0.0  # on failure the other ranks are stopped at once
    try:
        values = collect(procs, results, world_size, wall_timeout, logs)
        grace = 10.0  # on success they are only tearing down the process group
        return values
    finally:
        stop(procs, grace)
        echo(logs)


# ------------------------------------------------- functions written in a notebook


def _run_source(rank: int, world_size: int, source: str, names: list, *args):
    namespace = {"torch": torch, "dist": dist, "nn": torch.nn,
                 "F": torch.nn.functional}
    exec(compile(source, "<notebook>", "exec"), namespace)
    return namespace[names[0]](rank, world_size, *args)


def launch_source(fn: Callable[..., Any], world_size: int, *args: Any,
                  helpers: tuple = (), **kwargs: Any) -> list:
    """:func:`launch` for a function written in a notebook (the labs).

    A notebook's function cannot be pickled into another process, so its source
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
