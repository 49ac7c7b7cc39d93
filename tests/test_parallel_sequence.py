"""Sequence parallelism by hand: one block on 2 processes equals one device, in
outputs and gradients, keeps 1/n of the activations (the formula), and matches
DTensor's SequenceParallel plan."""

import copy

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                               RowwiseParallel, SequenceParallel,
                                               parallelize_module)

from book.workers.activations import activation_bytes, saved_bytes
from book.workers.costmodel import tp_payload
from llmcore.models.gpt import GPT, GPTConfig
from book.workers.launch import launch
from llmcore.parallel.comm import wire_bytes
from llmcore.parallel.native import unfuse_qkv
from llmcore.parallel.sequence_parallel import SequenceParallelBlock

CFG = GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=4, n_embd=32)


def sp_block(rank, world_size):
    torch.manual_seed(0)
    block = GPT(CFG).blocks[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 32, generator=g)
    w = torch.randn(2, 16, 32, generator=g)  # a loss that weighs every output
    ref_x = x.clone().requires_grad_()
    ref = block(ref_x)
    (ref * w).sum().backward()
    sp = SequenceParallelBlock(copy.deepcopy(block))
    mine = x.chunk(world_size, 1)[rank].clone().requires_grad_()
    nbytes, out = saved_bytes(sp, mine, exclude=list(sp.parameters()))
    forward = dict(sp.comm.stats.payload)
    (out * w.chunk(world_size, 1)[rank]).sum().backward()
    step = dict(sp.comm.stats.payload)
    sp.sync_grads()
    attn = block.self_attn
    q, k, v = attn.qkv_proj.weight.grad.chunk(3, 0)
    qkv = torch.cat([t.chunk(world_size, 0)[rank] for t in (q, k, v)])
    grads = {"qkv": (sp.qkv.grad, qkv),
             "fc1": (sp.fc1.grad,
                     block.ffn.linear1.weight.grad.chunk(world_size)[rank]),
             "fc2": (sp.fc2.grad,
                     block.ffn.linear2.weight.grad.t().chunk(world_size)[rank]),
             "norm1": (sp.norm1.weight.grad, block.norm1.weight.grad),
             "x": (mine.grad, ref_x.grad.chunk(world_size, 1)[rank]),
             "out": (out.detach(), ref.detach().chunk(world_size, 1)[rank])}
    return {"gaps": {k: (a - b).abs().max().item() for k, (a, b) in grads.items()},
            "saved": nbytes, "forward": forward, "step": step}


@pytest.mark.distributed
def test_sequence_parallel_block_matches_one_device_and_the_formula():
    for r in launch(sp_block, 2):
        assert max(r["gaps"].values()) < 1e-5, r["gaps"]
        assert r["saved"] == activation_bytes(CFG, 2, 16, 4, tp=2,
                                              sequence_parallel=True)
        assert r["saved"] < activation_bytes(CFG, 2, 16, 4, tp=2)  # TP alone keeps more
        # through Comm: forward, two all-gathers and two reduce-scatters of the whole
        # (B, T, C), as many bytes on the wire as tensor parallelism's two all-reduces
        act = 2 * 16 * 32 * 4
        assert r["forward"] == {"all_gather": 2 * act, "reduce_scatter": 2 * act}
        tp = tp_payload(2, 16, 32, 1, 32, vocab_parallel=False)["all_reduce"]
        wire = {k: sum(wire_bytes(op, b, 2) for op, b in r[k].items())
                for k in ("forward", "step")}
        assert wire["forward"] == wire_bytes("all_reduce", tp / 2, 2)
        # backward gathers each matmul's input again (it was not kept): 10 transfers
        # of (B, T, C) where tensor parallelism has 8
        assert r["step"] == {"all_gather": 6 * act, "reduce_scatter": 4 * act}
        assert wire["step"] == 10 / 8 * wire_bytes("all_reduce", tp, 2)


def against_dtensor(rank, world_size):
    """Our block against DTensor's SequenceParallel plan on the same weights: the
    largest difference of the outputs and of the input gradients."""
    torch.manual_seed(0)
    block = GPT(CFG).blocks[0]
    mine = SequenceParallelBlock(copy.deepcopy(block))
    theirs = copy.deepcopy(block)
    theirs.self_attn = unfuse_qkv(theirs.self_attn)
    shard = (PrepareModuleInput(input_layouts=(Shard(1),),
                                desired_input_layouts=(Replicate(),)))
    plan = {"norm1": SequenceParallel(), "norm2": SequenceParallel(),
            "self_attn": shard, "ffn": copy.deepcopy(shard),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.out_proj": RowwiseParallel(output_layouts=Shard(1)),
            "ffn.linear1": ColwiseParallel(),
            "ffn.linear2": RowwiseParallel(output_layouts=Shard(1))}
    parallelize_module(theirs, init_device_mesh("cpu", (world_size,)), plan)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for model in (mine, theirs):
        xs = x.chunk(world_size, 1)[rank].clone().requires_grad_()
        out = model(xs)
        out = out.to_local() if isinstance(out, DTensor) else out
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append(xs.grad)
    return max((outs[0] - outs[1]).abs().max().item(),
               (grads[0] - grads[1]).abs().max().item())


@pytest.mark.distributed
def test_sequence_parallel_block_matches_dtensor_sequence_parallel():
    assert max(launch(against_dtensor, 2)) < 1e-5
