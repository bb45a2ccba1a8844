"""Which layers carry the W4A4 output error on miniature-pixart: for each quantized layer, the denoiser's
output MSE against float (all denoiser calls of 8 evaluation prompts x 10 steps) with only that layer's
activation quantizer switched off, or only its weight quantizer, next to the MSE with everything on.

    OMP_NUM_THREADS=1 python docs/results/finetune-ablation-intel/layers/layer_shares.py [recipe] > shares.txt
"""
import sys

import torch

import dmquant
from dmquant.eval.runner import calibration_prompts
from dmquant.pipelines import generate, load, miniature_prompts
from dmquant.state import quant_layers

recipe = sys.argv[1] if len(sys.argv) > 1 else "w4a4-static"
torch.manual_seed(0)
pipe = load("miniature-pixart")
prompts = miniature_prompts("miniature-pixart", 16)
denoiser, calls = pipe.transformer, []


def record(_module, args, kwargs):
    kwargs = {**kwargs, **({"hidden_states": args[0]} if args else {}), "return_dict": False}
    calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})


handle = denoiser.register_forward_pre_hook(record, with_kwargs=True)
generate(pipe, prompts[:8], seed=0, steps=10, progress=False)
handle.remove()
with torch.no_grad():  # the float outputs before quantizing: a fine-tuning merge rewrites the float weights
    reference = [denoiser(**c)[0] for c in calls]
# calibrated as `dmquant eval` does: held-out prompts, seed 10**6; float masters kept for the switches
dmquant.quantize(pipe, recipe, calibration={"prompts": calibration_prompts("miniature-pixart", prompts, 16),
                                            "steps": 10, "seed": 10**6}, pack=False)
with torch.no_grad():
    def mse() -> float:
        return sum(float((denoiser(**c)[0] - r).pow(2).mean()) for c, r in zip(calls, reference)) / len(calls)

    everything = mse()
    rows = []
    for name, layer in quant_layers(denoiser).items():
        off = []
        for q in (layer.input_quantizer, layer.weight_quantizer):
            q.enabled = False
            off.append(mse())
            q.enabled = True
        rows.append((name, *off))
print(f"{recipe}: output MSE vs float {everything:.5f} with every quantizer on\n")
print("| layer | activations off: MSE | share | weights off: MSE | share |\n|---|---:|---:|---:|---:|")
for name, act, weight in sorted(rows, key=lambda r: r[1]):
    print(f"| {name} | {act:.5f} | {1 - act / everything:+.1%} | {weight:.5f} | {1 - weight / everything:+.1%} |")
