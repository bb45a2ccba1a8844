"""Peak memory of trajectory calibration on a full-size SD1.5 UNet (random weights, 860 M params).

The pipeline is the stock StableDiffusionPipeline with the real SD1.5 UNet config and a one-layer
768-wide CLIP text encoder (only the UNet's size matters here). Prints the float model's resident
memory, the recorded trajectory's size and the peak during quantize + calibration, for N prompts x
K recorded timesteps:

    python scripts/calibration_memory.py --prompts 2 --steps 4 --timesteps 2 --recipe w8a8-tsa
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

import dmquant
from dmquant.calibration import CalibrationSet

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build(latent: int):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dmquant.pipelines.tiny import _clip, _vae

    tok, _ = _clip()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=768,
                                        num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77))
    unet = UNet2DConditionModel(**{**SD15_UNET, "sample_size": latent})
    from diffusers import DDIMScheduler

    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text.eval(), tokenizer=tok, unet=unet.eval(),
                                   scheduler=DDIMScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--timesteps", type=int, default=2)
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = SD1.5's 512 px)")
    p.add_argument("--recipe", default="w8a8-tsa")
    args = p.parse_args()
    torch.manual_seed(0)
    pipe = build(args.latent)
    params = sum(t.numel() for t in pipe.unet.parameters())
    print(f"SD1.5 UNet: {params / 1e6:.0f} M params; after build: peak {peak_gib():.2f} GiB")
    calib = CalibrationSet(num_prompts=args.prompts, steps=args.steps, timesteps=args.timesteps, batch_size=args.prompts)
    t0 = time.perf_counter()
    dmquant.quantize(pipe, args.recipe, calibration=calib)
    info = pipe.unet.dmquant_state.provenance["calibration"]
    print(f"{args.recipe}: {args.prompts} prompts x {args.timesteps} of {args.steps} steps at {args.latent}x{args.latent} "
          f"latents: {info['recorded_calls']} recorded calls, {time.perf_counter() - t0:.0f} s, peak {peak_gib():.2f} GiB")


if __name__ == "__main__":
    main()
