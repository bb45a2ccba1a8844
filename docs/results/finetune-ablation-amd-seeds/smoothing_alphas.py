"""The smoothing strength svdquant-w4a4 chooses per group on miniature-sd, as the eval calibrates it
(16 held-out prompts around the 16 scored ones, 10 steps). Run under two code paths and compare:

    OMP_NUM_THREADS=1 python smoothing_alphas.py alphas-default.json
    OMP_NUM_THREADS=1 ONEDNN_MAX_CPU_ISA=AVX2 python smoothing_alphas.py alphas-onednn-avx2.json
"""
import json
import sys

import dmquant
from dmquant.pipelines import load, miniature_prompts

pipe = load("miniature-sd")
scored = miniature_prompts("miniature-sd", 16)
dmquant.quantize(pipe, "svdquant-w4a4", calibration={"num_prompts": 16, "exclude": scored, "steps": 10})
chosen = pipe.unet.dmquant_state.steps[0].result  # the smoothquant step: {group: alpha or None}
with open(sys.argv[1], "w") as f:
    json.dump(chosen, f, indent=0)
