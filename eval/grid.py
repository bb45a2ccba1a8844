"""Comparison grids people look at: rows = prompts, columns = FP and each recipe, each cell labelled
with its recipe and PSNR vs FP; PNG for images, animated GIF for video; an HTML report around them."""
from __future__ import annotations

import base64
import html
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .metrics.similarity import psnr

PAD, LABEL_H, ROW_LABEL_W = 6, 14, 150


def _to_pil(x: torch.Tensor, scale: int) -> Image.Image:
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def _layout(prompts: list[str], columns: dict[str, torch.Tensor], reference: str | None, scale: int,
            frame: int | None) -> Image.Image:
    names = list(columns)
    n = len(prompts)
    if any(c.shape[0] != n for c in columns.values()):
        raise ValueError("every column needs one sample per prompt")
    pick = (lambda t: t[:, frame]) if frame is not None else (lambda t: t)  # noqa: E731
    first = pick(columns[names[0]])
    cw, ch = first.shape[-1] * scale, first.shape[-2] * scale
    scores = {}
    if reference in columns:
        for name in names:
            if name != reference:
                scores[name] = psnr(columns[name], columns[reference])
    font = ImageFont.load_default()
    width = ROW_LABEL_W + len(names) * (cw + PAD) + PAD
    height = LABEL_H * 2 + n * (ch + LABEL_H + PAD) + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        draw.text((ROW_LABEL_W + j * (cw + PAD) + PAD, 4), name, fill="black", font=font)
    for i, prompt in enumerate(prompts):
        y = LABEL_H * 2 + i * (ch + LABEL_H + PAD)
        draw.multiline_text((4, y + 2), "\n".join(textwrap.wrap(prompt, 22)[:4]), fill="black", font=font)
        for j, name in enumerate(names):
            x = ROW_LABEL_W + j * (cw + PAD) + PAD
            canvas.paste(_to_pil(pick(columns[name])[i], scale), (x, y))
            label = "reference" if name == reference else (f"{scores[name][i]:.1f} dB" if name in scores else "")
            draw.text((x, y + ch + 1), label, fill="dimgray", font=font)
    return canvas


def image_grid(prompts: list[str], columns: dict[str, torch.Tensor], reference: str | None = "FP",
               scale: int = 4) -> Image.Image:
    """Grid of (N, 3, H, W) samples per column; PSNR vs the `reference` column under each cell."""
    return _layout(prompts, columns, reference, scale, None)


def save_grid(path: str | Path, prompts: list[str], columns: dict[str, torch.Tensor], reference: str | None = "FP",
              scale: int = 4, frame_ms: int = 250) -> Path:
    """PNG for images; animated GIF for videos (N, F, 3, H, W), one grid per frame."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = next(iter(columns.values()))
    if sample.dim() == 5:
        frames = [_layout(prompts, columns, reference, scale, f) for f in range(sample.shape[1])]
        frames[0].save(path.with_suffix(".gif"), save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
        return path.with_suffix(".gif")
    image_grid(prompts, columns, reference, scale).save(path.with_suffix(".png"))
    return path.with_suffix(".png")


def html_report(path: str | Path, title: str, table_markdown: str, images: list[str | Path]) -> Path:
    """A self-contained HTML page: the metrics table and the grids embedded as base64."""
    path = Path(path)
    blocks = []
    for img in map(Path, images):
        mime = "image/gif" if img.suffix == ".gif" else "image/png"
        data = base64.b64encode(img.read_bytes()).decode()
        blocks.append(f'<figure><img src="data:{mime};base64,{data}"><figcaption>{html.escape(img.name)}'
                      "</figcaption></figure>")
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}pre{background:#f6f6f6;padding:1em}"
            "img{image-rendering:pixelated;max-width:100%}</style>"
            f"<h1>{html.escape(title)}</h1><pre>{html.escape(table_markdown)}</pre>{''.join(blocks)}")
    path.write_text(page)
    return path

