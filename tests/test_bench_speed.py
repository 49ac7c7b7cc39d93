"""The speed benchmark: the ladder through the training loop, skipped rungs with a
reason, the JSON it writes, and the nanoGPT log it parses."""

import json
import textwrap

import pytest
import torch

from llmcore.config import Tiered
from llmcore.models.gpt import GPTConfig
from tools.bench import nanogpt, profile, speed

TINY = speed.SpeedPreset(GPTConfig(65, 16, 1, 2, 32), batch_size=2, steps=2, warmup=2)


def test_rungs_a_cpu_cannot_run_are_skipped_with_a_reason():
    cpu = torch.device("cpu")
    names = {r.name: speed.skip_reason(r, cpu) for r in speed.LADDER}
    assert "sm80" in names["tf32"]
    assert names["fp32"] is None and names["compile"] is None
    # each rung adds one thing to the one before (FP8: tools.bench fp8)
    assert [r.name for r in speed.LADDER] == ["fp32", "tf32", "16-bit", "fused kernels",
                                              "compile"]


def test_sixteen_bit_rungs_use_the_devices_format(monkeypatch):
    from llmcore.runtime import DeviceCaps

    half = speed.LADDER[2]
    for capability, want in (((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        caps = DeviceCaps("cuda", "gpu", capability, 16 * 2**30, 40)
        monkeypatch.setattr(speed, "device_caps", lambda device, caps=caps: caps)
        assert speed.precision_of(half, torch.device("cuda")) == want
    assert speed.precision_of(speed.LADDER[0], torch.device("cuda")) == "fp32"


def test_main_writes_the_ladder(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "PRESETS", Tiered(cpu=TINY, gpu=TINY))
    eager = tuple(r for r in speed.LADDER if not r.compile)  # compile: see test_train
    monkeypatch.setattr(speed, "LADDER", eager)
    assert speed.main(["--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "speed-cpu.json").read_text())
    assert result["torch"] == torch.__version__ and result["date"]
    rows = {r["rung"]: r for r in result["ladder"]}
    assert set(rows) == {"fp32", "tf32", "16-bit", "fused kernels"}
    assert "skipped" in rows["tf32"]
    assert rows["16-bit"]["precision"] == "bf16"  # a CPU: bf16, never fp16
    for name in ("fp32", "16-bit", "fused kernels"):
        assert rows[name]["tokens_per_s"] > 0 and 0 < rows[name]["mfu"] < 1
    assert rows["fp32"]["sdpa"] is False and rows["fused kernels"]["sdpa"] is True


def test_nanogpt_times_are_read_from_its_log(tmp_path):
    fake = tmp_path / "nanoGPT"
    fake.mkdir()
    lines = [f"iter {i}: loss 4.1, time {10.0 * (i + 1):.2f}ms, mfu -100.00%"
             for i in range(nanogpt.SETTLE + 4)]
    (fake / "train.py").write_text(textwrap.dedent(f"""
        print("tokens per iteration will be: 768")
        for line in {lines!r}:
            print(line)
    """))
    times = nanogpt.nanogpt_step_ms(fake, 3, {})
    assert times == [10.0 * (i + 1) for i in range(nanogpt.SETTLE + 1,
                                                   nanogpt.SETTLE + 4)]
    (fake / "train.py").write_text("raise SystemExit('no data')")
    with pytest.raises(RuntimeError, match="prepare its data"):
        nanogpt.nanogpt_step_ms(fake, 3, {})


def test_profile_groups_operators_into_families():
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 64))
    x = torch.randn(32, 64)

    def run(tick):
        for _ in range(4):
            tick()
            model(x).square().mean().backward()

    shares = profile.profiled(run, settle=1, steps=2)
    assert shares["matmul"] > 0 and shares["activation"] > 0
    assert "attention" not in shares  # no attention operator ran
    assert profile.family("aten::_scaled_dot_product_flash_attention_for_cpu") == \
        "attention"
    assert profile.family("aten::addmm") == "matmul"
    with pytest.raises(ValueError, match="settle"):
        profile.profiled(run, settle=0, steps=2)


def test_comparison_records_rounds_ratios_and_a_profile(tmp_path):
    fake = tmp_path / "nanoGPT"  # a stand-in that logs 50 ms per iteration
    fake.mkdir()
    (fake / "train.py").write_text(textwrap.dedent("""
        import sys
        n = int([a for a in sys.argv if a.startswith("--max_iters=")][0][12:])
        for i in range(n + 1):
            print(f"iter {i}: loss 4.1, time 50.00ms, mfu -100.00%")
    """))
    cmp = nanogpt.compare_nanogpt(fake, rounds=1, steps=2, threads=1)
    assert cmp["nanogpt_ms"] == [50.0] and len(cmp["llmcore_ms"]) == 1
    assert 0 < cmp["llmcore_ms"][0] < 10_000  # a real llmcore process timed steps
    prof = cmp["llmcore_profile_ms"]
    assert prof["matmul"] > 0 and prof["attention"] > 0 and prof["optimizer"] > 0
