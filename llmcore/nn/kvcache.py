"""The KV cache: keys and values of the positions a decoder has already seen.

One cache per attention layer. Generation prefills the prompt once (all its positions,
causally) and then feeds one token at a time; each new query attends to every cached
position, so a step costs one position's projections instead of the whole prefix.

Two layouts, one class:

- **growing** (``KVCache()``): ``update`` appends with ``torch.cat``, so the tensors
  have a new shape every token. Simple; what beam search reorders with
  :meth:`KVCache.reorder`.
- **static** (``KVCache(max_len)``): two (B, nh, max_len, hs) buffers allocated once,
  at the first update, and written in place at the current position (``index_copy_``
  with a position tensor on the device). With ``fixed_shapes=True`` attention reads
  all ``max_len`` slots and :meth:`key_mask` hides the ones not written yet, so every
  decode step sees tensors of the same shapes at the same addresses: what
  ``torch.compile`` needs to compile the step once and CUDA graphs need to replay it.
  With ``fixed_shapes=False`` attention reads only the written prefix (a view of the
  buffers), less work for an eager step when ``max_len`` is much longer than the text.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """``update(k, v)`` stores the new positions' keys and values (B, nh, T_new, hs)
    and returns what attention should read; ``len(cache)`` counts the stored positions.
    """

    def __init__(self, max_len: int | None = None, fixed_shapes: bool = True):
        if max_len is not None and (isinstance(max_len, bool)
                                    or not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"max_len must be a positive int (static cache) or None "
                             f"(growing cache), got {max_len!r}")
        self.max_len = max_len  # None: grow with torch.cat; else preallocated buffers
        self.fixed_shapes = fixed_shapes  # static: read all max_len slots, masked
        self.reset()

    @property
    def static(self) -> bool:
        return self.max_len is not None

    def reset(self) -> None:
        """Forget every position; a static cache keeps its buffers for reuse."""
        self.length = 0  # stored positions, on the host: len() never syncs
        if self.static and getattr(self, "_k", None) is not None:
            self._pos.zero_()
        else:
            self._k = self._v = None

    def __len__(self) -> int:
        return self.length

    # The filled part, (B, nh, len, hs); assignable, as beam search does.
    @property
    def k(self) -> Tensor | None:
        return self._view(self._k)

    @k.setter
    def k(self, value: Tensor) -> None:
        self._assign("_k", value)

    @property
    def v(self) -> Tensor | None:
        return self._view(self._v)

    @v.setter
    def v(self, value: Tensor) -> None:
        self._assign("_v", value)

    def _view(self, buf: Tensor | None) -> Tensor | None:
        if buf is None or not self.static:
            return buf
        return buf[:, :, :self.length]

    def _assign(self, name: str, value: Tensor) -> None:
        if not self.static:
            setattr(self, name, value)
            self.length = value.shape[-2]
            return
        if self._k is None:
            self._allocate(value)
        buf = getattr(self, name)
        n = value.shape[-2]
        if value.shape[:2] != buf.shape[:2] or value.shape[-1] != buf.shape[-1] or (
                n > self.max_len):
            raise ValueError(f"cannot store {tuple(value.shape)} in a static cache of "
                             f"{tuple(buf.shape)}; use reorder(index) to permute rows")
        buf[:, :, :n].copy_(value)  # in place: the buffer keeps its address
        self.length = n
        self._pos.fill_(n)

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (B,) of the batch, in place (beam search's survivors)."""
        if self._k is None:
            return
        if not self.static:
            self._k, self._v = self._k[index], self._v[index]
            return
        self._k.copy_(self._k.index_select(0, index))
        self._v.copy_(self._v.index_select(0, index))

    def _allocate(self, k: Tensor) -> None:
        b, nh, _, hs = k.shape
        shape = (b, nh, self.max_len, hs)
        self._k = torch.zeros(shape, dtype=k.dtype, device=k.device)
        self._v = torch.zeros(shape, dtype=k.dtype, device=k.device)
        self._pos = torch.zeros((), dtype=torch.long, device=k.device)
        self._slots = torch.arange(self.max_len, device=k.device)  # key positions

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, nh, T_new, hs). Returns every stored position, (B, nh, len,
        hs), or with fixed shapes the whole buffers (B, nh, max_len, hs), to be masked
        with :meth:`key_mask`."""
        t_new = k.shape[-2]
        if self.static and self.length + t_new > self.max_len:
            raise ValueError(f"KVCache holds {self.length} positions and got {t_new} "
                             f"more, past max_len={self.max_len}; reset() it or crop "
                             "the sequence")
        ref = self._k
        if self.static and ref is not None and self.length == 0 and (
                k.shape[:2] != ref.shape[:2] or k.shape[-1] != ref.shape[-1]):
            ref = None  # an empty static cache takes a new batch shape
        if ref is not None and (k.shape[:2] != ref.shape[:2]
                                or k.shape[-1] != ref.shape[-1]):
            raise ValueError(f"k has shape {tuple(k.shape)}, expected "
                             f"{tuple(ref.shape[:2])} + (T_new, {ref.shape[-1]}) to "
                             "match the cache; reset() it for a new batch")
        if not self.static:
            if ref is None:
                self._k, self._v = k, v
            else:
                self._k = torch.cat([self._k, k], dim=-2)  # (B, nh, len + T_new, hs)
                self._v = torch.cat([self._v, v], dim=-2)
            self.length += t_new
            return self._k, self._v
        if ref is None:
            self._allocate(k)
        if not self.fixed_shapes:  # eager: a plain slice write, then the prefix
            end = self.length + t_new
            self._k[:, :, self.length:end] = k
            self._v[:, :, self.length:end] = v
            self._pos += t_new
            self.length = end
            return self.k, self.v  # (B, nh, len, hs), views of the buffers
        # Positions as a device tensor: the write and the mask need no host value.
        self._new = self._pos + torch.arange(t_new, device=k.device)  # (T_new,)
        self._k.index_copy_(2, self._new, k.to(self._k.dtype))
        self._v.index_copy_(2, self._new, v.to(self._v.dtype))
        self._pos += t_new
        self.length += t_new
        return self._k, self._v

    def key_mask(self, causal: bool) -> Tensor | None:
        """After :meth:`update`: the boolean (T_new, keys) mask the new queries need
        (True = may attend), or None when every returned key may be read.

        Without fixed shapes: None (the caller shifts the causal mask by the earlier
        positions). With them: the written slots only, and causally if ``causal``.
        """
        if not (self.static and self.fixed_shapes):
            return None  # the caller builds the shifted causal mask (it knows past)
        allowed = self._slots[None, :] <= self._new[:, None]  # (T_new, max_len)
        if not causal:  # every new query sees every written slot, itself included
            allowed = (self._slots <= self._new[-1]).expand(len(self._new), -1)
        return allowed
