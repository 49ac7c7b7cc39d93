"""Named training runs: a GPT preset on a corpus, trained by ``llmcore.train.train``.

The run is built in three steps: the data (:func:`build_data`), the model
(:func:`build_model`), then its place: one device, or, with ``mesh=(dp, tp)`` under
``torchrun``, a device mesh (:func:`prepare_mesh`: tensor parallel inside a row, FSDP2
across the rows; see ``llmcore.parallel.native``). The command line is
``python -m llmcore.train`` (``llmcore/train/__main__.py``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import llmcore.train.sharded as sharded
from llmcore.accounting import count_params
from llmcore.config import Tiered, check_fields, override
from llmcore.data import get_batch, load_corpus, split_tokens
from llmcore.data.corpora import CORPORA
from llmcore.data.textfiles import (TextDataError, prepare_text, remove_cache,
                                    text_files)
from llmcore.generate import generate
from llmcore.io import atomic_write
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.parallel.native import (apply_fsdp, full_state, init_distributed,
                                     parallelize_gpt)
from llmcore.parallel.rng import rank_seed
from llmcore.runtime import Runtime, device_name
from llmcore.tokenizer import BPETokenizer, CharTokenizer, Tokenizer
from llmcore.train.checkpoint import read_checkpoint, save_checkpoint
from llmcore.train.loop import History, TrainConfig, train
from llmcore.train.muon import Muon, muon_param_groups
from llmcore.train.outdir import SHARDS, claim_out
from llmcore.train.resume import MAY_CHANGE, check_resume
from llmcore.train.step import resolve_precision


@dataclass(frozen=True)
class RunPreset:
    """A GPT on a corpus: the model's shape, the batch, and how to train it."""

    corpus: str  # a vendored corpus (llmcore.data.load_corpus), or the path of your
    # own UTF-8 text: a file or a folder of .txt files (llmcore.data.textfiles)
    n_layer: int  # GPT blocks
    n_head: int  # attention heads
    n_embd: int  # model width
    block_size: int  # context length (tokens)
    batch_size: int  # sequences per micro-batch
    dropout: float = 0.0
    train: TrainConfig = field(default_factory=TrainConfig)
    val_fraction: float = 0.1  # the last 10% of the corpus is validation data
    tokenizer: str = "char"  # "char" (one id per character) or "bpe" (byte-level
    # BPE, llmcore.tokenizer.bpe), trained on the corpus
    vocab_size: int | None = None  # bpe: ids in all, 256 bytes + merges; char: None
    # (the corpus's characters)
    use_sdpa: bool = True  # these four are GPTConfig's options (llmcore.models.gpt)
    pos: str = "learned"
    qk_norm: bool = False
    zero_init: bool = False
    muon_lr: float = 0.0  # > 0: Muon (llmcore.train.muon) at this lr for the hidden
    # matrices, AdamW at train.lr for the rest; 0: AdamW for everything

    def __post_init__(self):
        check_fields(self, "n_layer", "n_head", "n_embd", "block_size", "batch_size",
                     integer=True, above=0)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head="
                             f"{self.n_head} (--n-embd, --n-head)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must lie in [0, 1) (--dropout)")
        if self.tokenizer not in ("char", "bpe"):
            raise ValueError(f"tokenizer={self.tokenizer!r}: use 'char' or 'bpe'")
        if self.tokenizer == "char" and self.vocab_size is not None:
            raise ValueError("vocab_size is for the bpe tokenizer (--tokenizer bpe); "
                             "a char tokenizer has one id per character of the text")
        if self.tokenizer == "bpe":
            check_fields(self, "vocab_size", integer=True, minimum=256)
        check_fields(self, "muon_lr", minimum=0)


PRESETS: dict[str, Tiered[RunPreset]] = {
    # CPU: the book's target, validation loss <= 1.9 within 2,000 steps (nanoGPT's CPU
    # recipe, a higher learning rate). GPU: nanoGPT's shakespeare-char model in the
    # device's own precision (fp16 on a T4, bf16 from Ampere on), compiled (on a GPU
    # torch.compile fuses the element-wise kernels; on a CPU it costs ~25 s of
    # compilation and gains nothing at this size).
    "shakespeare-char": Tiered(
        cpu=RunPreset("shakespeare", n_layer=4, n_head=4, n_embd=128, block_size=64,
                      batch_size=12, train=TrainConfig(
                          max_steps=2000, lr=2e-3, warmup_steps=100, betas=(0.9, 0.99),
                          eval_interval=250, eval_steps=20, ckpt_interval=500)),
        gpu=RunPreset("shakespeare", n_layer=6, n_head=6, n_embd=384, block_size=256,
                      batch_size=64, dropout=0.2, train=TrainConfig(
                          max_steps=5000, lr=1e-3, warmup_steps=100, betas=(0.9, 0.99),
                          eval_interval=250, eval_steps=200, precision="auto",
                          ckpt_interval=1000, compile=True)),
    ),
}
# The time-to-loss ladder's last recipe (python -m tools.bench speedrun, chapter
# "Training faster"): on the CPU bf16, the hand-written attention, RoPE, QK-norm,
# zero-initialised projections, Muon and a batch of 32; it reaches nanoGPT's
# 2,000-step loss in a fraction of nanoGPT's time. GPU: shakespeare-char's, until a
# GPU ladder is measured. (shakespeare-char itself keeps AdamW: the mesh runs and
# the chapters built on it train it with --dp/--tp and compare it step for step.)
PRESETS["shakespeare-char-fast"] = Tiered(
    cpu=RunPreset("shakespeare", n_layer=4, n_head=4, n_embd=128, block_size=64,
                  batch_size=32, use_sdpa=False, pos="rope", qk_norm=True,
                  zero_init=True, muon_lr=0.08, train=TrainConfig(
                      max_steps=300, lr=4e-3, warmup_steps=30, min_lr_ratio=0.0,
                      betas=(0.9, 0.99), precision="bf16", eval_interval=50,
                      eval_steps=20, ckpt_interval=100)),
    gpu=PRESETS["shakespeare-char"].gpu)


@dataclass(frozen=True)
class RunData:
    """A tokenized corpus split for training."""

    tokenizer: Tokenizer
    train: torch.Tensor | np.ndarray  # 1-D token ids (a memmap for your own text)
    val: torch.Tensor | np.ndarray  # the held-out tail


def build_data(preset: RunPreset, cache: Path | None = None, reuse: bool = False,
               verbose: bool = False) -> RunData:
    """The corpus tokenised and split: the last ``val_fraction`` of its tokens is
    held out for validation. A vendored corpus is read whole; your own text is
    tokenised once into ``cache/tokens.bin``, which ``reuse`` reads back
    (:func:`llmcore.data.textfiles.prepare_text`). ``verbose``: say so, with a
    progress bar."""
    if preset.corpus in CORPORA:
        text = load_corpus(preset.corpus)
        tok = (CharTokenizer.train(text) if preset.tokenizer == "char"
               else BPETokenizer.train(text, preset.vocab_size))
        ids = torch.from_numpy(np.array(tok.encode(text), dtype=np.int64))
    else:
        tok, ids = prepare_text(preset.corpus, preset.tokenizer, preset.vocab_size,
                                cache, reuse,
                                progress=verbose and preset.train.progress)
    n_val = len(ids) - int(len(ids) * (1 - preset.val_fraction))
    if min(len(ids) - n_val, n_val) < preset.block_size + 1:
        if cache is not None and not reuse and preset.corpus not in CORPORA:
            remove_cache(cache)  # a text too short leaves no run behind
        raise TextDataError(
            f"{preset.corpus} is too short for a context of {preset.block_size} "
            f"tokens: its {len(ids):,} tokens leave {n_val:,} for validation (the last "
            f"{preset.val_fraction:.0%}) and each part needs {preset.block_size + 1}. "
            "Add text, or pass a smaller --block-size")
    train_ids, val_ids = split_tokens(ids, preset.val_fraction)
    if verbose and preset.corpus not in CORPORA:
        print(f"{preset.corpus}: {len(ids):,} tokens ({preset.tokenizer}, "
              f"{tok.vocab_size} ids); training on the first {len(train_ids):,}, "
              f"validating on the last {len(val_ids):,} "
              f"({preset.val_fraction:.0%}, held out)")
    return RunData(tok, train_ids, val_ids)


def build_model(preset: RunPreset, vocab_size: int) -> GPT:
    return GPT(GPTConfig(vocab_size, preset.block_size, preset.n_layer, preset.n_head,
                         preset.n_embd, dropout=preset.dropout,
                         use_sdpa=preset.use_sdpa, pos=preset.pos,
                         qk_norm=preset.qk_norm, zero_init=preset.zero_init))


def build_optimizer(model: torch.nn.Module,
                    preset: RunPreset) -> torch.optim.Optimizer | None:
    """Muon for the hidden matrices and AdamW for the rest if ``preset.muon_lr``;
    None: the loop's AdamW."""
    if not preset.muon_lr:
        return None
    return Muon(muon_param_groups(model, preset.muon_lr, preset.train.lr),
                betas=preset.train.betas)


def join_mesh(dp: int, tp: int):
    """This process's ``DistInfo`` in torchrun's group, if it has ``dp * tp`` ranks
    (``--dp 1 --tp 1`` without torchrun: a group of this one process)."""
    info = init_distributed()
    if dp * tp == 1 and not dist.is_initialized():  # one process, no torchrun
        dist.init_process_group("nccl" if info.device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)
    if info.world_size < 2 and dp * tp > 1:
        raise ValueError(f"--dp {dp} --tp {tp} needs several processes; start the run "
                         f"with `torchrun --nproc_per_node {dp * tp} -m llmcore.train "
                         "...`")
    if dp * tp != info.world_size:
        raise ValueError(f"--dp {dp} x --tp {tp} = {dp * tp} processes, but torchrun "
                         f"started {info.world_size}: choose --dp and --tp whose "
                         f"product is {info.world_size}, or --nproc_per_node {dp * tp}")
    return info


def prepare_mesh(model: torch.nn.Module, dp: int, tp: int,
                 param_dtype: torch.dtype | None = None):
    """``(model, info, mesh)``: the model on a (dp, tp) device mesh of all ranks
    (``parallelize_gpt``: tensor parallel inside a row, FSDP2 across the rows)."""
    info = join_mesh(dp, tp)
    mesh = init_device_mesh(info.device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    model = parallelize_gpt(model.to(info.device), mesh, param_dtype=param_dtype)
    if dp * tp == 1:  # sharded over its one rank all the same, so that it saves the
        # shards any layout reads, and reads theirs
        apply_fsdp(model, mesh["dp"], param_dtype)
    return model, info, mesh


def batch_fns(data: RunData, preset: RunPreset):
    """``(train_fn, val_fn)`` in the ``batch_fn(step, generator)`` form of ``train``."""
    def train_fn(step, generator):
        return get_batch(data.train, preset.batch_size, preset.block_size, generator)

    def val_fn(step, generator):
        return get_batch(data.val, preset.batch_size, preset.block_size, generator)
    return train_fn, val_fn


def run(preset: RunPreset, rt: Runtime, out: str | Path | None = None,
        resume: bool = False, overwrite: bool = False,
        mesh: tuple[int, int] | None = None,
        stop_at: int | None = None) -> tuple[GPT, History, RunData]:
    """Train ``preset``; with ``out``, write checkpoint, tokenizer and metrics there.

    ``out`` is checked and locked before training (see :mod:`llmcore.train.outdir`):
    a folder holding a run needs ``resume`` or ``overwrite``. On ``resume`` the
    checkpoint is read once and the request compared with the saved run
    (:mod:`llmcore.train.resume`): a change of what a step computes is refused, a new
    ``max_steps`` is applied and reported. With ``mesh=(dp, tp)`` (under torchrun)
    the model lives on a device mesh and checkpoints in shards (``OUT/ckpt.dcp``),
    which ``resume`` continues on any (dp, tp) layout; at the end rank 0 also writes
    the whole model (``OUT/ckpt.pt``, final weights only). Its batches depend on the
    seed and the step only (``sharded.global_batches``), so a resume on the same mesh
    is exact. ``stop_at``: end after that many steps, the schedule unchanged (the run
    goes on with ``resume``). Your own text (``preset.corpus`` a path) is tokenised
    once into ``OUT/tokens.bin``, which ``resume`` reads back.
    """
    if mesh and preset.muon_lr:
        raise ValueError("Muon orthogonalises whole matrices and runs on one process "
                         "here; train this preset without --dp/--tp, or a preset "
                         "without muon_lr on the mesh")
    if resume and mesh and out is not None and (Path(out) / "ckpt.pt").exists() and \
            not (Path(out) / SHARDS).exists():  # before any process group or model
        refuse_unsharded(out)
    if not resume and preset.corpus not in CORPORA:
        text_files(preset.corpus)  # missing or empty text: refused before OUT is made
    info = join_mesh(*mesh) if mesh else None  # the rank, to claim OUT on rank 0
    writes = out is not None and (info is None or info.is_main)
    claim = (claim_out(out, resume=resume, overwrite=overwrite) if writes
             else contextlib.nullcontext())
    with claim:
        meta = {"preset": asdict(preset), "seed": rt.seed,
                "parallel": "mesh" if mesh else "none", "resumes": []}
        if mesh:
            meta["mesh"] = {"dp": mesh[0], "tp": mesh[1]}
        ckpt = None if out is None else Path(out) / (SHARDS if mesh else "ckpt.pt")
        later = info is not None and not info.is_main
        if later:
            dist.barrier()  # rank 0 has checked and cleared OUT, and made the data
        saved = None
        if resume and ckpt is not None and ckpt.exists():
            saved = (sharded.read_checkpoint(ckpt) if mesh
                     else read_checkpoint(ckpt, map_location=rt.device))
            meta["resumes"] = check_saved_run(saved, ckpt, meta, writes)
            # a resumed run keeps its own warm-up, whatever --steps says
            warmup = saved["extra"]["config"]["warmup_steps"]
            preset = override(preset, train=override(preset.train,
                                                     warmup_steps=warmup))
        # Your own text is tokenised into OUT once OUT is claimed and a resumed run
        # checked, on rank 0; the other ranks read its cache.
        data = build_data(preset, None if out is None else Path(out),
                          reuse=resume or later, verbose=not later)
        if info is not None and not later:
            dist.barrier()
        if writes:  # from the start, so that llmcore.sample reads any checkpoint
            data.tokenizer.save(Path(out) / "tokenizer.json")
        model = build_model(preset, data.tokenizer.vocab_size)
        meta["model"] = asdict(model.config)  # what llmcore.sample rebuilds
        dp_group, dp_rank = None, 0
        if mesh is not None:
            precision = resolve_precision(preset.train.precision, info.device)
            bf16 = torch.bfloat16 if precision == "bf16" else None
            model, info, device_mesh = prepare_mesh(model, *mesh, param_dtype=bf16)
            dp_rank = device_mesh["dp"].get_local_rank()
            dp_group = device_mesh["dp"].get_group() if mesh[0] > 1 else None
        else:
            model = model.to(rt.device)
        train_fn, val_fn = batch_fns(data, preset)
        generator = torch.Generator().manual_seed(rank_seed(rt.seed, dp_rank))
        if mesh:
            train_fn = sharded.global_batches(
                lambda g: get_batch(data.train, preset.batch_size * mesh[0],
                                    preset.block_size, g), rt.seed, dp_rank, mesh[0])
        history = train(model, train_fn, preset.train, val_batch_fn=val_fn,
                        optimizer=build_optimizer(model, preset),
                        generator=generator, ckpt_path=ckpt, start_from=saved,
                        dp_group=dp_group, meta=meta, stop_at=stop_at)
        if info is not None:
            model = gather_model(model, preset, data.tokenizer.vocab_size, info)
        if writes and model is not None:
            if info is not None:
                save_checkpoint(Path(out) / "ckpt.pt", model, step=len(history.loss),
                                extra={"meta": meta, "config": asdict(preset.train)})
            write_outputs(Path(out), preset, rt, model, history, data, meta)
    return model, history, data


def refuse_unsharded(out) -> None:
    raise FileNotFoundError(
        f"--resume with --dp/--tp continues the sharded checkpoint "
        f"{Path(out) / SHARDS}, which is missing: {out} holds a run without "
        "--dp/--tp. Resume it as it was started, or start a new run with --overwrite.")


def check_saved_run(payload: dict, ckpt: Path, meta: dict,
                    verbose: bool = True) -> list[dict]:
    """Compare the run saved in ``payload`` (read from ``ckpt``) with the requested
    ``meta``; return the list of resumes, this one added, or raise listing what may
    not change."""
    saved = payload["extra"].get("meta", {})
    if not ckpt.is_dir() and saved.get("parallel") == "mesh":
        raise ValueError(f"{ckpt} holds the final weights of a --dp/--tp run; resume "
                         "it with --dp/--tp under torchrun (from its ckpt.dcp)")
    if not ckpt.is_dir() and payload["optimizer"] is None:
        raise ValueError(f"{ckpt} holds final weights only, no optimizer state, so it "
                         "cannot be resumed. Start a new run with --overwrite (or "
                         "another --out).")
    requested = {k: meta[k] for k in ("preset", "seed", "parallel")}
    changes = check_resume(
        {k: saved.get(k) for k in requested}, requested, MAY_CHANGE, source=str(ckpt),
        hint="Resume with the flags the run was started with (--tier, --precision, "
             "--lr, --seed), or start a new run with --overwrite or another --out.")
    if saved.get("mesh") and saved["mesh"] != meta.get("mesh"):
        changes.append(f"mesh {saved['mesh']} -> {meta['mesh']}")
    here = {"at_step": payload["step"], "changes": changes}
    if verbose:
        print(f"resuming {ckpt} at step {payload['step']}"
              + (f"; changed: {'; '.join(changes)}" if changes else ""))
    return list(saved.get("resumes", [])) + [here]


def gather_model(model: torch.nn.Module, preset: RunPreset, vocab_size: int, info):
    """A plain single-device GPT with the mesh model's full weights, on rank 0 (None
    elsewhere); ends the process group. Every rank must call it."""
    full = {k: v.cpu() for k, v in full_state(model).items()}  # q, k, v fused back
    plain = None
    if info.is_main:
        plain = build_model(preset, vocab_size)
        missing, unexpected = plain.load_state_dict(full, strict=False)
        lost = set(missing) & {n for n, _ in plain.named_parameters()}
        if unexpected or lost:  # buffers (masks, caches) are rebuilt, weights not
            raise RuntimeError(f"gathered weights do not fit the model: missing "
                               f"{sorted(lost)}, unexpected {unexpected}")
        plain.to(info.device)
    dist.barrier()
    dist.destroy_process_group()
    return plain


def write_outputs(out: Path, preset: RunPreset, rt: Runtime, model: GPT,
                  history: History, data: RunData, meta: dict | None = None) -> None:
    data.tokenizer.save(out / "tokenizer.json")
    prompt = torch.tensor([[int(data.train[0])]], device=rt.device)  # the first token
    sample = generate(model, prompt, 200, temperature=0.8, top_k=50,
                      generator=torch.Generator(rt.device).manual_seed(rt.seed))
    metrics = {
        "preset": asdict(preset), "tier": rt.tier, "device": device_name(rt.device),
        "torch": torch.__version__, "params": count_params(model),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "history": history.to_dict(),
        "seed": rt.seed, "parallel": (meta or {}).get("parallel", "none"),
        "resumes": (meta or {}).get("resumes", []),
        "sample": data.tokenizer.decode(sample[0].tolist()),
    }
    with atomic_write(out / "metrics.json", "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)


