"""The trained miniatures: real diffusers pipelines, small enough to train on a laptop CPU.

`miniature-sd` (StableDiffusionPipeline: UNet2DConditionModel + CLIPTextModel), `miniature-pixart`
(PixArtAlphaPipeline: PixArtTransformer2DModel + T5EncoderModel) and `miniature-latte` (LattePipeline,
8-frame text-to-video) share one small AutoencoderKL (32x32x3 <-> 8x8x4). Architectures are data here;
`dmquant.pipelines.training` trains them and `weights/<name>/` holds the committed checkpoints.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

WEIGHTS = Path(__file__).parent / "weights"
NAMES = ("miniature-sd", "miniature-pixart", "miniature-latte")
IMAGE_SIZE, FRAMES = 32, 8

VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
           up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
           latent_channels=4, norm_num_groups=16, sample_size=IMAGE_SIZE)
CLIP_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
T5_TEXT = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, feed_forward_proj="gated-gelu")
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
            attention_head_dim=4, norm_num_groups=16)
# The DiT blocks PixArt and Latte share, so the video model can start from the image model (as Latte
# was initialised from PixArt-alpha): Latte's block options are set to PixArt's defaults.
DIT_BLOCKS = dict(num_layers=4, num_attention_heads=4, attention_head_dim=32, cross_attention_dim=128,
                  caption_channels=64, norm_type="ada_norm_single", num_embeds_ada_norm=1000)
PIXART = dict(sample_size=8, patch_size=1, in_channels=4, out_channels=4, interpolation_scale=1, **DIT_BLOCKS)
LATTE = dict(sample_size=8, patch_size=1, in_channels=4, out_channels=8,  # LattePipeline keeps half
             video_length=FRAMES, activation_fn="gelu-approximate", attention_bias=True,
             norm_elementwise_affine=False, norm_eps=1e-6, **DIT_BLOCKS)
TRAIN_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def build_components(name: str, vocab_words: list[str] | None = None) -> dict[str, Any]:
    """Fresh (untrained) components of a miniature, keyed as its pipeline expects them."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        LatteTransformer3DModel,
        PixArtTransformer2DModel,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .tokenizers import clip_tokenizer, t5_tokenizer

    parts: dict[str, Any] = {
        "vae": AutoencoderKL(**VAE),
        "scheduler": DPMSolverMultistepScheduler(**TRAIN_SCHEDULER),
    }
    if name == "miniature-sd":
        tok = clip_tokenizer(vocab_words)
        parts.update(tokenizer=tok, text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), **CLIP_TEXT)),
                     unet=UNet2DConditionModel(**UNET))
    elif name in ("miniature-pixart", "miniature-latte"):
        tok = t5_tokenizer(vocab_words)
        parts.update(tokenizer=tok, text_encoder=T5EncoderModel(T5Config(vocab_size=len(tok), **T5_TEXT)))
        parts["transformer"] = (PixArtTransformer2DModel(**PIXART) if name == "miniature-pixart"
                                else LatteTransformer3DModel(**LATTE))
    else:
        raise ValueError(f"unknown miniature {name!r}; choose from {NAMES}")
    return parts


def pipeline_class(name: str):
    import diffusers

    return {"miniature-sd": diffusers.StableDiffusionPipeline, "miniature-pixart": diffusers.PixArtAlphaPipeline,
            "miniature-latte": diffusers.LattePipeline}[name]


def assemble(name: str, parts: dict[str, Any]):
    """A stock diffusers pipeline from components."""
    cls = pipeline_class(name)
    if name == "miniature-sd":
        return cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return cls(**parts)
