"""`make test-gpu`: stops at once without a GPU; with one, writes its record."""

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from llmcore.runtime import DeviceCaps
from tools.bench import gpucheck, results

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_make_test_gpu_stops_at_once_without_a_gpu():
    start = time.perf_counter()
    done = subprocess.run(["make", "-s", "test-gpu", "PY=python3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "needs a CUDA GPU" in done.stderr
    assert time.perf_counter() - start < 10  # nothing was built or run


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpucheck_refuses_without_cuda(capsys):
    assert gpucheck.main([]) == 3
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_a_gpu_test_runs_only_on_a_gpu():
    assert torch.cuda.is_available()  # skipped elsewhere by the gpu marker
    x = torch.ones(4, device="cuda")
    assert x.sum().item() == 4


def test_gpucheck_record_on_a_faked_gpu(tmp_path, monkeypatch):
    (tmp_path / "_config.yml").write_text("")
    (tmp_path / "_toc.yml").write_text("")
    head = "---\nkernelspec:\n  name: python3\n---\n"
    for name in ("book/01-a.md", "book/02-b.md", "labs/01-c.md"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(head)
    caps = DeviceCaps("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30, 132)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpucheck, "device_caps", lambda device: caps)
    calls = []

    def fake_stage(cmd, timeout, env=None, cwd=None):
        calls.append((cmd, timeout, env["LLMCORE_TIER"]))
        if "--nb-times" in cmd:
            path = Path(cmd[cmd.index("--nb-times") + 1])
            path.write_text(json.dumps({"seconds": {"book/01-a.md": 12.0,
                                                    "labs/01-c.md": 3.0},
                                        "failed": ["labs/01-c.md"]}))
        return 0, 1.0

    monkeypatch.setattr(gpucheck, "run_stage", fake_stage)
    rc = gpucheck.main(["--root", str(tmp_path), "--commit", "abc",
                        "--benchmarks", "mfu", "no_such_bench"])
    assert rc == 1  # one notebook failed, one did not run
    record = results.load("gpu-check-h100-80gb-hbm3", root=tmp_path)
    assert record["notebooks"] == {
        "book/01-a.md": {"status": "passed", "seconds": 12.0},
        "book/02-b.md": {"status": "not run", "seconds": 0.0},
        "labs/01-c.md": {"status": "failed", "seconds": 3.0}}
    assert record["capability"] == [9, 0] and record["memory_gib"] == 80.0
    assert record["commit"] == "abc" and record["torch"] == torch.__version__
    assert record["benchmarks"]["no_such_bench"] == {"status": "missing"}
    assert record["benchmarks"]["mfu"]["status"] == "passed"
    assert all(tier == "gpu" for _, _, tier in calls)
    assert record["jobs"] == 8  # pages that train nothing: the most kernels, 8
    assert calls[1][0][calls[1][0].index("-n") + 1] == "8"
    # Each stage's limit is a share of what is left of the 8-minute budget.
    unit, nbs, bench = (t for _, t, _ in calls)
    assert unit <= 90 and nbs <= 0.7 * 480 and bench <= 480
    assert [c[-1] for c, _, _ in calls] == ["tests", "labs", "mfu"]
    assert "H100 80GB HBM3 (sm90)" in results.provenance(record)


def test_run_stage_interrupts_a_command_past_its_time():
    rc, secs = gpucheck.run_stage(["sleep", "30"], timeout=1)
    assert rc == 124 and secs < 10
    assert gpucheck.run_stage(["true"], timeout=5)[0] == 0


def test_the_gpu_check_writes_only_gpu_result_files():
    # parallel measures CPU processes: a GPU host must not rewrite its CPU file
    assert "parallel" not in gpucheck.BENCHMARKS
    assert results.device_part("cuda", "NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert results.device_part("cpu", "CPU x86_64, 2 threads") == "cpu"
    for name in gpucheck.BENCHMARKS:  # each names its file by the device it ran on
        source = (ROOT / "tools" / "bench" / f"{name}.py").read_text()
        assert "device_part(" in source or "gpu_slug(" in source, name
