"""Collectives that carry 8 bits per value: FP8 or int8 codes with block scales.

A tensor travels as one byte per value plus one fp32 scale per block of ``block``
consecutive values (the fine-grained scaling of DeepSeek-V3, 2024, section 3.3), so
an outlier spoils the precision of its own block only. Against bf16 that is half the
bytes, plus 4 / ``block`` bytes per value for the scales.

* :func:`quantized_all_gather`: every rank encodes its own shard once; the codes and
  scales are gathered and decoded. This is the FP8 all-gather of sharded weights
  (torchao's float8 all-gather for FSDP2).
* :func:`quantized_reduce_scatter`: a sum cannot be taken in 8 bits (int8 sums
  overflow, and two ranks' scales differ). So each rank encodes the N chunks of its
  tensor, an all-to-all hands chunk j of every rank to rank j, and rank j decodes
  them and sums in fp32: the quantised gradient reduce-scatter of ZeRO++ (Wang et
  al. 2023, "ZeRO++", qgZ). It moves what a reduce-scatter moves, (N-1)/N of the
  input, in 8 bits.
* :func:`quantized_all_reduce`: the two in a row (the reduced chunk is encoded again
  for the all-gather), an all-reduce of int8 or FP8 whose traffic per rank does not
  grow with N.

Formats: ``"e4m3"`` and ``"e5m2"`` (FP8, scaled so a block's largest magnitude maps
onto the format's largest value) and ``"int8"`` (symmetric, onto 127).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcore.parallel.comm import Comm

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "int8": torch.int8}


def _check(fmt: str, block: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int (values per scale), "
                         f"got {block!r}")


def encode(x: torch.Tensor, fmt: str = "e4m3", block: int = 128,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` for the rows of ``x`` (..., n): uint8 codes (..., n) and
    fp32 scales (..., ceil(n / block)), with ``x ~= code / scale`` per block."""
    _check(fmt, block)
    n = x.shape[-1]
    blocks = F.pad(x.float(), (0, -n % block)).unflatten(-1, (-1, block))
    top = 127.0 if fmt == "int8" else torch.finfo(FORMATS[fmt]).max
    # the block's largest magnitude onto the format's largest value (an all-zero
    # block keeps a finite scale)
    scale = top / blocks.abs().amax(-1, keepdim=True).clamp(min=1e-30)
    scaled = (blocks * scale).clamp(-top, top)  # e5m2's cast would overflow to inf
    codes = (scaled.round() if fmt == "int8" else scaled).to(FORMATS[fmt])
    codes = codes.flatten(-2)[..., :n].contiguous()  # the padding is not sent
    return codes.view(torch.uint8), scale.squeeze(-1).contiguous()


def decode(codes: torch.Tensor, scales: torch.Tensor, fmt: str = "e4m3",
           block: int = 128) -> torch.Tensor:
    """The fp32 values of :func:`encode`'s ``(codes, scales)``."""
    _check(fmt, block)
    n = codes.shape[-1]
    values = codes.view(FORMATS[fmt]).float()
    blocks = F.pad(values, (0, -n % block)).unflatten(-1, (-1, block))
    return (blocks / scales.unsqueeze(-1)).flatten(-2)[..., :n]


def quantized_all_gather(comm: Comm, shard: torch.Tensor, fmt: str = "e4m3",
                         block: int = 128) -> torch.Tensor:
    """Every rank's 1-d ``shard`` (equal sizes), in rank order, through 8-bit codes:
    fp32, (N * numel,)."""
    codes, scales = encode(shard, fmt, block)
    n = comm.world_size
    all_codes = codes.new_empty(n * codes.numel())
    all_scales = scales.new_empty(n * scales.numel())
    comm.all_gather(all_codes, codes)
    comm.all_gather(all_scales, scales)
    return decode(all_codes.view(n, -1), all_scales.view(n, -1), fmt, block).flatten()


def quantized_reduce_scatter(comm: Comm, full: torch.Tensor, fmt: str = "e4m3",
                             block: int = 128) -> torch.Tensor:
    """This rank's chunk of the sum over ranks of the 1-d ``full`` (numel divisible
    by N): each rank's chunks encoded, exchanged all-to-all, decoded and summed in
    fp32."""
    n = comm.world_size
    if full.dim() != 1 or full.numel() % n:
        raise ValueError(f"full must be 1-d with a size divisible by {n} ranks, got "
                         f"shape {tuple(full.shape)}; pad it first")
    codes, scales = encode(full.view(n, -1), fmt, block)  # row j: rank j's chunk
    got_codes, got_scales = torch.empty_like(codes), torch.empty_like(scales)
    comm.all_to_all(got_codes, codes)
    comm.all_to_all(got_scales, scales)
    return decode(got_codes, got_scales, fmt, block).sum(0)  # in fp32


def quantized_all_reduce(comm: Comm, t: torch.Tensor, fmt: str = "int8",
                         block: int = 128) -> torch.Tensor:
    """The sum of ``t`` over ranks (fp32, ``t``'s shape): a quantised reduce-scatter,
    then a quantised all-gather of the reduced chunks."""
    n = comm.world_size
    flat = F.pad(t.reshape(-1), (0, -t.numel() % n))
    mine = quantized_reduce_scatter(comm, flat, fmt, block)
    return quantized_all_gather(comm, mine, fmt, block)[:t.numel()].view(t.shape)


def quantized_payload(numel: int, world_size: int, block: int = 128) -> dict:
    """Bytes one rank hands in for an all-gather of shards of ``numel`` values per
    rank, or a reduce-scatter of ``world_size`` such chunks: a byte per value and 4
    per block of each chunk (the cost model of the functions above)."""
    per_chunk = numel + 4 * -(-numel // block)
    return {"all_gather": world_size * per_chunk, "all_to_all": world_size * per_chunk}
