"""Device and tier selection, seeding, the banner, presets per tier."""

import random

import numpy as np
import pytest
import torch

from llmcore import runtime
from llmcore.config import Tiered, check_fields, override
from tools.bench import gpus


def test_device_order_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.select_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.select_device().type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runtime.select_device().type == "cpu"


def test_prefer_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="prefer='cuda'.*no CUDA device"):
        runtime.select_device("cuda")


def test_tier_follows_device_then_environment(monkeypatch):
    monkeypatch.delenv("LLMCORE_TIER", raising=False)
    assert runtime.select_tier(torch.device("cpu")) == "cpu"
    assert runtime.select_tier(torch.device("cuda")) == "gpu"
    monkeypatch.setenv("LLMCORE_TIER", "cpu")
    assert runtime.select_tier(torch.device("cuda")) == "cpu"
    monkeypatch.setenv("LLMCORE_TIER", "tpu")
    with pytest.raises(ValueError, match="LLMCORE_TIER.*'tpu'.*cpu"):
        runtime.select_tier(torch.device("cpu"))
    monkeypatch.setenv("LLMCORE_TIER", "gpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        runtime.select_tier(torch.device("cpu"))


def test_seed_everything_makes_every_generator_repeat():
    def draw():
        return random.random(), np.random.rand(), torch.rand(3)

    g = runtime.seed_everything(7)
    first = draw() + (torch.rand(2, generator=g),)
    g = runtime.seed_everything(7)
    second = draw() + (torch.rand(2, generator=g),)
    assert first[:2] == second[:2]
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        runtime.seed_everything(-1)


def test_setup_prints_one_banner_line(capsys, monkeypatch):
    monkeypatch.delenv("LLMCORE_TIER", raising=False)
    rt = runtime.setup(seed=3, device="cpu")
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0
    assert "device: cpu" in out and "tier: cpu" in out
    assert torch.__version__ in out and "seed 3" in out
    assert rt.device.type == "cpu" and rt.tier == "cpu" and rt.seed == 3


def test_pick_chooses_the_preset_of_the_tier():
    rt = runtime.setup(seed=0, device="cpu", tier="cpu", quiet=True)
    assert rt.pick(Tiered(cpu="small", gpu="large")) == "small"
    assert rt.pick({"cpu": 1, "gpu": 2}) == 1
    with pytest.raises(KeyError, match="no entry for tier 'cpu'"):
        rt.pick({"gpu": 2})
    with pytest.raises(KeyError, match="unknown tier"):
        Tiered(cpu=1, gpu=2)["tpu"]


def test_config_helpers_name_the_bad_field():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Cfg:
        width: int = 8

        def __post_init__(self):
            check_fields(self, "width", above=0)

    with pytest.raises(ValueError, match=r"Cfg.width must be a positive number, got 0"):
        Cfg(width=0)
    assert override(Cfg(), width=16).width == 16
    with pytest.raises(ValueError, match=r"has no field\(s\) \['height'\]"):
        override(Cfg(), height=3)


# ---------------------------------------------------------------- device capabilities

class FakeProps:
    """What torch.cuda.get_device_properties returns, for a GPU this machine lacks."""

    def __init__(self, name, major, minor, gib, sms):
        self.name, self.major, self.minor = name, major, minor
        self.total_memory, self.multi_processor_count = gib * 2**30, sms


GPUS = {  # name: (major, minor, GiB, SMs, expected default precision)
    "Tesla T4": (7, 5, 15, 40, "fp16"),
    "Tesla V100-SXM2-16GB": (7, 0, 16, 80, "fp16"),
    "NVIDIA A100-SXM4-40GB": (8, 0, 40, 108, "bf16"),
    "NVIDIA L4": (8, 9, 22, 58, "bf16"),
    "NVIDIA H100 80GB HBM3": (9, 0, 80, 132, "bf16"),
    "Tesla P100-PCIE-16GB": (6, 0, 16, 56, "fp32"),
}


def fake_gpu(monkeypatch, name):
    major, minor, gib, sms, _ = GPUS[name]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: FakeProps(name, major, minor, gib, sms))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch, "manual_seed", lambda seed: None)  # no CUDA to seed


@pytest.mark.parametrize("name", sorted(GPUS))
def test_caps_and_default_precision_follow_compute_capability(monkeypatch, name):
    major, minor, gib, sms, precision = GPUS[name]
    fake_gpu(monkeypatch, name)
    caps = runtime.device_caps("cuda")
    assert caps == runtime.DeviceCaps("cuda", name, (major, minor), gib * 2**30, sms)
    assert caps.fp16_tensor_cores == ((major, minor) >= (7, 0))
    assert caps.bf16_tensor_cores == (major >= 8)
    assert caps.fp8_tensor_cores == ((major, minor) >= (8, 9))
    assert runtime.default_precision(caps) == precision
    assert f"sm{major}{minor}" in caps.describe() and f"{gib} GiB" in caps.describe()


CLASSES = {"Tesla T4": "t4", "Tesla V100-SXM2-16GB": "t4", "NVIDIA L4": "l4",
           "NVIDIA A100-SXM4-40GB": "a100-40gb", "NVIDIA H100 80GB HBM3": "h100",
           "Tesla P100-PCIE-16GB": None}


@pytest.mark.parametrize("name", sorted(GPUS))
def test_each_gpu_is_planned_as_its_device_class(monkeypatch, name):
    fake_gpu(monkeypatch, name)
    caps = runtime.device_caps("cuda")
    kind = gpus.device_class(caps)
    assert (kind.name if kind else None) == CLASSES[name]
    if kind is not None:  # the class trains in the precision the GPU itself would
        assert kind.precision == runtime.default_precision(caps)
        assert kind.usable_gib <= caps.memory_gb + 1
        assert kind.precision in kind.peak_tflops  # its tensor cores run it


def test_the_classes_beyond_the_gpus_above():
    h200 = runtime.DeviceCaps("cuda", "NVIDIA H200", (9, 0), 141 * 2**30, 132)
    a100 = runtime.DeviceCaps("cuda", "NVIDIA A100-SXM4-80GB", (8, 0), 80 * 2**30, 108)
    rtx = runtime.DeviceCaps("cuda", "NVIDIA GeForce RTX 3090", (8, 6), 24 * 2**30, 82)
    assert [gpus.device_class(c).name for c in (h200, a100, rtx)] == [
        "h200", "a100-80gb", "l4"]
    assert gpus.device_class(runtime.device_caps("cpu")) is None
    assert gpus.DEVICE_CLASSES["t4"].precision == "fp16"  # no bf16 tensor cores
    assert "bf16" not in gpus.DEVICE_CLASSES["t4"].peak_tflops


def test_setup_on_a_fake_gpu_exposes_caps_and_precision(monkeypatch, capsys):
    fake_gpu(monkeypatch, "Tesla T4")
    monkeypatch.delenv("LLMCORE_TIER", raising=False)
    rt = runtime.setup(seed=1)
    assert rt.tier == "gpu" and rt.caps.name == "Tesla T4"
    assert rt.precision == "fp16" and not rt.caps.fp8_tensor_cores
    out = capsys.readouterr().out
    assert "Tesla T4, sm75" in out and "precision: fp16" in out


def test_cpu_and_mps_have_no_tensor_core_formats(monkeypatch):
    caps = runtime.device_caps("cpu")
    assert caps.type == "cpu" and caps.capability is None and caps.total_memory == 0
    assert not (caps.fp16_tensor_cores or caps.bf16_tensor_cores
                or caps.fp8_tensor_cores)
    # bf16 only where the CPU has bf16 instructions
    assert runtime.default_precision(caps) == ("bf16" if caps.cpu_bf16 else "fp32")
    assert runtime.default_precision(runtime.DeviceCaps("cpu", "x", None, 0, 0)) == \
        "fp32"
    assert runtime.default_precision(
        runtime.DeviceCaps("cpu", "x", None, 0, 0, cpu_bf16=True)) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.delenv("LLMCORE_TIER", raising=False)
    mps = runtime.device_caps()
    assert mps.type == "mps" and runtime.default_precision(mps) == "fp32"
    # MPS runs the cpu-tier sizes.
    assert runtime.select_tier(torch.device("mps")) == "cpu"


def test_fit_memory_picks_the_largest_preset_the_device_holds(monkeypatch):
    options = {16: "small", 40: "medium", 80: "large"}

    def caps(gib):
        return runtime.DeviceCaps("cuda", "x", (8, 0), gib * 2**30, 1)

    assert runtime.fit_memory(options, caps(15)) == "small"  # a T4: nothing fits
    assert runtime.fit_memory(options, caps(24)) == "small"
    assert runtime.fit_memory(options, caps(44)) == "small"  # 40 > 0.9 * 44
    assert runtime.fit_memory(options, caps(45)) == "medium"
    assert runtime.fit_memory(options, caps(141)) == "large"
    with pytest.raises(ValueError, match="options is empty"):
        runtime.fit_memory({}, caps(16))
    with pytest.raises(ValueError, match="positive GiB"):
        runtime.fit_memory({0: "x"}, caps(16))
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3")
    rt = runtime.setup(quiet=True, tier="gpu")
    assert rt.fit({16: "small", 40: "medium", 80: "large"}) == "medium"  # 80 > 72
    assert runtime.setup(quiet=True, tier="cpu").fit(options) == "small"


@pytest.mark.gpu
def test_caps_of_the_real_gpu_match_torch():
    caps = runtime.device_caps("cuda")
    props = torch.cuda.get_device_properties(0)
    assert caps.capability == torch.cuda.get_device_capability(0)
    assert caps.total_memory == props.total_memory > 0 and caps.multiprocessors > 0
    # bf16 where the hardware says it is supported natively (sm80+)
    assert caps.bf16_tensor_cores == (caps.capability >= (8, 0))
    rt = runtime.setup(quiet=True, tier="gpu")
    assert rt.tier == "gpu" and rt.precision in ("bf16", "fp16")
    x = torch.randn(64, 64, device=rt.device)
    with torch.autocast("cuda", dtype=torch.bfloat16 if rt.precision == "bf16"
                        else torch.float16):
        assert (x @ x).dtype in (torch.bfloat16, torch.float16)
