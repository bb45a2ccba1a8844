"""Data-free quantization-aware fine-tuning against the full-precision teacher, as recipe steps.

`efficientdm` (QALoRA + temporal LSQ), `quest` (selective: temporal and most sensitive layers) and
`qvgen` (QALoRA plus an auxiliary branch decayed to rank 0) all distil the quantized denoiser from its
own float self on the calibration trajectory, then fold everything into plain quantized layers.
"""
from .adapters import LayerAdapters, LowRankDelta, make_adapters, merge_adapters, serving_adapters
from .distill import DistillConfig, DistillResult, Schedule, distill_adapters
from .qalora import apply_efficientdm, finetune_layers, weight_quantized_layers
from .quest import apply_quest, layer_sensitivity
from .qvgen import RankDecay, apply_qvgen

__all__ = ["LowRankDelta", "LayerAdapters", "make_adapters", "merge_adapters", "serving_adapters",
           "DistillConfig", "DistillResult", "Schedule", "distill_adapters", "apply_efficientdm", "finetune_layers",
           "weight_quantized_layers", "apply_quest", "layer_sensitivity", "apply_qvgen", "RankDecay"]
