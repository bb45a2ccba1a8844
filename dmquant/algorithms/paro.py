"""PAROAttention's offline choice of token order, one per attention head.

Block quantization of Q and K shares one scale per block of tokens; which tokens form a block decides
how far a block's range exceeds its typical token. Visual attention heads are local along different
axes, so the order that groups similar tokens differs per head. This step replays the calibration
trajectory once, lets every reordering attention layer (`AttentionSpec.reorder`) accumulate the
relative block-quantization error of each candidate order per head, and keeps the best order per head
as a buffer (saved with the model). See `dmquant.nn.qattention` for the orders.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from torch import nn

from ..nn.qattention import ORDERS, AttentionQuantizers

log = logging.getLogger(__name__)


def search_token_orders(modules: list[nn.Module], run: Any) -> dict[str, Any]:
    """Recipe step `paro`: per head, the token order with the least Q/K block-quantization error on the
    recorded denoiser calls. Heads that never saw a square token grid keep row-major (-1)."""
    denoiser = modules[0]
    layers = [m for m in denoiser.modules() if isinstance(m, AttentionQuantizers) and m.spec.reorder]
    if not layers:
        raise ValueError("the paro step needs attention quantization with reorder: true (and block_size) in the recipe")
    trajectory = getattr(run, "trajectory", None)
    if trajectory is None or not trajectory.calls:
        raise ValueError("the paro step needs the recorded denoiser trajectory: quantize a pipeline "
                         "(calibration=None, a dict or a CalibrationSet), not a plain callable")
    for layer in layers:
        layer.order_cost.zero_()
        layer.searching = True
    try:
        trajectory.replay(denoiser)
    finally:
        for layer in layers:
            layer.searching = False
    chosen: Counter[str] = Counter()
    for layer in layers:
        seen = layer.order_cost.sum(-1) > 0
        layer.order.copy_(layer.order_cost.argmin(-1).where(seen, -1))
        chosen.update(ORDERS[i] if i >= 0 else "not a square grid" for i in layer.order.tolist())
    log.info("paro: token orders of %d heads in %d attention layers: %s", sum(chosen.values()), len(layers),
             dict(chosen))
    return {"layers": len(layers), "orders": dict(chosen)}
