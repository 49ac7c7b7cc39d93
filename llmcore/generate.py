"""Autoregressive text generation: sampling strategies and the KV cache.

A decoder predicts a distribution over the next token; generation appends one token
and repeats. The strategies differ in how a token is drawn from ``softmax(logits)``:
greedy takes the argmax (``temperature=0``); temperature ``t`` samples from
``softmax(logits / t)`` (sharper below 1, flatter above); top-k samples among the
``k`` likeliest tokens only (Fan et al. 2018); top-p, or nucleus, sampling among the
smallest set whose probability reaches ``p`` (Holtzman et al., "The Curious Case of
Neural Text Degeneration", 2020). Filters apply in that order: temperature, top-k,
top-p.

The KV cache keeps each layer's keys and values of the tokens already processed, so
each new token costs one position's work instead of re-running the whole prefix. The
caches are static (``llmcore.nn.KVCache(max_len)``): preallocated once and written in
place, so every decode step has the same shapes and ``torch.compile`` compiles it once.
Once the sequence outgrows the context (``block_size``) a model with learned absolute
positions must re-read the last ``block_size`` tokens at shifted positions; from there
on each step runs the full window, exactly as the uncached path does.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

MIN_TEMPERATURE = 1e-5  # below: use 0 (greedy); tiny values overflow logits / t


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """Logits with everything below the k-th largest of each row set to -inf."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be a positive int, got {k!r}")
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Logits outside the nucleus (the likeliest tokens with total probability >= p)
    set to -inf; the likeliest token always stays."""
    if not 0 < p <= 1:  # p = 0 would drop every token, a row of NaN probabilities
        raise ValueError(f"top_p must lie in (0, 1], got {p!r}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass ahead of each token
    drop_sorted = before >= p  # the nucleus ends where the mass ahead already reaches p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of ``logits`` (B, V) -> (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    device = generator.device if generator is not None else probs.device
    # Sample on the generator's device so a seeded CPU generator gives the same tokens
    # whatever device the model runs on.
    return torch.multinomial(probs.to(device), 1, generator=generator).to(logits.device)


def _check(model: nn.Module, idx: Tensor, max_new_tokens: int, temperature: float,
           top_k: int | None, top_p: float | None, use_cache: bool) -> int:
    config = getattr(model, "config", None)
    block_size = getattr(config, "block_size", None)
    if block_size is None:
        raise ValueError("model must have config.block_size (its context length)")
    if idx.dim() != 2 or idx.shape[1] == 0 or idx.is_floating_point():
        raise ValueError(f"idx must be integer token ids (B, T) with T >= 1, got shape "
                         f"{tuple(idx.shape)} and dtype {idx.dtype}")
    if idx.shape[1] > block_size:
        raise ValueError(f"the prompt has {idx.shape[1]} tokens but the model's "
                         f"context is block_size={block_size}; shorten the prompt, "
                         f"e.g. idx[:, -{block_size}:]")
    vocab = getattr(config, "vocab_size", None)
    lo, hi = int(idx.min()), int(idx.max())  # one read of the prompt, before the loop
    if lo < 0 or (vocab is not None and hi >= vocab):
        bad = lo if lo < 0 else hi
        raise ValueError(f"idx holds the token id {bad}, outside the model's "
                         f"vocabulary [0, {vocab}); encode the prompt with the "
                         "tokenizer the model was trained with")
    if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, numbers.Real) or math.isnan(temperature) or (
            temperature < 0):
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got "
                         f"{temperature!r}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature={temperature!r} is too small to sample with "
                         f"(logits / temperature overflow); use temperature=0 for "
                         f"greedy decoding, or a value >= {MIN_TEMPERATURE}")
    if top_k is not None and (isinstance(top_k, bool)
                              or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}"
                         + (f"; pass top_k={int(top_k)}" if isinstance(top_k, float)
                            and top_k.is_integer() and top_k >= 1 else ""))
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")
    if use_cache and not hasattr(model, "new_kv_caches"):
        raise ValueError(f"{type(model).__name__} has no new_kv_caches(); pass "
                         "use_cache=False")
    return block_size


@torch.no_grad()
def generate(model: nn.Module, idx: Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None,
             compile: bool | None = None) -> Tensor:
    """Extend ``idx`` (B, T) by ``max_new_tokens`` tokens; returns (B, T + new).

    ``model(idx, kv_caches=...)`` must return ``(logits, _)`` as ``GPT`` does.
    ``temperature=0`` is greedy decoding; ``generator`` makes sampling reproducible.
    The caches are static (preallocated, written in place). ``compile`` (default: on
    for CUDA, off elsewhere) gives every one-token decode step the same shapes and
    compiles it with ``torch.compile`` once, for every token.
    """
    block_size = _check(model, idx, max_new_tokens, temperature, top_k, top_p,
                        use_cache)
    if compile is None:
        compile = idx.device.type == "cuda"
    was_training = model.training
    model.eval()
    try:  # the caller's mode back, also after an error or Ctrl-C
        caches = model.new_kv_caches() if use_cache else None
        for cache in caches or []:
            # Compiled: every step the same shapes (all slots, masked). Eager: read
            # only the written prefix, less work when the context is much longer
            # than the text.
            cache.fixed_shapes = compile
        # dynamic=True: the caches' length is an int that grows by one every step;
        # marked dynamic from the start it never causes a recompilation.
        decode = torch.compile(model, dynamic=True) if compile and use_cache else model
        out, fresh = idx, idx  # fresh: the tokens the caches have not seen yet
        for _ in range(max_new_tokens):
            if caches is not None and out.shape[1] <= block_size:
                # the prefill runs eagerly
                step = decode if fresh.shape[1] == 1 else model
                logits, _ = step(fresh, kv_caches=caches)  # (B, len(fresh), V)
            else:
                logits, _ = model(out[:, -block_size:])  # re-read the whole window
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            out = torch.cat([out, nxt.to(out.dtype)], dim=1)
            fresh = nxt
    finally:
        model.train(was_training)
    return out
