"""Fine-tuning a pretrained model for classification: a pooled vector and a linear head.

The recipe of GPT (Radford et al., "Improving Language Understanding by Generative
Pre-Training", 2018) and BERT (Devlin et al. 2019): keep the pretrained Transformer,
read one vector per sequence from its last layer, and add a linear layer that maps it
to class logits. Which vector depends on what can see the whole input:

- ``"cls"``: position 0 of a bidirectional encoder (BERT prepends a ``[CLS]`` token);
- ``"last"``: the last real token of a causal decoder, the only one that has read
  every other token (with right padding the pads come after it and, being in its
  future, change nothing);
- ``"mean"``: the average over the real tokens.

Three ways to train it: *full fine-tuning* (every weight moves), a *linear probe*
(:func:`freeze_backbone`: only the head learns, which measures what the pretrained
features already hold), and LoRA adapters (``llmcore.apps.lora``).

Public API::

    hidden_states(backbone, idx, attention_mask=None) -> (B, T, C)
    pool(h, attention_mask, pooling) -> (B, C)
    SequenceClassifier(backbone, n_embd, num_classes, pooling, dropout=0.0)
    freeze_backbone(classifier) -> classifier
    classification_loss(model, batch)            # a loss_fn for llmcore.train
    fixed_split(n, fractions=(0.8, 0.1, 0.1), seed=0) -> [train, val, test] indices
    predict(model, batches) -> (predictions, labels)
    text_classification_data(texts, labels, vocab_size, max_len) -> splits, tokenized
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmcore.apps.lora import LoRALinear, apply_lora, merge_lora
from llmcore.data.collate import collate
from llmcore.models.gpt import GPT
from llmcore.tokenizer import BPETokenizer

POOLINGS = ("cls", "last", "mean")


def hidden_states(backbone: nn.Module, idx: Tensor,
                  attention_mask: Tensor | None = None) -> Tensor:
    """The last layer's vectors (B, T, C) of a pretrained model, without its LM head.

    A :class:`~llmcore.models.gpt.GPT` is causal and needs no attention mask with right
    padding: its trunk (:meth:`GPT.hidden`) gives them. A model with a
    ``hidden(idx, attention_mask)`` method (BERT, ELECTRA) is given the mask.
    """
    if isinstance(backbone, GPT):
        return backbone.hidden(idx)
    if hasattr(backbone, "hidden"):
        return backbone.hidden(idx, attention_mask)
    raise ValueError(f"backbone {type(backbone).__name__} has no hidden() method and "
                     "is not a GPT; give it hidden(idx, attention_mask) -> (B, T, C)")


def pool(h: Tensor, attention_mask: Tensor | None, pooling: str) -> Tensor:
    """One vector per sequence from ``h`` (B, T, C): see the module docstring."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "cls":
        return h[:, 0]
    if attention_mask is None:
        return h[:, -1] if pooling == "last" else h.mean(dim=1)
    if attention_mask.shape != h.shape[:2]:
        raise ValueError(f"attention_mask must be (B, T) = {tuple(h.shape[:2])}, got "
                         f"{tuple(attention_mask.shape)}")
    m = attention_mask.bool()
    if pooling == "last":
        # Right padding: the last real token sits at length - 1.
        last = m.long().sum(dim=1).clamp(min=1) - 1  # (B,)
        return h[torch.arange(h.shape[0], device=h.device), last]
    w = m.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
    return (h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


class SequenceClassifier(nn.Module):
    """A pretrained backbone, a pooled vector, dropout and a linear head.

    ``forward(input_ids, attention_mask=None, labels=None) -> (logits, loss)`` with
    logits (B, num_classes), so it trains with ``llmcore.train`` and
    :func:`classification_loss`. The head starts at zero weights: the first logits are
    all zero, a uniform guess, and the backbone gets gradients only once the head has
    learned a direction (a common, stable choice for fine-tuning).
    """

    def __init__(self, backbone: nn.Module, n_embd: int, num_classes: int,
                 pooling: str = "last", dropout: float = 0.0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.backbone, self.pooling = backbone, pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(n_embd, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, input_ids: Tensor,
                 attention_mask: Tensor | None = None) -> Tensor:
        """The pooled vectors (B, C) the head reads."""
        h = hidden_states(self.backbone, input_ids, attention_mask)
        return pool(h, attention_mask, self.pooling)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        logits = self.head(self.dropout(self.features(input_ids, attention_mask)))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return logits, loss


def freeze_backbone(classifier: SequenceClassifier) -> SequenceClassifier:
    """Linear probe: only the head's parameters stay trainable. Returns the model."""
    for p in classifier.backbone.parameters():
        p.requires_grad_(False)
    for p in classifier.head.parameters():
        p.requires_grad_(True)
    return classifier


def classification_loss(model: nn.Module, batch: dict) -> Tensor:
    """A ``loss_fn`` for ``llmcore.train``: batch dicts hold input_ids,
    attention_mask and label."""
    _, loss = model(batch["input_ids"], batch.get("attention_mask"), batch["label"])
    return loss


def fixed_split(n: int, fractions: tuple[float, ...] = (0.8, 0.1, 0.1),
                seed: int = 0) -> list[list[int]]:
    """Indices 0..n-1 shuffled with ``seed`` and cut into parts of the given shares.

    The same ``n`` and ``seed`` give the same split on every machine (a CPU generator
    of its own, not the global RNG), so train, validation and test stay apart across
    runs and chapters. The last part takes the rounding remainder.
    """
    if n < len(fractions) or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) <= 0:
        raise ValueError(f"fractions must be positive and sum to 1 and n >= "
                         f"{len(fractions)}; got n={n}, fractions={fractions}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    parts, start = [], 0
    for i, f in enumerate(fractions):
        end = n if i == len(fractions) - 1 else start + round(f * n)
        parts.append(perm[start:end])
        start = end
    return parts


@dataclass
class TextClassificationData:
    """Sentences tokenized for a classifier, split into train / val / test.

    Every example ends with the ``<|cls|>`` token, whose last-layer vector the head
    reads (the "extract" token of GPT's fine-tuning, Radford et al. 2018).
    """

    tokenizer: BPETokenizer  # trained on the training sentences only
    examples: dict[str, list[dict]]  # split -> [{"input_ids": [...], "label": y}]
    texts: dict[str, list[str]]  # split -> the raw sentences
    max_len: int  # longest example in tokens, <|cls|> included

    @property
    def pad_id(self) -> int:
        return self.tokenizer.special_tokens["<|pad|>"]

    def batch_fn(self, split: str, batch_size: int) -> Callable:
        """``batch_fn(step, generator)`` drawing random examples, for ``train``."""
        data = self.examples[split]

        def fn(step: int, generator: torch.Generator) -> dict:
            pick = torch.randint(len(data), (batch_size,), generator=generator)
            return collate([data[i] for i in pick.tolist()], self.pad_id)
        return fn

    def batches(self, split: str, batch_size: int = 256) -> list[dict]:
        """Every example of ``split`` once, in order, as padded batches."""
        data = self.examples[split]
        return [collate(data[i:i + batch_size], self.pad_id)
                for i in range(0, len(data), batch_size)]

    def lm_tokens(self, split: str = "train") -> Tensor:
        """The split's examples as one stream of ids, for LM pretraining (labels
        dropped): each sentence ends with ``<|cls|>`` exactly as the classifier will
        read it, so that token's embedding is pretrained too."""
        ids = [t for e in self.examples[split] for t in e["input_ids"]]
        return torch.tensor(ids, dtype=torch.long)


def text_classification_data(texts: Sequence[str], labels: Sequence[int],
                             vocab_size: int = 2048, max_len: int = 64,
                             fractions: tuple[float, ...] = (0.8, 0.1, 0.1),
                             seed: int = 0) -> TextClassificationData:
    """Split with :func:`fixed_split`, train a byte-level BPE on the training text,
    encode every sentence (cut to ``max_len - 1`` tokens) and append ``<|cls|>``."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    split = fixed_split(len(texts), fractions, seed)
    parts = dict(zip(("train", "val", "test"), split))
    split_texts = {k: [texts[i] for i in v] for k, v in parts.items()}
    tok = BPETokenizer.train("\n".join(split_texts["train"]), vocab_size,
                             special_tokens=["<|pad|>", "<|cls|>"])
    cls = tok.special_tokens["<|cls|>"]
    examples = {k: [{"input_ids": tok.encode(texts[i], allow_special=False)
                     [:max_len - 1] + [cls], "label": int(labels[i])} for i in v]
                for k, v in parts.items()}
    longest = max(len(e["input_ids"]) for v in examples.values() for e in v)
    return TextClassificationData(tok, examples, split_texts, longest)


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[dict]) -> tuple[Tensor, Tensor]:
    """Predicted classes and true labels (both int64, on the CPU) over ``batches``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, labels = [], []
    try:  # the caller's mode back, also after an error or Ctrl-C
        for batch in batches:
            mask = batch.get("attention_mask")
            logits, _ = model(batch["input_ids"].to(device),
                              None if mask is None else mask.to(device))
            preds.append(logits.argmax(dim=-1).cpu())
            labels.append(batch["label"].cpu())
    finally:
        model.train(was_training)
    return torch.cat(preds), torch.cat(labels)


__all__ = ["LoRALinear", "POOLINGS", "SequenceClassifier", "apply_lora",
           "classification_loss", "fixed_split", "freeze_backbone",
           "hidden_states", "merge_lora", "pool", "predict", "text_classification_data",
           "TextClassificationData"]
