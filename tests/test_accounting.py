"""Parameter and memory accounting against real modules and real optimizer state."""

import pytest
import torch
from torch import nn

from book.workers import memory as mem
from llmcore import accounting as acc
from llmcore.models.gpt import GPT, GPTConfig


class NativeGPT(nn.Module):
    """A GPT-2-shaped decoder built from torch.nn only, to check the formula."""

    def __init__(self, n_layer, n_embd, vocab_size, block_size):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(n_embd, 4, 4 * n_embd, dropout=0.0,
                                       batch_first=True, norm_first=True)
            for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied


def test_gpt_param_count_matches_a_real_module():
    model = NativeGPT(3, 64, 100, 32)
    assert acc.count_params(model) == mem.gpt_param_count(3, 64, 100, 32)
    # GPT-2 small: 124M with a tied head (the paper's and nanoGPT's figure).
    assert round(mem.gpt_param_count(12, 768, 50257, 1024) / 1e6) == 124
    with pytest.raises(ValueError, match="n_embd must be a positive int"):
        mem.gpt_param_count(2, 0, 10, 10)


def test_adamw_state_is_eight_bytes_per_parameter_in_fp32():
    model = NativeGPT(2, 32, 50, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 50, (2, 16))
    h = model.tok(x) + model.pos(torch.arange(16))
    for block in model.blocks:
        h = block(h)
    model.head(model.norm(h)).sum().backward()
    opt.step()
    n = acc.count_params(model)
    measured = mem.measure_training_state(model, opt)
    predicted = mem.training_bytes(n, "fp32 + AdamW")
    assert measured["weights"] == predicted["weights"] == 4 * n
    assert measured["grads"] == predicted["grads"] == 4 * n
    assert measured["optimizer"] == predicted["optimizer"] == 8 * n
    assert measured["counters"] == 4 * len(list(model.parameters()))


def test_recipes_and_formats():
    assert mem.training_bytes(10, "mixed bf16 + AdamW")["total"] == 160
    assert mem.bytes_per_element("int4") == 0.5
    with pytest.raises(ValueError, match="fmt='fp12'"):
        mem.bytes_per_element("fp12")
    with pytest.raises(ValueError, match="recipe='adam'"):
        mem.training_bytes(1, "adam")
    assert mem.human_bytes(1536) == "1.5 KiB" and mem.human_bytes(12) == "12 B"


def test_gpt_param_count_without_biases_matches_llmcore_gpt():
    from llmcore.models.gpt import GPT, GPTConfig

    for bias in (True, False):
        cfg = GPTConfig(vocab_size=77, block_size=19, n_layer=2, n_head=2, n_embd=24,
                        bias=bias)
        assert acc.count_params(GPT(cfg)) == mem.gpt_param_count(2, 24, 77, 19,
                                                                 bias=bias)


def test_flops_per_token_by_hand():
    # L=2, C=8, V=10, T=16: matmul weights 12 * 2 * 8^2 + 10 * 8 = 1,616, times 6 =
    # 9,696; attention 12 * 2 * 8 * 16 = 3,072; in all 12,768
    cfg = GPTConfig(vocab_size=10, block_size=16, n_layer=2, n_head=2, n_embd=8)
    assert acc.flops_per_token(cfg) == 12_768
    assert acc.flops_per_token(cfg, seq_len=8) == 9_696 + 1_536
    assert acc.mfu(1000.0, 1e6, 1e10) == pytest.approx(0.1)


def test_flops_per_token_matches_torchs_flop_counter():
    # The hand-written attention is plain matmuls, which the counter sees; the formula
    # counts the full T x T score matrix, as that kernel computes it.
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=64,
                    use_sdpa=False)
    model = GPT(cfg)
    x = torch.randint(96, (2, 32))
    with FlopCounterMode(display=False) as counter:
        _, loss = model(x, x)
        loss.backward()
    counted = counter.get_total_flops() / x.numel()
    assert counted == pytest.approx(acc.flops_per_token(cfg), rel=0.03)


def test_peak_is_measured_against_a_timed_matmul():
    peak = acc.measure_peak_flops("cpu", "fp32", n=256, iters=2)
    assert 1e8 < peak < 1e14
    with pytest.raises(ValueError, match="precision"):
        acc.measure_peak_flops("cpu", "int4")
