"""Per-family facts as data: which pipelines and denoisers belong to a family, what stays in high
precision, how the timestep reaches the denoiser, and the patterns calibration steps use.

One generic code path reads this table (`quantize`, calibration, eval). Skip rules are named *roles*
(`ROLES`: one regex each, searched in module names relative to the denoiser); the core's generic
default for models outside the table (`dmquant.filters.DEFAULT_EXCLUDE`) is the union of all roles, and
a recipe adjusts by role name (`skip_patterns(family, without=("temporal",))`), never by pasted regexes.
`tests/test_pipelines.py` and `tests/test_families.py` check every entry against the real classes.
Pure data: nothing here imports torch, diffusers or the rest of dmquant.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable


def _names(*names: str) -> str:
    return r"(^|\.)(" + "|".join(names) + r")(\.|$)"


# Kept in high precision, following Q-Diffusion / PTQ4DiT / ViDiT-Q / SVDQuant (first and last layers,
# time and text embeddings, patch/position embeddings, adaLN modulation), grouped by role.
ROLES: dict[str, str] = {
    # inputs depend on the timestep alone (TFMQ-DM's temporal layers): UNet time MLP and per-resnet
    # projections, PixArt/Latte adaLN-single, DiT timestep MLPs
    "temporal": _names("time_embed", "time_embedding", "time_emb_proj", "adaln_single", "timestep_embedder"),
    # timestep mixed with other conditioning: SDXL added time ids, SD3/FLUX timestep + pooled text
    # (+ guidance), Wan's condition embedder
    "time_conditioning": _names("time_proj", "add_embedding", "time_text_embed", "condition_embedder",
                                "guidance_embedder"),
    "text_projection": _names("caption_projection", "context_embedder"),
    "patch_embedding": _names("pos_embed", "patch_embed", "patch_embedding", "x_embedder"),
    "modulation": r"(^|\.)norm[\w]*(\.|$)",  # adaLN / AdaLayerNorm modulation linears live under norm*
    "first_last": r"^(conv_in|conv_out|proj_in|proj_out|conv_norm_out|norm_out)$",
}
GENERIC_SKIP: tuple[str, ...] = tuple(ROLES)  # models outside the table: every role

# Units of block reconstruction for models outside the table (outermost match wins).
UNET_BLOCKS = (r"(^|\.)(down|up)_blocks\.\d+\.(resnets|attentions)\.\d+$",  # ResnetBlock2D / Transformer2DModel
               r"(^|\.)mid_block\.(resnets|attentions)\.\d+$")
GENERIC_BLOCKS: tuple[str, ...] = (*UNET_BLOCKS, r"(^|\.)((temporal_|single_)?transformer_)?blocks\.\d+$")
GENERIC_TEMPORAL = r"(^|\.)(time_embedding|time_emb_proj|adaln_single|timestep_embedder)(\.|$)"
DEFAULT_TIMESTEP_SCALE = 1000.0  # DDPM-trained and flow models whose pipeline passes t in [0, 1000]


@dataclass(frozen=True)
class Family:
    """One denoiser family. Each `skip` role must match a quantizable layer of the family's denoiser.

    `timestep_scale`: the timestep the stock pipeline passes divided by it is the noise level in
    [0, 1] (1000 for DDPM and flow models, 1 for FLUX, whose pipeline passes t / 1000). `video_size`:
    (frames, height, width) calibration samples at by default, None entries leaving the pipeline's
    own default (CogVideoX and Latte derive theirs from the denoiser config); None for images.
    `config_kwargs`: pipeline call kwargs that must equal a denoiser config attribute."""

    name: str
    kind: str  # "unet" | "image-dit" | "video-dit"
    pipelines: tuple[str, ...]  # model_index.json `_class_name`s
    denoiser_class: str
    denoiser: str  # pipeline attribute holding the denoiser
    skip: tuple[str, ...]  # ROLES kept in high precision
    blocks: tuple[str, ...]  # block-reconstruction units
    temporal: str  # layers whose input depends on the timestep alone
    timestep_scale: float = DEFAULT_TIMESTEP_SCALE
    timestep_kwarg: str = "timestep"
    text_kwarg: str = "encoder_hidden_states"
    extra_conditioning: tuple[str, ...] = ()  # other forward kwargs carrying conditioning
    call_kwargs: dict[str, Any] = field(default_factory=dict)  # quirks the stock pipeline needs
    video_size: tuple[int | None, int | None, int | None] | None = None
    frames_kwarg: str = "num_frames"
    config_kwargs: dict[str, str] = field(default_factory=dict)  # pipeline kwarg -> denoiser config attribute
    config_match: dict[str, Any] = field(default_factory=dict)  # tells families sharing a denoiser class apart

    def __post_init__(self) -> None:
        unknown = [r for r in self.skip if r not in ROLES]
        if unknown:
            raise ValueError(f"family {self.name}: unknown roles {unknown}; roles: {', '.join(ROLES)}")

    @property
    def is_video(self) -> bool:
        return self.kind == "video-dit"

    @property
    def skip_patterns(self) -> tuple[str, ...]:
        """The regexes of `skip` (what a recipe without `exclude` keeps in high precision)."""
        return tuple(ROLES[r] for r in self.skip)


_UNET_BLOCKS = UNET_BLOCKS
_DIT_BLOCKS = (r"(^|\.)transformer_blocks\.\d+$",)
_PIXART_SKIP = ("patch_embedding", "temporal", "text_projection", "first_last")
_MMDIT_SKIP = ("patch_embedding", "time_conditioning", "text_projection", "modulation", "first_last")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd", "unet", ("StableDiffusionPipeline",), "UNet2DConditionModel", "unet", ("first_last", "temporal"),
           _UNET_BLOCKS, _names("time_embedding", "time_emb_proj")),
    Family("sdxl", "unet", ("StableDiffusionXLPipeline",), "UNet2DConditionModel", "unet",
           ("first_last", "temporal", "time_conditioning"), _UNET_BLOCKS, _names("time_embedding", "time_emb_proj"),
           extra_conditioning=("added_cond_kwargs",), config_match={"addition_embed_type": "text_time"}),
    Family("pixart", "image-dit", ("PixArtAlphaPipeline", "PixArtSigmaPipeline"), "PixArtTransformer2DModel",
           "transformer", _PIXART_SKIP, _DIT_BLOCKS, _names("adaln_single"),
           extra_conditioning=("encoder_attention_mask", "added_cond_kwargs"),
           call_kwargs={"use_resolution_binning": False, "clean_caption": False}),
    Family("sd3", "image-dit", ("StableDiffusion3Pipeline",), "SD3Transformer2DModel", "transformer", _MMDIT_SKIP,
           _DIT_BLOCKS, _names("timestep_embedder"), extra_conditioning=("pooled_projections",)),
    Family("flux", "image-dit", ("FluxPipeline",), "FluxTransformer2DModel", "transformer", _MMDIT_SKIP,
           (r"(^|\.)(single_)?transformer_blocks\.\d+$",), _names("timestep_embedder"), timestep_scale=1.0,
           extra_conditioning=("pooled_projections", "guidance", "txt_ids", "img_ids")),
    Family("latte", "video-dit", ("LattePipeline",), "LatteTransformer3DModel", "transformer", _PIXART_SKIP,
           (r"(^|\.)(temporal_)?transformer_blocks\.\d+$",), _names("adaln_single"),
           extra_conditioning=("encoder_attention_mask",), call_kwargs={"clean_caption": False, "mask_feature": False},
           # frames must equal the config's video_length (fixed temporal embedding)
           video_size=(None, None, None), frames_kwarg="video_length", config_kwargs={"video_length": "video_length"}),
    Family("cogvideox", "video-dit", ("CogVideoXPipeline",), "CogVideoXTransformer3DModel", "transformer",
           ("patch_embedding", "temporal", "modulation", "first_last"), _DIT_BLOCKS, _names("time_embedding"),
           # the joint positional embedding is built for exactly max_text_seq_length text tokens
           video_size=(None, None, None), config_kwargs={"max_sequence_length": "max_text_seq_length"}),
    Family("wan", "video-dit", ("WanPipeline",), "WanTransformer3DModel", "transformer",
           ("patch_embedding", "time_conditioning", "first_last"), (r"(^|\.)blocks\.\d+$",),
           r"(^|\.)condition_embedder\.(time_embedder|time_proj)(\.|$)",
           video_size=(9, 64, 64)),  # the pipeline's own default is 81 x 480 x 832
)}
_BY_PIPELINE = {p: f for f in FAMILIES.values() for p in f.pipelines}


def _config(module: Any) -> dict[str, Any]:
    config = getattr(module, "config", None)
    return dict(config) if config is not None and hasattr(config, "keys") else {}


def family_for_module(module: Any) -> Family | None:
    """The family of a denoiser module (by class, then config for classes several families share),
    or None for a model outside the table."""
    candidates = [f for f in FAMILIES.values() if f.denoiser_class == type(module).__name__]
    config = _config(module)
    for fam in sorted(candidates, key=lambda f: not f.config_match):  # the most specific first
        if all(config.get(k) == v for k, v in fam.config_match.items()):
            return fam
    return None


def family_of(obj: Any) -> Family:
    """Family of a pipeline object, a pipeline class name (model_index.json `_class_name`), a denoiser
    module or a denoiser class name (a class name shared by several families resolves to the first, sd)."""
    name = obj if isinstance(obj, str) else type(obj).__name__
    fam = _BY_PIPELINE.get(name)
    if fam is None and any(f.denoiser_class == name for f in FAMILIES.values()):
        fam = next(f for f in FAMILIES.values() if f.denoiser_class == name) if isinstance(obj, str) \
            else family_for_module(obj)
    if fam is None:
        raise ValueError(f"unsupported pipeline class {name!r}; supported: {', '.join(sorted(_BY_PIPELINE))}")
    return fam


def find_family(obj: Any) -> Family | None:
    """`family_of`, or None outside the table; a pipeline outside the table (img2img, control, ...)
    resolves by its denoiser, since what the table says of a denoiser holds in any pipeline."""
    try:
        return family_of(obj)
    except ValueError:
        pass
    for attr in ("unet", "transformer"):
        denoiser = getattr(obj, attr, None)
        if denoiser is not None:
            return family_for_module(denoiser)
    return None


def skip_patterns(family: Family | None, without: Iterable[str] = ()) -> tuple[str, ...]:
    """The high-precision regexes of `family` (the generic set for None), minus the roles `without`."""
    drop = set(without)
    unknown = drop - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; roles: {', '.join(ROLES)}")
    roles = family.skip if family is not None else GENERIC_SKIP
    return tuple(ROLES[r] for r in roles if r not in drop)


def resolve_pattern(pattern: str) -> str:
    """A layer-name regex, where "role:<name>" stands for that role's regex (`ROLES`): recipes name
    roles instead of pasting their patterns."""
    if not pattern.startswith("role:"):
        return pattern
    role = pattern[len("role:"):]
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} in {pattern!r}; roles: {', '.join(ROLES)}")
    return ROLES[role]


def timestep_scale_for(obj: Any) -> float:
    """What the denoiser's timestep is divided by to give the noise level (1000 outside the table)."""
    fam = find_family(obj)
    return fam.timestep_scale if fam is not None else DEFAULT_TIMESTEP_SCALE


def blocks_for(obj: Any) -> tuple[str, ...]:
    """Block-reconstruction unit patterns of obj's family (the generic set outside the table)."""
    fam = find_family(obj)
    return fam.blocks if fam is not None else GENERIC_BLOCKS


def temporal_for(obj: Any) -> str:
    """The temporal-layer regex of obj's family (the generic one outside the table)."""
    fam = find_family(obj)
    return fam.temporal if fam is not None else GENERIC_TEMPORAL
