"""Training the miniatures from scratch on procedural data (CPU, minutes each).

Stage 1 trains the shared VAE on images, then sharpens its decoder alone (encoder frozen, as SD's
ft-MSE VAE was made, so the latents and every denoiser trained on them stay valid). Stage 2 encodes
the data once and trains each denoiser and its text encoder jointly with the standard
epsilon-prediction objective, dropping 10 % of captions so classifier-free guidance works. The video
DiT starts from the trained image DiT (`inflate`), as Latte started from PixArt-alpha.
Everything is seeded: the same command reproduces the checkpoint.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import make_images, make_videos
from .miniature import FRAMES, TRAIN_SCHEDULER, VAE, build_components

log = logging.getLogger(__name__)
CFG_DROP = 0.1
LATTE_TEXT_LENGTH = 120


def _cosine_lr(opt: torch.optim.Optimizer, step: int, total: int, base: float, warmup: int = 100) -> None:
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
    for group in opt.param_groups:
        group["lr"] = lr


def shape_weighted_mean(loss: torch.Tensor, masks: torch.Tensor, shape_weight: float) -> torch.Tensor:
    """Mean of an elementwise loss (N, C, ...) with the cells a shape covers weighted (1 + shape_weight),
    normalised so that shape_weight 0 is the plain mean. `masks` (N, ...) are boolean at the loss's
    spatial size and broadcast over its channels."""
    w = 1 + shape_weight * masks.unsqueeze(1).float()
    return (w * loss).mean() / w.mean()


def train_vae(steps: int, batch: int = 64, seed: int = 0, lr: float = 1e-3, kl_weight: float = 1e-6):
    """Reconstruction + tiny KL: the latent space only needs to be smooth enough to diffuse in."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    for step in (bar := tqdm(range(steps), desc="vae")):
        x = make_images(batch, seed=seed * 1_000_003 + step).pixels * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + kl_weight * post.kl().mean()
        _cosine_lr(opt, step, steps, lr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():  # unit-variance latents, as SD's scaling_factor does for its VAE
        z = vae.encode(make_images(512, seed=seed + 7).pixels * 2 - 1).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1 / z.std()))
    return vae


def sharpen_decoder(vae, steps: int, batch: int = 32, seed: int = 0, lr: float = 5e-4,
                    shape_weight: float = 10.0):
    """Fine-tune only the decoder with the shape pixels weighted (1 + shape_weight) and an L1 term.

    Plain MSE spends the decoder on the background, which is most of the pixels, and rounds the
    corners of 10-pixel shapes (squares read as circles); the encoder is frozen, so the latent space
    does not move."""
    torch.manual_seed(seed)
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)
    vae.train()
    for step in (bar := tqdm(range(steps), desc="vae decoder")):
        data = make_images(batch, seed=seed * 1_000_003 + 500_000 + step)
        x = data.pixels * 2 - 1
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        err = vae.decode(z).sample - x
        loss = shape_weighted_mean(err**2 + 0.1 * err.abs(), data.masks, shape_weight)
        _cosine_lr(opt, step, steps, lr, warmup=20)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.requires_grad_(True)
    return vae.eval()


@torch.no_grad()
def encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled latents of images (N,3,H,W) or videos (N,F,3,H,W) -> (N,C,h,w) or (N,C,F,h,w)."""
    video = pixels.dim() == 5
    flat = pixels.flatten(0, 1) if video else pixels
    z = torch.cat([vae.encode(c * 2 - 1).latent_dist.mode() for c in flat.split(256)]) * vae.config.scaling_factor
    return z.unflatten(0, pixels.shape[:2]).transpose(1, 2) if video else z


def latent_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel masks (..., H, W) -> (..., size, size): a latent cell is set where any of its pixels is."""
    cells = F.adaptive_max_pool2d(masks.float().flatten(0, -3).unsqueeze(1), size)
    return cells.squeeze(1).unflatten(0, masks.shape[:-2]).bool()


def text_embeddings(parts: dict[str, Any], prompts: list[str],
                    video: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings exactly as each stock pipeline computes them at inference."""
    tok = parts["tokenizer"]
    # LattePipeline pads to 120 tokens and gives the transformer no mask (we call it with
    # mask_feature=False, so samples do not depend on which prompts share a batch).
    length = LATTE_TEXT_LENGTH if video else tok.model_max_length
    enc = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    if "unet" in parts:  # the SD pipeline passes no attention mask to CLIP
        return parts["text_encoder"](enc.input_ids)[0], None
    emb = parts["text_encoder"](enc.input_ids, attention_mask=enc.attention_mask)[0]
    return emb, None if video else enc.attention_mask


def predict_noise(parts: dict[str, Any], x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, mask) -> torch.Tensor:
    """The denoiser's epsilon prediction for latents x (images or Latte videos), as its pipeline calls it."""
    if "unet" in parts:
        return parts["unet"](x, t, encoder_hidden_states=emb).sample
    model = parts["transformer"]
    if x.dim() == 5:  # Latte: no text mask in its pipeline; half the output channels are unused
        return model(x, encoder_hidden_states=emb, timestep=t, enable_temporal_attentions=True).sample[:, : x.shape[1]]
    return model(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t,
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, : x.shape[1]]


@torch.no_grad()
def inflate(video, image) -> None:
    """Start a Latte transformer as a PixArt one applied frame by frame (Latte's own recipe).

    Spatial blocks and the patch, caption and timestep embeddings are copied; the temporal blocks'
    output projections are zeroed so each begins as the identity (its residual) and learns only
    what motion adds; the learned-sigma half of `proj_out`, which LattePipeline discards, is zero."""
    state = image.state_dict()
    weight, bias = state.pop("proj_out.weight"), state.pop("proj_out.bias")
    result = video.load_state_dict(state, strict=False)  # shape mismatches raise here
    left = [k for k in result.missing_keys if not k.startswith(("temporal_transformer_blocks.", "proj_out."))]
    if left or result.unexpected_keys:
        raise ValueError(f"image and video transformers differ: {(left + result.unexpected_keys)[:4]}")
    pp, c = video.config.patch_size ** 2, image.config.out_channels  # proj_out rows: (patch, patch, channel)
    video.proj_out.weight.zero_()
    video.proj_out.bias.zero_()
    video.proj_out.weight.view(pp, -1, weight.shape[1])[:, :c] = weight.view(pp, c, -1)
    video.proj_out.bias.view(pp, -1)[:, :c] = bias.view(pp, c)
    for block in video.temporal_transformer_blocks:
        out_linear = [m for m in block.ff.net if isinstance(m, torch.nn.Linear)][-1]
        for layer in (block.attn1.to_out[0], out_linear):
            layer.weight.zero_()
            layer.bias.zero_()


@torch.no_grad()
def seed_words(parts: dict[str, Any], pairs: dict[str, str]) -> None:
    """Copy the text encoder's input embedding of an old word onto a new one (`{"up": "top"}`).

    The image captions PixArt was trained on never use the video's "up" and "down", so after
    `inflate` their embeddings are untrained noise, while "left" and "right" arrive meaning positions
    (as a pretrained text encoder would relate "up" to "top"). Starting the new words from the
    related old ones gives the denoiser that same handle on vertical motion; training moves them on."""
    tok, table = parts["tokenizer"], parts["text_encoder"].get_input_embeddings().weight
    for new, old in pairs.items():
        ids = [tok(w, add_special_tokens=False).input_ids for w in (new, old)]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"seed words must be single tokens of the vocabulary: {new!r} -> {old!r} gives {ids}")
        table[ids[0][0]] = table[ids[1][0]]


def sample_timesteps(n: int, total: int, shift: float, g: torch.Generator) -> torch.Tensor:
    """Training timesteps: uniform integers, or u ~ U(0, 1) mapped through shift*u / (1 + (shift-1)*u),
    which puts the median at shift / (1 + shift) of the way to pure noise. Shift 1 keeps the plain
    integer draw so that the committed rounds reproduce."""
    if shift == 1.0:
        return torch.randint(0, total, (n,), generator=g)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return (shift * u / (1 + (shift - 1) * u) * total).long().clamp(max=total - 1)


def train_denoiser(name: str, vae, steps: int, batch: int = 64, seed: int = 0, lr: float = 5e-4,
                   num_samples: int = 20000, resume: Path | None = None,
                   init: Path | None = None, timestep_shift: float = 1.0,
                   shape_weight: float = 0.0, words: dict[str, str] | None = None) -> dict[str, Any]:
    """Train a miniature's denoiser and text encoder (from scratch, continuing from a saved pipeline
    folder `resume`, or, for the video miniature, inflated from a saved image DiT pipeline `init`);
    returns its components (VAE included). `timestep_shift` > 1 draws noisier timesteps more often
    (SD3's shift of a uniform draw), where a video's motion is decided; `shape_weight` > 0 weighs the
    latent cells a shape covers (1 + shape_weight) in the loss, which the background, most of every
    frame, otherwise dominates; `words` starts new words from old ones first (`seed_words`)."""
    from diffusers import DDPMScheduler, DiffusionPipeline

    torch.manual_seed(seed)
    parts = build_components(name)
    if resume is not None:
        saved = DiffusionPipeline.from_pretrained(resume, local_files_only=True).components
        parts.update({k: saved[k] for k in ("text_encoder", "unet", "transformer") if k in saved})
    elif init is not None:
        saved = DiffusionPipeline.from_pretrained(init, local_files_only=True).components
        inflate(parts["transformer"], saved["transformer"])
        parts["text_encoder"].load_state_dict(saved["text_encoder"].state_dict())
    seed_words(parts, words or {})
    parts["vae"] = vae
    video = name == "miniature-latte"
    data = make_videos(num_samples // 4, seed=seed, frames=FRAMES) if video else make_images(num_samples, seed=seed)
    latents = encode(vae, data.pixels)
    masks = latent_masks(data.masks, latents.shape[-1])
    noise_sched = DDPMScheduler(**TRAIN_SCHEDULER)
    denoiser = parts.get("unet") or parts["transformer"]
    params = [*denoiser.parameters(), *parts["text_encoder"].parameters()]
    denoiser.train(), parts["text_encoder"].train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for step in (bar := tqdm(range(steps), desc=name)):
        idx = torch.randint(len(data.prompts), (batch,), generator=g)
        prompts = ["" if torch.rand((), generator=g) < CFG_DROP else data.prompts[i] for i in idx.tolist()]
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = sample_timesteps(batch, noise_sched.config.num_train_timesteps, timestep_shift, g)
        emb, mask = text_embeddings(parts, prompts, video)
        pred = predict_noise(parts, noise_sched.add_noise(x0, noise, t), t, emb, mask)
        loss = shape_weighted_mean((pred - noise) ** 2, masks[idx], shape_weight)
        _cosine_lr(opt, step, steps, lr)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    denoiser.eval(), parts["text_encoder"].eval()
    return parts
