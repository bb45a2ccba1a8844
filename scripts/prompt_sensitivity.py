#!/usr/bin/env python
"""Which words of the prompt a miniature's denoiser listens to: the RMS change of its noise
prediction when one attribute (shape, colour, position or direction) is swapped for another, on the
same noisy held-out latents, at several noise levels; the empty prompt is the scale. The last column
is the relative change of the text encoder's output: an attribute with a clear text change but a
near-zero prediction change is ignored by the denoiser, not lost in the text encoder or in sampling.

    python scripts/prompt_sensitivity.py --pipeline miniature-latte
"""
from __future__ import annotations

import argparse

import torch
from diffusers import DDPMScheduler

from dmquant.pipelines import load, make_images, make_videos, parse_prompt
from dmquant.pipelines.data import COLOURS, DIRECTIONS, POSITIONS, SHAPES, caption
from dmquant.pipelines.miniature import NAMES, TRAIN_SCHEDULER
from dmquant.pipelines.training import encode, predict_noise, text_embeddings

NAMES_OF = {"shape": SHAPES, "colour": tuple(COLOURS), "position": POSITIONS, "direction": DIRECTIONS}


def swap(prompt: str, attribute: str) -> str:
    """The prompt with `attribute` set to its next value."""
    labels = parse_prompt(prompt)
    labels[attribute] = (labels[attribute] + 1) % len(NAMES_OF[attribute])
    return caption(**labels)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", choices=NAMES, default="miniature-latte")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--timesteps", default="900,600,300,50")
    args = parser.parse_args()
    pipe = load(args.pipeline)
    parts, video = pipe.components, args.pipeline == "miniature-latte"
    data = (make_videos if video else make_images)(args.num_samples, seed=5)
    x0 = encode(pipe.vae, data.pixels)
    attributes = [a for a in data.labels if a in NAMES_OF]
    variants = {a: [swap(p, a) for p in data.prompts] for a in attributes} | {"(empty prompt)": [""] * len(x0)}
    g = torch.Generator().manual_seed(0)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    rows: dict[str, list[float]] = {k: [] for k in variants}
    text = {k: text_embeddings(parts, prompts, video)[0] for k, prompts in variants.items()}
    ref_text = text_embeddings(parts, data.prompts, video)[0]
    for t in timesteps:
        tt = torch.full((len(x0),), t)
        xt = DDPMScheduler(**TRAIN_SCHEDULER).add_noise(x0, torch.randn(x0.shape, generator=g), tt)
        ref = predict_noise(parts, xt, tt, *text_embeddings(parts, data.prompts, video))
        for key, prompts in variants.items():
            pred = predict_noise(parts, xt, tt, *text_embeddings(parts, prompts, video))
            rows[key].append((pred - ref).pow(2).mean().sqrt().item())
    print(f"RMS change of the noise prediction, {args.pipeline}, {len(x0)} held-out samples\n")
    print("| swapped | " + " | ".join(f"t={t}" for t in timesteps) + " | text change |\n|---|"
          + "---:|" * (len(timesteps) + 1))
    for key, values in rows.items():
        change = ((text[key] - ref_text).norm() / ref_text.norm()).item()
        print(f"| {key} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {change:.2f} |")


if __name__ == "__main__":
    main()
