"""MFU: the FLOPs formula against a FLOP counter, the peak measurement, the CLI."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llmcore.bench import mfu as bench
from llmcore.config import Tiered
from llmcore.models.gpt import GPT, GPTConfig


def test_formula():
    assert bench.flops_per_token(100, 2, 8, 16) == 6 * 100 + 12 * 2 * 8 * 16
    assert bench.mfu(1000.0, 1e6, 1e10) == pytest.approx(0.1)


def test_formula_matches_counted_flops():
    # The hand-written attention is plain matmuls, which the counter sees; the formula
    # counts the full T x T score matrix, as that kernel computes it.
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=64,
                    use_sdpa=False)
    model = GPT(cfg)
    x = torch.randint(96, (2, 32))
    with FlopCounterMode(display=False) as counter:
        _, loss = model(x, x)
        loss.backward()
    counted = counter.get_total_flops() / x.numel()
    assert counted == pytest.approx(bench.gpt_flops_per_token(model), rel=0.03)


def test_peak_is_measured():
    peak = bench.measure_peak_flops("cpu", "fp32", n=256, iters=2)
    assert 1e8 < peak < 1e14
    with pytest.raises(ValueError, match="precision"):
        bench.measure_peak_flops("cpu", "int4")


def test_main_writes_json(tmp_path, monkeypatch):
    tiny = bench.MFUPreset(GPTConfig(65, 16, 1, 2, 32), batch_size=2, steps=1)
    monkeypatch.setattr(bench, "PRESETS", Tiered(cpu=tiny, gpu=tiny))
    assert bench.main(["--precision", "fp32", "--steps", "1", "--out",
                       str(tmp_path)]) == 0
    (path,) = tmp_path.glob("mfu-*.json")
    result = json.loads(path.read_text())
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1
    assert result["torch"] == torch.__version__
