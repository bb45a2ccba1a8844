"""save_quantized / load_quantized: packed safetensors + a JSON manifest, written atomically.

Layout of a saved directory:
  quantization.json        manifest: format version, recipe, plans, provenance, sha256 of every file
  <component>/config.json  the component's own config (diffusers or transformers)
  <component>/dmquant.safetensors   packed quantized weights + every other tensor of the component
  model_index.json, <other>/...     for a pipeline: the untouched components via save_pretrained
A bare model is saved the same way with the component folder "model". Nothing is pickled; loading
verifies hashes, rebuilds the skeleton on the meta device, re-applies the plan and assigns tensors.
"""
from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .apply import apply_plan
from .atomic import MANIFEST, atomic_directory, hash_tree, verify_tree
from .components import BARE
from .config import Recipe
from .memory import release_freed_memory
from .nn.quantizer import TensorQuantizer
from .payload import decode_weight, encode_weight
from .plans import FORMAT_VERSION, plan_from_json, plan_to_json
from .state import QuantState, plan_of, quant_layers, quantized_components, sync_state, track_timesteps

log = logging.getLogger(__name__)
WEIGHTS = "dmquant.safetensors"


# -- saving -------------------------------------------------------------------------------------
def save_quantized(obj: Any, directory: str | Path) -> Path:
    """Save a quantized pipeline or model to `directory` (atomically; replaces a previous save)."""
    comps = quantized_components(obj)
    if not comps:
        raise ValueError("nothing to save: the object carries no dmquant quantization (call dmquant.quantize)")
    tops: dict[str, dict[str, nn.Module]] = {}
    for path, module in comps.items():
        top, _, sub = path.partition(".")
        tops.setdefault(top, {})[sub] = module
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        manifest: dict[str, Any] = {"format": "dmquant", "format_version": FORMAT_VERSION,
                                    "kind": "model" if isinstance(obj, nn.Module) else "pipeline",
                                    "components": {}}
        if manifest["kind"] == "pipeline":
            obj.save_config(tmp)
            for name, comp in obj.components.items():
                if comp is not None and name not in tops and hasattr(comp, "save_pretrained"):
                    comp.save_pretrained(tmp / name)
        for top, subs in tops.items():
            module = obj if top == BARE else getattr(obj, top)
            manifest["components"][top] = _save_component(module, subs, tmp / top)
        manifest["files"] = hash_tree(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log.info("saved quantized %s to %s", manifest["kind"], directory)
    return directory


def _save_component(module: nn.Module, subs: dict[str, nn.Module], folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True)
    adapted = [n for part in subs.values() for n, m in part.named_modules() if hasattr(m, "lora_A")]
    if adapted:
        raise ValueError(f"unfused LoRA adapters ({adapted[0]}, ...) cannot be saved with the quantized model: "
                         "save them on their own (save_lora_weights), unload_lora_weights(), save, then load them "
                         "again after loading (or fuse_lora() to keep them in the low-rank branch); "
                         "nothing was written")
    for part in subs.values():
        sync_state(part)  # the plan and config.json as the modules are now, whatever changed them since
    library = _save_config(module, folder)
    state = module.state_dict()
    entry: dict[str, Any] = {"class": f"{type(module).__module__}.{type(module).__qualname__}",
                             "library": library, "parts": {}}
    for sub, part in subs.items():
        prefix = f"{sub}." if sub else ""
        st: QuantState = part.dmquant_state
        layers = {}
        for name, layer in quant_layers(part).items():
            if getattr(layer, "vq", None) is not None:
                raise ValueError(f"{prefix}{name} holds vector-quantized (VQ) weights beside its float master "
                                 "(quantized with pack=False): dmquant.pack_weights(obj) first (nothing was written)")
            if layer.is_vq:  # codebook and packed indices are buffers: the state dict holds them as they are
                layers[name] = {"shape": list(layer.weight_shape),
                                "dtype": str(layer.weight_dtype).removeprefix("torch.")}
                continue
            if layer.weight_quantizer is None:
                continue
            full = f"{prefix}{name}."
            for key in [k for k in state if k.startswith(full + "weight_quantizer.")]:
                state.pop(key)
            state.pop(full + "weight", None)
            state.pop(full + "weight_packed", None)
            state.update(encode_weight(layer, full))
            layers[name] = {"shape": list(layer.weight_shape), "dtype": str(layer.weight_dtype).removeprefix("torch.")}
        entry["parts"][sub] = {"recipe": st.recipe.to_dict(), "plan": plan_to_json(plan_of(part)),
                               "weights": layers, "provenance": st.provenance, "timestep_scale": st.timestep_scale}
    save_file(_unshared(state), str(folder / WEIGHTS), metadata={"format": "dmquant"})
    return entry


def _save_config(module: nn.Module, folder: Path) -> str | None:
    if hasattr(module, "save_config"):  # diffusers ModelMixin
        module.save_config(folder)
        return "diffusers"
    config = getattr(module, "config", None)
    if hasattr(config, "save_pretrained"):  # transformers PreTrainedModel
        config.save_pretrained(folder)
        return "transformers"
    return None


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied weights): copy the repeats."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else (id(v), 0)
        out[k] = v.contiguous().clone() if key in seen or not v.is_contiguous() else v
        seen.add(key)
    return out


# -- loading ------------------------------------------------------------------------------------
def load_quantized(directory: str | Path, model: nn.Module | None = None, device: str | torch.device = "cpu",
                   torch_dtype: torch.dtype | None = None, backend: str | None = None) -> Any:
    """Load what `save_quantized` wrote: layers receive their packed codes directly (no float weight
    is ever built). `torch_dtype` casts the float parts and the activations (e.g. torch.bfloat16, which
    weight-only kernels need); `backend` replaces the saved one ("auto" picks kernels per layer). For a
    model that is neither a diffusers nor a transformers model, pass a float skeleton as `model`."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    verify_tree(directory, manifest.get("files", {}))
    loaded = {top: _load_component(directory / top, entry, model if top == BARE else None, backend)
              for top, entry in manifest["components"].items()}
    release_freed_memory()  # what building the skeletons and reading the file left on the heap
    if manifest["kind"] == "model":
        return loaded[BARE].to(device) if torch_dtype is None else loaded[BARE].to(device, torch_dtype)
    diffusers = importlib.import_module("diffusers")
    extra = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    # The pipeline's own class (DiffusionPipeline.from_pretrained would read the base class's optional
    # components, and reload Wan's optional transformer from disk); components saved as null
    # (SD3 without text_encoder_3) are passed as None, which is how they were.
    index = json.loads((directory / "model_index.json").read_text())
    cls = getattr(diffusers, index.get("_class_name", ""), diffusers.DiffusionPipeline)
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v and v[0] is None and k not in loaded}
    pipe = cls.from_pretrained(directory, local_files_only=True, **absent, **loaded, **extra)
    if torch_dtype is not None:
        for comp in loaded.values():
            comp.to(dtype=torch_dtype)
    return pipe.to(device)


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a dmquant checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt checkpoint {directory}: {MANIFEST} is not valid JSON ({err})") from err
    if manifest.get("format") != "dmquant" or not isinstance(manifest.get("components"), dict):
        raise ValueError(f"{path} is not a dmquant manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{directory} was saved by a newer dmquant (format {manifest['format_version']})")
    return manifest


def _load_component(folder: Path, entry: dict[str, Any], skeleton: nn.Module | None,
                    backend: str | None = None) -> nn.Module:
    # Every tensor is copied out of the file's memory map: one tensor left on the map keeps the whole
    # file mapped, and the pages the copies read stay counted in the process's resident memory (a
    # w8a8-static load measured 2x its packed size); copies are also 64-byte aligned, which CPU GEMM
    # kernels pick their code path by, so a loaded model is bitwise equal to the saved one.
    try:
        state = {k: v.clone() for k, v in load_file(str(folder / WEIGHTS)).items()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"corrupt checkpoint: cannot read {folder / WEIGHTS}: {err}") from err
    module = skeleton if skeleton is not None else _skeleton(folder, entry)
    for sub, part in entry["parts"].items():
        target = module.get_submodule(sub) if sub else module
        recipe = Recipe.from_dict(part["recipe"])
        if backend is not None:
            recipe = recipe.replace(backend=backend)
        plan = plan_from_json(part["plan"])
        try:
            apply_plan(target, plan, recipe, init_scales=False)
        except AttributeError as err:
            raise ValueError(f"checkpoint does not match the model: {err}") from err
        prefix = f"{sub}." if sub else ""
        for name, meta in part["weights"].items():
            layer, key = target.get_submodule(name), f"{prefix}{name}."
            if plan[name].vq is not None:
                layer.adopt_vq(state[key + "vq_codebook"], state[key + "vq_packed"], *plan[name].vq)
            else:
                packed = decode_weight(plan[name].weight, key, state, meta["shape"])
                layer.adopt_packed(packed)
                state[key + "weight_packed"] = packed
            layer.weight_shape, layer.weight_dtype = tuple(meta["shape"]), getattr(torch, meta["dtype"])
        target.dmquant_state = QuantState(recipe, plan, part.get("provenance", {}), part.get("timestep_scale"))
        track_timesteps(target, part.get("timestep_scale"), inference=True)
        sync_state(target)
    _restore_quantizer_buffers(module, state)
    try:
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {folder} does not match the model: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"checkpoint {folder} does not match the model: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    return module.eval()


def _restore_quantizer_buffers(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Quantizer buffers start as None, so load_state_dict would see them as unexpected: set them first."""
    for name, q in module.named_modules():
        if isinstance(q, TensorQuantizer):
            for buf in ("scale", "zero_point", "tensor_scale", "noise_edges", "split_at"):
                if f"{name}.{buf}" in state:
                    setattr(q, buf, state[f"{name}.{buf}"])


def _skeleton(folder: Path, entry: dict[str, Any]) -> nn.Module:
    """Rebuild the float architecture from its config without allocating weights."""
    from accelerate import init_empty_weights

    module_name, _, cls_name = entry["class"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    with init_empty_weights():
        if entry["library"] == "diffusers":
            return cls.from_config(cls.load_config(folder))
        if entry["library"] == "transformers":
            return cls(cls.config_class.from_pretrained(folder))
    raise ValueError(f"cannot rebuild {entry['class']}: pass a float skeleton as load_quantized(..., model=...)")
