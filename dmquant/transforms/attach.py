"""Re-creating a layer's transforms from its plan, before a saved state is loaded into it."""
from __future__ import annotations

from typing import Any

from ..nn.qmodule import QuantModule
from .layer import LayerTransform
from .lowrank import LowRankBranch


def attach_transforms(layer: QuantModule, plan: Any) -> None:
    """Re-create the (empty) transform buffers and low-rank branch a LayerPlan names, so that
    load_state_dict assigns them."""
    out_features, in_features = layer.weight_shape[:2]  # no decode: a packed layer has no float weight
    if plan.smooth or plan.output_scale or plan.rotation or plan.output_rotation:
        layer.transform = LayerTransform(in_features, out_features, layer.INPUT_AXIS, plan.smooth, plan.output_scale,
                                         plan.rotation, plan.output_rotation, device=layer.weight_device,
                                         dtype=layer.weight_dtype)
    if plan.lowrank_rank or plan.lora:
        layer.lowrank = LowRankBranch.empty(layer, plan.lowrank_rank, plan.lora)
