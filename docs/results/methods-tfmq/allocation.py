"""Calibration calls per step that a recipe's `samples` budget keeps, recorded as `dmquant eval` records
them (its held-out calibration prompts for the evaluation prompts in metrics.json, seed + 10**6):

    python docs/results/methods-tfmq/allocation.py /tmp/eval/metrics.json RECIPE.yaml [RECIPE.yaml ...]
"""
import json
import sys

import dmquant
from dmquant.calibration import CalibrationSet
from dmquant.eval.runner import calibration_prompts
from dmquant.pipelines import load

meta = json.load(open(sys.argv[1]))
prompts = calibration_prompts(meta["pipeline"], meta["prompts"], 16)
for path in sys.argv[2:]:
    settings = {**dmquant.get_recipe(path).calibration, "prompts": prompts, "steps": meta["steps"],
                "seed": meta["seed"] + 10**6}
    runner = CalibrationSet(**settings).prepare(load(meta["pipeline"]))
    print(f"{path}: calls per step {runner.description['calls_per_step']}")
