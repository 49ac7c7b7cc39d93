"""Beam search for ``llmcore``'s encoder-decoder (Wu et al., "Google's Neural Machine
Translation System", 2016, for the length penalty).

Greedy decoding keeps one prefix; beam search keeps the ``beam_size`` most probable
prefixes and extends each by every token. A hypothesis that emits ``eos_id`` is set
aside as finished; a source is done once it has ``beam_size`` finished hypotheses
(or after ``max_new_tokens``, when the unfinished ones count as they are). The winner
maximises ``log p / lp(n)`` with ``lp(n) = ((5 + n) / 6) ** length_penalty``, ``n``
the tokens written after ``<bos>``: ``length_penalty=0`` ranks by raw log-probability,
which favours short outputs. Padding is never emitted (as in
``EncoderDecoder.generate``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from llmcore.models.seq2seq import EncoderDecoder, padding_mask
from llmcore.nn import KVCache


class BeamOutput(NamedTuple):
    tokens: Tensor  # (B, 1 + n) <bos>, the best hypothesis, then padding
    logprob: Tensor  # (B,) its summed log-probability
    score: Tensor  # (B,) logprob / lp(length), the quantity the search maximised


def length_norm(n: int, alpha: float) -> float:
    """GNMT length penalty lp(n) = ((5 + n) / 6) ** alpha."""
    return ((5 + n) / 6) ** alpha


def _next_logprobs(logits: Tensor, pad_id: int) -> Tensor:
    """Log-probabilities of the next token with padding forbidden (it is never real)."""
    logits = logits.float().clone()
    logits[..., pad_id] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def sequence_logprob(model: EncoderDecoder, src: Tensor, tgt: Tensor, eos_id: int
                     ) -> Tensor:
    """Summed log p(tgt[:, 1:] | src) of (B, 1 + n) outputs, up to and with ``eos_id``.

    Scores the outputs of ``generate`` or ``beam_search`` on the same footing.
    """
    pad = model.cfg.pad_id
    logp = _next_logprobs(model(src, tgt[:, :-1]), pad)  # (B, n, V)
    out = tgt[:, 1:]
    picked = logp.gather(-1, out[..., None]).squeeze(-1)  # (B, n)
    is_eos = (out == eos_id).long()
    after_eos = is_eos.cumsum(-1) - is_eos > 0  # an <eos> came strictly before
    return picked.masked_fill(after_eos | (out == pad), 0.0).sum(-1)


@torch.no_grad()
def beam_search(model: EncoderDecoder, src: Tensor, bos_id: int, eos_id: int,
                max_new_tokens: int, beam_size: int = 4,
                length_penalty: float = 0.6) -> BeamOutput:
    """Beam search for each row of a (B, S) source; see the module docstring.

    ``beam_size=1`` is greedy decoding. Every source is searched independently, so
    the result of a row does not depend on the others in the batch.
    """
    cfg = model.cfg
    if src.dim() != 2 or src.dtype != torch.long:
        raise ValueError(f"src must be a (B, S) tensor of int64 token ids; got "
                         f"{tuple(src.shape)} {src.dtype} (use src[None] for one line)")
    if beam_size < 1 or max_new_tokens < 1:
        raise ValueError(f"beam_size={beam_size} and max_new_tokens={max_new_tokens} "
                         "must both be >= 1")
    if cfg.pad_id in (bos_id, eos_id) or not 0 <= eos_id < cfg.tgt_vocab:
        raise ValueError(f"bos_id={bos_id}, eos_id={eos_id} must be target ids in "
                         f"[0, {cfg.tgt_vocab}) other than pad_id={cfg.pad_id}")
    B, K, dev = src.shape[0], beam_size, src.device
    memory = model.encoder(src).repeat_interleave(K, 0)  # (B*K, S, C)
    mem_mask = padding_mask(src, cfg.pad_id).repeat_interleave(K, 0)
    seqs = torch.full((B * K, 1), bos_id, dtype=torch.long, device=dev)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start equal: keep one so candidates are distinct
    caches = [KVCache() for _ in model.decoder.layers]
    finished: list[list[tuple[float, float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(1, max_new_tokens + 1):
        logits = model.decoder(seqs[:, -1:], memory, mem_mask, kv_caches=caches)
        logp = _next_logprobs(logits[:, -1], cfg.pad_id)  # (B*K, V)
        V = logp.shape[-1]
        cand = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
        top, idx = cand.topk(min(2 * K, K * V), dim=-1)  # (B, 2K): >= K not <eos>
        top, idx = top.tolist(), idx.tolist()
        keep_beam, keep_tok, keep_score = [], [], []
        for b in range(B):
            live = []
            for rank, (s, i) in enumerate(zip(top[b], idx[b])):
                if done[b] or len(live) == K or s == float("-inf"):
                    break
                beam, tok = divmod(i, V)
                if tok == eos_id:
                    # Only an <eos> ranked among the best K competes, as in GNMT.
                    if rank < K:
                        hyp = seqs[b * K + beam, 1:].tolist() + [tok]
                        finished[b].append((s / length_norm(step, length_penalty),
                                            s, hyp))
                else:
                    live.append((beam, tok, s))
            done[b] = done[b] or len(finished[b]) >= K
            live += [(0, bos_id, float("-inf"))] * (K - len(live))  # dead fillers
            for beam, tok, s in live:
                keep_beam.append(b * K + beam)
                keep_tok.append(tok)
                keep_score.append(s)
        if all(done):
            break
        sel = torch.tensor(keep_beam, device=dev)
        for c in caches:  # each surviving beam continues from its parent's keys/values
            c.reorder(sel)
        seqs = torch.cat([seqs[sel], torch.tensor(keep_tok, device=dev)[:, None]], 1)
        scores = torch.tensor(keep_score, device=dev).view(B, K)
    for b in range(B):  # out of steps: unfinished beams compete as they are
        if not done[b]:
            n = seqs.shape[1] - 1
            for k in range(K):
                s = scores[b, k].item()
                if s > float("-inf"):
                    finished[b].append((s / length_norm(n, length_penalty), s,
                                        seqs[b * K + k, 1:].tolist()))
    best = [max(f, key=lambda h: h[0]) for f in finished]
    width = 1 + max(len(h[2]) for h in best)
    tokens = torch.full((B, width), cfg.pad_id, dtype=torch.long, device=dev)
    tokens[:, 0] = bos_id
    for b, (_, _, hyp) in enumerate(best):
        tokens[b, 1:1 + len(hyp)] = torch.tensor(hyp, dtype=torch.long)
    return BeamOutput(tokens, torch.tensor([h[1] for h in best]),
                      torch.tensor([h[0] for h in best]))
