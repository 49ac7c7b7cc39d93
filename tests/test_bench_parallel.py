"""The parallel benchmark's command line and the results file it committed."""

import json
from pathlib import Path

import pytest

from tools.bench.costmodel_runs import PLANS, run
from tools.bench.parallel import LOADED, TOLERANCE, hardware, main

RESULT = Path(__file__).resolve().parents[1] / "results" / "parallel-cpu.json"


def test_help_and_hardware(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "--check" in capsys.readouterr().out
    assert "cores" in hardware()


def test_committed_results_hold_both_times_of_every_plan():
    res = json.loads(RESULT.read_text())
    assert {"device", "date", "torch", "backend", "cores", "links"} <= set(res)
    assert [r["plan"] for r in res["plans"]] == list(PLANS)
    for r in res["plans"]:
        assert r["processes"] == PLANS[r["plan"]][0]
        assert r["predicted_s"] > 0 and r["measured_s"] > 0
        assert r["error"] == pytest.approx(r["predicted_s"] / r["measured_s"] - 1)
        assert 0 <= r["waited_s"] < r["measured_s"]
    # the target, on ranks that had their cores (they waited for none)
    assert res["waited"]["2"] <= LOADED
    assert all(abs(r["error"]) <= TOLERANCE for r in res["plans"]
               if r["processes"] == 2)
    assert res["scheduling"] in ("normal", "SCHED_RR")


def test_unknown_plan_is_refused():
    with pytest.raises(ValueError, match="unknown plans"):
        run(names=("dp", "zero9"))
