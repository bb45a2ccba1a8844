#!/usr/bin/env python
"""How recognisable the trained miniatures' samples are: the judge's accuracy per attribute on
held-out procedural data, on that data passed through the shared VAE (the ceiling any denoiser in
its latent space can reach), and on FP samples of every miniature.

    python scripts/judge_table.py                    # the README table
    python scripts/judge_table.py --weights /tmp/w   # checkpoints trained elsewhere
    python scripts/judge_table.py --only miniature-latte --no-data   # one miniature's FP row
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dmquant.pipelines import generate, judge, load, make_images, make_videos, miniature_prompts
from dmquant.pipelines.miniature import NAMES, WEIGHTS
from dmquant.pipelines.training import encode

CHANCE = {"shape": 0.25, "colour": 1 / 6, "position": 1 / 9, "direction": 0.25}


@torch.no_grad()
def reconstruct(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Encode -> decode through the VAE (images or videos), back in [0, 1]."""
    z = encode(vae, pixels) / vae.config.scaling_factor
    if pixels.dim() == 5:
        z = z.transpose(1, 2).flatten(0, 1)
    out = torch.cat([vae.decode(c).sample for c in z.split(256)])
    return ((out + 1) / 2).clamp(0, 1).reshape(pixels.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--num-prompts", type=int, default=96, help="image prompts (video: half)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument("--only", choices=NAMES, action="append", help="FP rows for these miniatures only")
    parser.add_argument("--no-data", action="store_true", help="skip the procedural-data rows")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[tuple[str, dict[str, float]]] = []
    real = () if args.no_data else (("image", make_images(1000, seed=123)), ("video", make_videos(500, seed=123)))
    if real:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.weights / "vae").eval()  # the one all miniatures share
    for kind, data in real:
        rows.append((f"{kind} judge on held-out procedural {kind}s ({len(data.prompts)})",
                     judge(kind).adherence(data.pixels, data.prompts)))
        recon = reconstruct(vae, data.pixels)
        rows.append((f"the same {kind}s through the VAE", judge(kind).adherence(recon, data.prompts)))
    for name in args.only or NAMES:
        n = args.num_prompts // 2 if name == "miniature-latte" else args.num_prompts
        prompts = miniature_prompts(name, n)
        samples = generate(load(str(args.weights / name)), prompts, seed=args.seed, steps=args.steps)
        label = f"FP `{name}`, {n} prompts, {args.steps} steps" + (f", seed {args.seed}" if args.seed else "")
        rows.append((label, judge(name).adherence(samples, prompts)))
    print("| | shape | colour | position / direction |\n|---|---|---|---|")
    for label, acc in rows:
        where = acc.get("position", acc.get("direction"))
        print(f"| {label} | {acc['shape']:.1%} | {acc['colour']:.1%} | {where:.1%} |")
    print("\nChance: " + ", ".join(f"{k} {v:.0%}" for k, v in CHANCE.items()))


if __name__ == "__main__":
    main()
