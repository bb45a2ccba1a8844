"""Worker for the multi-process / mixed-precision fine-tuning tests: quantizes tiny-pixart with a
short EfficientDM run and saves the denoiser's output on a fixed call (main process only).

    python tests/distill_worker.py OUT.safetensors [no|bf16] [call|sample]
    accelerate launch --cpu --num_processes 2 tests/distill_worker.py OUT.safetensors [no] [call|sample]
"""
import sys

import torch
from safetensors.torch import save_file

import dmquant
from dmquant.config import Step
from dmquant.pipelines import load

out, extra = sys.argv[1], sys.argv[2:]
precision, objective = extra[0] if extra else "no", extra[1] if len(extra) > 1 else "call"
torch.manual_seed(0)
pipe = load("tiny-pixart")
base = dmquant.get_recipe("efficientdm-w4a4")
ranges, step = base.steps
args = {**step.args, "iters": 6, "batch_size": 4, "mixed_precision": precision, "objective": objective}
dmquant.quantize(pipe, base.replace(steps=(ranges, Step(step.name, args))),
                 calibration={"num_prompts": 2, "steps": 4, "timesteps": "all"})
d = pipe.transformer
g = torch.Generator().manual_seed(0)
x = torch.randn(1, d.config.in_channels, d.config.sample_size, d.config.sample_size, generator=g)
text = torch.randn(1, 4, d.config.caption_channels, generator=g)
with torch.no_grad():
    y = d(x, encoder_hidden_states=text, timestep=torch.tensor([500]),
          added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
from accelerate import PartialState  # noqa: E402

if PartialState().is_main_process:
    save_file({"y": y.contiguous()}, out)
