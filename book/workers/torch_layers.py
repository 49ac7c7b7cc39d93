"""PyTorch's own Transformer layers read into the book's blocks, to compare the two.

Chapter 5 and the tests check the book's encoder and decoder blocks against
``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer``: the same weights in
both, the same outputs. The blocks name their parameters as PyTorch does (norm1,
linear1, ...), so only the attention's packed projection needs splitting.
"""

from __future__ import annotations

from torch import nn

from llmcore.nn.blocks import DecoderBlock, SelfAttentionBlock


def load_torch_weights(block: SelfAttentionBlock | DecoderBlock,
                       layer: nn.Module) -> None:
    """Copy an ``nn.TransformerEncoderLayer``/``DecoderLayer`` into ``block``, in place.

    PyTorch packs the q, k, v projections into one (3C, C) ``in_proj_weight``; split
    into q, k, v here, they load into either layout (separate or fused). Everything
    else has the same name.
    """
    attns = [("self_attn", "self_attn")]
    if isinstance(block, DecoderBlock):
        attns.append(("cross_attn", "multihead_attn"))
    state = {}
    ref = layer.state_dict()
    for mine, theirs in attns:
        c = getattr(block, mine).d_model
        for name in ("weight", "bias"):
            packed = ref.get(f"{theirs}.in_proj_{name}")
            if packed is None:
                continue
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                state[f"{mine}.{proj}.{name}"] = packed[i * c:(i + 1) * c]
            state[f"{mine}.out_proj.{name}"] = ref[f"{theirs}.out_proj.{name}"]
    for key, value in ref.items():
        if key.startswith(("linear1", "linear2")):
            state[f"ffn.{key}"] = value
        elif key.startswith("norm"):
            state[key] = value
    block.load_state_dict(state)
