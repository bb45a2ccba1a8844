"""Independent float64 references for the quantization tests (brute force over every grid value)."""
from __future__ import annotations

import math

import torch

from dmquant.formats import Format


def nearest_on_grid(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Round by enumerating every representable value: nearest in float64, ties to the even code
    (bit pattern with LSB 0), beyond max -> max (nearest), NaN -> NaN, sign of zero kept."""
    table = fmt.decode_table()
    codes = torch.arange(table.numel())
    finite = torch.isfinite(table)
    values, codes = table[finite], codes[finite]
    x64 = x.double().reshape(-1)
    out = torch.empty_like(x64)
    for i, v in enumerate(x64.tolist()):
        if math.isnan(v):
            out[i] = float("nan")
            continue
        dist = (values - v).abs()
        best = dist.min()
        tied = (dist == best).nonzero().reshape(-1)
        even = [j for j in tied.tolist() if int(codes[j]) % 2 == 0]
        pick = values[even[0] if even else int(tied[0])]
        out[i] = math.copysign(abs(float(pick)), v) if pick == 0 else float(pick)
    return out.reshape(x.shape)


def adversarial_inputs(fmt: Format) -> torch.Tensor:
    """Grid values, midpoints between neighbours (rounding boundaries) and nudges around them,
    beyond-max values, tiny subnormal-range values, zeros of both signs."""
    g = fmt.grid()
    mids = (g[1:] + g[:-1]) / 2
    pos = g[g > 0]
    tiny = pos.min().item()
    extra = torch.tensor([0.0, -0.0, fmt.max_value * 1.01, fmt.max_value * 4, -fmt.max_value * 3,
                          tiny / 2, -tiny / 2, tiny / 4, tiny * 0.75, 1e-30, -1e-30], dtype=torch.float64)
    nudged = torch.cat([mids * (1 + 1e-6), mids * (1 - 1e-6)])
    return torch.cat([g, mids, nudged, extra]).float()
