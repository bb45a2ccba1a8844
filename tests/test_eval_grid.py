"""Comparison grids (PNG, animated GIF/WebP), the HTML report and the results table."""
import numpy as np
import pytest
import torch
from PIL import Image

from dmquant.eval import format_table, html_report, image_grid, psnr, save_grid
from dmquant.eval.grid import _cell_scores
from dmquant.eval.table import table_sections

PROMPTS = ["a red circle at the top", "a blue square", "a long prompt that must wrap over several lines to fit"]


@pytest.fixture
def columns():
    torch.manual_seed(0)
    fp = torch.rand(3, 3, 32, 32)
    return {"FP": fp, "w8a8": (fp + 0.01).clamp(0, 1), "w4a4": torch.rand(3, 3, 32, 32)}


def test_image_grid_size_upscale_and_scores(columns):
    img = image_grid(PROMPTS, columns, scale=4)
    assert img.mode == "RGB" and img.width > 170 + 3 * 128 and img.height > 3 * 128
    arr = np.asarray(img)
    # Nearest-neighbour upscaling: some 4x4 block of the grid equals one FP pixel of sample 0 exactly.
    pixel = (columns["FP"][0, :, 0, 0] * 255).round().byte().numpy()
    assert (arr == pixel).all(-1).sum() >= 16
    scores = _cell_scores(columns, "FP")
    assert set(scores) == {"w8a8", "w4a4"} and torch.allclose(scores["w8a8"], psnr(columns["w8a8"], columns["FP"]))
    assert image_grid(PROMPTS, columns, reference=None).size == img.size  # no reference: names only


def test_grid_input_errors(columns):
    with pytest.raises(ValueError, match="one sample per prompt"):
        image_grid(["p1"], columns)
    with pytest.raises(ValueError, match="share one shape"):
        image_grid(PROMPTS, {"FP": columns["FP"], "small": torch.rand(3, 3, 16, 16)})
    with pytest.raises(ValueError, match="frame="):
        image_grid(["p"], {"FP": torch.rand(1, 4, 3, 8, 8)})


def test_save_png_and_animated_video_grids(tmp_path, columns):
    png = save_grid(tmp_path / "g", PROMPTS, columns)
    assert png.suffix == ".png" and Image.open(png).size == image_grid(PROMPTS, columns).size
    videos = {"FP": torch.rand(2, 5, 3, 8, 8), "q": torch.rand(2, 5, 3, 8, 8)}
    gif = save_grid(tmp_path / "v", ["p1", "p2"], videos)
    assert gif.suffix == ".gif" and Image.open(gif).n_frames == 5
    webp = gif.with_suffix(".webp")
    if webp.exists():  # Pillow built with WebP
        assert Image.open(webp).n_frames == 5


ROWS = [{"name": "FP", "adherence": 0.91, "fid_real": 3.2},
        {"name": "w8a8", "adherence": 0.9, "fid_real": 3.4, "psnr": 34.25, "ssim": 0.98123, "fid_fp": 0.12},
        {"name": "w4a4", "adherence": 0.6, "fid_real": 13.4, "psnr": 18.2, "ssim": 0.71, "fid_fp": 8.1, "fid_fp_n": 32}]


def test_table_keeps_families_apart_with_arrows_and_counts():
    text = format_table(ROWS, n_samples=16)
    prompts_part, fp_part = text.split("**vs FP on the same seeds**")
    assert "**vs prompts / dataset**" in prompts_part and "PSNR" not in prompts_part
    assert "adherence ↑" in prompts_part and "FID vs real ↓" in prompts_part and "3.200 (n=16)" in prompts_part
    assert "PSNR dB ↑" in fp_part and "FID vs FP ↓" in fp_part and "0.120 (n=16)" in fp_part
    assert "8.100 (n=32)" in fp_part  # a row's own count wins
    assert "| FP" not in fp_part  # FP is the reference there, not a row
    lines = [ln for ln in fp_part.splitlines() if ln.startswith("|")]
    assert len({len(ln) for ln in lines}) == 1  # aligned columns
    assert "34.25" in fp_part and "0.9812" in fp_part  # per-metric decimals


def test_html_report_embeds_table_and_grids(tmp_path, columns):
    png = save_grid(tmp_path / "g", PROMPTS, columns)
    gif = save_grid(tmp_path / "v", ["p"], {"FP": torch.rand(1, 3, 3, 8, 8)})
    page = html_report(tmp_path / "r.html", "demo <w8a8>", ROWS, [png, gif], n_samples=16).read_text()
    assert "data:image/png;base64" in page and "data:image/gif;base64" in page
    assert "demo &lt;w8a8&gt;" in page and "<table>" in page and "vs FP on the same seeds" in page
    assert page.count("<tr>") == sum(len(body) + 1 for _, _, body in table_sections(ROWS, 16))
    text_page = html_report(tmp_path / "t.html", "demo", format_table(ROWS), []).read_text()
    assert "<pre>" in text_page and "w4a4" in text_page
