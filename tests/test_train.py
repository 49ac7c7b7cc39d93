"""The training loop: config checks, schedule, parameter groups, accumulation,
precision, NaN stop, evaluation and a golden short loss curve."""

import contextlib
import math

import pytest
import torch
from torch import nn

from llmcore.accounting import count_params
from llmcore.config import IGNORE_INDEX, override
from llmcore.data.lm import get_batch
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.train import (TrainConfig, make_optimizer, read_checkpoint, train,
                           warmup_cosine)
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
    assert n == count_params(m)  # tied embedding counted once
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


def test_nan_step_puts_the_model_back_to_the_last_good_checkpoint(tmp_path):
    m, path = make_model(), tmp_path / "c.pt"
    with pytest.raises(FloatingPointError, match="at step 6.*checkpoint, step 4"):
        train(m, batch_fn, quiet(max_steps=10, ckpt_interval=4, log_interval=4),
              loss_fn=NaNAt(6), ckpt_path=path)
    saved = read_checkpoint(path)
    assert saved["step"] == 4 and len(saved["extra"]["history"]["loss"]) == 4
    for name, p in m.state_dict().items():  # the NaN update is gone
        torch.testing.assert_close(p, saved["model"][name], rtol=0, atol=0)


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


def test_default_loss_is_the_loops_own_name():
    from llmcore.train import loop
    assert not hasattr(loop, "lm_loss")  # the one lm_loss(logits, targets) is nn.loss
    x, y = batch_fn(0, torch.Generator().manual_seed(0))
    m = make_model()
    assert loop.default_loss(m, (x, y)) == m(x, y)[1]


@pytest.mark.parametrize("kw", [dict(max_steps=2.5), dict(max_steps=float("nan")),
                                dict(lr=float("nan")), dict(lr=float("inf")),
                                dict(warmup_steps=float("nan")),
                                dict(grad_clip=float("nan")), dict(grad_accum=True),
                                dict(betas=(0.9, float("nan"))),
                                dict(log_interval=0)])
def test_config_refuses_float_and_nan_sizes(kw):
    with pytest.raises(ValueError, match="TrainConfig"):
        TrainConfig(**kw)


class NaNGradAt:
    """A loss_fn whose loss stays finite while its gradient is NaN at one step."""

    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, model, batch):
        _, loss = model(*batch)
        self.calls += 1
        if self.calls == self.step + 1:  # d sqrt(0 * w)/dw = 0 * inf = NaN
            loss = loss + torch.sqrt(0.0 * next(model.parameters()).sum())
        return loss


def test_nan_gradient_stops_the_run_and_is_never_saved(tmp_path):
    m, path = make_model(), tmp_path / "c.pt"
    with pytest.raises(FloatingPointError, match="at step 3"):
        train(m, batch_fn, quiet(max_steps=10, ckpt_interval=5, log_interval=4),
              loss_fn=NaNGradAt(3), ckpt_path=path)
    assert not path.exists()  # the checkpoint at step 5 came after the bad step


def test_nan_step_is_reported_at_the_next_log_point_not_later():
    m = make_model()
    fn = NaNAt(2)
    with pytest.raises(FloatingPointError, match="at step 2"):
        train(m, batch_fn, quiet(max_steps=50, log_interval=5), loss_fn=fn)
    assert fn.calls == 5  # steps 0-4 ran, step 5 never started


def masked_batch(n_rows=8, seed=0):
    """Targets with -100 masks of very unequal counts per row."""
    x, y = get_batch(DATA, n_rows, 8, torch.Generator().manual_seed(seed))
    y = y.clone()
    for row in range(n_rows):
        keep = 1 if row < n_rows // 2 else 8  # the first half: one target per row
        y[row, keep:] = IGNORE_INDEX
    return x, y


def test_grad_accumulation_weights_by_valid_tokens():
    x, y = masked_batch()

    def halves(step, generator):
        i = halves.calls % 2
        halves.calls += 1
        return x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]
    halves.calls = 0
    a, b = make_model(), make_model()
    ha = train(a, halves, quiet(max_steps=3, grad_accum=2, warmup_steps=0))
    hb = train(b, lambda s, g: (x, y), quiet(max_steps=3, warmup_steps=0))
    assert ha.loss == pytest.approx(hb.loss, abs=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4)


def test_more_steps_on_resume_keeps_the_lr_continuous(tmp_path):
    path = tmp_path / "c.pt"
    train(make_model(), batch_fn, quiet(max_steps=20, warmup_steps=2), ckpt_path=path)
    h = train(make_model(), batch_fn, quiet(max_steps=40, warmup_steps=2),
              ckpt_path=path, resume=True)
    lr = h.lr
    assert len(lr) == 40 and lr[20] == pytest.approx(lr[19], rel=0.1)
    assert all(a >= b for a, b in zip(lr[2:], lr[3:]))  # never rises after warm-up
    assert lr[-1] == pytest.approx(1e-3 * 0.1, rel=0.05)  # ends at the floor
    h2 = train(make_model(), batch_fn, quiet(max_steps=60, warmup_steps=2),
               ckpt_path=path, resume=True)  # a second extension from the first
    assert h2.lr[:40] == lr and h2.lr[40] <= lr[39]


def test_resume_refuses_a_changed_step(tmp_path):
    path = tmp_path / "c.pt"
    train(make_model(), batch_fn, quiet(max_steps=4), ckpt_path=path)
    with pytest.raises(ValueError, match=r"(?s)grad_accum: 1 in the checkpoint, 2 "
                                         r"requested.*lr: 0.001 in the checkpoint, "
                                         r"1e-06 requested"):
        train(make_model(), batch_fn, quiet(max_steps=8, lr=1e-6, grad_accum=2),
              ckpt_path=path, resume=True)


@pytest.mark.slow  # torch.compile takes ~20-40 s on two cores
def test_compiled_training_matches_eager():
    cfg = quiet(max_steps=4, warmup_steps=0, lr=1e-2)
    eager = train(make_model(), batch_fn, cfg)
    compiled = train(make_model(), batch_fn, override(cfg, compile=True))
    assert compiled.loss == pytest.approx(eager.loss, rel=1e-4, abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_between_log_points():
    # batch_fn(step) runs while step - 1 is on the device: switching the sync debug
    # mode there covers the end of step 1, all of step 2 and the start of step 3.
    def cuda_batch(step, generator):
        if step == 2:
            torch.cuda.set_sync_debug_mode("error")
        elif step == 4:
            torch.cuda.set_sync_debug_mode("default")
        return get_batch(DATA, 4, 8, generator)
    m = make_model().cuda()
    try:
        for precision in ("fp32", "bf16"):
            h = train(m, cuda_batch, quiet(max_steps=8, log_interval=4,
                                           precision=precision))
            assert len(h.loss) == 8
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_auto_precision_is_the_devices():
    from llmcore.runtime import default_precision, device_caps
    from llmcore.train.step import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == default_precision(device_caps(cpu))
    assert resolve_precision("fp16", cpu) == "fp16"
    with pytest.raises(ValueError, match="or 'auto'"):
        resolve_precision("int8", cpu)
    with pytest.raises(ValueError, match="TrainConfig.precision must be one of"):
        TrainConfig(precision="bfloat16")
    h = train(make_model(), batch_fn, quiet(max_steps=2, precision="auto"))
    assert len(h.loss) == 2 and all(math.isfinite(x) for x in h.loss)
