"""Small models and data for the parallel tests (not part of the library)."""

import torch
from torch import nn


class TinyLM(nn.Module):
    """A stand-in for a GPT with its forward signature, small enough for unit tests."""

    def __init__(self, vocab_size: int = 32, n_embd: int = 16, hidden: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, hidden), nn.GELU(),
                                 nn.Linear(hidden, n_embd))
        self.head = nn.Linear(n_embd, vocab_size)

    def forward(self, idx, targets=None):
        x = self.emb(idx)  # (B, T, C)
        logits = self.head(x + self.mlp(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


class IdleMLP(nn.Module):
    """An MLP unit that also holds a frozen layer (used) and a layer never used."""

    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(n_embd, hidden), nn.Linear(hidden, n_embd)
        self.frozen = nn.Linear(n_embd, n_embd).requires_grad_(False)
        self.unused = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        return self.frozen(self.down(nn.functional.gelu(self.up(x))))


class WithIdle(TinyLM):
    """TinyLM whose ``mlp`` unit holds a frozen and an unused parameter."""

    def __init__(self, vocab_size: int = 32, n_embd: int = 16, hidden: int = 32):
        super().__init__(vocab_size, n_embd, hidden)
        self.mlp = IdleMLP(n_embd, hidden)


def random_batches(steps: int, batch: int, seq: int, vocab: int, seed: int = 0):
    """Token batches (steps, batch, seq) and their next-token targets, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(vocab, (steps, batch, seq + 1), generator=g)
    return tokens[..., :-1].contiguous(), tokens[..., 1:].contiguous()
