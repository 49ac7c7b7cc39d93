"""The recipes of the time-to-loss ladder (``python -m tools.bench speedrun``).

A :class:`Recipe` is everything a run is made of: the network (a ``GPTConfig``), the
batch, the loop's ``TrainConfig`` (steps, learning rate and schedule, precision) and
the optimizer. A :class:`Rung` changes one thing in the last recipe that paid; a rung
that did not pay (``kept=False``) is measured all the same and left out of the rungs
after it. Every change is a public option of ``GPTConfig``, ``TrainConfig`` or
:class:`llmcore.train.muon.Muon`; the step counts were chosen by measurement, the
shortest schedule that still reaches the target in every round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmcore.config import check_fields, override
from llmcore.models.gpt import GPTConfig
from llmcore.train import TrainConfig

EVAL_CONTEXT = 64  # characters per validation window: nanoGPT's context


@dataclass(frozen=True)
class Recipe:
    """One way to train the model: network, batch, loop settings, optimizer."""

    model: GPTConfig  # the network; its block_size is the training context
    batch_size: int  # sequences per step
    train: TrainConfig = field(default_factory=TrainConfig)  # steps, schedule, lr
    # (AdamW's; with Muon the lr of embeddings, output layer and vectors), precision
    muon_lr: float = 0.0  # > 0: Muon at this lr for the hidden matrices
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum
    eval_every: int = 250  # steps between evaluations of the whole validation split

    def __post_init__(self):
        check_fields(self, "batch_size", "eval_every", integer=True, above=0)
        check_fields(self, "muon_lr", "muon_momentum", minimum=0)
        if self.model.block_size < EVAL_CONTEXT:
            raise ValueError(f"Recipe.model.block_size={self.model.block_size} is "
                             f"shorter than the evaluation's windows ({EVAL_CONTEXT})")


@dataclass(frozen=True)
class Rung:
    """A recipe, what it changed and why; ``kept=False``: measured, not carried on."""

    name: str  # the change, as the table shows it
    why: str  # the reason it should pay
    recipe: Recipe
    kept: bool = True


def edit(recipe: Recipe, model: dict | None = None, train: dict | None = None,
         **fields) -> Recipe:
    """A copy of ``recipe`` with some fields of its model, its train config and its
    own fields changed (unknown names are errors)."""
    return override(recipe, model=override(recipe.model, **(model or {})),
                    train=override(recipe.train, **(train or {})), **fields)


class Ladder:
    """Rungs built one on another: each ``add`` edits the last kept recipe."""

    def __init__(self, name: str, why: str, base: Recipe):
        self.rungs = [Rung(name, why, base)]

    def add(self, name: str, why: str, kept: bool = True, **changes) -> None:
        last = next(r.recipe for r in reversed(self.rungs) if r.kept)
        self.rungs.append(Rung(name, why, edit(last, **changes), kept))


def final_recipe(rungs: tuple[Rung, ...]) -> Recipe:
    """The recipe of the last kept rung: every change that paid."""
    return next(r.recipe for r in reversed(rungs) if r.kept)


# nanoGPT's CPU recipe (its README): 4 layers, 4 heads, width 128, context 64,
# batch 12, AdamW at 1e-3 with betas (0.9, 0.99), 100 steps of warm-up, cosine to
# 1e-4 over 2,000 steps, weight decay 0.1, clipping at 1, fp32, no dropout.
NANOGPT = Recipe(GPTConfig(65, 64, 4, 4, 128),
                 batch_size=12, train=TrainConfig(
                     max_steps=2000, lr=1e-3, warmup_steps=100, min_lr_ratio=0.1,
                     betas=(0.9, 0.99), weight_decay=0.1, grad_clip=1.0,
                     precision="fp32", progress=False), eval_every=250)


def cpu_ladder() -> tuple[Rung, ...]:
    lad = Ladder("nanoGPT's recipe", "the starting point: nanoGPT's CPU recipe in "
                 "llmcore's loop", NANOGPT)
    lad.add("bf16 autocast", "matmuls in bfloat16: half the bytes, and this CPU has "
            "bf16 dot-product instructions", train={"precision": "bf16"})
    lad.add("hand-written attention", "PyTorch's fused CPU attention is slow "
            "backwards in bf16 at this size; two batched matmuls are not",
            model={"use_sdpa": False})
    lad.add("lr 3e-3, decay to 0", "a small model tolerates a larger step; the "
            "decay to zero takes the noise out at the end",
            train={"lr": 3e-3, "warmup_steps": 50, "min_lr_ratio": 0.0},
            eval_every=100)
    lad.add("batch 32, lr 4e-3", "fewer, larger steps: a less noisy gradient "
            "takes a larger lr, and larger matmuls cost less per token", kept=False,
            batch_size=32, train={"lr": 4e-3, "warmup_steps": 30, "max_steps": 700},
            eval_every=25)
    lad.add("Muon, batch 32", "orthogonalised updates for the hidden matrices: "
            "every direction of a matrix moves, not only its largest; its fixed cost "
            "per step wants many tokens per step", muon_lr=0.05, batch_size=32,
            train={"lr": 4e-3, "warmup_steps": 30, "max_steps": 300}, eval_every=25)
    lad.add("RoPE", "relative positions by rotation: nothing to learn per "
            "position", model={"pos": "rope"})
    lad.add("Muon lr 0.08", "a larger step for the hidden matrices", kept=False,
            muon_lr=0.08)
    lad.add("QK-norm + Muon lr 0.08", "normalised queries and keys bound the "
            "attention logits however the matrices grow: the larger step is stable",
            muon_lr=0.08, model={"qk_norm": True})
    lad.add("zero-init projections", "every block starts as the identity: the "
            "first steps train a shallow network", model={"zero_init": True})
    lad.add("ReLU^2", "a sparser MLP activation (modded-nanogpt's)", kept=False,
            model={"activation": "relu2"})
    lad.add("untied head", "an output layer of its own (zero at the start)",
            kept=False, model={"tie_weights": False})
    lad.add("RMSNorm", "one reduction instead of two", kept=False,
            model={"norm": "rmsnorm"})
    lad.add("context 128, batch 16", "longer sequences, the same tokens per step",
            kept=False, batch_size=16, model={"block_size": 128})
    return tuple(lad.rungs)


# GPT-2 small's shape on the same characters: 12 layers, 12 heads, width 768,
# context 256, batch 32 x 256; AdamW at 6e-4 (GPT-2 small's), fp32 without TF32.
GPT2_SMALL = Recipe(GPTConfig(65, 256, 12, 12, 768), batch_size=32, train=TrainConfig(
    max_steps=1000, lr=6e-4, warmup_steps=100, min_lr_ratio=0.1, betas=(0.9, 0.95),
    weight_decay=0.1, grad_clip=1.0, precision="fp32", progress=False), eval_every=50)


def gpu_ladder() -> tuple[Rung, ...]:
    lad = Ladder("AdamW baseline", "GPT-2 small's recipe, fp32", GPT2_SMALL)
    lad.add("bf16 autocast", "tensor cores: bf16 matmuls at many times fp32's rate",
            train={"precision": "bf16"})
    lad.add("torch.compile", "fused element-wise kernels: fewer trips to memory",
            train={"compile": True})
    lad.add("higher lr, decay to 0", "a larger step, the noise removed at the end",
            train={"lr": 1.5e-3, "min_lr_ratio": 0.0, "max_steps": 700})
    lad.add("Muon", "orthogonalised updates for the hidden matrices", muon_lr=0.02,
            train={"max_steps": 500})
    lad.add("RoPE, ReLU^2, QK-norm", "the architecture of the CPU ladder's kept rungs",
            model={"pos": "rope", "activation": "relu2", "qk_norm": True})
    lad.add("untied head, zero-init", "separate output layer; blocks start as the "
            "identity", model={"tie_weights": False, "zero_init": True})
    return tuple(lad.rungs)


LADDERS = {"cpu": cpu_ladder, "gpu": gpu_ladder}
