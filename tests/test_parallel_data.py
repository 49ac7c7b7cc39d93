"""Hand-written data parallelism equals one process on the full batch and DDP."""

import functools

import pytest
import torch
from parallel_fixtures import TinyLM, random_batches

from book.workers.common import max_abs_diff, solution_code, train_single
from book.workers.costmodel import dp_payload
from book.workers.data import dropout_masks, train_worker
from book.workers.timeline import dp_timeline_worker, overlap
from book.workers.launch import launch
from llmcore.parallel import BucketedDataParallel
from llmcore.parallel.data_parallel import make_buckets

MODEL = functools.partial(TinyLM, vocab_size=32, n_embd=16, hidden=32)
DATA = random_batches(steps=3, batch=8, seq=6, vocab=32)


class WithUnused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.used(x)


def unused_parameter_is_reported():
    dp = BucketedDataParallel(WithUnused())
    dp(torch.ones(1, 2)).sum().backward()
    try:
        dp(torch.ones(1, 2))
    except RuntimeError as err:
        return str(err)
    return ""


def every_wrapper(rank, world_size):
    runs = {"unused": unused_parameter_is_reported()}
    runs.update({kind: train_worker(rank, world_size, MODEL, kind, DATA,
                                    bucket_cap_mb=0.002)
                 for kind in ("naive", "bucketed", "ddp")})
    runs["accumulate"] = train_worker(rank, world_size, MODEL, "bucketed", DATA,
                                      accumulate=2, bucket_cap_mb=0.002)
    return runs


def test_buckets_follow_backward_order_and_cap():
    params = list(MODEL().parameters())
    buckets = make_buckets(params, cap_bytes=4 * 600)
    flat = [p for b in buckets for p in b.parameters()]
    assert [id(p) for p in flat] == [id(p) for p in reversed(params)]
    assert len(buckets) > 1 and buckets[-1].is_last() and not buckets[0].is_last()
    for b in buckets:
        assert b.buffer().numel() == sum(p.numel() for p in b.parameters())
        assert [g.shape for g in b.gradients()] == [p.shape for p in b.parameters()]


@pytest.mark.distributed
def test_data_parallel_matches_single_process_and_ddp():
    ref = train_single(MODEL, DATA)
    ranks = launch(every_wrapper, 2)
    assert "2 of 4 parameters received a gradient" in ranks[0].pop("unused")
    ranks[1].pop("unused")
    for kind, run in ranks[0].items():
        assert max_abs_diff(run["state"], ref["state"]) < 1e-5, kind
        assert max(abs(a - b) for a, b in zip(run["losses"], ref["losses"])) < 1e-5
        # the replicas stay identical
        assert max_abs_diff(run["state"], ranks[1][kind]["state"]) == 0.0, kind
    n_params = sum(p.numel() for p in MODEL().parameters())
    per_step = dp_payload(n_params, grad_bytes=4)["all_reduce"]  # the cost model
    for kind in ("naive", "bucketed", "accumulate"):  # no_sync: one sync per step
        assert ranks[0][kind]["bytes_sent"] == 3 * per_step, kind


@pytest.mark.distributed
def test_data_parallel_ranks_draw_their_own_dropout_masks():
    masks = launch(dropout_masks, 2, 0)
    assert not torch.equal(masks[0], masks[1])


def timelines(rank, world_size):
    model = functools.partial(TinyLM, vocab_size=64, n_embd=64, hidden=512)
    x, y = random_batches(1, 16, 32, 64)
    return {cap: dp_timeline_worker(rank, world_size, model, x[0], y[0], cap)
            for cap in (0.05, 100.0)}


@pytest.mark.distributed
def test_bucketed_all_reduce_overlaps_backward_and_one_bucket_cannot():
    ranks = launch(timelines, 2)
    for r in ranks:
        many, one = r[0.05], r[100.0]
        assert many["buckets"] > 2 and one["buckets"] == 1
        comm = sorted((e for e in many["events"] if e["kind"] == "comm"),
                      key=lambda e: e["start"])
        bwd = next(e for e in many["events"] if e["kind"] == "backward")
        assert comm[0]["start"] < bwd["end"]  # sent while backward still computed
        assert overlap(many["events"]) > 0.0
        one_comm = next(e for e in one["events"] if e["kind"] == "comm")
        assert one_comm["start"] >= next(e for e in one["events"]
                                         if e["kind"] == "backward")["end"] - 1e-3


def test_solution_code_is_the_printed_solution(tmp_path):
    """The chapters run the code their solutions print: indented lines only, from
    the named solution, and a clear error for a missing or code-less one."""
    page = tmp_path / "page.md"
    page.write_text("```{solution} ex-a\n:class: dropdown\nProse.\n\n    x = 1\n"
                    "    y = x + 1\n```\n\n````{solution} ex-b\nOnly prose.\n````\n")
    namespace = {}
    exec(solution_code(page, "ex-a"), namespace)
    assert namespace["y"] == 2
    with pytest.raises(ValueError, match="prints no code"):
        solution_code(page, "ex-b")
    with pytest.raises(ValueError, match="no solution 'ex-c'"):
        solution_code(page, "ex-c")
