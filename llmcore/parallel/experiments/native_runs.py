"""PyTorch's engines in the book: one backward with each, and a short torchrun run.

``torchrun --nproc_per_node 4 -m llmcore.parallel.experiments.native_runs --dp 2
--tp 2`` trains the chapter's small GPT on Shakespeare for a few clipped AdamW steps
on a (dp, tp) mesh through :func:`llmcore.parallel.native.parallelize_gpt`;
``--mode ddp|fsdp|tp`` uses one engine alone instead.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from llmcore.models.gpt import GPT
from llmcore.parallel.experiments.common import DEMO, shakespeare_batches
from llmcore.parallel.native import (MODES, apply_parallel, clip_grad_norm_,
                                     full_state, init_distributed, parallelize_gpt)
from llmcore.parallel.launch import rank_device


def native_worker(rank: int, world_size: int, cfg, x, y, seed: int = 0) -> dict:
    """One backward with each engine on this rank's device; largest gradient
    difference to one device (the same kind of device)."""
    torch.manual_seed(seed)
    device = rank_device()
    ref = GPT(cfg).to(device)
    x, y = x.to(device), y.to(device)
    ref(x, y)[1].backward()
    gaps = {}
    for mode in MODES:
        model = copy.deepcopy(ref)
        model.zero_grad(set_to_none=True)
        model = apply_parallel(model, mode, device)
        mine = (x, y) if mode == "tp" else (x.chunk(world_size)[rank],
                                            y.chunk(world_size)[rank])
        model(*mine)[1].backward()
        grads = full_state(model, grads=True)
        gaps[mode] = max((grads[n] - p.grad).abs().max().item()
                         for n, p in ref.named_parameters())
    return gaps


def main(argv=None) -> None:
    """A few clipped AdamW steps of a small GPT with PyTorch's engines."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="one engine alone (default: the --dp x --tp mesh)")
    parser.add_argument("--dp", type=int, default=0, help="data-parallel size "
                        "(default: all processes over --tp)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    info = init_distributed()
    cfg, (X, Y) = shakespeare_batches(DEMO.cpu)
    torch.manual_seed(0)
    if args.mode:
        dp, tp = (1, info.world_size) if args.mode == "tp" else (info.world_size, 1)
        model = apply_parallel(GPT(cfg), args.mode, info.device)
    else:
        tp = args.tp
        dp = args.dp or info.world_size // tp
        if dp * tp != info.world_size:
            raise SystemExit(f"--dp {dp} x --tp {tp} must equal the "
                             f"{info.world_size} processes")
        mesh = init_device_mesh(info.device.type, (dp, tp),
                                mesh_dim_names=("dp", "tp"))
        model = parallelize_gpt(GPT(cfg).to(info.device), mesh, param_dtype=None)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=False)
    row = info.rank // tp  # ranks of one tensor-parallel row read the same batch
    losses = []
    for step in range(args.steps):
        x, y = X[step % len(X)].chunk(dp)[row], Y[step % len(Y)].chunk(dp)[row]
        loss = model(x.to(info.device), y.to(info.device))[1]
        loss.backward()
        clip_grad_norm_(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    if info.is_main:
        print(f"mode={args.mode or 'mesh'} dp={dp} tp={tp} world_size="
              f"{info.world_size} loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
