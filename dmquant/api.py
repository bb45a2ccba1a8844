"""`quantize(obj, recipe)`: the one verb that changes a pipeline or model in place.

It resolves what the recipe leaves open (a recipe searched per model, calibration data recorded from
the float pipeline) and hands over to `dmquant.apply`, which swaps the layers and runs the steps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from .apply import apply_recipe, components_to_quantize
from .config import Recipe
from .families import timestep_scale_for
from .recipes import AUTO_BASE, AUTO_PREFIX, get_recipe


def quantize(obj: Any, recipe: str | Path | Recipe, *, calibration: Any = None, backend: str | None = None,
             timestep_scale: float | None = None, pack: bool = True) -> Any:
    """Quantize a diffusers pipeline (its denoiser, and any other components the recipe names) or a
    bare model in place, and return it.

    >>> pipe = dmquant.quantize(pipe, "w8a8")                  # built-in recipe
    >>> pipe = dmquant.quantize(pipe, "q-diffusion-w4a8")      # calibrates on the recipe's default prompts
    >>> pipe = dmquant.quantize(pipe, "tfmq-w4a8", calibration={"prompts": prompts, "timesteps": "uniform:10"})
    >>> model = dmquant.quantize(model, "my_recipe.yaml", calibration=lambda m: m(**example))

    Recipes with static activation scales or algorithm steps need data. On a pipeline it is recorded
    from the float model (a `dmquant.calibration.CalibrationSet`: the recipe's defaults, overridden by
    `calibration` given as a dict of settings or a list of prompts); a callable is called with `obj`
    to run representative inputs (the only way for a bare model). `backend` overrides the recipe's
    ("fake": simulated; "auto": the best kernel per layer, see `dmquant.kernels`; "cpu", "fbgemm",
    "cuda"). `pack` (default) leaves only packed codes and scales in each layer once the recipe's steps
    are done; `pack=False` keeps the float masters for further training or float references (then
    `dmquant.pack_weights(obj)` packs later). `timestep_scale` normalises the denoiser's timestep into the noise
    level per-timestep scales key on; None takes the family's (`dmquant.families`: 1000 for DDPM-trained
    and most flow models, 1 for FLUX, whose pipeline already passes t / 1000).
    """
    recipe = resolve_recipe(recipe, obj)
    if backend is not None:
        recipe = recipe.replace(backend=backend)
    components_to_quantize(obj, recipe)  # refuse an already-quantized model before recording any data
    if timestep_scale is None:
        timestep_scale = timestep_scale_for(obj)
    runner = prepare_calibration(obj, recipe.calibration, calibration, timestep_scale) \
        if recipe.needs_calibration else None  # float data, before any swap
    return apply_recipe(obj, recipe, runner, timestep_scale=timestep_scale, pack=pack)


def quantize_text_encoder_bos(pipe: Any, recipe: str | Path | Recipe, **quantize_kwargs: Any) -> Any:
    """`quantize(pipe, recipe)` for a recipe covering the text encoder, with its BOS output precomputed
    from the float encoder first and restored on every call (MixDQ's BOS-aware scheme,
    `dmquant.mixed.bos`). The hook lives on the module: re-attach it after loading a saved model."""
    from .mixed.bos import attach_bos, bos_states

    encoder = pipe.text_encoder
    states = bos_states(encoder, pipe.tokenizer)
    quantize(pipe, recipe, **quantize_kwargs)
    encoder.dmquant_bos_hook = attach_bos(encoder, states)
    return pipe


def resolve_recipe(recipe: str | Path | Recipe, obj: Any = None) -> Recipe:
    """`get_recipe`, plus `auto-<budget>` (e.g. auto-4.5bits, auto-1.2MiB, auto-w4a8): searched on
    `obj` by measured sensitivity (`dmquant.mixed.search` on gptq-w4a8, cached)."""
    key = str(recipe) if not isinstance(recipe, Recipe) else ""
    if key.lower().startswith(AUTO_PREFIX) and obj is not None:
        from .mixed import search  # the search records a trajectory: loaded only when asked for

        return search(obj, key[len(AUTO_PREFIX):], base=AUTO_BASE, name=key).recipe
    return get_recipe(recipe)


def prepare_calibration(obj: Any, recipe_calibration: dict[str, Any], calibration: Any,
                        timestep_scale: float | None = None) -> Callable[[Any], Any]:
    """The data runner for `quantize`, resolved while `obj` is still in float.

    A callable runs as given. For a pipeline, None / a list of prompts / a dict of settings becomes a
    `dmquant.calibration.CalibrationSet` (recipe defaults, then the caller's overrides) that records
    the float model's denoiser trajectory now; anything with `prepare(obj)` is prepared the same way."""
    if callable(calibration) and not hasattr(calibration, "prepare"):
        return calibration
    if isinstance(obj, nn.Module) and not hasattr(calibration, "prepare"):
        raise ValueError("a bare model cannot generate its own calibration data: pass calibration=<callable that "
                         "runs the model on representative inputs> (or quantize the whole pipeline)")
    if not hasattr(calibration, "prepare"):
        from .calibration import CalibrationSet  # loads diffusers' pipeline machinery: only for a pipeline

        settings = {"timestep_scale": timestep_scale or timestep_scale_for(obj), **recipe_calibration}  # the hook's
        if isinstance(calibration, dict):
            settings.update(calibration)
        elif isinstance(calibration, (list, tuple)):
            settings["prompts"] = list(calibration)
        elif calibration is not None:
            raise TypeError(f"calibration must be a callable, a list of prompts, a dict of settings or a "
                            f"CalibrationSet, got {type(calibration).__name__}")
        calibration = CalibrationSet(**settings)
    return calibration.prepare(obj)
