"""Bit packing of element codes: `bits`-wide codes stored densely, LSB first, in uint8 bytes.

Two int4 per byte, four int2 per byte, eight int3 in three bytes, and so on for any width 1-8.
"""
from __future__ import annotations

import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (< 2**bits, any shape) -> flat uint8 tensor of `packed_nbytes` bytes."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() and int(flat.max()) >= 2**bits:
        raise ValueError(f"codes do not fit in {bits} bits (max {int(flat.max())})")
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, cheap vectorised shift-or
        per = 8 // bits
        pad = -flat.numel() % per
        lanes = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, per)
        shifts = torch.arange(per, dtype=torch.uint8) * bits
        return (lanes << shifts).sum(-1, dtype=torch.uint8)
    # General widths: expand to a bit stream, then regroup by 8.
    stream = ((flat.unsqueeze(-1) >> _SHIFTS[:bits]) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8)).reshape(-1, 8)
    return (stream << _SHIFTS).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack`: flat uint8 codes of length `numel`."""
    _check_bits(bits)
    if packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(
            f"packed data has {packed.numel()} bytes, expected {packed_nbytes(numel, bits)} "
            f"for {numel} codes of {bits} bits"
        )
    packed = packed.reshape(-1).to(torch.uint8)
    if bits == 8:
        return packed.clone()
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.uint8) * bits
        return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(-1)[:numel]
    stream = ((packed.unsqueeze(-1) >> _SHIFTS) & 1).reshape(-1)[: numel * bits].reshape(numel, bits)
    return (stream << _SHIFTS[:bits]).sum(-1, dtype=torch.uint8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"can pack 1-8 bit codes, got {bits}")


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer indices (< 2**bits, 1-24 bits wide, e.g. VQ codeword numbers) as a dense LSB-first bit
    stream in uint8 bytes; `pack` for widths above a byte."""
    if not 1 <= bits <= 24:
        raise ValueError(f"can pack 1-24 bit indices, got {bits}")
    flat = indices.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"indices do not fit in {bits} bits (range {int(flat.min())}..{int(flat.max())})")
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((flat.unsqueeze(-1) >> shifts) & 1).to(torch.uint8).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8)).reshape(-1, 8)
    return (stream << _SHIFTS).sum(-1, dtype=torch.uint8)


def unpack_indices(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_indices`: int64 indices of length `numel`."""
    if packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"packed data has {packed.numel()} bytes, expected {packed_nbytes(numel, bits)} "
                         f"for {numel} indices of {bits} bits")
    stream = ((packed.reshape(-1).to(torch.uint8).unsqueeze(-1) >> _SHIFTS) & 1).reshape(-1)[: numel * bits]
    return (stream.reshape(numel, bits).to(torch.int64) << torch.arange(bits, dtype=torch.int64)).sum(-1)
