"""The FP8 benchmark's CPU-runnable parts: arguments, refusal, dry run, JSON."""

import json

import pytest
import torch

from llmcore.accounting import count_params
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.precision import fp8, size_filter
from tools.bench import fp8 as bench
from tools.bench.__main__ import main as bench_main


def test_parse_args_defaults_and_errors():
    args = bench.parse_args(["--out", "x.json", "--dry-run", "--steps", "4"])
    assert args.out == "x.json" and args.dry_run and args.steps == 4
    assert not bench.parse_args([]).skip_e2e
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--bogus"])


def test_gpu_runs_fit_the_card_they_run_on():
    """bf16 against FP8 on a ~1.3B GPT on an 80 GB card, on a 350M one on 24 GB."""
    from llmcore.runtime import fit_memory
    from tools.bench.gpus import DEVICE_CLASSES
    from tools.bench import plan

    sizes = {}
    for name in ("l4", "h100"):
        dc = DEVICE_CLASSES[name]
        (spec,) = fit_memory(bench.GPU_MODELS, dc.caps)
        with torch.device("meta"):
            model = GPT(GPTConfig(spec.vocab_size, spec.block_size, spec.n_layer,
                                  spec.n_head, spec.n_embd))
        sizes[name] = count_params(model)
        keep = size_filter()  # the block's linears are large enough to convert
        assert keep(torch.nn.Linear(spec.n_embd, 3 * spec.n_embd), "blocks.0.qkv_proj")
        w = plan.Workload("fp8", spec.n_layer, spec.n_embd, spec.n_head,
                          spec.vocab_size, spec.block_size, spec.batch_size, 1,
                          precision="bf16")
        assert plan.peak_gib(w, dc) < dc.usable_gib  # it fits the card
    assert 1.2e9 < sizes["h100"] < 1.5e9 and 3e8 < sizes["l4"] < 4.5e8


def test_gpu_slug():
    assert bench.gpu_slug("NVIDIA H200") == "h200"
    assert bench.gpu_slug("NVIDIA GeForce RTX 4090") == "rtx-4090"
    assert bench.gpu_slug("") == "gpu"


def test_refuses_without_fp8_gpu(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.json"
    assert bench_main(["fp8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "compute capability >= 8.9" in err and "--dry-run" in err
    assert not out.exists()
    assert bench.check_hardware(dry_run=True) is None


def test_refuses_old_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(fp8, "_capability", lambda index: (8, 0))
    why = bench.check_hardware(dry_run=False)
    assert "compute capability 8.0" in why and "emulated" in why


def test_dry_run_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "fp8.json"
    assert bench.main(["--dry-run", "--out", str(out), "--steps", "2",
                       "--iters", "1"]) == 0
    d = json.loads(out.read_text())
    assert d["dry_run"] is True and d["torch"] == torch.__version__
    assert d["gpu"].startswith("none") and d["date"][:2] == "20"
    assert len(d["matmul"]) == len(bench.DRY_SIZES)
    row = d["matmul"][0]
    for key in ("bf16_tflops", "fp8_tensorwise_tflops", "fp8_rowwise_tflops"):
        assert row[key] > 0
    (e2e,) = d["e2e"]
    assert e2e["bf16"]["params"] == e2e["fp8"]["params"] > 0
    assert len(e2e["fp8"]["loss"]) == 2 and e2e["compiled"] is False
    # Same data and seed: FP8 starts from the same loss as bf16, within FP8 error.
    assert abs(e2e["fp8"]["loss"][0] / e2e["bf16"]["loss"][0] - 1) < 0.01
    assert "Float8Linear" in capsys.readouterr().out
    assert not list(out.parent.glob("*.tmp"))  # the atomic write cleaned up
