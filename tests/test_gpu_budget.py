"""Every gpu-tier preset fits the memory it declares, checked on the meta device.

See ``tools.bench.budget`` for how presets are found in the notebooks and how their
training memory is counted. The table of estimated H100 minutes is written to
``_build/reports/gpu-budget.txt`` and printed at the end of ``make test``.
"""

from dataclasses import replace
from pathlib import Path

import pytest

from llmcore import accounting
from llmcore.models.gpt import GPTConfig
from llmcore.train.run import PRESETS
from tools.bench import budget
from tools.notebooks import notebooks

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "_build" / "reports" / "gpu-budget.txt"


def notebook_workloads(path: Path):
    import jupytext

    cells = [c.source for c in jupytext.read(path).cells if c.cell_type == "code"]
    return budget.notebook_presets(cells, str(path.relative_to(ROOT)))


def too_large(rows):
    return [f"{w.source}: {budget.total_bytes(w) / budget.GiB:.1f} GiB > "
            f"{w.budget_gb} GiB" for w in rows if not budget.fits(w)]


def test_every_gpu_preset_fits_its_budget():
    rows = budget.library_presets()
    assert any("train.run" in w.source for w in rows)  # the presets were found
    broken = {}
    for path in notebooks(root=ROOT):
        found, failed = notebook_workloads(path)
        rows += found
        # A moved or renamed import hides a notebook's presets: that is a failure.
        # Presets computed from a run's data (NameError here) are not checkable.
        broken.update({f"{path.name}:{line}": err for line, err in failed
                       if err.startswith(("ImportError", "ModuleNotFoundError"))})
    notebook_rows = [w for w in rows if w.source.startswith(("book/", "labs/"))]
    assert len(notebook_rows) >= 10, "too few notebook presets found"
    table = budget.table(rows) + (
        f"\nminutes: one training run per preset at {budget.UTILISATION:.0%} of an "
        f"H100's {budget.H100_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16 peak (a floor)")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(table + "\n")
    print(table)
    assert not broken, f"preset cells that no longer import: {broken}"
    assert not too_large(rows), too_large(rows)
    assert all(budget.h100_seconds(w) < 10 * 60 for w in rows), "a page over 10 min"


def test_a_gpu_preset_made_too_large_fails():
    big = replace(PRESETS["shakespeare-char"].gpu, n_layer=48, n_embd=2048, n_head=16,
                  block_size=1024)
    rows = budget.collect({"P": replace(PRESETS["shakespeare-char"], gpu=big)}, ["P"],
                          "test")
    assert len(rows) == 1 and rows[0].batch == 64 and rows[0].context == 1024
    assert too_large(rows)  # ~2.4B parameters: 39 GiB of weights and optimizer state


def test_notebook_cells_are_read_without_running_them():
    cells = ["import torch\nfrom llmcore.config import Tiered\n"
             "from llmcore.models.gpt import GPTConfig\nrt = None\n"
             "raise RuntimeError('an ordinary cell: never run')",
             "MODEL = rt.pick(Tiered(cpu=GPTConfig(65, 64, 2, 2, 64),\n"
             "                       gpu=GPTConfig(65, 1024, 24, 16, 2048)))\n"
             "BATCH = Tiered(cpu=8, gpu=32)\nSTEPS = Tiered(cpu=10, gpu=500)\n"
             "x = undefined_name",
             "%matplotlib inline\n"
             "BIG = rt.fit({16: dict(n_layer=12, n_embd=768, block_size=1024, "
             "batch=8, steps=100),\n 80: dict(n_layer=48, n_embd=1600, "
             "block_size=1024, batch=8, steps=100)})"]
    rows, failed = budget.notebook_presets(cells, "nb")
    assert failed == []  # neither ordinary statement was executed
    model, small, large = rows
    assert (model.n_layer, model.batch, model.steps) == (24, 32, 500)
    assert not budget.fits(model)  # 1.2B parameters at batch 32: over 16 GiB
    assert (small.budget_gb, large.budget_gb) == (16, 80)
    assert budget.fits(small) and budget.fits(large)
    assert not budget.fits(replace(large, budget_gb=16))


def test_parameters_built_on_meta_match_the_formula():
    w = budget.Workload("t", n_layer=12, n_embd=768, n_head=12, vocab_size=50257,
                        context=1024, batch=12, steps=1)
    mem = budget.memory(w)
    bias = GPTConfig(50257, 1024, 12, 12, 768).bias  # the default the budget builds
    assert mem["params"] == accounting.gpt_param_count(12, 768, 50257, 1024, bias=bias)
    assert mem["weights"] + mem["grads"] + mem["master+optimizer"] == 16 * mem["params"]
    # bf16, a fused attention kernel: per token and layer 16 C values, the fp32
    # log-sum-exp per head, and the two norms' fp32 mean and rstd (activations.py)
    tokens = 12 * 1024
    assert mem["activations"] == 12 * tokens * (16 * 768 * 2 + 4 * 12 + 4 * 4)
    unfused = budget.memory(w, fused_attention=False)["activations"]
    # without the kernel: q, k, v apart, the T x T softmax, its dropout mask and the
    # dropped weights per head, and two residual dropout masks
    assert unfused - mem["activations"] == 12 * tokens * (
        2 * 768 * 2 + 3 * 12 * 1024 * 2 - 4 * 12)


@pytest.mark.parametrize("steps, minutes", [(1000, 1), (100_000, 60)])
def test_time_estimate_grows_with_the_steps(steps, minutes):
    w = budget.Workload("t", 12, 768, 12, 50304, 1024, 12, steps)
    secs = budget.h100_seconds(w)
    # 6N + attention FLOPs per token, at 30% of 989 TFLOP/s
    assert 0.5 * minutes * 60 < secs < 2 * minutes * 60
