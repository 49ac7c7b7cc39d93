"""Activation memory: what a GPT block keeps for its backward pass, counted, measured.

Backward needs, per block and token, the inputs of every matmul and nonlinearity of
the forward. For llmcore's ``GPTBlock`` (pre-LN, one fused q/k/v projection, no
biases, GELU MLP of width 4C) with a fused attention kernel (SDPA's flash path) and
no dropout, autograd saves per token, in the activation dtype of s bytes:

====================================  =========
tensor                                elements
====================================  =========
block input x (norm1 reads it)        C
norm1 output (q/k/v matmul input)     C
q, k, v (one fused output)            3C
attention output (out_proj input)     C
residual x + attn (norm2 input)       C
norm2 output (MLP input)              C
MLP hidden before GELU                4C
GELU output (second matmul input)     4C
====================================  =========

that is ``16 C s`` bytes, plus the log-sum-exp in fp32 (``4 nh``) and the two norms'
mean and reciprocal standard deviation (4 values, in the activation dtype on the CPU,
in fp32 on CUDA). The attention matrix (T x T per head) is never stored:
the kernel recomputes it in backward (Dao et al. 2022). Without the fused kernel -
PyTorch's CPU kernel falls back to the plain one when attention dropout is on - q, k
and v are stored apart, as are the softmax, the dropout mask and the dropped weights
(3 nh T values), and the two residual dropouts keep a mask each (C values each, in
the activation dtype on the CPU): ``18 C s + 3 nh T s`` plus the norms' statistics.
Korthikanti et al. 2022 give the same count for Megatron's blocks with biases.

Activation checkpointing (:mod:`llmcore.parallel.recompute`) keeps only each
checkpointed block's input: :func:`activation_bytes` counts that too.
"""

from __future__ import annotations

import torch


def block_activation_bytes(n_embd: int, n_head: int, seq: int, dtype_bytes: float = 2,
                           fused_attention: bool = True, dropout: bool = False,
                           stats_bytes: float | None = None) -> float:
    """Bytes one GPT block saves per token (the table of the module docstring).

    ``fused_attention``: SDPA's flash kernel (no T x T matrix); ``dropout``: dropout
    is on, which on the CPU also means the plain attention kernel; ``stats_bytes``:
    bytes of a norm statistic (None: ``dtype_bytes``, as on the CPU; 4 on CUDA).
    """
    if n_embd <= 0 or n_head <= 0 or seq <= 0:
        raise ValueError(f"n_embd, n_head and seq must be positive, got {n_embd}, "
                         f"{n_head}, {seq}")
    c, s = n_embd, dtype_bytes
    stats = 4 * (dtype_bytes if stats_bytes is None else stats_bytes)  # 2 x mean, rstd
    if fused_attention and not dropout:
        return 16 * c * s + 4 * n_head + stats
    return 18 * c * s + 3 * n_head * seq * s + stats


def activation_bytes(cfg, batch: int, seq: int, dtype_bytes: float = 2,
                     checkpoint_every: int = 0, tp: int = 1,
                     sequence_parallel: bool = False) -> float:
    """Bytes the blocks of a GPT save for one micro-batch of ``batch`` x ``seq``.

    ``checkpoint_every=k``: every k-th block keeps only its input (C values per
    token). ``tp``: tensor parallelism splits what lies between the column- and
    row-parallel matmuls (q/k/v, attention, MLP hidden: 12 C + nh of the 16 C + nh);
    ``sequence_parallel`` also splits the rest (norms, residuals) by the sequence.
    """
    per = block_activation_bytes(cfg.n_embd, cfg.n_head, seq, dtype_bytes,
                                 dropout=cfg.dropout > 0)
    c, s = cfg.n_embd, dtype_bytes
    split = 12 * c * s + 4 * cfg.n_head if cfg.dropout == 0 else 0.0
    per = per / tp if sequence_parallel else per - split + split / tp
    kept = cfg.n_layer if not checkpoint_every else cfg.n_layer - len(
        range(0, cfg.n_layer, checkpoint_every))
    held = cfg.n_layer - kept  # checkpointed blocks: their input only
    return batch * seq * (kept * per + held * c * s)


def saved_bytes(fn, *args, exclude=()) -> tuple[int, object]:
    """(bytes autograd saves while ``fn(*args)`` runs, its result): each storage
    counted once, the tensors of ``exclude`` (parameters) left out."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(seen.values()), out
