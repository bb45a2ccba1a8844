"""Per-family facts as data: which pipeline classes belong to which family, where the denoiser is,
what stays in high precision, and how the timestep and text reach the denoiser. One generic code
path reads this; `tests/test_pipelines.py` checks every entry against the real diffusers classes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Module-name regexes (searched in names relative to the denoiser) kept in high precision, following
# Q-Diffusion / PTQ4DiT / ViDiT-Q / SVDQuant: first and last layers, time and text embeddings,
# patch/position embeddings, adaLN modulation. Grouped by role so each family lists what it has.
_FIRST_LAST_CONV = r"^(conv_in|conv_out)$"
_PROJ_OUT = r"^proj_out$"
_TIME_EMB = r"(^|\.)(time_embedding|time_emb_proj)(\.|$)"  # UNet time MLP and its per-resnet projections
_ADALN_SINGLE = r"^adaln_single\."  # PixArt/Latte: timestep MLP + the shared adaLN-single modulation
_CAPTION = r"^caption_projection\."
_POS_EMBED = r"^pos_embed\."
_TIME_TEXT = r"^time_text_embed\."  # SD3/FLUX: timestep + pooled text (+ guidance) embeddings
_CONTEXT = r"^context_embedder$"
_MODULATION = r"(^|\.)norm[\w]*\.linear$"  # adaLN-zero modulation linears inside the blocks and norm_out


@dataclass(frozen=True)
class Family:
    """One denoiser family; `keep_fp` regexes must each match a module of the family's denoiser."""

    name: str
    kind: str  # "unet" | "image-dit" | "video-dit"
    pipelines: tuple[str, ...]  # model_index.json `_class_name`s
    denoiser_class: str
    denoiser: str  # pipeline attribute holding the denoiser
    keep_fp: tuple[str, ...]
    timestep_kwarg: str = "timestep"
    text_kwarg: str = "encoder_hidden_states"
    extra_conditioning: tuple[str, ...] = ()  # other forward kwargs carrying conditioning
    call_kwargs: dict[str, Any] = field(default_factory=dict)  # quirks the stock pipeline needs

    @property
    def is_video(self) -> bool:
        return self.kind == "video-dit"


_UNET_FP = (_FIRST_LAST_CONV, _TIME_EMB)
_PIXART_FP = (_POS_EMBED, _ADALN_SINGLE, _CAPTION, _PROJ_OUT)
_MMDIT_FP = (_POS_EMBED, _TIME_TEXT, _CONTEXT, _MODULATION, _PROJ_OUT)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd", "unet", ("StableDiffusionPipeline",), "UNet2DConditionModel", "unet", _UNET_FP),
    Family("sdxl", "unet", ("StableDiffusionXLPipeline",), "UNet2DConditionModel", "unet",
           (*_UNET_FP, r"^add_embedding\."), extra_conditioning=("added_cond_kwargs",)),
    Family("pixart", "image-dit", ("PixArtAlphaPipeline", "PixArtSigmaPipeline"), "PixArtTransformer2DModel",
           "transformer", _PIXART_FP, extra_conditioning=("encoder_attention_mask", "added_cond_kwargs"),
           call_kwargs={"use_resolution_binning": False, "clean_caption": False}),
    Family("sd3", "image-dit", ("StableDiffusion3Pipeline",), "SD3Transformer2DModel", "transformer", _MMDIT_FP,
           extra_conditioning=("pooled_projections",)),
    Family("flux", "image-dit", ("FluxPipeline",), "FluxTransformer2DModel", "transformer",
           (r"^x_embedder$", *_MMDIT_FP[1:]), extra_conditioning=("pooled_projections", "guidance", "txt_ids", "img_ids")),
    Family("latte", "video-dit", ("LattePipeline",), "LatteTransformer3DModel", "transformer", _PIXART_FP,
           extra_conditioning=("encoder_attention_mask",), call_kwargs={"clean_caption": False, "mask_feature": False}),
    Family("cogvideox", "video-dit", ("CogVideoXPipeline",), "CogVideoXTransformer3DModel", "transformer",
           (r"^patch_embed\.", r"^time_embedding\.", _MODULATION, _PROJ_OUT)),
    Family("wan", "video-dit", ("WanPipeline",), "WanTransformer3DModel", "transformer",
           (r"^patch_embedding$", r"^condition_embedder\.", _PROJ_OUT)),
)}
_BY_CLASS = {p: f for f in FAMILIES.values() for p in f.pipelines}


def family_of(obj: Any) -> Family:
    """Family of a pipeline object, a pipeline class name (model_index.json `_class_name`), or a
    denoiser module (UNet/DiT classes shared by several families resolve to the first, e.g. sd)."""
    name = obj if isinstance(obj, str) else type(obj).__name__
    if name in _BY_CLASS:
        return _BY_CLASS[name]
    for fam in FAMILIES.values():
        if fam.denoiser_class == name:
            return fam
    raise ValueError(f"unsupported pipeline class {name!r}; supported: {', '.join(sorted(_BY_CLASS))}")
