"""Degenerate inputs, interrupted calls and stale files across the package: a clear
error naming the argument or file instead of NaN or a foreign message, and the
caller's state back after an error or Ctrl-C."""

import json
import subprocess
import sys

import pytest
import torch

import llmcore.generate as generation
from book.workers.costmodel import bubble_fraction
from llmcore.accounting import mfu
from llmcore.apps.finetune import predict
from llmcore.config import IGNORE_INDEX
from llmcore.runtime import seed_everything
from llmcore.tokenizer import CharTokenizer
from llmcore.train import TrainConfig, evaluate, train
from tests.test_train import batch_fn, make_model
from tools.bench.__main__ import available


def no_targets(step, generator):
    x, _ = batch_fn(step, generator)
    return x, torch.full_like(x, IGNORE_INDEX)


def interrupted(step, generator):
    raise KeyboardInterrupt


def test_top_p_and_top_k_of_zero_are_argument_errors_not_nan():
    logits = torch.randn(2, 10)
    # top_p=0 dropped every token: a row of NaN probabilities, then a torch error
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\], got 0.0"):
        generation.sample_next(logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be a positive int, got 0"):
        generation.sample_next(logits, top_k=0)
    top = logits.argmax(dim=-1)
    kept = generation.filter_top_p(logits, 1e-9)  # the smallest nucleus: the top one
    assert torch.equal(kept.isfinite().sum(dim=-1), torch.tensor([1, 1]))
    assert torch.equal(kept.argmax(dim=-1), top)


def test_evaluate_without_targets_is_an_error_and_keeps_the_mode():
    model = make_model()
    with pytest.raises(ValueError, match="no target to score .*IGNORE_INDEX=-100"):
        evaluate(model, no_targets, 2)
    assert model.training, "the model was left in eval mode"
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, interrupted, 2)
    assert model.training


def test_a_training_step_without_targets_is_named_not_a_nan_stop():
    with pytest.raises(ValueError, match="step 0 has no target to learn from"):
        train(make_model(), no_targets, TrainConfig(max_steps=2, progress=False))


def test_generation_and_prediction_give_the_mode_back_when_interrupted(monkeypatch):
    model = make_model()

    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(generation, "sample_next", stop)
    with pytest.raises(KeyboardInterrupt):
        generation.generate(model, torch.zeros(1, 1, dtype=torch.long), 3)
    assert model.training

    def batches():
        yield {"input_ids": torch.zeros(1, 4, dtype=torch.long),
               "label": torch.zeros(1)}
        raise KeyboardInterrupt

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 2)

        def forward(self, ids, mask=None):
            return self.head(ids.float()), None
    classifier = Classifier()
    with pytest.raises(KeyboardInterrupt):
        predict(classifier, batches())
    assert classifier.training


def test_a_tokenizer_file_of_another_version_is_refused(tmp_path):
    path = tmp_path / "tokenizer.json"
    CharTokenizer.train("abc").save(path)
    assert CharTokenizer.load(path).vocab_size == 3
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "version": saved["version"] + 1}))
    with pytest.raises(ValueError, match=rf"{path} is a char tokenizer of version 2; "
                                         "this llmcore reads version 1"):
        CharTokenizer.load(path)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True])
def test_a_seed_out_of_range_names_the_argument(seed):
    with pytest.raises(ValueError, match=r"non-negative int below 2\*\*64, got"):
        seed_everything(seed)


def test_mfu_needs_a_measured_peak():
    assert mfu(1000.0, 6e6, 1e12) == pytest.approx(6e-3)
    for peak in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="peak_flops must be a positive finite"):
            mfu(1000.0, 6e6, peak)


def test_the_benchmark_command_lists_only_what_runs():
    names = available()
    assert {"mfu", "speed", "parallel"} <= set(names)
    assert "presets" not in names and "nanogpt" not in names  # parts, not benchmarks
    listed = subprocess.run([sys.executable, "-m", "tools.bench", "--help"],
                            capture_output=True, text=True, check=True).stdout
    assert str(names) in listed
    part = subprocess.run([sys.executable, "-m", "tools.bench", "presets"],
                          capture_output=True, text=True, check=False)
    assert part.returncode == 2 and "unknown benchmark 'presets'" in part.stderr
    assert "Traceback" not in part.stderr


@pytest.mark.parametrize("kwargs, name", [({"n_stages": 0}, "n_stages"),
                                          ({"n_micro": 0}, "n_micro"),
                                          ({"chunks": 0, "schedule": "interleaved"},
                                           "chunks")])
def test_a_pipeline_of_no_stages_or_micro_batches_has_no_bubble_fraction(kwargs,
                                                                         name):
    # it was a negative fraction, a whole bubble or a division by zero
    args = {"n_stages": 4, "n_micro": 8, **kwargs}
    with pytest.raises(ValueError, match=f"{name} must be a positive int, got 0"):
        bubble_fraction(**args)
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
