"""dmquant as a diffusers quantization backend (registered when `dmquant.pipelines` is imported).

    >>> import dmquant.pipelines                          # registers quant_method "dmquant" with diffusers
    >>> from dmquant.pipelines import DmquantConfig
    >>> unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", quantization_config=DmquantConfig("w8a8"))
    >>> unet.save_pretrained("out/unet")                  # packed codes + the plan in config.json
    >>> unet = UNet2DConditionModel.from_pretrained("out/unet")   # bitwise the same quantized model

A model quantized by `dmquant.quantize` carries the same `quantization_config` in its config, so the
pipeline's own `save_pretrained` writes packed weights and `from_pretrained` rebuilds them. Recipes that
need calibration data cannot run inside `from_pretrained` (no data there): they are refused with a
message naming `dmquant.quantize(pipe, recipe)`, never quantized naively.

LoRA (peft, and diffusers' `load_lora_weights` / `load_lora_adapter`, which use peft): on a quantized
layer an adapter runs beside it, in float, unfused (`set_adapters`, `disable_lora`, `unload_lora_weights`
never touch the packed codes, so nothing is re-quantized). A packed layer has no float weight to add
B A to, so `fuse_lora()` / `merge_adapter()` / `merge_and_unload()` put the adapter's ranks into the
layer's high-precision low-rank branch instead (as `dmquant.merge_lora` does, named "peft:<adapter>"),
and unfusing slices them off again, bit for bit. DoRA and LoRA-bias adapters cannot be merged that way
and are refused. Saving: fuse (and unload) first and the adapter is saved as part of the branch;
otherwise save the adapter on its own (`get_peft_model_state_dict`) and the base after
`unload_lora()`, and load the adapter again onto the reloaded quantized model.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import torch
from diffusers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from safetensors import safe_open

from dmquant.apply import apply_plan, apply_recipe
from dmquant.config import Recipe
from dmquant.plans import FORMAT_VERSION, QUANT_METHOD, plan_from_json
from dmquant.recipes import get_recipe
from dmquant.state import QuantState, quant_layers, sync_state, track_timesteps
from dmquant.transforms.peft import register_peft

_SAFETENSORS_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
                       "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class DmquantMethod(str, Enum):
    DMQUANT = QUANT_METHOD


class DmquantConfig(QuantizationConfigMixin):
    """`quantization_config` for diffusers' `from_pretrained`: a recipe to apply on load, or (as read
    from a saved config.json) the plan of weights that are already packed."""

    def __init__(self, recipe: str | dict[str, Any] | Recipe = "w8a8", plan: dict[str, Any] | None = None,
                 timestep_scale: float | None = None, backend: str | None = None,
                 format_version: int = FORMAT_VERSION, **unused: Any) -> None:
        if format_version > FORMAT_VERSION:
            raise ValueError(f"quantization_config was written by a newer dmquant (format {format_version})")
        self.quant_method = DmquantMethod.DMQUANT
        self.recipe = recipe.to_dict() if isinstance(recipe, Recipe) else recipe
        self.plan = plan
        self.timestep_scale = timestep_scale
        self.backend = backend
        self.format_version = format_version
        self.resolved_recipe()  # unknown recipe names and bad fields fail here, before any loading

    def resolved_recipe(self) -> Recipe:
        recipe = Recipe.from_dict(self.recipe) if isinstance(self.recipe, dict) else get_recipe(self.recipe)
        return recipe if self.backend is None else recipe.replace(backend=self.backend)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "recipe": self.recipe,
                "plan": self.plan, "timestep_scale": self.timestep_scale, "backend": self.backend}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()  # every field matters: nothing is left out as a default


class DmquantQuantizer(DiffusersQuantizer):
    """Rebuilds packed dmquant layers on the meta skeleton before diffusers assigns the stored tensors,
    or quantizes the loaded float weights with a calibration-free recipe."""

    requires_calibration = False
    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config: DmquantConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.stored: dict[str, tuple[list[int], torch.dtype]] = {}

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        recipe = self.quantization_config.resolved_recipe()
        if not self.pre_quantized and recipe.needs_calibration:
            raise ValueError(f"recipe {recipe.name!r} needs calibration data, which from_pretrained does not have: "
                             "load the float pipeline, then call dmquant.quantize(pipe, recipe)")

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype:
        return torch.float32 if torch_dtype is None else torch_dtype

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: Any) -> list[str]:
        """Note the stored shapes and dtypes: the skeleton needs placeholders of exactly these."""
        files = [checkpoint_files] if isinstance(checkpoint_files, (str, Path)) else list(checkpoint_files or [])
        for path in files:
            if str(path).endswith(".safetensors"):
                with safe_open(str(path), "pt") as f:
                    for key in f.keys():
                        part = f.get_slice(key)
                        self.stored[key] = (part.get_shape(), _SAFETENSORS_DTYPES[part.get_dtype()])
        return loaded_keys

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
        if not self.pre_quantized:
            return
        cfg = self.quantization_config
        if cfg.plan is None:
            raise ValueError("this config.json has a dmquant quantization_config without a plan: it was not written "
                             "by a dmquant-quantized model")
        apply_plan(model, plan_from_json(cfg.plan), cfg.resolved_recipe(), init_scales=False)
        layers = quant_layers(model)
        for name, layer in layers.items():
            if layer.weight_quantizer is not None:
                shape, dtype = self._stored_or_fail(f"{name}.weight_packed")
                layer.adopt_packed(torch.empty(shape, dtype=dtype, device="meta"))
        expected = model.state_dict()
        for key, (shape, dtype) in self.stored.items():  # quantizer scales start as empty buffer slots
            owner, _, attr = key.rpartition(".")
            if key not in expected and owner and attr in model.get_submodule(owner)._buffers:
                setattr(model.get_submodule(owner), attr, torch.empty(shape, dtype=dtype, device="meta"))

    def _stored_or_fail(self, key: str) -> tuple[list[int], torch.dtype]:
        adapters = sorted({k.split(".lora_A.")[1].split(".")[0] for k in self.stored if ".lora_A." in k})
        if key not in self.stored and adapters:
            raise ValueError(f"this checkpoint was saved with unfused LoRA adapters {adapters} around its quantized "
                             "layers: save an adapter on its own (get_peft_model_state_dict / save_lora_weights), the "
                             "quantized model after unload_lora(), and load the adapter again after from_pretrained; "
                             "or fuse_lora() and unload first, which saves it in the layers' low-rank branch")
        if key not in self.stored:
            raise ValueError(f"the checkpoint has no {key}: it does not match its dmquant quantization_config")
        return self.stored[key]

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        cfg = self.quantization_config
        recipe = cfg.resolved_recipe()
        if self.pre_quantized:
            model.dmquant_state = QuantState(recipe, plan_from_json(cfg.plan), timestep_scale=cfg.timestep_scale)
            track_timesteps(model, cfg.timestep_scale, inference=True)
        else:
            apply_recipe(model, recipe, timestep_scale=cfg.timestep_scale)  # None: the family's
        sync_state(model)
        return model

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


class _TransformersRefusal:
    """transformers would skip an unknown quant_method and hand back random float weights where the
    packed ones are: for a dmquant-quantized text encoder its `from_pretrained` fails instead."""

    @staticmethod
    def register() -> None:
        from transformers.quantizers import auto
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin as HfConfigMixin

        class DmquantTextConfig(HfConfigMixin):
            def __init__(self, **kwargs: Any) -> None:
                self.quant_method = QUANT_METHOD
                self.entry = kwargs

            def to_dict(self) -> dict[str, Any]:
                return {**self.entry, "quant_method": QUANT_METHOD}

        class DmquantTextQuantizer(HfQuantizer):
            def validate_environment(self, *args: Any, **kwargs: Any) -> None:
                raise ValueError("this model holds dmquant-packed weights, which transformers' from_pretrained cannot "
                                 "rebuild: save it with dmquant.save_quantized and load it with dmquant.load_quantized")

            def is_serializable(self) -> bool:
                return False

            @property
            def is_trainable(self) -> bool:
                return False

        auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = DmquantTextConfig
        auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = DmquantTextQuantizer


def register() -> None:
    """Make diffusers' `from_pretrained` know quant_method "dmquant", and transformers' refuse it; make
    peft's LoRA layers merge into the low-rank branch of quantized layers (idempotent)."""
    AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = DmquantQuantizer
    AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = DmquantConfig
    _TransformersRefusal.register()
    register_peft()  # also done by every quantize / load (dmquant.transforms.peft)
