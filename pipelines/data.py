"""Procedural captioned data: coloured shapes on varied backgrounds, still or moving.

Deterministic from a seed, vectorised, any number of samples. Every sample carries its labels, and
`parse_prompt` recovers them from the text, which is how the judge scores prompt adherence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.25, 0.95),
           "yellow": (0.95, 0.85, 0.1), "magenta": (0.85, 0.15, 0.85), "cyan": (0.1, 0.85, 0.9)}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
DIRECTIONS = ("left", "right", "up", "down")
_DIR_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass
class Batch:
    """images (N,3,H,W) or videos (N,F,3,H,W) in [0,1], their prompts, integer labels, and where the
    shape is (masks (N,H,W) or (N,F,H,W), bool)."""

    pixels: torch.Tensor
    prompts: list[str]
    labels: dict[str, torch.Tensor]
    masks: torch.Tensor


def _shape_masks(shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, size: int) -> torch.Tensor:
    """(N, size, size) boolean masks, pixel centres at integer + 0.5."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dx = coords.view(1, 1, -1) - cx.view(-1, 1, 1)
    dy = coords.view(1, -1, 1) - cy.view(-1, 1, 1)
    r = r.view(-1, 1, 1)
    circle = dx**2 + dy**2 <= r**2
    square = torch.maximum(dx.abs(), dy.abs()) <= r * 0.85
    triangle = (dy >= -r) & (dy <= r * 0.8) & (dx.abs() <= (dy + r) * 0.55)
    arm = r * 0.35
    cross = ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    stack = torch.stack([circle, square, triangle, cross])  # (4, N, S, S)
    return stack[shape, torch.arange(shape.numel())]


def _backgrounds(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Grey-ish gradients with mild noise: varied, but never one of the shape colours."""
    base = torch.rand(n, 1, 1, 1, generator=g) * 0.35 + 0.05
    tint = (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.08
    ramp = torch.linspace(-1, 1, size)
    angle = torch.rand(n, generator=g) * 6.2832
    grad = (torch.cos(angle).view(-1, 1, 1) * ramp.view(1, 1, -1)
            + torch.sin(angle).view(-1, 1, 1) * ramp.view(1, -1, 1))
    bg = base + tint + 0.08 * grad.unsqueeze(1) + 0.02 * torch.randn(n, 3, size, size, generator=g)
    return bg.clamp(0, 1)


def _paint(bg: torch.Tensor, masks: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    rgb = torch.tensor(list(COLOURS.values()))[colour].view(-1, 3, 1, 1)
    return torch.where(masks.unsqueeze(1), rgb, bg)


def caption(shape: int, colour: int, position: int | None = None, direction: int | None = None) -> str:
    """The generators' caption for labels: 'a red circle at the top left', 'a blue square moving right'
    (the inverse of `parse_prompt`)."""
    head = f"a {list(COLOURS)[colour]} {SHAPES[shape]}"
    if direction is not None:
        return f"{head} moving {DIRECTIONS[direction]}"
    return f"{head} at the {POSITIONS[position]}".replace("at the center", "in the center")


def make_images(n: int, seed: int = 0, size: int = 32) -> Batch:
    """Still images: 'a red circle at the top left'."""
    g = torch.Generator().manual_seed(seed)
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    colour = torch.randint(len(COLOURS), (n,), generator=g)
    pos = torch.randint(len(POSITIONS), (n,), generator=g)
    r = (torch.rand(n, generator=g) * 0.08 + 0.13) * size
    cell = size / 3
    jitter = (torch.rand(n, 2, generator=g) - 0.5) * cell * 0.3
    cx = (pos % 3).float() * cell + cell / 2 + jitter[:, 0]
    cy = (pos // 3).float() * cell + cell / 2 + jitter[:, 1]
    masks = _shape_masks(shape, cx, cy, r, size)
    pixels = _paint(_backgrounds(n, size, g), masks, colour)
    prompts = [caption(s, c, position=p) for s, c, p in zip(shape.tolist(), colour.tolist(), pos.tolist())]
    return Batch(pixels, prompts, {"shape": shape, "colour": colour, "position": pos}, masks)


def make_videos(n: int, seed: int = 0, frames: int = 8, size: int = 32, speed: float = 2.0) -> Batch:
    """Videos of one shape moving in a direction: 'a blue square moving right'."""
    g = torch.Generator().manual_seed(seed)
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    colour = torch.randint(len(COLOURS), (n,), generator=g)
    direction = torch.randint(len(DIRECTIONS), (n,), generator=g)
    r = (torch.rand(n, generator=g) * 0.05 + 0.14) * size
    step = torch.tensor([_DIR_STEP[d] for d in DIRECTIONS], dtype=torch.float32)[direction] * speed
    travel = step * (frames - 1)
    lo = r.unsqueeze(1) + 1 - torch.clamp(travel, max=0)
    hi = size - r.unsqueeze(1) - 1 - torch.clamp(travel, min=0)
    start = lo + torch.rand(n, 2, generator=g) * (hi - lo).clamp(min=0)
    bg = _backgrounds(n, size, g)
    masks = torch.stack([_shape_masks(shape, *(start + step * f).unbind(1), r, size) for f in range(frames)], 1)
    video = [_paint(bg, masks[:, f], colour) for f in range(frames)]
    prompts = [caption(s, c, direction=d) for s, c, d in zip(shape.tolist(), colour.tolist(), direction.tolist())]
    return Batch(torch.stack(video, 1), prompts, {"shape": shape, "colour": colour, "direction": direction}, masks)


def parse_prompt(prompt: str) -> dict[str, int]:
    """Attribute labels named in a prompt (the inverse of the generators' captions)."""
    text = prompt.lower()
    out: dict[str, int] = {}
    for key, names in (("shape", SHAPES), ("colour", tuple(COLOURS))):
        hits = [i for i, name in enumerate(names) if name in text.split()]
        if hits:
            out[key] = hits[0]
    if " moving " in f" {text} ":
        tail = text.split("moving", 1)[1].split()
        if tail and tail[0] in DIRECTIONS:
            out["direction"] = DIRECTIONS.index(tail[0])
    else:
        # longest match first, so "top left" is not read as "top"
        for i in sorted(range(len(POSITIONS)), key=lambda i: -len(POSITIONS[i])):
            if text.endswith(POSITIONS[i]):
                out["position"] = i
                break
    return out


def vocabulary() -> list[str]:
    """Every word the captions use (the offline tokenizers are built over it)."""
    words = {"a", "at", "the", "in", "moving", *SHAPES, *COLOURS, *DIRECTIONS}
    for p in POSITIONS:
        words.update(p.split())
    return sorted(words)
