"""GPT-2 124M for the gpu tier of the generation and fine-tuning chapters.

Where the weights can be downloaded (a GPU on Colab), chapters 9, 22 and 25 also run
their experiment from GPT-2's released weights (Radford et al. 2019), loaded into
llmcore's own GPT (``GPT.from_pretrained``, ``llmcore.models.hf``) with GPT-2's own
tokenizer read by llmcore's BPE (``llmcore.tokenizer.gpt2``). The cpu tier, and a
machine without a network, keep the chapters' small models, and say so.

A chapter declares the model as a gpu-tier preset, ``Tiered(cpu=None, gpu=GPT2)``,
so that the plan of the gpu tier (``tools.bench.plan``) counts it (a fine-tuning
page adds its batch, steps and ``max_len``); the shape it declares is checked
against the model that arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmcore.accounting import count_params
from llmcore.apps.finetune import TextClassificationData
from llmcore.models.gpt import GPT
from llmcore.tokenizer import BPETokenizer
from llmcore.tokenizer.gpt2 import gpt2_tokenizer

# GPT-2 124M as a preset: the name on the Hugging Face Hub and the shape it has.
GPT2 = dict(name="gpt2", n_layer=12, n_head=12, n_embd=768, vocab_size=50257,
            block_size=1024)
EOT = "<|endoftext|>"  # GPT-2's one special token: ends a document
SHAPE = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")


def pretrained(rt, preset: dict | None):
    """``(model, tokenizer)`` of ``preset`` on ``rt.device`` in eval mode, or None
    (the cpu tier's ``preset`` is None; or the weights cannot be had), saying which."""
    if preset is None:
        print(f"{rt.tier} tier: the small model above; the gpu tier also starts from "
              "GPT-2 124M where its weights can be downloaded (Colab)")
        return None
    try:
        model, tok = GPT.from_pretrained(preset["name"]), gpt2_tokenizer(preset["name"])
    except (ImportError, RuntimeError) as err:
        print(f"GPT-2's weights cannot be had here, so this page keeps its small model "
              f"({str(err).splitlines()[0][:300]})")
        return None
    declared = {k: v for k, v in preset.items() if k in SHAPE}
    shape = {k: getattr(model.config, k) for k in declared}
    if shape != declared or tok.vocab_size != model.config.vocab_size:
        raise ValueError(f"{preset['name']} arrived as {shape} with a tokenizer of "
                         f"{tok.vocab_size} ids, not the declared {preset}")
    print(f"{preset['name']}: {count_params(model) / 1e6:.0f}M parameters, GPT-2's "
          "released weights in llmcore's GPT, and its tokenizer")
    return model.to(rt.device).eval(), tok


@dataclass
class GPT2ClassificationData(TextClassificationData):
    """Sentences in GPT-2's tokens: ``<|endoftext|>`` ends each one (the token the
    classifier's last position reads) and pads the batches."""

    @property
    def pad_id(self) -> int:
        return self.tokenizer.special_tokens[EOT]


def classification_data(data: TextClassificationData, tok: BPETokenizer,
                        max_len: int = 64) -> GPT2ClassificationData:
    """``data``'s split and labels, each sentence encoded with GPT-2's tokenizer."""
    eot = tok.special_tokens[EOT]
    examples = {split: [{"input_ids": tok.encode(text, allow_special=False)
                         [:max_len - 1] + [eot], "label": e["label"]}
                        for text, e in zip(data.texts[split], rows)]
                for split, rows in data.examples.items()}
    longest = max(len(e["input_ids"]) for rows in examples.values() for e in rows)
    return GPT2ClassificationData(tok, examples, dict(data.texts), longest)
