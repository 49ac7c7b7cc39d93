"""Device and tier selection, seeding, the banner, presets per tier."""

import random

import numpy as np
import pytest
import torch

from llmcore import runtime
from llmcore.config import Tiered, check_positive, override


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


def test_ensure_packages_installs_only_what_is_missing(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime.subprocess, "check_call", calls.append)
    installed = runtime.ensure_packages({"torch": "torch", "no_such_mod_xyz": "xyz==1"})
    assert installed == ["xyz==1"]
    assert calls and calls[0][-1] == "xyz==1" and "torch" not in calls[0]


def test_config_helpers_name_the_bad_field():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Cfg:
        width: int = 8

        def __post_init__(self):
            check_positive(self, "width")

    with pytest.raises(ValueError, match=r"Cfg.width must be a positive number, got 0"):
        Cfg(width=0)
    assert override(Cfg(), width=16).width == 16
    with pytest.raises(ValueError, match=r"has no field\(s\) \['height'\]"):
        override(Cfg(), height=3)
