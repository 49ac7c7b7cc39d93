"""The cost model's closed forms against counts taken from real objects."""

import pytest

from llmcore.accounting import zero_state_bytes
from llmcore.models.gpt import GPTConfig
from llmcore.parallel.activations import activation_bytes
from llmcore.parallel.costmodel import (Plan, bubble_fraction, estimate,
                                        memory_per_rank, pp_payload)


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
