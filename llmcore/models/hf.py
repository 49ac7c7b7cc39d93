"""GPT-2's weights in llmcore's GPT and back: the Hugging Face ``GPT2LMHeadModel``.

The two models compute the same function (Radford et al. 2019): learned positions,
pre-LN blocks, a GELU MLP four times as wide, a final LayerNorm and an output layer
tied to the token embedding. What differs is only how the weights are kept:

- Hugging Face stores each linear layer as a ``Conv1D`` whose weight is (in, out),
  the transpose of ``nn.Linear``'s (out, in): every matrix is transposed on the way.
- Its q, k, v projection ``c_attn`` is one matrix whose outputs are [q | k | v],
  the same order as llmcore's fused ``qkv_proj``.
- GPT-2's MLP uses the tanh approximation of GELU ("gelu_new") and LayerNorms with
  ``layer_norm_epsilon``: llmcore's ``GPTConfig(activation="gelu_tanh",
  norm_eps=...)``, with biases everywhere (``bias=True``).
- A state dict does not say how many heads there are; GPT-2's models all use heads
  of 64, which is the default when no ``GPT2Config`` comes with it.

These functions only translate: :meth:`llmcore.models.gpt.GPT.from_hf`, ``to_hf``
and ``from_pretrained`` build the models. ``transformers`` is needed only by
:func:`to_hf` and :func:`download`, and imported there.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import nn

# llmcore name -> Hugging Face name (inside "transformer."), per block and overall;
# True: a Conv1D weight, transposed on the way.
BLOCK = {"norm1.weight": ("ln_1.weight", False), "norm1.bias": ("ln_1.bias", False),
         "self_attn.qkv_proj.weight": ("attn.c_attn.weight", True),
         "self_attn.qkv_proj.bias": ("attn.c_attn.bias", False),
         "self_attn.out_proj.weight": ("attn.c_proj.weight", True),
         "self_attn.out_proj.bias": ("attn.c_proj.bias", False),
         "norm2.weight": ("ln_2.weight", False), "norm2.bias": ("ln_2.bias", False),
         "ffn.linear1.weight": ("mlp.c_fc.weight", True),
         "ffn.linear1.bias": ("mlp.c_fc.bias", False),
         "ffn.linear2.weight": ("mlp.c_proj.weight", True),
         "ffn.linear2.bias": ("mlp.c_proj.bias", False)}
TOP = {"tok_emb.weight": "wte.weight", "pos_emb.weight": "wpe.weight",
       "ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"}
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu": "gelu"}  # Hugging Face's name -> GPTConfig.activation
HEAD_SIZE = 64  # every released GPT-2 (768/12, 1024/16, 1280/20, 1600/25)
# GPTConfig options (where this llmcore has them) and GPT-2's only value of each
GPT2_ONLY = {"pos": "learned", "norm": "layernorm", "qk_norm": False,
             "tie_weights": True, "moe": None}


def _check_hf_config(config: Any) -> None:
    """Refuse a GPT2Config whose model llmcore's GPT does not compute."""
    problems = []
    if getattr(config, "model_type", "gpt2") != "gpt2":
        problems.append(f"model_type={config.model_type!r} (not GPT-2)")
    if config.activation_function not in ACTIVATIONS:
        problems.append(f"activation_function={config.activation_function!r}")
    if config.n_inner not in (None, 4 * config.n_embd):
        problems.append(f"n_inner={config.n_inner} (llmcore's MLP is 4 * n_embd)")
    if not getattr(config, "scale_attn_weights", True) or getattr(
            config, "scale_attn_by_inverse_layer_idx", False):
        problems.append("a different attention scaling")
    if getattr(config, "add_cross_attention", False):
        problems.append("cross-attention")
    if problems:
        raise ValueError("this GPT-2 variant does not fit llmcore's GPT: "
                         + "; ".join(problems))


def from_hf(source: nn.Module | Mapping[str, torch.Tensor], config: Any = None
            ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(GPTConfig fields, llmcore state dict)`` from a ``GPT2LMHeadModel`` (or
    ``GPT2Model``), or from a state dict with its ``GPT2Config`` (or none: GPT-2's
    GELU, epsilon 1e-5 and heads of 64)."""
    if isinstance(source, nn.Module):
        config = getattr(source, "config", config)
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise ValueError(f"from_hf takes a GPT2LMHeadModel or its state dict, got "
                         f"{type(source).__name__}")
    sd = {k.removeprefix("transformer."): v for k, v in source.items()}
    if "wte.weight" not in sd or "wpe.weight" not in sd:
        raise ValueError("not a GPT-2 state dict: it has no wte.weight/wpe.weight "
                         f"(keys: {sorted(sd)[:5]}...)")
    (vocab, width), block_size = sd["wte.weight"].shape, sd["wpe.weight"].shape[0]
    n_layer = 1 + max((int(m.group(1)) for k in sd
                       if (m := re.match(r"h\.(\d+)\.", k))), default=-1)
    head = sd.get("lm_head.weight")
    if head is not None and not torch.equal(head, sd["wte.weight"]):
        raise ValueError("the output layer (lm_head) is not tied to the token "
                         "embedding (wte), as llmcore's GPT ties them")
    if config is not None:
        _check_hf_config(config)
    if config is None and width % HEAD_SIZE:
        raise ValueError(f"n_embd={width} is not a multiple of GPT-2's head size "
                         f"{HEAD_SIZE}: pass the model's GPT2Config as config=")
    fields = {"vocab_size": vocab, "block_size": block_size, "n_layer": n_layer,
              "n_head": config.n_head if config is not None else width // HEAD_SIZE,
              "n_embd": width, "bias": True,
              "dropout": config.resid_pdrop if config is not None else 0.0,
              "activation": ACTIVATIONS[config.activation_function]
              if config is not None else "gelu_tanh",
              "norm_eps": config.layer_norm_epsilon if config is not None else 1e-5}
    state = {mine: sd[theirs] for mine, theirs in TOP.items()}
    state["lm_head.weight"] = sd["wte.weight"]
    for i in range(n_layer):
        for mine, (theirs, conv) in BLOCK.items():
            w = sd[f"h.{i}.{theirs}"]
            state[f"blocks.{i}.{mine}"] = w.t() if conv else w
    return fields, state


def to_hf(fields: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A ``GPT2LMHeadModel`` computing what the llmcore GPT with these config
    ``fields`` and ``state`` computes (a model without biases gets zero biases)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise ImportError("GPT.to_hf needs transformers: pip install transformers"
                          ) from None
    act = {v: k for k, v in ACTIVATIONS.items() if k != "gelu_pytorch_tanh"}
    odd = [f"{k}={fields[k]!r}" for k, v in GPT2_ONLY.items()
           if k in fields and fields[k] != v]
    if fields["activation"] not in act or odd:
        raise ValueError("GPT-2 has learned positions, LayerNorm, a GELU MLP and a "
                         "tied output layer; this model has "
                         + ", ".join(odd or [f"activation={fields['activation']!r}"]))
    gpt2 = fields["vocab_size"] == 50257  # keep GPT-2's <|endoftext|> id
    config = GPT2Config(
        vocab_size=fields["vocab_size"], n_positions=fields["block_size"],
        n_embd=fields["n_embd"], n_layer=fields["n_layer"], n_head=fields["n_head"],
        activation_function=act[fields["activation"]],
        layer_norm_epsilon=fields["norm_eps"], resid_pdrop=fields["dropout"],
        embd_pdrop=fields["dropout"], attn_pdrop=fields["dropout"],
        tie_word_embeddings=True, bos_token_id=50256 if gpt2 else None,
        eos_token_id=50256 if gpt2 else None)
    weight = state["tok_emb.weight"]
    model = GPT2LMHeadModel(config).to(device=weight.device, dtype=weight.dtype)
    sd = {f"transformer.{theirs}": state.get(mine) for mine, theirs in TOP.items()}
    for i in range(fields["n_layer"]):
        for mine, (theirs, conv) in BLOCK.items():
            w = state.get(f"blocks.{i}.{mine}")
            sd[f"transformer.h.{i}.{theirs}"] = w.t() if conv and w is not None else w
    params = dict(model.named_parameters())
    for name, w in sd.items():
        if w is None:  # a bias or LayerNorm shift llmcore's model was built without
            sd[name] = torch.zeros_like(params[name])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    lost = [k for k in missing if k in params and k != "lm_head.weight"]
    if lost or unexpected:
        raise RuntimeError(f"the weights do not fit GPT2LMHeadModel: missing {lost}, "
                           f"unexpected {unexpected}")
    return model


def download(name: str) -> nn.Module:
    """``GPT2LMHeadModel.from_pretrained(name)`` ("gpt2", "gpt2-medium",
    "gpt2-large", "gpt2-xl"), with a clear error where it cannot be had."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise ImportError("GPT.from_pretrained needs transformers: pip install "
                          "transformers (Colab has it)") from None
    try:
        return GPT2LMHeadModel.from_pretrained(name)
    except Exception as err:  # offline, unknown name, hub down: all say the same
        raise RuntimeError(
            f"could not load {name!r} from the Hugging Face Hub ({type(err).__name__}"
            f": {str(err)[:200]}). Downloading GPT-2's weights needs a network "
            "connection (Colab has one); offline, train a model here (python -m "
            "llmcore.train) or pass a GPT2LMHeadModel you have to GPT.from_hf"
        ) from None
