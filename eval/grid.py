"""Comparison grids people look at: rows = prompts, columns = FP and each recipe, each cell labelled
with its recipe and PSNR vs FP; PNG for images, animated GIF (and WebP) for video; an HTML report.

>>> save_grid("out/grid", prompts, {"FP": fp, "w8a8": q8, "w4a4": q4})   # -> out/grid.png
"""
from __future__ import annotations

import base64
import html
import logging
import textwrap
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont, features

from .metrics.similarity import psnr

log = logging.getLogger(__name__)
PAD, ROW_LABEL_W, FONT_SIZE = 8, 170, 13
BACKGROUND, INK, MUTED, GOOD, BAD = "#ffffff", "#1a1a1a", "#666666", "#1b7a3a", "#b3261e"


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable bundled font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _to_pil(x: torch.Tensor, scale: int) -> Image.Image:
    arr = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)  # keep pixels crisp


def _cell_scores(columns: dict[str, torch.Tensor], reference: str | None) -> dict[str, torch.Tensor]:
    """Per-sample PSNR vs the reference column (whole video for 5-D samples)."""
    if reference not in columns:
        return {}
    return {name: psnr(col, columns[reference]) for name, col in columns.items() if name != reference}


def _check(prompts: list[str], columns: dict[str, torch.Tensor]) -> None:
    if not columns:
        raise ValueError("no columns to show: pass {'FP': samples, recipe: samples, ...}")
    shapes = {tuple(c.shape) for c in columns.values()}
    if any(c.shape[0] != len(prompts) for c in columns.values()):
        raise ValueError(f"every column needs one sample per prompt ({len(prompts)} prompts), "
                         f"got shapes {sorted(shapes)}")
    if len(shapes) != 1:
        raise ValueError(f"columns must share one shape, got {sorted(shapes)}")


def _layout(prompts: list[str], columns: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
            reference: str | None, scale: int, frame: int | None) -> Image.Image:
    names = list(columns)
    pick = (lambda t: t[:, frame]) if frame is not None else (lambda t: t)  # noqa: E731
    h, w = columns[names[0]].shape[-2:]
    cw, ch = max(w * scale, 96), h * scale  # cells at least as wide as their label
    font, small = _font(), _font(FONT_SIZE - 2)
    header_h, label_h = FONT_SIZE + 2 * PAD, FONT_SIZE + 6
    width = ROW_LABEL_W + len(names) * (cw + PAD) + PAD
    height = header_h + len(prompts) * (ch + label_h + PAD) + PAD
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        x = ROW_LABEL_W + j * (cw + PAD) + PAD
        draw.text((x + cw // 2, PAD), name, fill=INK, font=font, anchor="mt")
    draw.line((PAD, header_h - 3, width - PAD, header_h - 3), fill="#cccccc")
    for i, prompt in enumerate(prompts):
        y = header_h + i * (ch + label_h + PAD)
        lines = textwrap.wrap(prompt, 24)[: max(1, ch // (FONT_SIZE + 3))]
        draw.multiline_text((PAD, y + 2), "\n".join(lines), fill=INK, font=small, spacing=3)
        for j, name in enumerate(names):
            x = ROW_LABEL_W + j * (cw + PAD) + PAD
            cell = _to_pil(pick(columns[name])[i], scale)
            canvas.paste(cell, (x + (cw - cell.width) // 2, y))
            if name == reference:
                text, colour = f"{name} (reference)", MUTED
            elif name in scores:
                db = float(scores[name][i])
                text, colour = f"{name}  {db:.1f} dB", GOOD if db >= 30 else (INK if db >= 20 else BAD)
            else:
                text, colour = name, MUTED
            draw.text((x + cw // 2, y + ch + 3), text, fill=colour, font=small, anchor="mt")
    return canvas


def image_grid(prompts: list[str], columns: dict[str, torch.Tensor], reference: str | None = "FP",
               scale: int = 4, frame: int | None = None) -> Image.Image:
    """Grid of samples: rows = prompts, columns = {name: (N, 3, H, W)} in order, each cell labelled with
    its column name and PSNR vs the `reference` column (green >= 30 dB, red < 20 dB). Videos
    (N, F, 3, H, W) need `frame`; scores are still over the whole video."""
    _check(prompts, columns)
    if next(iter(columns.values())).dim() == 5 and frame is None:
        raise ValueError("video columns (N, F, 3, H, W): pass frame=<index> or use save_grid for an animation")
    return _layout(prompts, columns, _cell_scores(columns, reference), reference, scale, frame)


def save_grid(path: str | Path, prompts: list[str], columns: dict[str, torch.Tensor], reference: str | None = "FP",
              scale: int = 4, frame_ms: int = 250) -> Path:
    """Write the grid: `path`.png for images; for videos `path`.gif (every frame of every cell animated
    together) plus `path`.webp where Pillow supports it. Returns the PNG or GIF path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check(prompts, columns)
    sample = next(iter(columns.values()))
    if sample.dim() != 5:
        out = path.with_suffix(".png")
        image_grid(prompts, columns, reference, scale).save(out)
        return out
    scores = _cell_scores(columns, reference)
    frames = [_layout(prompts, columns, scores, reference, scale, f) for f in range(sample.shape[1])]
    out = path.with_suffix(".gif")
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0, disposal=1)
    if features.check("webp"):
        frames[0].save(path.with_suffix(".webp"), save_all=True, append_images=frames[1:], duration=frame_ms,
                       loop=0, lossless=True)
    return out


def _html_table(rows: list[dict[str, Any]], n_samples: int | None) -> str:
    from .table import table_sections

    parts = []
    for title, head, body in table_sections(rows, n_samples):
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
        parts.append(f"<h3>{html.escape(title)}</h3><table><tr>{cells}</tr>{trs}</table>")
    return "".join(parts)


_MIME = {".png": "image/png", ".gif": "image/gif", ".webp": "image/webp", ".jpg": "image/jpeg"}
_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;color:#1a1a1a}table{border-collapse:collapse;"
        "margin-bottom:1.2em}th,td{border:1px solid #ddd;padding:4px 10px;text-align:right}"
        "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}pre{background:#f6f6f6;padding:1em}"
        "img{image-rendering:pixelated;max-width:100%}figure{margin:1em 0}figcaption{color:#666}")


def html_report(path: str | Path, title: str, table: str | list[dict[str, Any]], images: list[str | Path],
                n_samples: int | None = None, notes: str = "") -> Path:
    """A self-contained HTML page (images embedded as base64): the metrics table, given as per-model
    metric rows (rendered per metric family) or as preformatted text, then the grids."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = _html_table(table, n_samples) if isinstance(table, list) else f"<pre>{html.escape(table)}</pre>"
    blocks = []
    for img in map(Path, images):
        data = base64.b64encode(img.read_bytes()).decode()
        blocks.append(f'<figure><img src="data:{_MIME.get(img.suffix, "image/png")};base64,{data}" '
                      f'alt="{html.escape(img.name)}"><figcaption>{html.escape(img.name)}</figcaption></figure>')
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"{f'<p>{html.escape(notes)}</p>' if notes else ''}{body}{''.join(blocks)}</body></html>")
    path.write_text(page, encoding="utf-8")
    log.info("wrote %s", path)
    return path
