"""Outlier handling for low-bit activations, as recipe steps: smoothing (SmoothQuant, ViDiT-Q channel
balancing), rotation (Hadamard / random orthogonal), the SVDQuant low-rank branch, and LoRA merging.

Each step runs after the layers are swapped to quantized modules, keeps the float model's function
(exactly, up to float rounding) and records what it did on the layer (`LayerTransform`,
`LowRankBranch`) and in the plan, so save/load re-creates it.
"""
from ..orthogonal import hadamard, random_orthogonal, rotate
from .attach import attach_transforms
from .layer import LayerTransform
from .lora import merge_lora, parse_lora, unmerge_lora
from .lowrank import LowRankBranch, LowRankSplit, apply_svd, svd_split
from .rotation import apply_rotation
from .smoothing import apply_smoothquant, smoothing_factors
from .stats import ActivationStats

__all__ = ["attach_transforms", "LayerTransform", "LowRankBranch", "LowRankSplit", "ActivationStats",
           "apply_smoothquant", "apply_rotation", "apply_svd", "merge_lora", "unmerge_lora", "parse_lora", "svd_split",
           "smoothing_factors", "hadamard", "random_orthogonal", "rotate"]
