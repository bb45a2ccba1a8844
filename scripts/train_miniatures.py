#!/usr/bin/env python
"""Reproduce the trained miniatures (and the judges) from a seed, on CPU.

    python scripts/train_miniatures.py                       # everything, into pipelines/weights/
    python scripts/train_miniatures.py --only miniature-sd   # one pipeline (reuses the saved VAE)
    python scripts/train_miniatures.py --only judge          # the image and video judges
    python scripts/train_miniatures.py --only vae-decoder    # re-sharpen the saved VAE's decoder
    python scripts/train_miniatures.py --steps-scale 0.01 --out /tmp/w   # a smoke run

The committed checkpoints are these rounds, in order (each `--resume` continues the saved pipeline;
the VAE's encoder never changes after the first, so every round trains on the same latents; Latte
starts from the PixArt checkpoint in --out, so it is retrained last):

    python scripts/train_miniatures.py
    python scripts/train_miniatures.py --only miniature-sd --only miniature-pixart --resume
    python scripts/train_miniatures.py --only miniature-pixart --resume --seed 1
    python scripts/train_miniatures.py --only miniature-latte
    python scripts/train_miniatures.py --only miniature-latte --resume --steps-scale 0.5
    python scripts/train_miniatures.py --only miniature-latte --resume --steps-scale 0.5 --seed 2 --timestep-shift 8
    python scripts/train_miniatures.py --only miniature-latte --resume --steps-scale 0.5 --seed 3 --timestep-shift 8
    python scripts/train_miniatures.py --only miniature-latte --resume --steps-scale 0.5 --seed 4 --timestep-shift 8 --shape-weight 4
    python scripts/train_miniatures.py --only miniature-latte --resume --seed 5 --timestep-shift 8 --shape-weight 4
    python scripts/train_miniatures.py --only miniature-latte --resume --steps-scale 0.5 --seed 6 --timestep-shift 8 --shape-weight 4 --seed-word up=top --seed-word down=bottom
    python scripts/train_miniatures.py --only miniature-latte --resume --steps-scale 0.5 --seed 7 --timestep-shift 8 --shape-weight 4

The last four Latte rounds ran with --threads 1 (about 1.5 s a step: 15 minutes per 600 steps);
the thread count can change floating-point sums, so reproduce them with the same count.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from dmquant.pipelines.miniature import NAMES, WEIGHTS, assemble

STEPS = {"vae": 800, "vae-decoder": 900, "miniature-sd": 1500, "miniature-pixart": 2000, "miniature-latte": 1200,
         "judge-image": 600, "judge-video": 1200}
BATCH = {"vae": 32, "vae-decoder": 32, "miniature-sd": 64, "miniature-pixart": 64, "miniature-latte": 16,
         "judge-image": 128, "judge-video": 64}


def save(model, folder: Path) -> None:
    """save_pretrained, minus the `_name_or_path` a resumed model carries: committed configs should
    not name the machine they were trained on."""
    model.save_pretrained(folder)
    for config in folder.rglob("config.json"):
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("vae", "vae-decoder", *NAMES, "judge"), action="append")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step count")
    parser.add_argument("--num-samples", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--timestep-shift", type=float, default=1.0,
                        help="favour noisy timesteps in denoiser training (1: uniform)")
    parser.add_argument("--shape-weight", type=float, default=0.0,
                        help="extra loss weight on the latent cells a shape covers (0: plain MSE)")
    parser.add_argument("--seed-word", action="append", default=[], metavar="NEW=OLD",
                        help="start the text embedding of word NEW from OLD's (e.g. up=top), before training")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints already in --out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL

    from dmquant.pipelines.training import sharpen_decoder, train_denoiser, train_vae

    todo = args.only or ["vae", *NAMES, "judge"]
    if ("miniature-latte" in todo and not args.resume and "miniature-pixart" not in todo
            and not (args.out / "miniature-pixart" / "model_index.json").is_file()):
        parser.error(f"miniature-latte starts from miniature-pixart, which is not in {args.out}: "
                     "train it too (--only miniature-pixart --only miniature-latte)")
    if any(w.count("=") != 1 for w in args.seed_word):
        parser.error(f"--seed-word takes NEW=OLD, got {args.seed_word}")
    words = dict(w.split("=") for w in args.seed_word)
    steps = {k: max(2, int(v * args.steps_scale)) for k, v in STEPS.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    vae_dir = args.out / "vae"
    if "vae" in todo or "vae-decoder" in todo:
        vae = train_vae(steps["vae"], BATCH["vae"], args.seed) if "vae" in todo else AutoencoderKL.from_pretrained(vae_dir)
        save(sharpen_decoder(vae, steps["vae-decoder"], BATCH["vae-decoder"], args.seed), vae_dir)
    for name in NAMES:
        if name in todo:
            vae = AutoencoderKL.from_pretrained(vae_dir).eval()
            resume = args.out / name if args.resume else None
            init = args.out / "miniature-pixart" if name == "miniature-latte" else None  # Latte starts from PixArt
            parts = train_denoiser(name, vae, steps[name], BATCH[name], args.seed + int(args.resume),
                                   num_samples=args.num_samples, resume=resume, init=init,
                                   timestep_shift=args.timestep_shift, shape_weight=args.shape_weight, words=words)
            save(assemble(name, parts), args.out / name)
    if "judge" in todo:
        from dmquant.pipelines.judge import train_judge

        for kind in ("image", "video"):
            key = f"judge-{kind}"
            train_judge(kind, steps[key], BATCH[key], args.seed).save(args.out / key)


if __name__ == "__main__":
    main()
