"""Merging a user's LoRA into the low-rank branch of an already quantized model, and removing it again.

A LoRA adds scale * B A to a layer's weight. The quantized weight stays as it is: A and B are mapped
into the layer's transformed space (the smoothing scales and rotations the transforms left, see
`LayerTransform.adapter_factors`) and concatenated to its high-precision low-rank branch, whose rank
grows by r: no re-quantization, one more (r, in) + (out, r) pair. Unmerging slices the adapter's ranks
off again, which restores the previous branch exactly. Reads peft / diffusers state dicts
(`<layer>.lora_A[.<adapter>].weight`, `<layer>.lora_B...`, optional `<layer>.alpha`) and the older
`<layer>.lora.down.weight` / `.lora.up.weight` names.

    >>> from peft.utils import get_peft_model_state_dict
    >>> merge_lora(pipe, get_peft_model_state_dict(lora_unet), scale=lora_alpha / r, name="style")
    >>> unmerge_lora(pipe, "style")
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import nn

from ..components import DENOISER_ATTRS
from ..nn.qmodule import QuantModule
from ..state import quantized_components, sync_state
from .lowrank import LowRankBranch

_KEY = re.compile(r"^(?P<layer>.+?)\.(?P<part>lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)"
                  r"(?:\.[\w-]+)?\.weight$")  # optional peft adapter name before .weight
_DOWN = ("lora_A", "lora.down", "lora_down")


def parse_lora(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """{layer name: (A, B, alpha or None)} from a LoRA state dict; refuses keys it does not understand."""
    parts: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        m = _KEY.match(key)
        if m is not None:
            parts.setdefault(m["layer"], {})["A" if m["part"] in _DOWN else "B"] = value
        elif key.endswith(".alpha"):
            parts.setdefault(key.removesuffix(".alpha"), {})["alpha"] = float(value)
        else:
            raise ValueError(f"not a LoRA weight: {key!r} (expected <layer>.lora_A.weight / .lora_B.weight)")
    incomplete = [n for n, p in parts.items() if "A" not in p or "B" not in p]
    if incomplete:
        raise ValueError(f"LoRA layers without both factors: {incomplete[:5]}")
    return {n: (p["A"], p["B"], p.get("alpha")) for n, p in parts.items()}


def _components(obj: Any) -> dict[str, nn.Module]:
    comps = quantized_components(obj)
    if not comps:
        raise ValueError("LoRA merging needs a dmquant-quantized model (call dmquant.quantize first)")
    return comps


def _resolve(comps: dict[str, nn.Module], key: str) -> tuple[nn.Module, str, nn.Module | None]:
    """(component, layer name in it, layer or None) for a LoRA key, with or without a component prefix."""
    for path, module in comps.items():
        for prefix in (f"{path}.", *(f"{a}." for a in DENOISER_ATTRS), ""):
            if key.startswith(prefix):
                try:
                    return module, key[len(prefix):], module.get_submodule(key[len(prefix):])
                except AttributeError:
                    continue
    return next(iter(comps.values())), key, None


def merge_into_branch(layer: QuantModule, name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    """Concatenate one adapter's factors (down (r, in[, *kernel]), up (out, r[, *ones]) with every scale
    already in `up`, acting on the layer's original input and output) to the layer's low-rank branch."""
    r = down.shape[0]
    down, up = down.to(layer.weight_device).double(), up.to(layer.weight_device).double()
    up = up.reshape(up.shape[0], r, *[1] * (up.dim() - 2))
    if layer.transform is not None:
        down, up = layer.transform.adapter_factors(down, up)
    old = layer.lowrank
    dtype = layer.weight_dtype if old is None else old.down.weight.dtype
    down, up = down.to(dtype), up.to(dtype)
    if old is not None:
        d0, u0 = old.factors()
        down, up = torch.cat([d0, down]), torch.cat([u0, up], 1)
    layer.lowrank = LowRankBranch.build(layer, down, up, old.svd_rank if old else 0,
                                        [*(old.adapters if old else ()), (name, r)])


def unmerge_from_branch(layer: QuantModule, name: str) -> bool:
    """Slice a merged adapter's ranks off the layer's branch (bit for bit the branch before); False if
    the layer holds no adapter of that name."""
    branch = layer.lowrank
    if branch is None or name not in dict(branch.adapters):
        return False
    i = [n for n, _ in branch.adapters].index(name)
    start = branch.svd_rank + sum(r for _, r in branch.adapters[:i])
    stop = start + branch.adapters[i][1]
    d, u = branch.factors()
    down, up = torch.cat([d[:start], d[stop:]]), torch.cat([u[:, :start], u[:, stop:]], 1)
    rest = branch.adapters[:i] + branch.adapters[i + 1:]
    layer.lowrank = LowRankBranch.build(layer, down, up, branch.svd_rank, rest) if down.shape[0] else None
    return True


def merge_lora(obj: Any, lora: Mapping[str, torch.Tensor], name: str = "lora", scale: float = 1.0) -> list[str]:
    """Add `scale * B A` (times alpha / r where the state dict has alphas) of every LoRA layer to the
    low-rank branch of the matching quantized layer. All-or-nothing: unknown or unquantized targets
    raise before anything changes. Returns the merged layer names."""
    comps = _components(obj)
    targets = {key: (_resolve(comps, key), factors) for key, factors in parse_lora(lora).items()}
    bad = [k for k, ((_, _, layer), _) in targets.items() if not isinstance(layer, QuantModule)]
    if bad:
        raise ValueError(f"LoRA targets that are not quantized layers of this model: {bad[:5]} "
                         "(merge those into the float model before quantizing)")
    for key, ((_, _, layer), (a, b, _)) in targets.items():
        shape = layer.weight_shape  # no decode of a packed weight
        if a.shape[1:] != shape[1:] or b.shape[0] != shape[0] or b.shape[1] != a.shape[0]:
            raise ValueError(f"LoRA {key}: factors {tuple(a.shape)}, {tuple(b.shape)} do not fit the weight "
                             f"{tuple(shape)}")
        if layer.lowrank is not None and name in dict(layer.lowrank.adapters):
            raise ValueError(f"an adapter named {name!r} is already merged into {key}")
    merged = []
    for key, ((_, _, layer), (a, b, alpha)) in targets.items():
        up = b.double() * scale * (alpha / a.shape[0] if alpha is not None else 1.0)
        merge_into_branch(layer, name, a, up)
        merged.append(key)
    for module in comps.values():
        sync_state(module)
    return merged


def unmerge_lora(obj: Any, name: str = "lora") -> list[str]:
    """Remove a merged adapter's ranks from every branch that holds them (the branch returns to what it
    was before the merge, bit for bit). Returns the affected layer names."""
    done = []
    for module in _components(obj).values():
        for layer_name, layer in module.named_modules():
            if isinstance(layer, QuantModule) and unmerge_from_branch(layer, name):
                done.append(layer_name)
        sync_state(module)
    if not done:
        raise ValueError(f"no adapter named {name!r} is merged into this model")
    return done
