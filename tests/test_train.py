"""The training loop: config checks, schedule, parameter groups, accumulation,
precision, NaN stop, evaluation and a golden short loss curve."""

import contextlib
import math

import pytest
import torch
from torch import nn

from llmcore.data.lm import get_batch
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.train import TrainConfig, make_optimizer, train, warmup_cosine
from llmcore.train.optim import make_scheduler, param_groups

CFG = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16)
# A learnable stream: token t+1 = (token t + 1) mod 16, with noise-free windows.
DATA = torch.arange(4000) % 16


def make_model(cfg=CFG):
    torch.manual_seed(0)
    return GPT(cfg)


def batch_fn(step, generator):
    return get_batch(DATA, 4, 8, generator)


def quiet(**kw):
    return TrainConfig(progress=False, **kw)


@pytest.mark.parametrize("kw", [dict(max_steps=0), dict(lr=-1.0), dict(grad_accum=0),
                                dict(precision="fp8"), dict(warmup_steps=-1),
                                dict(betas=(0.9, 1.0)), dict(min_lr_ratio=2.0)])
def test_config_validation(kw):
    with pytest.raises(ValueError):
        TrainConfig(**kw)


def test_warmup_cosine():
    lrs = [warmup_cosine(s, 10, 100, 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.55)  # half way down the cosine
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rises after warm-up
    assert lrs[119] == pytest.approx(0.1)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = make_scheduler(opt, 10, 100, 0.1)
    seen = []
    for _ in range(100):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * x for x in lrs[:100]])


def test_param_groups():
    m = make_model()
    decay, no_decay = param_groups(m, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == m.num_params()  # tied embedding counted once
    opt = make_optimizer(m, 1e-3)
    assert opt.defaults.get("fused") is True  # fused AdamW exists on CPU in torch 2.4+
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_golden_loss_curve():
    h = train(make_model(), batch_fn, quiet(max_steps=60, lr=1e-2, warmup_steps=5),
              val_batch_fn=batch_fn)
    assert len(h.loss) == len(h.lr) == len(h.grad_norm) == len(h.tokens_per_s) == 60
    assert h.loss[0] == pytest.approx(math.log(16), abs=0.2)
    assert h.loss[-1] < 0.5 and h.eval_loss[-1] < 0.5
    assert h.eval_step == [60]
    assert all(t > 0 for t in h.tokens_per_s) and h.seconds > 0


def test_grad_accumulation_matches_bigger_batch():
    fixed = get_batch(DATA, 8, 8, torch.Generator().manual_seed(0))

    def halves(step, generator):  # the two halves of `fixed`, in turn
        i = halves.calls % 2
        halves.calls += 1
        return fixed[0][4 * i:4 * i + 4], fixed[1][4 * i:4 * i + 4]
    halves.calls = 0
    a, b = make_model(), make_model()
    ha = train(a, halves, quiet(max_steps=3, grad_accum=2, warmup_steps=0))
    hb = train(b, lambda s, g: fixed, quiet(max_steps=3, warmup_steps=0))
    assert ha.loss == pytest.approx(hb.loss, abs=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4)


def test_no_sync_on_all_but_last_micro_step():
    class Wrapped(nn.Module):  # what DistributedDataParallel offers the loop
        def __init__(self):
            super().__init__()
            self.inner = make_model()
            self.skipped = 0

        @contextlib.contextmanager
        def no_sync(self):
            self.skipped += 1
            yield

        def forward(self, x, y):
            return self.inner(x, y)

    m = Wrapped()
    train(m, batch_fn, quiet(max_steps=2, grad_accum=3))
    assert m.skipped == 4


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_precisions_train(precision):
    h = train(make_model(), batch_fn, quiet(max_steps=30, lr=1e-2, warmup_steps=0,
                                            precision=precision))
    assert h.loss[-1] < h.loss[0] - 0.5
    assert torch.get_float32_matmul_precision() == "highest"  # tf32 switched back off


class NaNAt:
    """A loss_fn that returns NaN at one step (grad_accum=1: one call per step)."""

    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, model, batch):
        _, loss = model(*batch)
        self.calls += 1
        return loss * float("nan") if self.calls == self.step + 1 else loss


def test_nan_loss_names_the_step():
    m = make_model()
    with pytest.raises(FloatingPointError, match="at step 3"):
        train(m, batch_fn, quiet(max_steps=10), loss_fn=NaNAt(3))
    assert all(torch.isfinite(p).all() for p in m.parameters())  # no NaN update


def test_custom_loss_fn_and_dict_batches():
    def dict_batch(step, generator):
        x, y = batch_fn(step, generator)
        return {"input_ids": x, "labels": y}

    def loss_fn(model, batch):
        return model(batch["input_ids"], batch["labels"])[1]

    h = train(make_model(), dict_batch, quiet(max_steps=5), loss_fn=loss_fn)
    assert h.tokens_per_s[0] > 0 and len(h.loss) == 5


@pytest.mark.slow  # reads and encodes the whole corpus twice
def test_command_line(tmp_path, capsys):
    import json

    from llmcore.train.__main__ import main
    out = tmp_path / "run"
    args = ["--preset", "shakespeare-char", "--tier", "cpu", "--steps", "4", "--out",
            str(out), "--no-progress", "--precision", "bf16"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]["loss"]) == 4 and metrics["tier"] == "cpu"
    assert metrics["preset"]["train"]["precision"] == "bf16"
    assert (out / "ckpt.pt").exists() and (out / "tokenizer.json").exists()
    assert main(args[:5] + ["6"] + args[6:] + ["--resume"]) == 0  # 2 more steps
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"]["step"] == list(range(6))
    assert "val loss" in capsys.readouterr().out
