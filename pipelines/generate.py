"""`generate(pipe, prompts, seed)`: samples as float tensors in [0, 1], reproducible per prompt.

Each prompt i gets its own generator seeded with seed + i, so any batching, shard or subset of a
prompt list gives the same sample for the same prompt index.
"""
from __future__ import annotations

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
    kwargs: dict[str, Any] = dict(family.call_kwargs, num_inference_steps=steps or DEFAULT_STEPS,
                                  guidance_scale=DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale,
                                  output_type="pt")
    if family.name == "latte":  # its defaults are 16 frames at 512 px, whatever the model was trained on
        side = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        kwargs.update(video_length=pipe.transformer.config.video_length, height=side, width=side)
    kwargs.update(call_kwargs)
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
