"""Masked language modelling: BERT's corruption of a batch of token ids.

Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding" (2019), section 3.1: choose 15% of the positions; of those, replace
80% by ``[MASK]``, 10% by a random token and keep 10% unchanged. The model must predict
the original token at every chosen position, and only there. The random and unchanged
10% keep the model from learning that only ``[MASK]`` positions matter, since
``[MASK]`` never appears when the model is fine-tuned.

Public API::

    mask_tokens(ids, mask_id, vocab_size, special_ids=(), p=0.15, generator=None,
                keep_frac=0.1, random_frac=0.1) -> (inputs, labels)

``ids`` is an integer tensor of any shape (usually ``(B, T)``), on any device.
``inputs`` has the same shape, dtype and device and holds the corrupted ids;
``labels`` (int64, same shape) holds the original id at every chosen position and
``-100`` (``IGNORE_INDEX``, what ``F.cross_entropy`` ignores by default) elsewhere.
Positions holding an id from ``special_ids`` (padding, ``[CLS]``, ``[SEP]``, ...)
are never chosen, and the random replacement never draws a special id nor
``mask_id``. Random numbers come from ``generator`` (a ``torch.Generator`` on any
device; the draws are made on its device and then moved), so a seeded CPU generator
gives the same masks on every device.
"""

from __future__ import annotations

from typing import Iterable

import torch

from llmcore.config import IGNORE_INDEX


def _draw_device(generator: torch.Generator | None, fallback: torch.device):
    return generator.device if generator is not None else fallback


def mask_tokens(ids: torch.Tensor, mask_id: int, vocab_size: int,
                special_ids: Iterable[int] = (), p: float = 0.15,
                generator: torch.Generator | None = None, keep_frac: float = 0.1,
                random_frac: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: ``(inputs, labels)`` with labels ``-100`` where not chosen.

    Each non-special position is chosen independently with probability ``p``; a
    chosen position becomes ``mask_id`` with probability ``1 - keep_frac -
    random_frac``, a uniformly drawn non-special id with ``random_frac``, and stays as
    it is with ``keep_frac``.
    """
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point \
            or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer torch.Tensor, got "
                         f"{getattr(ids, 'dtype', type(ids))}")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p={p} must lie in (0, 1]: the fraction of positions chosen")
    if keep_frac < 0 or random_frac < 0 or keep_frac + random_frac > 1:
        raise ValueError(f"keep_frac={keep_frac} and random_frac={random_frac} must be "
                         "non-negative and sum to at most 1 (BERT uses 0.1 and 0.1)")
    special = sorted(set(int(s) for s in special_ids) | {int(mask_id)})
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id={mask_id} must be an id in [0, vocab_size="
                         f"{vocab_size})")
    if any(not 0 <= s < vocab_size for s in special):
        raise ValueError(f"special_ids={special} must all lie in [0, {vocab_size})")
    if ids.numel():
        lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one device sync, not two
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"ids must lie in [0, vocab_size={vocab_size}), got "
                             f"values in [{lo}, {hi}]")
    ordinary = torch.ones(vocab_size, dtype=torch.bool)
    ordinary[special] = False
    ordinary_ids = ordinary.nonzero().squeeze(1)  # ids a random replacement may take
    if random_frac > 0 and len(ordinary_ids) == 0:
        raise ValueError("every id is special: no id left for random replacements")

    dev = _draw_device(generator, ids.device)
    # Two uniforms per position: one decides "chosen?", one decides mask/random/keep.
    u_choose = torch.rand(ids.shape, generator=generator, device=dev).to(ids.device)
    u_kind = torch.rand(ids.shape, generator=generator, device=dev).to(ids.device)
    random_tokens = ids  # stays unused when random_frac is 0 and every id is special
    if len(ordinary_ids):
        pick = torch.randint(len(ordinary_ids), ids.shape, generator=generator,
                             device=dev)
        random_tokens = ordinary_ids.to(dev)[pick].to(ids.device, ids.dtype)

    is_special = torch.isin(ids, torch.tensor(special, device=ids.device))
    chosen = (u_choose < p) & ~is_special
    to_mask = chosen & (u_kind < 1.0 - keep_frac - random_frac)
    to_random = chosen & ~to_mask & (u_kind < 1.0 - keep_frac)

    inputs = ids.clone()
    inputs[to_mask] = mask_id
    inputs[to_random] = random_tokens[to_random]
    # int64 labels whatever the dtype of ids: F.cross_entropy wants them long.
    labels = torch.where(chosen, ids.long(), IGNORE_INDEX)
    return inputs, labels
