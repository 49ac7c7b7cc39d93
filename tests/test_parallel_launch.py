"""launch(): results come back by rank, a failing rank is an error, never a hang."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from llmcore.parallel import WorkerError, launch

pytestmark = pytest.mark.distributed


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


def test_dead_rank_is_reported():
    with pytest.raises(WorkerError, match="rank 1 died with exit code 3"):
        launch(one_rank_dies, 2, timeout=60)


def test_unpicklable_function_is_refused():
    def local(rank, world_size):
        return rank

    with pytest.raises(ValueError, match="importable module"):
        launch(local, 2)
    with pytest.raises(ValueError, match="world_size"):
        launch(sum_of_ranks, 0)
