"""Units of block-wise algorithms (BRECQ reconstruction, feature distillation): which blocks of a
denoiser are optimised together, and the weight-quantized layers inside each."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from ..families import blocks_for
from ..nn.qmodule import QuantModule


@dataclass(eq=False)
class Unit:
    """What is reconstructed together: a block (or a lone layer) and its weight-quantized layers."""

    name: str
    module: nn.Module
    layers: dict[str, QuantModule]


def find_units(modules: Sequence[nn.Module], blocks: Sequence[str] | None = None,
               skip: str | None = None) -> list[Unit]:
    """Blocks (outermost modules whose name matches a pattern) with their non-skipped weight-quantized
    layers, then each such layer outside all blocks on its own. Names are `{component index}.{path}`;
    `blocks` defaults to each component's family patterns (`dmquant.families.blocks_for`)."""
    units, lone = [], []
    for i, root in enumerate(modules):
        patterns = blocks_for(root) if blocks is None else tuple(blocks)
        named = dict(root.named_modules())
        heads: list[str] = []
        for name in named:  # pre-order: ancestors come first, so the outermost match wins
            if name and any(re.search(p, name) for p in patterns) and not any(name.startswith(h + ".") for h in heads):
                heads.append(name)
        layers = {n: m for n, m in named.items() if isinstance(m, QuantModule) and m.weight_quantizer is not None
                  and m.weight_quantizer.enabled and not (skip and re.search(skip, n))}
        inner = {h: {f"{i}.{n}": m for n, m in layers.items() if n.startswith(h + ".")} for h in heads}
        units += [Unit(f"{i}.{h}", named[h], inner[h]) for h in heads if inner[h]]
        lone += [Unit(f"{i}.{n}", m, {f"{i}.{n}": m}) for n, m in layers.items()
                 if not any(n == h or n.startswith(h + ".") for h in heads)]
    return units + lone
