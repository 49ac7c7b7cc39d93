"""The gpu tier's plan holds every page to its device class, checked on the CPU.

``tools.bench.plan`` (see its docstring for the memory and time model) and
``tools.bench.presets`` (how presets are found without running a page).
"""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from book.workers.activations import saved_bytes
from llmcore.accounting import count_params
from llmcore.models.gpt import GPT, GPTConfig
from tools.bench.gpus import DEVICE_CLASSES
from llmcore.train.run import PRESETS
from tools.bench import plan, presets

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "_build" / "reports" / "gpu-plan.txt"
T4, H100 = DEVICE_CLASSES["t4"], DEVICE_CLASSES["h100"]


@pytest.fixture(scope="module")
def t4_plan():
    return plan.plan("t4", ROOT)


@pytest.fixture(scope="module")
def h100_plan():
    return plan.plan("h100", ROOT)


def test_on_a_t4_every_page_fits_15_gib_5_minutes_and_never_bf16(t4_plan):
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(plan.table(t4_plan) + "\n")
    pages = t4_plan["notebooks"]
    assert len(pages) >= 35 and sum(bool(p["workloads"]) for p in pages) >= 12
    assert not plan.violations(t4_plan), plan.violations(t4_plan)
    assert all("bf16" not in p["precision"] for p in pages)


def test_on_an_h100_make_test_gpu_fits_8_minutes(h100_plan):
    with REPORT.open("a") as f:
        f.write(plan.table(h100_plan) + "\n")
    assert h100_plan["check_minutes"] <= plan.CHECK_MINUTES
    assert not plan.violations(h100_plan), plan.violations(h100_plan)
    names = {b["path"] for b in h100_plan["benchmarks"]}
    assert {"tools.bench.speed", "tools.bench.fp8", "tools.bench.mfu"} <= names


def test_a_preset_made_too_large_fails_on_a_t4():
    big = replace(PRESETS["shakespeare-char"].gpu, n_layer=48, n_embd=2048, n_head=16,
                  block_size=1024)
    rows = presets.collect({"P": replace(PRESETS["shakespeare-char"], gpu=big)}, ["P"],
                           "test")
    row = plan.entry("test", rows, T4)
    assert row["over_budget"]  # ~2.4B parameters: 39 GiB of fp32 state alone
    assert plan.violations({"gpu": "t4", "notebooks": [row], "benchmarks": [],
                            "broken_preset_cells": {}})


def test_bf16_on_a_t4_is_flagged():
    w = presets.Workload("p", 12, 768, 12, 65, 1024, 8, 10, precision="bf16")
    row = plan.entry("page", [w], T4)
    assert row["precision"] == "bf16"
    assert any("bf16 on a T4" in v for v in plan.violations(
        {"gpu": "t4", "notebooks": [row], "benchmarks": [],
         "broken_preset_cells": {}}))
    # on the T4 class bf16 is emulated: slower than its fp16
    assert plan.seconds(w, T4) > plan.seconds(replace(w, precision="fp16"), T4)


def test_notebook_cells_are_read_without_running_them():
    cells = ["import torch\nfrom llmcore.config import Tiered\n"
             "from llmcore.models.gpt import GPTConfig\nrt = None\n"
             "raise RuntimeError('an ordinary cell: never run')",
             "MODEL = rt.pick(Tiered(cpu=GPTConfig(65, 64, 2, 2, 64),\n"
             "                       gpu=GPTConfig(65, 1024, 24, 16, 2048)))\n"
             "BATCH = Tiered(cpu=8, gpu=32)\nSTEPS = Tiered(cpu=10, gpu=500)\n"
             "x = undefined_name",
             "%matplotlib inline\n"
             "BIG = rt.fit({13: dict(n_layer=12, n_embd=768, block_size=1024, "
             "batch=8, steps=100),\n 70: dict(n_layer=48, n_embd=1600, "
             "block_size=1024, batch=8, steps=100)})"]
    rows, failed = presets.notebook_presets(cells, "nb")
    assert failed == []  # neither ordinary statement was executed
    model, small, large = rows
    assert (model.n_layer, model.batch, model.steps) == (24, 32, 500)
    assert (small.budget_gb, large.budget_gb) == (13, 70)
    # rt.fit on a T4 runs the 13 GiB option, on an H100 the 70 GiB one
    assert [w.n_layer for w in plan.chosen([small, large], T4)] == [12]
    assert [w.n_layer for w in plan.chosen([small, large], H100)] == [48]


def test_memory_parts_against_real_models():
    w = presets.Workload("t", n_layer=2, n_embd=64, n_head=4, vocab_size=97,
                         context=32, batch=4, steps=1, fused_attention=False)
    parts = plan.memory(w, T4)
    model = GPT(GPTConfig(97, 32, 2, 4, 64, use_sdpa=False))
    assert parts["params"] == count_params(model)
    # fp16 autocast on a T4: fp32 weights, gradients, two moments, the 16-bit copies
    assert parts["state"] == 18 * parts["params"]
    fp32 = plan.memory(replace(w, precision="fp32"), T4)
    assert fp32["state"] == 16 * parts["params"]
    # the activations autograd really saves for the blocks, in fp32, without SDPA
    x = torch.randint(97, (4, 32))
    measured, _ = saved_bytes(lambda: model.blocks[1](model.blocks[0](
        model.pos_emb(model.tok_emb(x)))))
    assert fp32["activations"] == pytest.approx(measured, rel=0.15)
    assert fp32["logits"] == 4 * 32 * 97 * 8


def test_time_follows_precision_device_and_size():
    w = presets.Workload("t", 12, 768, 12, 50304, 1024, 12, 100)
    on = {p: plan.seconds(replace(w, precision=p), H100)
          for p in ("fp32", "tf32", "bf16")}
    assert on["fp32"] > on["tf32"] > on["bf16"]
    assert plan.seconds(replace(w, precision="fp16"), T4) > on["bf16"]
    compiled = plan.seconds(replace(w, precision="bf16", compile=True), H100)
    assert compiled > on["bf16"]  # 100 steps do not earn back the compilation
    long = replace(w, precision="bf16", steps=10_000)
    assert plan.seconds(replace(long, compile=True), H100) < plan.seconds(long, H100)
    tiny = presets.Workload("t", 1, 8, 1, 16, 8, 1, 1000)  # all launch overhead
    assert plan.seconds(tiny, H100) == pytest.approx(1000 * 80 * plan.LAUNCH_S)


def test_the_plan_command_writes_the_json_it_promises(tmp_path, t4_plan):
    import json

    out = tmp_path / "plan.json"
    plan.main(["--gpu", "t4", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["gpu"] == "t4" and data["memory_gib"] == T4.usable_gib
    for row in data["notebooks"]:
        assert set(row) >= {"path", "precision", "peak_gib", "minutes"}
    assert isinstance(data["check_minutes"], float)
