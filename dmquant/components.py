"""Finding the parts of a pipeline a recipe quantizes: the denoiser, text encoders, VAE decoder.

Works on any diffusers pipeline with `.unet` or `.transformer` and on a bare `nn.Module` (which is
then the denoiser). Components are named by their attribute path, e.g. "unet", "vae.decoder".
"""
from __future__ import annotations

from typing import Any

from torch import nn

DENOISER_ATTRS = ("unet", "transformer")
TEXT_ENCODER_ATTRS = ("text_encoder", "text_encoder_2", "text_encoder_3")
BARE = "model"


def get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(obj: Any, path: str, value: Any) -> None:
    head, _, last = path.rpartition(".")
    setattr(get_path(obj, head) if head else obj, last, value)


def denoiser_path(obj: Any) -> str:
    for attr in DENOISER_ATTRS:
        if isinstance(getattr(obj, attr, None), nn.Module):
            return attr
    raise TypeError(
        f"cannot find a denoiser in {type(obj).__name__}: expected a diffusers pipeline with `.unet` or "
        "`.transformer`, or a torch.nn.Module"
    )


def find_components(obj: Any, kinds: tuple[str, ...] = ("denoiser",)) -> dict[str, nn.Module]:
    """{attribute path: module} for the requested component kinds."""
    if isinstance(obj, nn.Module):
        if set(kinds) - {"denoiser"}:
            raise ValueError(f"a bare model has no {sorted(set(kinds) - {'denoiser'})}: pass the pipeline")
        return {BARE: obj}
    found: dict[str, nn.Module] = {}
    if "denoiser" in kinds:
        path = denoiser_path(obj)
        found[path] = get_path(obj, path)
    if "text_encoder" in kinds:
        found.update({a: getattr(obj, a) for a in TEXT_ENCODER_ATTRS if isinstance(getattr(obj, a, None), nn.Module)})
    if "vae_decoder" in kinds:
        vae = getattr(obj, "vae", None)
        if not isinstance(getattr(vae, "decoder", None), nn.Module):
            raise ValueError(f"{type(obj).__name__} has no `vae.decoder` to quantize")
        found["vae.decoder"] = vae.decoder
    if not found:
        raise ValueError(f"none of the components {kinds} were found in {type(obj).__name__}")
    return found
