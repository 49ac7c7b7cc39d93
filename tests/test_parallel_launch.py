"""launch(): results come back by rank, a failing rank is an error, never a hang."""

import importlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from book.workers.launch import WorkerError, launch
from llmcore.parallel.ranks import default_backend, rank_device

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parent.parent  # where `book.workers` imports from


def sum_of_ranks(rank, world_size, scale):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {"rank": rank, "world": world_size, "sum": t.item() * scale}


def one_rank_raises(rank, world_size):
    if rank == 1:
        raise ValueError("rank one is broken")
    dist.all_reduce(torch.zeros(1))  # rank 0 waits here for a peer that never comes
    return rank


def one_rank_dies(rank, world_size):
    if rank == 1:
        print("last words of rank 1", file=sys.stderr, flush=True)
        os._exit(3)
    dist.barrier()


def test_results_come_back_in_rank_order():
    out = launch(sum_of_ranks, 2, 10.0, backend="gloo")
    assert [o["rank"] for o in out] == [0, 1]
    assert all(o["world"] == 2 and o["sum"] == 10.0 for o in out)


def test_failing_rank_raises_in_parent_with_traceback():
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        launch(one_rank_raises, 2, timeout=60)
    assert time.monotonic() - start < 30  # the parent did not wait for the timeout
    err = info.value
    assert err.rank == 1
    assert "ValueError: rank one is broken" in str(err)
    assert "one_rank_raises" in err.remote_traceback  # the remote frame is shown


def test_dead_rank_is_reported_with_what_it_printed():
    with pytest.raises(WorkerError, match="rank 1 died with exit code 3") as info:
        launch(one_rank_dies, 2, timeout=60)
    assert "last words of rank 1" in info.value.remote_traceback


def environment_value(rank, world_size, name):
    return os.environ.get(name)


def test_ranks_run_in_the_environment_of_each_launch(monkeypatch):
    """The fork server starts once; each launch's ranks still see today's variables."""
    assert launch(environment_value, 2, "LLMCORE_LAUNCH_PROBE", backend="gloo") == [
        None, None]
    monkeypatch.setenv("LLMCORE_LAUNCH_PROBE", "set after the first launch")
    assert launch(environment_value, 2, "LLMCORE_LAUNCH_PROBE", backend="gloo") == [
        "set after the first launch"] * 2


def test_unpicklable_function_is_refused():
    def local(rank, world_size):
        return rank

    with pytest.raises(ValueError, match="importable module"):
        launch(local, 2)
    with pytest.raises(ValueError, match="world_size"):
        launch(sum_of_ranks, 0)


def test_nccl_never_binds_two_ranks_to_one_gpu(monkeypatch):
    gpus = torch.cuda.device_count()
    with pytest.raises(ValueError, match="at most one rank per GPU"):
        launch(sum_of_ranks, gpus + 1, 1.0, backend="nccl")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # refused before start
    with pytest.raises(ValueError, match="local_rank=1 has no GPU.*1 GPU"):
        launch(sum_of_ranks, 2, 1.0, backend="nccl")


@pytest.mark.parametrize("gpus", [0, 1, 2, 4])
def test_backend_and_device_never_share_or_invent_a_gpu(monkeypatch, gpus):
    """Whatever the GPUs, every rank of a launch gets a device of its own or the CPU."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for n in (1, 2, 3, 4):
        for tier in ("cpu", "gpu", None):
            backend = default_backend(n, tier)
            devices = [rank_device(r, backend) for r in range(n)]
            if backend == "nccl":
                assert tier != "cpu" and n <= gpus
                assert devices == [torch.device("cuda", r) for r in range(n)]
                assert len(set(devices)) == n and all(d.index < gpus for d in devices)
            else:
                assert tier == "cpu" or n > gpus  # gloo only when NCCL cannot serve
                assert set(devices) == {torch.device("cpu")}
    if gpus:
        assert default_backend(1, "gpu") == "nccl"
    with pytest.raises(ValueError, match=f"local_rank={gpus} has no GPU"):
        rank_device(gpus, "nccl")  # an index that does not exist
    with pytest.raises(ValueError, match="tier"):
        default_backend(2, "tpu")
    with pytest.raises(ValueError, match="world_size"):
        default_backend(0)


def rank_devices(rank, world_size):
    """What a launched rank finds: its device and a tensor made there."""
    return {"device": str(rank_device()), "t": torch.ones(2, device=rank_device())}


def test_ranks_under_gloo_work_on_the_cpu_and_results_come_back_there():
    out = launch(rank_devices, 2, backend="gloo")
    assert [o["device"] for o in out] == ["cpu", "cpu"]
    assert all(o["t"].device.type == "cpu" for o in out)
    nested = LAUNCH._to_cpu({"a": [torch.ones(1), (torch.zeros(1), 3)], "b": "x"})
    assert nested["a"][1][1] == 3 and isinstance(nested["a"][1], tuple)


# ------------------------------------------------- never hang, never hide the error

LAUNCH = importlib.import_module("book.workers.launch")


def one_rank_loops_forever(rank, world_size, pid_file):
    if rank == 1:
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
        while True:  # a student's endless loop, outside any collective
            time.sleep(0.05)
    return rank


def one_rank_exits_quietly(rank, world_size):
    if rank == 1:
        os._exit(0)
    return rank


def test_default_wall_timeout_stops_a_stuck_rank_and_names_it(monkeypatch, tmp_path):
    monkeypatch.setattr(LAUNCH, "DEFAULT_WALL_TIMEOUT", 8.0)
    pid_file = tmp_path / "pid"
    start = time.monotonic()
    with pytest.raises(WorkerError, match="did not finish") as info:
        launch(one_rank_loops_forever, 2, str(pid_file), backend="gloo")
    assert time.monotonic() - start < 60
    assert info.value.rank == 1 and "finished: [0]" in str(info.value)
    with pytest.raises(ProcessLookupError):  # the stuck rank was ended
        os.kill(int(pid_file.read_text()), 0)


def test_rank_that_exits_without_result_is_reported():
    start = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1 exited with code 0"):
        launch(one_rank_exits_quietly, 2, backend="gloo", wall_timeout=60)
    assert time.monotonic() - start < 30


def test_function_the_ranks_cannot_import_shows_the_import_error(tmp_path):
    (tmp_path / "vanishing_worker.py").write_text(
        "def work(rank, world_size):\n    return rank\n")
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module("vanishing_worker")
        (tmp_path / "vanishing_worker.py").unlink()  # gone before the ranks start
        with pytest.raises(WorkerError, match="No module named 'vanishing_worker'"):
            launch(module.work, 2, backend="gloo", wall_timeout=60)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("vanishing_worker", None)


def test_script_without_main_guard_gets_the_real_error(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""
        import operator
        from book.workers.launch import WorkerError, launch
        try:
            print(launch(operator.add, 2, backend="gloo", wall_timeout=60))
        except WorkerError as err:
            print("ERROR:", err)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "ERROR: rank" in out.stdout and "while starting" in out.stdout
    assert 'if __name__ == "__main__":' in out.stdout
    assert "bootstrapping phase" in out.stderr  # what the rank itself printed
