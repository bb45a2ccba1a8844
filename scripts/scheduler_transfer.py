"""Do per-timestep scales survive another sampler? Calibrate with the pipeline's own scheduler at one
step count, then sample with another scheduler and step count; PSNR vs FP on the same seeds, side by
side with one static scale (noise-level keyed groups should transfer; step-index keyed ones could not).

    python scripts/scheduler_transfer.py --pipeline miniature-pixart --calib-steps 10 --steps 25
"""
from __future__ import annotations

import argparse

import torch

import dmquant
from dmquant.eval.metrics import psnr
from dmquant.pipelines import generate, load, miniature_prompts


def sample(pipe, prompts: list[str], scheduler: str, steps: int) -> torch.Tensor:
    import diffusers

    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    return generate(pipe, prompts, seed=0, steps=steps, progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default="miniature-pixart")
    p.add_argument("--recipes", default="w8a8-static,w8a8-tsa,w4a8-static,w4a8-tsa")
    p.add_argument("--calib-steps", type=int, default=10)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scheduler", default="DDIMScheduler", help="diffusers scheduler class used for sampling")
    p.add_argument("--num-prompts", type=int, default=16)
    args = p.parse_args()
    prompts = miniature_prompts(args.pipeline, args.num_prompts)
    fp = sample(load(args.pipeline), prompts, args.scheduler, args.steps)
    print(f"{args.pipeline}: calibrated with its own scheduler at {args.calib_steps} steps (all recorded), "
          f"sampled with {args.scheduler} at {args.steps} steps, {len(prompts)} prompts")
    print(f"{'recipe':<14}{'PSNR vs FP (dB)':>16}")
    for recipe in args.recipes.split(","):
        pipe = dmquant.quantize(load(args.pipeline), recipe,
                                calibration={"num_prompts": 8, "steps": args.calib_steps, "timesteps": "all"})
        print(f"{recipe:<14}{float(psnr(sample(pipe, prompts, args.scheduler, args.steps), fp).mean()):>16.2f}")


if __name__ == "__main__":
    main()
