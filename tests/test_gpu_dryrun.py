"""A dry run of the gpu tier on a machine without a GPU.

Every page runs at ``LLMCORE_TIER=gpu`` with a stand-in runtime: the device is
``meta`` (tensors with shapes and no values, so nothing is computed) and the
capabilities are a T4's (the GPU learners have: fp16 tensor cores, no bf16). The
page's own code builds its own models, batches and loss functions; every call of the
training loop runs one real step (forward, backward, optimizer) on the stand-in
device. What a GPU would refuse is an error here too:

* a tensor left on the CPU next to the model ("Tensor on device meta is not on the
  expected device cpu!");
* a shape only the gpu-tier sizes reach;
* a precision the device class lacks (bf16 on a T4).

Statements that need a number from a tensor (a print, an assert, a plot) cannot run
on ``meta``; the dry run runs a page statement by statement and skips each such one.
Multi-process launches and subprocesses are skipped: they run at the cpu tier in the
other tests. The command line's and the benchmarks' gpu presets are run the same way.
"""

from __future__ import annotations

import ast
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest
import torch

import book.workers.launch as launch_module
import llmcore
import llmcore.runtime as runtime
import llmcore.train.loop as loop_module
import llmcore.train.run as run_module
from llmcore.config import override
from llmcore.models.gpt import GPT
from tools.bench import gpus, mfu, speed  # imported first: their `train` is patched
from tools.notebooks import notebooks

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
T4 = runtime.DeviceCaps("cuda", "Tesla T4 (stand-in)", (7, 5), 15 * GiB, 40)
CELL_SECONDS = 20  # a statement past this is skipped: real work on the CPU
DEVICE_ERRORS = ("is not on the expected device", "Expected all tensors to be on the "
                 "same device", "found at least two devices", "device meta")


class Skip(Exception):
    """A call the dry run does not make (a launch of processes, a subprocess)."""


class DryRun:
    """What a dry run saw: the training calls it made and what failed."""

    def __init__(self, caps: runtime.DeviceCaps):
        self.caps, self.calls, self.failures = caps, [], []
        self.dc = gpus.device_class(caps)

    def runtime(self, seed: int = 0, **kwargs) -> runtime.Runtime:
        rt = runtime.Runtime(device=torch.device("meta"), tier="gpu", seed=seed,
                             generator=runtime.seed_everything(seed), caps=self.caps)
        return rt

    def train(self, real):
        def dry_train(model, batch_fn, cfg, **kwargs):
            precision = (runtime.default_precision(self.caps)
                         if cfg.precision == "auto" else cfg.precision)
            if precision not in self.dc.peak_tflops:
                self.failures.append(f"trains in {precision}, which a "
                                     f"{self.dc.name} has no tensor cores for")
            for key in ("ckpt_path", "val_batch_fn", "resume", "start_from",
                        "stop_at"):
                kwargs.pop(key, None)
            # compilation is not what a dry run checks (and needs real tensors)
            history = real(model, batch_fn, override(cfg, precision=precision,
                                                     progress=False, compile=False),
                           **kwargs, stop_at=1)
            self.calls.append((type(model).__name__, cfg.max_steps, precision))
            return history
        return dry_train

    @contextlib.contextmanager
    def patched(self, monkeypatch):
        real = loop_module.train
        monkeypatch.setattr(llmcore, "setup", self.runtime)
        monkeypatch.setattr(runtime, "setup", self.runtime)
        # every module that imported the loop by name (run.py, the benchmarks)
        for module in list(sys.modules.values()):
            if getattr(module, "train", None) is real:
                monkeypatch.setattr(module, "train", self.train(real))

        def no_launch(*args, **kwargs):
            raise Skip("processes are launched at the cpu tier in other tests")
        monkeypatch.setattr(launch_module, "launch", no_launch)
        monkeypatch.setattr(launch_module, "launch_source", no_launch)
        monkeypatch.setattr(subprocess, "run", no_launch)
        monkeypatch.setenv("LLMCORE_TIER", "gpu")
        yield self


def timeout(signum, frame):
    raise TimeoutError(f"a statement ran over {CELL_SECONDS} s at the gpu tier")


def run_cells(cells: list[str], dry: DryRun, cwd: Path, name: str) -> int:
    """Execute ``cells`` in one namespace, statement by statement; return how many
    cells ran to their end."""
    namespace = {"__name__": "__dry_run__"}
    done = 0
    old = signal.signal(signal.SIGALRM, timeout)
    here = os.getcwd()
    os.chdir(cwd)
    try:  # the page's folder is its working directory, as in a kernel
        for i, code in enumerate(cells):
            lines = [ln for ln in code.splitlines()
                     if not ln.lstrip().startswith(("%", "!"))]
            tree = ast.parse("\n".join(lines))
            ok = True
            for stmt in tree.body:  # one at a time: a read of a value skips only it
                signal.alarm(CELL_SECONDS)
                try:
                    exec(compile(ast.Module([stmt], []), f"{name}[{i}]", "exec"),
                         namespace)
                except Exception as err:  # noqa: BLE001 - classified below
                    ok = False
                    text = f"{type(err).__name__}: {err}"
                    if any(s in text for s in DEVICE_ERRORS):
                        dry.failures.append(f"cell {i}, line {stmt.lineno}: "
                                            f"{text[:300]}")
                finally:
                    signal.alarm(0)
            done += ok
    finally:
        os.chdir(here)
        signal.signal(signal.SIGALRM, old)
    return done


def notebook_cells(path: Path) -> list[str]:
    import jupytext

    return [c.source for c in jupytext.read(path).cells if c.cell_type == "code"]


PAGES = [p.relative_to(ROOT) for p in notebooks(root=ROOT)]


@pytest.mark.parametrize("page", PAGES, ids=str)
def test_page_at_the_gpu_tier_on_a_stand_in_t4(page, monkeypatch):
    dry = DryRun(T4)
    with dry.patched(monkeypatch):
        ran = run_cells(notebook_cells(ROOT / page), dry, (ROOT / page).parent,
                        str(page))
    assert not dry.failures, dry.failures
    assert ran >= 1  # at least its first cell (the stand-in runtime) ran


# ------------------------------------------------------------ presets outside pages

def cli_run(dry):
    rt = dry.runtime()
    preset = rt.pick(run_module.PRESETS["shakespeare-char"])
    preset = override(preset, train=override(preset.train, max_steps=1))
    run_module.run(preset, rt)


def bench_speed(dry):
    rt = dry.runtime()
    preset = speed.preset_for(rt)
    for rung in speed.LADDER:
        if rung.precision in dry.dc.peak_tflops:
            speed.measure(preset, rung, rt.device, 1e12)


def bench_mfu(dry):
    rt = dry.runtime()
    preset = rt.fit(mfu.PRESETS.gpu)
    model = GPT(preset.model).to(rt.device)
    mfu.measure_tokens_per_s(model, preset.batch_size, 1, "fp16", warmup=0)


@pytest.mark.parametrize("entry", [cli_run, bench_speed, bench_mfu],
                         ids=lambda f: f.__name__)
def test_presets_outside_the_pages_on_a_stand_in_t4(entry, monkeypatch):
    dry = DryRun(T4)
    with dry.patched(monkeypatch):
        try:
            entry(dry)
        except Exception as err:  # noqa: BLE001 - reading a value ends a dry run
            text = f"{type(err).__name__}: {err}"
            if any(s in text for s in DEVICE_ERRORS):
                dry.failures.append(text)
    assert not dry.failures, dry.failures
    assert dry.calls, "no training step ran"


# ------------------------------------------------------------ the dry run itself

BAD_PAGE = ['from llmcore import setup\nrt = setup()',
            'import torch\nfrom llmcore.models.gpt import GPT, GPTConfig\n'
            'model = GPT(GPTConfig(65, 64, 2, 2, 64)).to(rt.device)',
            'x = torch.randint(65, (2, 64))  # left on the CPU\n'
            'logits, loss = model(x, x)']
BF16_PAGE = ['from llmcore import setup\nrt = setup()',
             'import torch\nfrom llmcore.models.gpt import GPT, GPTConfig\n'
             'from llmcore.train import TrainConfig, train\n'
             'model = GPT(GPTConfig(65, 64, 2, 2, 64)).to(rt.device)\n'
             'def batch(step, g):\n'
             '    x = torch.randint(65, (2, 65), generator=g)\n'
             '    return x[:, :-1], x[:, 1:]\n'
             'train(model, batch, TrainConfig(max_steps=3, precision="bf16"))',
             'train(model, batch, TrainConfig(max_steps=3, precision=rt.precision))']


def test_a_page_that_leaves_a_batch_on_the_cpu_fails(monkeypatch, tmp_path):
    dry = DryRun(T4)
    with dry.patched(monkeypatch):
        run_cells(BAD_PAGE, dry, tmp_path, "bad")
    assert len(dry.failures) == 1 and "not on the expected device" in dry.failures[0]


def test_bf16_on_a_t4_fails_and_rt_precision_passes(monkeypatch, tmp_path):
    dry = DryRun(T4)
    with dry.patched(monkeypatch):
        run_cells(BF16_PAGE, dry, tmp_path, "bf16")
    assert dry.calls == [("GPT", 3, "bf16"), ("GPT", 3, "fp16")]
    assert len(dry.failures) == 1 and "bf16" in dry.failures[0]
