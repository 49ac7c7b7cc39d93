"""The cost model's closed forms against counts taken from real objects."""

import pytest

from book.workers.activations import activation_bytes
from book.workers.costmodel import (Plan, bubble_fraction, estimate,
                                    memory_per_rank, pp_payload)
from book.workers.memory import zero_state_bytes
from llmcore.models.gpt import GPTConfig


def test_zero_memory_and_bubble():
    assert zero_state_bytes(1000, 0, 8) == 16000
    assert zero_state_bytes(1000, 3, 8) == 2000
    assert bubble_fraction(4, 1) == 0.75
    assert bubble_fraction(4, 12) == pytest.approx(0.2)
    assert pp_payload(8, 4, 2, stage=0, n_stages=2) == {"send": 8 * 4 * 2 * 4}
    with pytest.raises(ValueError, match="stage"):
        zero_state_bytes(10, 4, 2)


def test_estimate_shrinks_memory_with_sharding():
    cfg = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12,
                    n_embd=768)
    base = estimate(cfg, Plan(dp=8), batch=64, seq=1024)
    z3 = estimate(cfg, Plan(dp=8, zero=3), batch=64, seq=1024)
    hybrid = estimate(cfg, Plan(dp=2, tp=2, pp=2, micro_batches=8), batch=64, seq=1024)
    assert z3["state_bytes"] == pytest.approx(base["state_bytes"] / 8)
    assert hybrid["state_bytes"] == pytest.approx(base["state_bytes"] / 4, rel=1e-6)
    assert hybrid["bubble"] == pytest.approx(1 / 9)
    assert base["wire_bytes"]["tp"] == 0 and hybrid["wire_bytes"]["tp"] > 0
    with pytest.raises(ValueError, match="zero"):
        Plan(zero=5)


def test_memory_per_rank_adds_activations_that_tp_and_checkpointing_shrink():
    cfg = GPTConfig(vocab_size=32000, block_size=2048, n_layer=32, n_head=32,
                    n_embd=4096)
    dp = memory_per_rank(cfg, Plan(dp=8), batch=8, seq=2048)
    assert dp["state"] == estimate(cfg, Plan(dp=8), 8, 2048)["state_bytes"]
    assert dp["activations"] == activation_bytes(cfg, 1, 2048, 2)
    tp = memory_per_rank(cfg, Plan(dp=4, tp=2), batch=8, seq=2048)
    assert dp["activations"] < tp["activations"] < 2 * dp["activations"]
    ckpt = memory_per_rank(cfg, Plan(dp=8), batch=8, seq=2048, checkpoint_every=1)
    assert ckpt["activations"] == 32 * 2048 * 4096 * 2  # each block's input only
    pp = memory_per_rank(cfg, Plan(dp=2, pp=4, micro_batches=4), batch=8, seq=2048)
    assert pp["activations"] == 4 * activation_bytes(
        GPTConfig(32000, 2048, 8, 32, 4096), 1, 2048, 2)  # 4 micro-batches in flight


def test_pipeline_schedules_in_a_plan():
    cfg = GPTConfig(vocab_size=32000, block_size=2048, n_layer=32, n_head=32,
                    n_embd=4096)
    plans = {s: Plan(dp=2, pp=4, micro_batches=8, schedule=s,
                     chunks=2 if s == "interleaved" else 1)
             for s in ("1f1b", "interleaved", "zbh1")}
    mem = {s: memory_per_rank(cfg, p, batch=16, seq=2048)["activations"]
           for s, p in plans.items()}
    assert mem["zbh1"] == mem["1f1b"]  # ZB-H1 holds p micro-batches, as 1F1B
    assert mem["interleaved"] == pytest.approx(mem["1f1b"] * 5.5 / 4)
    bubbles = {s: estimate(cfg, p, 16, 2048)["bubble"] for s, p in plans.items()}
    assert bubbles["zbh1"] < bubbles["interleaved"] < bubbles["1f1b"]
    # two chunks per rank on two ranks: stage 0 sends out of both of its chunks and
    # a gradient out of its second one
    assert pp_payload(8, 4, 2, stage=0, n_stages=2, chunks=2) == {"send": 3 * 256}
    with pytest.raises(ValueError, match="schedule"):
        Plan(pp=2, schedule="dualpipe")
    with pytest.raises(ValueError, match="interleaved"):
        Plan(pp=2, chunks=2)
