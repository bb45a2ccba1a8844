"""The smoothing strength svdquant-w4a4 chooses per group on miniature-sd, as the eval calibrates it
(16 held-out prompts around the 16 scored ones, 10 steps), with every candidate's mean error (the
search's debug log). Run under two code paths and compare:

    OMP_NUM_THREADS=1 python smoothing_alphas.py alphas-default.json
    OMP_NUM_THREADS=1 ONEDNN_MAX_CPU_ISA=AVX2 python smoothing_alphas.py alphas-onednn-avx2.json
"""
import json
import logging
import sys

import dmquant
from dmquant.pipelines import load, miniature_prompts


class Errors(logging.Handler):
    """{consumers: {alpha: mean error}} from the search's debug lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: dict[str, dict[str, float]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        consumers, candidates = record.args
        self.errors[consumers] = {a: float(v) for a, v in (c.split(": ") for c in candidates.split(", "))}


errors = Errors()
search_log = logging.getLogger("dmquant.transforms.smoothing")
search_log.setLevel(logging.DEBUG)
search_log.addHandler(errors)
pipe = load("miniature-sd")
scored = miniature_prompts("miniature-sd", 16)
dmquant.quantize(pipe, "svdquant-w4a4", calibration={"num_prompts": 16, "exclude": scored, "steps": 10})
chosen = pipe.unet.dmquant_state.steps[0].result  # the smoothquant step: {group: alpha or None}
with open(sys.argv[1], "w") as f:
    json.dump({"chosen": chosen, "errors": errors.errors}, f, indent=0)
