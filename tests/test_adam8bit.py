"""AdamW8bit against torch's AdamW, a hand-quantized reference and the paper's map."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from book.workers.memory import measure_training_state
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.precision.adam8bit import (AdamW8bit, dequantize_blockwise, dynamic_map,
                                        quantize_blockwise)
from llmcore.train import TrainConfig, train
from llmcore.train.optim import param_groups


def decode_pattern(bits: int, signed: bool) -> float:
    """One 8-bit pattern of dynamic tree quantization, read bit by bit as the paper
    describes it: [sign], E zeros (exponent 10**-E), a one, then a linear fraction."""
    sign, rest, n = 1.0, bits, 8
    if signed:
        sign, rest, n = (-1.0 if bits >> 7 else 1.0), bits & 0x7F, 7
    if rest == 0:
        return 0.0
    e = n - rest.bit_length()  # leading zeros after the sign
    f = n - 1 - e  # fraction bits after the indicator
    frac = rest & ((1 << f) - 1)
    lo, width = 0.1, 0.9 / 2 ** f
    return sign * (lo + (frac + 0.5) * width) * 10.0 ** -e


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_the_papers_bit_layout(signed):
    code = dynamic_map(signed)
    distinct = sorted(set(decode_pattern(b, signed) for b in range(256)))
    assert 1.0 not in distinct  # fractions are bin midpoints: below 1
    if signed:  # +0 and -0 coincide: one pattern is free, and holds 1.0
        assert len(distinct) == 255
    else:  # the pattern 00000001 (10**-7) gives its place to 1.0, as in the signed map
        assert len(distinct) == 256 and 1e-8 < distinct[1] < 1e-7
        distinct.pop(1)
    want = torch.tensor(distinct + [1.0], dtype=torch.float32)
    torch.testing.assert_close(code, want, rtol=1e-6, atol=0)
    assert (code[1:] > code[:-1]).all()


def nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Brute force: the index of the closest code value to each entry."""
    return (x.flatten()[:, None] - code[None, :]).abs().argmin(dim=1)


def test_blockwise_quantization_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=gen) * torch.exp(3 * torch.randn(5000,
                                                                     generator=gen))
    for signed in (True, False):
        code = dynamic_map(signed)
        v = x if signed else x.abs()
        codes, absmax = quantize_blockwise(v, code, 256)
        assert codes.dtype == torch.uint8 and absmax.shape == (20,)  # 5000 / 256
        for i in range(20):
            block = v[256 * i:256 * (i + 1)]
            assert absmax[i] == block.abs().max()
            want = nearest_code(block / absmax[i], code)
            assert torch.equal(codes[256 * i:256 * (i + 1)].long(), want)
        back = dequantize_blockwise(codes, absmax, code, 256, v.shape)
        if not signed:  # 1.0 is a code value: each block's absmax comes back exactly
            padded = torch.nn.functional.pad(back, (0, 20 * 256 - 5000))
            assert torch.equal(padded.view(20, 256).amax(dim=1), absmax)


def reference_adamw8bit(params, grads_seq, lr, betas, eps, wd, block):
    """AdamW whose moments go through brute-force 8-bit rounding after every step."""
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    params = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]

    def roundtrip(t, code):
        flat = t.flatten()
        out = torch.empty_like(flat)
        for s in range(0, flat.numel(), block):
            seg = flat[s:s + block]
            amax = seg.abs().max()
            out[s:s + block] = code[nearest_code(seg / amax, code)] * amax \
                if amax > 0 else 0
        return out.view_as(t)

    for step, grads in enumerate(grads_seq, 1):
        for i, (p, g) in enumerate(zip(params, grads)):
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            p.mul_(1 - lr * wd)
            mh = m[i] / (1 - betas[0] ** step)
            vh = v[i] / (1 - betas[1] ** step)
            p.sub_(lr * mh / (vh.sqrt() + eps))
            m[i], v[i] = roundtrip(m[i], signed), roundtrip(v[i], unsigned)
    return params


def test_steps_match_the_hand_quantized_reference():
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(40, 30))
    grads = [[torch.randn(40, 30) * 10 ** float(torch.randn(()))] for _ in range(6)]
    opt = AdamW8bit([w], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1,
                    block_size=256, min_8bit_size=1)
    want = reference_adamw8bit([w], grads, 1e-2, (0.9, 0.99), 1e-8, 0.1, 256)[0]
    for (g,) in grads:
        w.grad = g.clone()
        opt.step()
    torch.testing.assert_close(w.detach(), want, rtol=1e-5, atol=1e-6)


def test_small_tensors_keep_fp32_moments_and_match_torch():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(20, 30), nn.GELU(), nn.Linear(30, 5))
    twin = copy.deepcopy(model)
    ours = AdamW8bit(model.parameters(), lr=3e-3, weight_decay=0.05)  # all < 4096
    theirs = torch.optim.AdamW(twin.parameters(), lr=3e-3, weight_decay=0.05,
                               foreach=False)
    for _ in range(10):
        x = torch.randn(16, 20)
        for m, o in ((model, ours), (twin, theirs)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_8bit_steps_follow_fp32_adamw_and_save_memory():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
    twin = copy.deepcopy(model)
    ours = AdamW8bit(model.parameters(), lr=1e-3)
    theirs = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(20):
        x = torch.randn(32, 128)
        for m, o in ((model, ours), (twin, theirs)):
            o.zero_grad()
            (m(x) - x).square().mean().backward()
            o.step()
    for a, b, s in zip(model.parameters(), twin.parameters(), start):
        da, db = (a - s).flatten(), (b - s).flatten()
        assert torch.cosine_similarity(da, db, dim=0) > 0.99  # the same direction
        assert 0.9 < da.norm() / db.norm() < 1.1
    mem8 = measure_training_state(model, ours)["optimizer"]
    mem32 = measure_training_state(twin, theirs)["optimizer"]
    n8 = sum(p.numel() for p in model.parameters() if p.numel() >= 4096)
    n32 = sum(p.numel() for p in model.parameters()) - n8
    blocks = sum(math.ceil(p.numel() / 2048) for p in model.parameters()
                 if p.numel() >= 4096)
    assert mem32 == 8 * (n8 + n32)
    assert mem8 == 2 * n8 + 2 * 4 * blocks + 8 * n32  # codes + absmaxes + fp32 small


def test_state_dict_round_trip_continues_exactly():
    torch.manual_seed(4)
    model = nn.Linear(100, 100)
    opt = AdamW8bit(model.parameters(), lr=1e-2, block_size=128)
    xs = [torch.randn(8, 100) for _ in range(6)]

    def step(m, o, x):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()

    for x in xs[:3]:
        step(model, opt, x)
    clone = copy.deepcopy(model)
    opt2 = AdamW8bit(clone.parameters(), lr=1e-2, block_size=128)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.state[clone.weight]["exp_avg_codes"].dtype == torch.uint8
    for x in xs[3:]:
        step(model, opt, x)
        step(clone, opt2, x)
    assert torch.equal(model.weight, clone.weight)


def test_bad_arguments():
    p = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="block_size"):
        AdamW8bit(p, block_size=0)
    with pytest.raises(ValueError, match="betas"):
        AdamW8bit(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        AdamW8bit(p, lr=0)


def test_trains_and_resumes_through_the_books_loop(tmp_path):
    """``train(..., optimizer=AdamW8bit(...))``: the loss falls, and a run stopped
    at step 4 and resumed from its checkpoint ends exactly where the whole run does
    (the uint8 codes survive the checkpoint)."""
    cfg = GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=64)
    data = torch.randint(0, 32, (10, 4, 17), generator=torch.Generator().manual_seed(0))
    data[..., 1::2] = data[..., :-1:2]  # a pattern to learn: every pair repeats

    def batch_fn(step, gen):
        return data[step, :, :-1], data[step, :, 1:]

    def run(**kw):
        torch.manual_seed(0)
        model = GPT(cfg)
        opt = AdamW8bit(param_groups(model, 0.1), lr=3e-3, betas=(0.9, 0.95),
                        block_size=256)
        run_cfg = TrainConfig(max_steps=10, lr=3e-3, warmup_steps=2, progress=False,
                              log_interval=1)
        return train(model, batch_fn, run_cfg, optimizer=opt, **kw), opt

    whole, opt = run()
    assert whole.loss[-1] < whole.loss[0] - 0.3
    assert any("exp_avg_codes" in s for s in opt.state.values())
    run(ckpt_path=tmp_path / "c.pt", stop_at=4)
    resumed, _ = run(ckpt_path=tmp_path / "c.pt", resume=True)
    assert resumed.loss == whole.loss
