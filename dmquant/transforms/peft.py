"""peft / diffusers LoRA adapters on quantized layers: they run beside the packed layer, and a merge
(`fuse_lora`, `merge_and_unload`) goes into the layer's low-rank branch instead of a decoded copy of
the weight that would be thrown away. Registered with peft (if installed) by every quantize and load.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch

from ..nn import QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear
from ..nn.qmodule import QuantModule
from ..state import sync_state
from .lora import merge_into_branch, unmerge_from_branch


class _PeftBranchMerge:
    """merge / unmerge of a peft LoRA layer around a quantized dmquant layer: into its low-rank branch
    (mixed in before peft's own layer class, whose forward, scaling and adapter bookkeeping stay)."""

    dmquant_root: Any = None  # weakref to the component peft injected into (its plan is kept in step)

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """peft builds a conv adapter's factors as `type(base_layer)`: plain float convs here, not
        quantized layers without quantizers."""
        super().update_layer(adapter_name, *args, **kwargs)
        for factors in (self.lora_A, self.lora_B):
            part = factors[adapter_name] if adapter_name in factors else None
            if isinstance(part, QuantModule):
                part.__class__ = next(c for c in type(part).__mro__ if c.__module__.startswith("torch.nn"))

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge

        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
        base = self.get_base_layer()
        factors = {}
        for name in names:  # all checked before any merges
            variant = name in getattr(self, "lora_variant", {}) or getattr(self, "use_dora", {}).get(name)
            if variant or getattr(self, "lora_bias", {}).get(name):
                raise ValueError(f"adapter {name!r} on {base.qname} is a {'DoRA' if variant else 'LoRA-bias'} adapter: "
                                 "it cannot merge into the low-rank branch of a quantized layer; keep it unfused "
                                 "(it runs beside the quantized layer)")
            down = self.lora_A[name].weight.detach()
            up = self.lora_B[name].weight.detach().double() * self.scaling[name]
            if safe_merge and not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                raise ValueError(f"NaNs detected in adapter {name!r}: not merged")
            factors[name] = (down, up)
        for name, (down, up) in factors.items():
            merge_into_branch(base, f"peft:{name}", down, up)
            self.merged_adapters.append(name)
        if names:
            self._sync_plan()

    def unmerge(self) -> None:
        if not self.merged:
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            unmerge_from_branch(base, f"peft:{self.merged_adapters.pop()}")
        self._sync_plan()

    def _sync_plan(self) -> None:
        """The component's plan and config as its modules now are (`sync_state` reads a peft-wrapped
        layer under its own name, the one it has once the adapters are unloaded)."""
        root = self.dmquant_root() if self.dmquant_root is not None else None
        if root is not None:
            sync_state(root)


_PEFT_CLASSES: dict[type, type] = {}


def register_peft() -> None:
    """Make peft wrap quantized dmquant layers in LoRA layers whose merge goes into the low-rank branch
    (idempotent; a no-op without peft). peft's LoraConfig takes such layer classes as custom modules
    (`_register_custom_module`); each config peft injects with (also those diffusers builds inside
    `load_lora_adapter`) gets them when its target is a dmquant layer."""
    try:
        from peft.tuners.lora import LoraModel
        from peft.tuners.lora import layer as lora_layer
    except ImportError:
        return
    if getattr(LoraModel._create_and_replace, "_dmquant", False):
        return
    for quant, peft_cls in ((QuantLinear, lora_layer.Linear), (QuantConv1d, lora_layer.Conv1d),
                            (QuantConv2d, lora_layer.Conv2d), (QuantConv3d, lora_layer.Conv3d)):
        _PEFT_CLASSES[quant] = type(f"Dmquant{peft_cls.__name__}", (_PeftBranchMerge, peft_cls),
                                    {"__module__": __name__})
    original = LoraModel._create_and_replace

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        if isinstance(base, QuantModule):
            lora_config._register_custom_module(_PEFT_CLASSES)
        original(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs)
        new = getattr(parent, target_name, None)
        if isinstance(new, _PeftBranchMerge):
            new.dmquant_root = weakref.ref(self.model)

    _create_and_replace._dmquant = True
    LoraModel._create_and_replace = _create_and_replace
