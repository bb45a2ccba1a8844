"""Per-half against guided output error of a quantized miniature-pixart, per sampling step: the float
trajectory of 8 evaluation prompts x 10 steps, the float outputs taken before quantizing (a fine-tuning
merge rewrites the float weights), calibrated as `dmquant eval` does.

    OMP_NUM_THREADS=1 python docs/results/finetune-ablation-amd-seeds/guided_error.py [recipe] > out.txt
"""
import sys

import torch

import dmquant
from dmquant.calibration.trajectory import TrajectoryRecorder
from dmquant.eval.runner import calibration_prompts
from dmquant.pipelines import generate, load, miniature_prompts
from dmquant.pipelines.generate import DEFAULT_GUIDANCE

recipe = sys.argv[1] if len(sys.argv) > 1 else "w4a4-static"
torch.manual_seed(0)
pipe = load("miniature-pixart")
prompts = miniature_prompts("miniature-pixart", 16)
denoiser = pipe.transformer
with TrajectoryRecorder(denoiser, lambda _step: True) as recorder:
    recorder.run(lambda: generate(pipe, prompts[:8], seed=0, steps=10, progress=False), first=True)
calls = [c.kwargs for c in recorder.trajectory.calls]
with torch.no_grad():
    reference = [denoiser(**c)[0] for c in calls]
dmquant.quantize(pipe, recipe, calibration={"prompts": calibration_prompts("miniature-pixart", prompts, 16),
                                            "steps": 10, "seed": 10**6}, pack=False)
s = DEFAULT_GUIDANCE
print(f"{recipe}: output error against float per sampling step (guidance {s})\n")
print("| step | per-half MSE | guided MSE | corr(error uncond, error cond) |\n|---:|---:|---:|---:|")
halves, guided = [], []
with torch.no_grad():
    for step, (c, r) in enumerate(zip(calls, reference)):
        du, dc = (denoiser(**c)[0] - r).chunk(2)
        halves.append(float(torch.cat([du, dc]).pow(2).mean()))
        guided.append(float((du + s * (dc - du)).pow(2).mean()))
        corr = float((du * dc).sum() / (du.norm() * dc.norm()))
        print(f"| {step} | {halves[-1]:.5f} | {guided[-1]:.5f} | {corr:.3f} |")
print(f"\nmean: per-half {sum(halves) / len(halves):.5f}, guided {sum(guided) / len(guided):.5f} "
      f"({sum(guided) / sum(halves):.1f}x)")
