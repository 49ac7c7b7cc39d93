"""The time-to-loss benchmark: its evaluation, nanoGPT's side (log, checkpoint, the
same network), a rung's run (target, evaluation left out of the time), the ladder,
and the whole comparison against a stand-in nanoGPT."""

import json
import math
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmcore.accounting import flops_per_token
from llmcore.data import LMWindows
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.train import TrainConfig
from tools.bench import ladder, nanogpt, speedrun
from tools.bench.ladder import Recipe, Rung

TINY = GPTConfig(65, 64, 1, 2, 16)


def test_full_val_loss_scores_every_character_once():
    torch.manual_seed(0)
    model = GPT(TINY)
    val = torch.randint(65, (64 * 9 + 30,))
    windows = LMWindows(val, 64)  # disjoint windows of 64 targets
    x = torch.stack([windows[i][0] for i in range(len(windows))])
    y = torch.stack([windows[i][1] for i in range(len(windows))])
    with torch.no_grad():
        logits, _ = model(x)
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    got = speedrun.full_val_loss(model, val, chunk=4)  # chunks of unequal sizes
    assert len(windows) == 9
    assert got == pytest.approx(expected, rel=1e-6)


def test_nanogpt_time_leaves_its_evaluations_out():
    log = "\n".join(
        (f"step {i}: train loss 2.0, val loss 2.1\n" if i % 4 == 0 else "")
        + f"iter {i}: loss 2.0, time {1000.0 if i % 4 == 0 else 10.0 + i}ms, mfu 1%"
        for i in range(9))
    times, evals = nanogpt.parse_log(log)
    assert evals == {0, 4, 8} and len(times) == 9
    plain = sorted(10.0 + i for i in range(8) if i % 4)  # 11 12 13 15 16 17: 14
    assert nanogpt.training_seconds(times, evals, 8) == pytest.approx(
        (sum(plain) + 2 * 14.0) / 1e3)
    with pytest.raises(ValueError, match="log_interval"):
        nanogpt.training_seconds({0: 1.0}, set(), 3)


def nanogpt_state(model: GPT) -> dict:
    """``model``'s weights under nanoGPT's names (RENAME read backwards)."""
    state = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # nanoGPT also saves it; tied, it is wte
        for theirs, ours in reversed(nanogpt.RENAME[1:]):
            name = name.replace(ours, theirs)
        state[name] = value
    state["lm_head.weight"] = model.state_dict()["tok_emb.weight"]
    return state


def save_nanogpt_checkpoint(model: GPT, path: Path) -> None:
    c = model.config
    torch.save({"model": nanogpt_state(model), "iter_num": 2000, "model_args": dict(
        n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size,
        bias=c.bias, vocab_size=c.vocab_size, dropout=0.0)}, path)


# nanoGPT's model.py, stood in for by llmcore's GPT under nanoGPT's names; SHIFT
# perturbs its logits to play a network that is not the same.
STAND_IN_MODEL = """
from dataclasses import dataclass
import torch
from llmcore.models.gpt import GPT as Ours, GPTConfig as OursConfig
from tools.bench.nanogpt import RENAME
SHIFT = {shift}

@dataclass
class GPTConfig:
    block_size: int; vocab_size: int; n_layer: int; n_head: int; n_embd: int
    dropout: float; bias: bool

class GPT(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.m = Ours(OursConfig(c.vocab_size, c.block_size, c.n_layer, c.n_head,
                                 c.n_embd, bias=c.bias))
    def load_state_dict(self, state):
        mine = {{}}
        for name, value in state.items():
            for theirs, ours in RENAME:
                name = name.replace(theirs, ours)
            mine[name] = value
        return self.m.load_state_dict(mine)
    def forward(self, x, y):
        logits, loss = self.m(x, y)
        return logits + SHIFT, loss
"""


@pytest.mark.parametrize("shift", [0.0, 1e-3])
def test_a_nanogpt_checkpoint_is_the_same_network_in_llmcore(tmp_path, shift):
    torch.manual_seed(0)
    theirs = GPT(TINY)
    save_nanogpt_checkpoint(theirs, tmp_path / "ckpt.pt")
    (tmp_path / "model.py").write_text(STAND_IN_MODEL.format(shift=shift))
    mine, ckpt = nanogpt.load_checkpoint(tmp_path / "ckpt.pt")
    x = torch.randint(65, (2, 64))
    assert torch.equal(mine(x)[0], theirs.eval()(x)[0])
    if shift:
        with pytest.raises(RuntimeError, match="RENAME"):
            nanogpt.check_same_network(tmp_path, ckpt, mine, x, x)
    else:
        assert nanogpt.check_same_network(tmp_path, ckpt, mine, x, x) == 0.0


def tiny_recipe(steps=6, **train) -> Recipe:
    return Recipe(TINY, batch_size=2, eval_every=2, train=TrainConfig(
        max_steps=steps, warmup_steps=0, progress=False, **train))


def test_a_rung_stops_at_the_target_and_its_time_leaves_evaluation_out(monkeypatch):
    losses = iter([3.0, 2.0, 1.0, 0.5])

    def slow_evaluation(model, val, *a, **k):
        time.sleep(0.3)
        return next(losses)

    monkeypatch.setattr(speedrun, "full_val_loss", slow_evaluation)
    out = speedrun.run_rung(tiny_recipe(), 0, 1.5, torch.device("cpu"))
    assert [c[0] for c in out["curve"]] == [2, 4, 6]  # stopped at the first <= 1.5
    assert out["reached"] and out["steps"] == 6 and out["tokens"] == 6 * 2 * 64
    assert out["seconds"] < 0.3  # the 0.9 s of evaluation are not training
    assert out["flops"] == out["tokens"] * flops_per_token(TINY)
    losses = iter([3.0, 2.0, 1.8])
    out = speedrun.run_rung(tiny_recipe(), 0, 1.5, torch.device("cpu"))
    assert not out["reached"] and out["seconds"] is None
    assert out["final_val_loss"] == 1.8


def test_muon_recipes_get_the_muon_optimizer():
    model = GPT(TINY)
    assert speedrun.make_optimizer(model, tiny_recipe()) is None  # the loop's AdamW
    opt = speedrun.make_optimizer(model, Recipe(TINY, 2, TrainConfig(lr=4e-3),
                                                muon_lr=0.03))
    assert [g["lr"] for g in opt.param_groups] == [0.03, 4e-3]


def changed_fields(a, b, prefix=""):
    out = []
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if hasattr(x, "__dataclass_fields__"):
            out += changed_fields(x, y, f"{f.name}.")
        elif x != y:
            out.append(prefix + f.name)
    return out


@pytest.mark.parametrize("name", sorted(ladder.LADDERS))
def test_each_rung_changes_the_last_kept_recipe(name):
    rungs = ladder.LADDERS[name]()
    for i, rung in enumerate(rungs[1:], 1):
        last = next(r.recipe for r in reversed(rungs[:i]) if r.kept)
        assert changed_fields(last, rung.recipe), rung.name
    assert rungs[0].kept and ladder.final_recipe(rungs) is next(
        r.recipe for r in reversed(rungs) if r.kept)


def test_the_first_cpu_rung_is_nanogpts_readme_recipe():
    args = dict(a[2:].split("=") for a in nanogpt.RECIPE if a.startswith("--"))
    base = ladder.cpu_ladder()[0].recipe
    m = base.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (
        int(args["n_layer"]), int(args["n_head"]), int(args["n_embd"]),
        int(args["block_size"]), float(args["dropout"]))
    assert base.batch_size == int(args["batch_size"])
    assert base.train.max_steps == int(args["max_iters"]) == nanogpt.RECIPE_ITERS
    assert base.train.precision == "fp32" and m.use_sdpa and not base.muon_lr
    gpu = ladder.gpu_ladder()[0].recipe.model
    assert (gpu.n_layer, gpu.n_head, gpu.n_embd) == (12, 12, 768)  # GPT-2 small


FAKE_TRAIN = """
import shutil, sys
out = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--out_dir="))
for i in range(2001):
    if i % 250 == 0:
        print(f"step {{i}}: train loss 2.0, val loss 2.1")
    print(f"iter {{i}}: loss 2.0, time 50.00ms, mfu 1.00%")
shutil.copy({ckpt!r}, out + "/ckpt.pt")
"""


def test_the_comparison_writes_rounds_and_rungs(tmp_path, monkeypatch):
    fake = tmp_path / "nanoGPT"  # 2,000 iterations of 50 ms, a tiny model's weights
    fake.mkdir()
    torch.manual_seed(0)
    save_nanogpt_checkpoint(GPT(TINY), tmp_path / "trained.pt")
    (fake / "train.py").write_text(FAKE_TRAIN.format(ckpt=str(tmp_path / "trained.pt")))
    (fake / "model.py").write_text(STAND_IN_MODEL.format(shift=0.0))
    rungs = (Rung("start", "", tiny_recipe()),
             Rung("worse", "", tiny_recipe(lr=1e-9), kept=False),
             Rung("better", "", tiny_recipe(lr=3e-3)))
    full = speedrun.splits()  # a short validation split keeps the test quick
    monkeypatch.setattr(speedrun, "splits", lambda: (full[0], full[1][:64 * 16 + 1]))
    monkeypatch.setitem(ladder.LADDERS, "cpu", lambda: rungs)
    monkeypatch.setattr(speedrun, "LADDERS", ladder.LADDERS)
    monkeypatch.setattr(speedrun, "worker", lambda name, i, seed, target, env:
                        speedrun.run_rung(rungs[i].recipe, seed, target,
                                          torch.device("cpu")))
    out = tmp_path / "speedrun.json"
    assert speedrun.main(["--compare-nanogpt", str(fake), "--rounds", "2",
                          "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    torch.manual_seed(0)
    _, val = speedrun.splits()
    assert res["target_val_loss"] == pytest.approx(
        speedrun.full_val_loss(GPT(TINY), val))  # the stand-in's untrained weights
    assert [r["nanogpt_seconds"] for r in res["rounds"]] == [100.0, 100.0]
    assert res["final_rung"] == "better"
    for r in res["rounds"]:
        assert r["llmcore_seconds"] == r["rungs"]["better"]
        assert r["speedup"] == pytest.approx(100.0 / r["llmcore_seconds"])
    assert [r["name"] for r in res["rungs"]] == ["start", "worse", "better"]
    assert res["rungs"][1]["kept"] is False and len(res["rungs"][2]["seconds"]) == 2
    assert res["nanogpt"]["runs"][0]["same_network_max_logit_diff"] == 0.0
    for key in ("hardware", "date", "torch", "load_average", "scheduling"):
        assert res[key]
    assert math.isfinite(res["speedup_median"])


def test_bad_arguments_are_refused_with_the_fix():
    with pytest.raises(SystemExit, match="rounds"):
        speedrun.main(["--rounds", "0"])
    with pytest.raises(SystemExit, match="unknown"):
        speedrun.main(["--rungs", "no such rung"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA"):
            speedrun.main(["--gpu"])


def test_the_crossing_is_drawn_between_evaluations():
    assert speedrun.crossing([[10, 1.0, 3.0], [20, 2.0, 1.0]], 2.0) == 1.5
    assert speedrun.crossing([[10, 1.0, 1.0], [20, 2.0, 0.5]], 2.0) == 1.0
    assert speedrun.crossing([[10, 1.0, 3.0], [20, 2.0, 2.5]], 2.0) is None


def test_a_budget_stops_the_run_after_that_much_training(monkeypatch):
    calls = []

    def evaluation(model, val, *a, **k):
        calls.append(1)
        time.sleep(0.2)  # evaluation time does not count against the budget
        return 3.0

    monkeypatch.setattr(speedrun, "full_val_loss", evaluation)
    recipe = Recipe(TINY, batch_size=2, eval_every=40, train=TrainConfig(
        max_steps=10**5, warmup_steps=0, progress=False))
    out = speedrun.run_rung(recipe, 0, None, torch.device("cpu"), budget=0.5)
    assert 0.5 <= out["end_seconds"] < 1.0 and out["steps"] < 10**5
    assert len(calls) == len(out["curve"]) == out["steps"] // 40 + (
        out["steps"] % 40 != 0)


@pytest.mark.parametrize("name", sorted(ladder.LADDERS))
def test_every_rung_trains_at_a_tiny_size(name, monkeypatch):
    """Each rung's options build and train together (the gpu ladder's too, here on
    the CPU, uncompiled): two steps of a one-layer model, a finite loss."""
    full = speedrun.splits()
    monkeypatch.setattr(speedrun, "splits", lambda: (full[0], full[1][:64 * 4 + 1]))
    for rung in ladder.LADDERS[name]():
        small = ladder.edit(rung.recipe, batch_size=2, eval_every=2, model={
            "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64}, train={
            "max_steps": 2, "warmup_steps": 0, "compile": False})
        out = speedrun.run_rung(small, 0, None, torch.device("cpu"))
        assert math.isfinite(out["final_val_loss"]), rung.name


def test_the_fast_cli_preset_is_the_ladders_last_recipe():
    from llmcore.train.run import PRESETS
    preset = PRESETS["shakespeare-char-fast"].cpu
    recipe = ladder.final_recipe(ladder.cpu_ladder())
    m = recipe.model
    assert (preset.n_layer, preset.n_head, preset.n_embd, preset.block_size,
            preset.batch_size, preset.dropout) == (
        m.n_layer, m.n_head, m.n_embd, m.block_size, recipe.batch_size, m.dropout)
    assert (preset.use_sdpa, preset.pos, preset.qk_norm, preset.zero_init) == (
        m.use_sdpa, m.pos, m.qk_norm, m.zero_init)
    assert preset.muon_lr == recipe.muon_lr
    for name in ("max_steps", "lr", "warmup_steps", "min_lr_ratio", "betas",
                 "precision", "grad_clip"):
        assert getattr(preset.train, name) == getattr(recipe.train, name), name
    # every other option of the ladder's model is GPTConfig's default
    assert m == type(m)(m.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd,
                        use_sdpa=m.use_sdpa, pos=m.pos, qk_norm=m.qk_norm,
                        zero_init=m.zero_init)
