"""Activation bytes: the formula against what autograd really saves; checkpointing."""

import pytest
import torch

from book.workers.activations import (activation_bytes, block_activation_bytes,
                                      saved_bytes)
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.parallel.recompute import apply_activation_checkpointing


def _saved(cfg, dtype, every=0, batch=2):
    """Bytes saved by a forward of ``cfg``'s GPT, its gradients, and the loss."""
    torch.manual_seed(0)
    model = GPT(cfg).to(dtype).train()
    if every:
        apply_activation_checkpointing(model, every)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(cfg.vocab_size, (batch, cfg.block_size), generator=g)
    nbytes, (_, loss) = saved_bytes(model, x, x, exclude=list(model.parameters()))
    loss.backward()
    return nbytes, {n: p.grad for n, p in model.named_parameters()}


def _blocks_only(dtype, every=0, **shape):
    """What two blocks save: a 3-block model minus a 1-block one."""
    cfgs = [GPTConfig(vocab_size=48, n_layer=n, **shape) for n in (1, 3)]
    one, three = (_saved(c, dtype, every)[0] for c in cfgs)
    return three - one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(block_size=32, n_head=4, n_embd=64),
                                   dict(block_size=16, n_head=2, n_embd=96)])
def test_formula_counts_what_autograd_saves(dtype, shape):
    s = torch.finfo(dtype).bits // 8
    tokens = 2 * shape["block_size"]
    per = block_activation_bytes(shape["n_embd"], shape["n_head"],
                                 shape["block_size"], s)
    assert _blocks_only(dtype, **shape) == 2 * tokens * per


def test_dropout_on_the_cpu_stores_attention_and_masks():
    shape = dict(block_size=32, n_head=4, n_embd=64, dropout=0.1)
    per = block_activation_bytes(64, 4, 32, 4, dropout=True)
    assert per > block_activation_bytes(64, 4, 32, 4)
    assert _blocks_only(torch.float32, **shape) == 2 * 64 * per


@pytest.mark.parametrize("every", [1, 2])
def test_checkpointing_keeps_block_inputs_and_the_same_gradients(every):
    cfg = GPTConfig(vocab_size=48, block_size=32, n_layer=4, n_head=4, n_embd=64)
    full, grads = _saved(cfg, torch.float32)
    ckpt, ckpt_grads = _saved(cfg, torch.float32, every)
    outside = full - activation_bytes(cfg, 2, 32, 4)  # embeddings, head, loss
    assert ckpt - outside == activation_bytes(cfg, 2, 32, 4, checkpoint_every=every)
    assert ckpt < full
    for name, g in grads.items():
        torch.testing.assert_close(ckpt_grads[name], g, rtol=0, atol=0)
    with pytest.raises(ValueError, match="every"):
        apply_activation_checkpointing(GPT(cfg), 0)
