"""Per-family facts as data: which pipeline classes belong to which family, where the denoiser is,
what stays in high precision, and how the pipeline is called. One generic code path reads this.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dmquant.filters import DEFAULT_EXCLUDE


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "unet" | "image-dit" | "video-dit"
    pipelines: tuple[str, ...]
    denoiser: str  # pipeline attribute
    timestep_kwarg: str = "timestep"
    text_kwarg: str = "encoder_hidden_states"
    keep_fp: tuple[str, ...] = DEFAULT_EXCLUDE  # module-name regexes kept in high precision
    call_kwargs: dict[str, Any] = field(default_factory=dict)  # quirks the stock pipeline needs

    @property
    def is_video(self) -> bool:
        return self.kind == "video-dit"


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd", "unet", ("StableDiffusionPipeline",), "unet"),
    Family("sdxl", "unet", ("StableDiffusionXLPipeline",), "unet"),
    Family("pixart", "image-dit", ("PixArtAlphaPipeline", "PixArtSigmaPipeline"), "transformer",
           call_kwargs={"use_resolution_binning": False, "clean_caption": False}),
    Family("sd3", "image-dit", ("StableDiffusion3Pipeline",), "transformer"),
    Family("flux", "image-dit", ("FluxPipeline",), "transformer"),
    Family("latte", "video-dit", ("LattePipeline",), "transformer",
           call_kwargs={"clean_caption": False, "mask_feature": False}),
    Family("cogvideox", "video-dit", ("CogVideoXPipeline",), "transformer"),
    Family("wan", "video-dit", ("WanPipeline",), "transformer"),
)}
_BY_PIPELINE = {p: f for f in FAMILIES.values() for p in f.pipelines}


def family_of(obj_or_class_name: Any) -> Family:
    """Family of a pipeline object, its class name, or a model_index.json `_class_name`."""
    name = obj_or_class_name if isinstance(obj_or_class_name, str) else type(obj_or_class_name).__name__
    if name not in _BY_PIPELINE:
        raise ValueError(f"unsupported pipeline class {name!r}; supported: {', '.join(sorted(_BY_PIPELINE))}")
    return _BY_PIPELINE[name]
