"""Plans: what happens to each layer, as plain data that round-trips through JSON.

A recipe resolves into a plan `{layer name: LayerPlan}` per component; the plan, not the recipe, is
what a checkpoint re-applies onto a fresh skeleton, and what a diffusers `config.json` carries as its
`quantization_config` (so `save_pretrained` / `from_pretrained` keep the quantization). Once layers
are quantized, their plan is read back from the modules (`dmquant.state.plan_of`), never kept in step
by hand.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import QuantSpec

FORMAT_VERSION = 1
QUANT_METHOD = "dmquant"


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer: a quantized class with weight/input specs, or attention specs."""

    kind: str  # "layer" | "attention"
    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    # What the transform steps left on the layer (dmquant.transforms), re-created on load:
    smooth: str | None = None  # "online": x / s before the input quantizer; "folded": the previous op divides
    output_scale: bool = False  # outputs carry 1/s of the next layer's folded smoothing
    rotation: str | None = None  # input rotation: "hadamard" | "random" online, "folded:hadamard:<b>" upstream
    output_rotation: str | None = None  # outputs carry a rotation folded for the next layer
    lowrank_rank: int = 0  # SVD branch rank (SVDQuant), kept in the model's float dtype
    lora: tuple[tuple[str, int], ...] = ()  # merged LoRA adapters (name, rank), after the SVD ranks
    vq: tuple[int, int] | None = None  # (bits, dim): a codebook + packed indices replace the weight (VQ4DiT)


# Transform records (smoothing, rotation, low-rank branch, LoRA) are written only where set, so plans
# without them read as before and checkpoints older than them load with the defaults.
_EXTRA = [f for f in dataclasses.fields(LayerPlan) if f.name not in ("kind", "weight", "input")]


def plan_to_json(plan: dict[str, LayerPlan]) -> dict[str, Any]:
    spec = lambda s: None if s is None else s.__dict__.copy()  # noqa: E731
    return {n: {"kind": p.kind, "weight": spec(p.weight), "input": spec(p.input),
                **{f.name: getattr(p, f.name) for f in _EXTRA if getattr(p, f.name) != f.default}}
            for n, p in plan.items()}


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def plan_from_json(data: dict[str, Any]) -> dict[str, LayerPlan]:
    spec = lambda s: None if s is None else QuantSpec.from_dict(s)  # noqa: E731
    return {n: LayerPlan(p["kind"], spec(p["weight"]), spec(p["input"]),
                         **{f.name: _tuples(p[f.name]) for f in _EXTRA if f.name in p})
            for n, p in data.items()}
