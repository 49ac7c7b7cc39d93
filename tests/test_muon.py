"""Muon: PyTorch's twin, a float64 reference step, the orthogonalisation itself, the
AdamW groups, the split of a GPT, and a run of the loop that resumes exactly."""

import pytest
import torch

from llmcore.models.gpt import GPT, GPTConfig
from llmcore.train import TrainConfig, train
from llmcore.train.muon import (COEFFICIENTS, Muon, muon_param_groups,
                                zeropower_via_newtonschulz)


def clones(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def step_both(mine, theirs, ours_params, their_params, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for a, b in zip(ours_params, their_params):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        mine.step()
        theirs.step()


@pytest.mark.parametrize("kwargs", [
    dict(lr=0.02, weight_decay=0.1),
    dict(lr=0.05, weight_decay=0.0, nesterov=False, momentum=0.9),
    dict(lr=0.01, adjust_lr_fn="match_rms_adamw", ns_steps=3)])
def test_muon_groups_match_torch_muon(kwargs):
    torch.manual_seed(0)
    ws = [torch.randn(8, 16), torch.randn(24, 8), torch.randn(12, 12)]
    ours, theirs = clones(ws), clones(ws)
    step_both(Muon(ours, **kwargs), torch.optim.Muon(theirs, **kwargs), ours, theirs)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)  # the same operations in the same order


def reference_step(w, grad, buf, lr, wd, mu, steps):
    """One Muon step in float64, written from the paper's formulas."""
    a, b, c = COEFFICIENTS
    buf = mu * buf + (1 - mu) * grad  # PyTorch's scaling of the momentum
    update = (1 - mu) * grad + mu * buf  # Nesterov
    x = update.T if update.shape[0] > update.shape[1] else update
    x = x / torch.linalg.matrix_norm(x)  # Frobenius
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if update.shape[0] > update.shape[1] else x
    scale = max(1.0, w.shape[0] / w.shape[1]) ** 0.5
    return w * (1 - lr * wd) - lr * scale * x, buf


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                       (torch.bfloat16, 3e-3)])
def test_two_steps_match_a_float64_reference(dtype, tol):
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    grads = [torch.randn(20, 6, generator=gen, dtype=torch.float64) for _ in range(2)]
    w = w0.clone().requires_grad_()
    opt = Muon([w], lr=0.03, weight_decay=0.1, ns_dtype=dtype)
    ref, buf = w0.clone(), torch.zeros_like(w0)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        ref, buf = reference_step(ref, g, buf, 0.03, 0.1, 0.95, 5)
    # the update moves every weight by about lr: compare to that scale
    assert (w.detach() - ref).abs().max().item() < tol * 0.03 * 10


def test_newton_schulz_orthogonalises():
    """The output's singular vectors are the input's, its singular values near 1,
    however spread the input's (a condition number of 100 here)."""
    gen = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -2, 32, dtype=torch.float64)
    g = u[:, :32] @ torch.diag(s) @ v.T  # (64, 32), tall
    out = zeropower_via_newtonschulz(g, dtype=torch.float64)
    inner = u[:, :32].T @ out @ v  # diagonal if the singular vectors are kept
    off = inner - torch.diag(torch.diagonal(inner))
    assert off.abs().max().item() < 1e-10
    sv = torch.diagonal(inner)
    assert sv.min().item() > 0.6 and sv.max().item() < 1.25  # Jordan: ~(0.7, 1.2)
    assert (torch.linalg.svdvals(g)[0] / torch.linalg.svdvals(g)[-1]) > 99


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    ps = [torch.randn(16), torch.randn(5, 7)]
    ours, theirs = clones(ps), clones(ps)
    mine = Muon([{"params": ours, "adamw": True, "lr": 3e-3, "weight_decay": 0.1}],
                betas=(0.9, 0.99), adam_eps=1e-8)
    ref = torch.optim.AdamW(theirs, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.99),
                            eps=1e-8, foreach=False)
    step_both(mine, ref, ours, theirs, steps=5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_a_vector_in_a_muon_group_is_refused():
    with pytest.raises(ValueError, match="adamw"):
        Muon([torch.zeros(4, requires_grad=True)])
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        Muon([torch.zeros(4, 4, requires_grad=True)], adjust_lr_fn="mine")


@pytest.mark.parametrize("tie", [True, False])
def test_param_groups_split_a_gpt(tie):
    m = GPT(GPTConfig(50, 16, 2, 2, 32, tie_weights=tie))
    hidden, rest = muon_param_groups(m, 0.02, 3e-3)
    assert rest["adamw"] is True and "adamw" not in hidden
    ids = [id(p) for p in hidden["params"]] + [id(p) for p in rest["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())  # each once
    names = {id(p): n for n, p in m.named_parameters()}
    muon_names = {names[id(p)] for p in hidden["params"]}
    assert muon_names == {f"blocks.{i}.{w}.weight" for i in range(2) for w in (
        "self_attn.qkv_proj", "self_attn.out_proj", "ffn.linear1", "ffn.linear2")}
    assert all(p.dim() == 2 for p in hidden["params"])
    assert hidden["lr"] == 0.02 and rest["lr"] == 3e-3


def test_the_loop_trains_and_resumes_with_muon(tmp_path):
    """Schedule and checkpoint go through PyTorch's optimizer API: a run stopped
    after 3 of 6 steps and resumed ends with the weights of an unbroken one."""
    data = torch.randint(50, (64, 17), generator=torch.Generator().manual_seed(0))

    def batch_fn(step, generator):
        rows = data[torch.randint(64, (4,), generator=generator)]
        return rows[:, :-1], rows[:, 1:]

    cfg = TrainConfig(max_steps=6, warmup_steps=2, lr=3e-3, progress=False)

    def run(stop_at=None, resume=False, path=None):
        torch.manual_seed(0)
        m = GPT(GPTConfig(50, 16, 2, 2, 32))
        opt = Muon(muon_param_groups(m, 0.02, 3e-3))
        h = train(m, batch_fn, cfg, optimizer=opt, ckpt_path=path, stop_at=stop_at,
                  resume=resume)
        return m, h

    whole, h = run()
    assert h.loss[-1] < h.loss[0]
    assert h.lr[0] < h.lr[2]  # the warm-up scaled the groups' own rates
    run(stop_at=3, path=tmp_path / "c.pt")
    resumed, _ = run(resume=True, path=tmp_path / "c.pt")
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_the_fast_preset_trains_with_muon(tmp_path):
    """``--preset shakespeare-char-fast`` through ``run``: its options reach the model
    and Muon is the optimizer (its state is in the checkpoint); a mesh is refused."""
    from llmcore.config import override
    from llmcore.runtime import setup
    from llmcore.train import run as runs
    from llmcore.train.checkpoint import read_checkpoint

    rt = setup(seed=0, tier="cpu")
    preset = rt.pick(runs.PRESETS["shakespeare-char-fast"])
    preset = override(preset, batch_size=4, train=override(
        preset.train, max_steps=3, warmup_steps=1, eval_interval=0, eval_steps=2,
        ckpt_interval=0, progress=False))
    model, history, _ = runs.run(preset, rt, tmp_path)
    assert model.config.pos == "rope" and model.config.qk_norm
    assert not model.config.use_sdpa and model.config.zero_init
    state = read_checkpoint(tmp_path / "ckpt.pt")["optimizer"]["state"]
    assert any("momentum_buffer" in s for s in state.values())  # Muon's
    assert history.loss[-1] < history.loss[0]
    with pytest.raises(ValueError, match="Muon"):
        runs.run(preset, rt, mesh=(2, 1))
