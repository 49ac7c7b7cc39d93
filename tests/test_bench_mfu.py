"""The MFU benchmark's command line (the formulas are tested in test_accounting)."""

import json

import torch

from llmcore.config import Tiered
from llmcore.models.gpt import GPTConfig
from tools.bench import mfu as bench


def test_main_writes_json(tmp_path, monkeypatch):
    tiny = bench.MFUPreset(GPTConfig(65, 16, 1, 2, 32), batch_size=2, steps=1)
    monkeypatch.setattr(bench, "PRESETS", Tiered(cpu=tiny, gpu=tiny))
    assert bench.main(["--precision", "fp32", "--steps", "1", "--out",
                       str(tmp_path)]) == 0
    (path,) = tmp_path.glob("mfu-*.json")
    result = json.loads(path.read_text())
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1
    assert result["torch"] == torch.__version__
