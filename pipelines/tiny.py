"""Tiny random-weight pipelines of every family, built offline from configs (for tests and adapters).

sd / pixart / latte reuse the miniature architectures untrained; the others get the smallest configs
their diffusers classes accept. Quality is meaningless here: these exercise code paths only.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .generate import with_call_defaults
from .miniature import assemble, build_components
from .tokenizers import clip_tokenizer, t5_tokenizer

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
T5 = dict(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, relative_attention_num_buckets=8,
          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _clip(projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = clip_tokenizer()
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return tok, cls(CLIPTextConfig(vocab_size=len(tok), projection_dim=32, **TEXT))


def _t5(umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    tok = t5_tokenizer()
    if umt5:
        return tok, UMT5EncoderModel(UMT5Config(vocab_size=len(tok), **T5))
    return tok, T5EncoderModel(T5Config(vocab_size=len(tok), **T5))


def _vae(latent: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent, norm_num_groups=16,
                         sample_size=32, shift_factor=0.0)


def _sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok, te = _clip()
    tok2, te2 = _clip(projection=True)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), norm_num_groups=16, transformer_layers_per_block=(1, 1),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        use_linear_projection=True)
    return StableDiffusionXLPipeline(vae=_vae(), text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=EulerDiscreteScheduler())


def _sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, te = _clip(projection=True)
    tok2, te2 = _clip(projection=True)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=32, pooled_projection_dim=64, out_channels=4)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(),
                                    text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
                                    text_encoder_3=None, tokenizer_3=None)


def _flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, te = _clip()
    tok2, te2 = _t5()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(), text_encoder=te, tokenizer=tok,
                        text_encoder_2=te2, tokenizer_2=tok2, transformer=transformer)


def _cogvideox():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    tok, te = _t5()
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                              out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=1,
                                              sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=16)
    return CogVideoXPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())


def _wan():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    tok, te = _t5(umt5=True)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    return WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def _miniature(name: str) -> Callable[[], Any]:
    return lambda: assemble(name, build_components(name))


BUILDERS: dict[str, Callable[[], Any]] = {
    "sd": _miniature("miniature-sd"), "pixart": _miniature("miniature-pixart"),
    "latte": _miniature("miniature-latte"), "sdxl": _sdxl, "sd3": _sd3, "flux": _flux,
    "cogvideox": _cogvideox, "wan": _wan,
}


def build_tiny_pipeline(family: str, seed: int = 0):
    """A random-weight pipeline of `family` (sd, sdxl, pixart, sd3, flux, latte, cogvideox, wan)."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(BUILDERS)}")
    torch.manual_seed(seed)
    pipe = BUILDERS[family]()
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval()  # built modules start in training mode: dropout would make sampling random
    pipe.set_progress_bar_config(disable=True)
    return with_call_defaults(pipe)  # pipe("a prompt") at the sizes the tiny denoiser was built for
