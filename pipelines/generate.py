"""`generate(pipe, prompts, seed)`: samples as float tensors in [0, 1], reproducible per prompt.

Each prompt i gets its own generator seeded with seed + i, so any batching, shard or subset of a
prompt list gives the same sample for the same prompt index.

`with_call_defaults(pipe)` makes the stock `pipe("a prompt")` work on models far smaller than the
pipelines' hard-coded defaults (Latte's 16 frames at 512 px, Wan's 81 x 480 x 832, PixArt's resolution
bins): the call fills in what `call_defaults(pipe)` says for every argument the caller left out.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from tqdm.auto import tqdm

from dmquant.families import family_of

DEFAULT_STEPS, DEFAULT_GUIDANCE = 20, 4.0


def generate(pipe: Any, prompts: list[str], seed: int = 0, steps: int | None = None, batch_size: int = 8,
             guidance_scale: float | None = None, start_index: int = 0, progress: bool = True,
             **call_kwargs: Any) -> torch.Tensor:
    """(N, 3, H, W) images or (N, F, 3, H, W) videos in [0, 1] for `prompts`.

    `start_index` is the global index of prompts[0] (for sharded runs); extra keyword arguments go to
    the pipeline call (height, width, num_frames, ...)."""
    family = family_of(pipe)
    kwargs = sampling_kwargs(pipe, steps, guidance_scale, **{"output_type": "pt", **call_kwargs})
    device = getattr(pipe, "device", torch.device("cpu"))
    outs = []
    starts = range(0, len(prompts), batch_size)
    for s in tqdm(starts, desc="generate", unit="batch", disable=not progress or len(starts) < 2):
        chunk = prompts[s:s + batch_size]
        gens = [torch.Generator(device).manual_seed(seed + start_index + s + i) for i in range(len(chunk))]
        with torch.no_grad():
            out = pipe(prompt=chunk, generator=gens, **kwargs)
        samples = out.frames if family.is_video else out.images
        outs.append(torch.as_tensor(samples).float().cpu())
    return torch.cat(outs).clamp(0, 1)


def sampling_kwargs(pipe: Any, steps: int | None = None, guidance_scale: float | None = None,
                    **call_kwargs: Any) -> dict[str, Any]:
    """The pipeline call arguments `generate` samples with (a fine-tuning step that samples the pipeline
    itself uses the same): the call defaults, step count and guidance, then `call_kwargs` over them."""
    return {**call_defaults(pipe), "num_inference_steps": steps or DEFAULT_STEPS,
            "guidance_scale": DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale, **call_kwargs}


def call_defaults(pipe: Any) -> dict[str, Any]:
    """Call arguments this pipeline needs beyond the stock defaults: the family's quirks, arguments that
    must equal a denoiser config value, and a video size the denoiser was built for (`dmquant.families`)."""
    family = family_of(pipe)
    kwargs: dict[str, Any] = dict(family.call_kwargs)
    denoiser = getattr(pipe, family.denoiser, None)
    config = getattr(denoiser, "config", None)
    kwargs.update({k: getattr(config, attr) for k, attr in family.config_kwargs.items() if hasattr(config, attr)})
    if family.video_size is not None:
        for key, value in zip((family.frames_kwarg, "height", "width"), family.video_size):
            if value is not None:
                kwargs.setdefault(key, value)
    if family.name == "latte":  # its defaults are 16 frames at 512 px, whatever the model was trained on
        side = config.sample_size * pipe.vae_scale_factor
        kwargs.update(height=side, width=side)
    return kwargs


_WITH_DEFAULTS: dict[type, type] = {}


def with_call_defaults(pipe: Any) -> Any:
    """Let `pipe(prompt, ...)` fill `call_defaults(pipe)` into the arguments the caller leaves out
    (idempotent; returns `pipe`). The pipeline becomes an instance of a subclass of the same name and
    module, so it saves, loads and prints as the stock class; everything else is the stock pipeline."""
    cls = type(pipe)
    if getattr(cls, "_dmquant_call_defaults", False):
        return pipe
    if cls not in _WITH_DEFAULTS:
        stock = cls.__call__

        @functools.wraps(stock)
        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
            filled = {k: v for k, v in call_defaults(self).items() if k not in kwargs} if len(args) <= 1 else {}
            return stock(self, *args, **filled, **kwargs)

        _WITH_DEFAULTS[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                          "__qualname__": cls.__qualname__,
                                                          "_dmquant_call_defaults": True})
    pipe.__class__ = _WITH_DEFAULTS[cls]
    return pipe
