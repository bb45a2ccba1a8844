"""Mixed precision found by measurement (MixDQ, ViDiT-Q MP): per-layer sensitivity on the recorded
float trajectory, bit allocation by integer programming under a budget, an ordinary recipe out.

    >>> from dmquant.mixed import search
    >>> result = search(pipe, "w4a8", base="gptq-w4a8")   # at the bytes of uniform w4a8
    >>> result.write("recipe.yaml", heatmap="sensitivity.png")
    >>> dmquant.quantize(pipe, "recipe.yaml")
"""
from .allocate import Allocation, allocate, parse_budget, solve
from .candidates import DEFAULT_CANDIDATES, FP, Candidate, parse_candidates, quantizable_layers, weight_nbytes
from .flow import SearchResult, measure_pipeline, recipe_nbytes, search
from .recipe import build_recipe, recipe_yaml, save_heatmap, suggest_exclude, write_recipe
from .sensitivity import Sensitivity, measure

__all__ = ["DEFAULT_CANDIDATES", "FP", "Allocation", "Candidate", "SearchResult", "Sensitivity", "allocate",
           "build_recipe", "measure", "measure_pipeline", "parse_budget", "parse_candidates", "quantizable_layers",
           "recipe_nbytes", "recipe_yaml", "save_heatmap", "search", "solve", "suggest_exclude", "weight_nbytes",
           "write_recipe"]
