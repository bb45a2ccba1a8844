"""Metrics against independent references: scipy sqrtm and closed forms, float64 formulas, torchmetrics."""
import numpy as np
import pytest
import scipy.linalg
import torch

from dmquant.eval import (fid, format_table, frechet_distance, html_report, image_grid, lpips, psnr, save_grid,
                          ssim)
from dmquant.eval.metrics.clip import clip_score, score_from_features

torch.manual_seed(0)


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_matches_scipy():
    a = torch.randn(400, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)
    b = torch.randn(300, 8, dtype=torch.float64) * 1.5 + 0.3
    assert frechet_distance(a, b) == pytest.approx(scipy_frechet(a.numpy(), b.numpy()), rel=1e-6)


def test_frechet_closed_form_for_diagonal_gaussians():
    """For diagonal covariances: ||mu_a - mu_b||^2 + sum (sqrt(va) - sqrt(vb))^2, on exact moments."""
    va, vb = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    mu_a, mu_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])

    def exact_samples(mu, var):  # +-1 patterns per axis: sample mean mu, sample variance var * n/(n-1)
        n = 8
        signs = torch.tensor([[1 if (i >> k) & 1 else -1 for k in range(3)] for i in range(n)], dtype=torch.float64)
        return mu.double() + signs * (var.double() * (n - 1) / n).sqrt()

    expected = float((mu_a - mu_b).pow(2).sum() + (va.sqrt() - vb.sqrt()).pow(2).sum())
    assert frechet_distance(exact_samples(mu_a, va), exact_samples(mu_b, vb)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(exact_samples(mu_a, va), exact_samples(mu_a, va)) == pytest.approx(0, abs=1e-9)


def test_fid_with_a_pluggable_extractor_warns_on_small_n(caplog):
    imgs = torch.rand(20, 3, 8, 8)
    feats = lambda x: x.mean((2, 3))  # noqa: E731
    result = fid(imgs, imgs.flip(0), extractor=feats)
    assert result.value == pytest.approx(0, abs=1e-9) and result.n_a == 20
    assert fid(imgs, imgs * 0.5, extractor=feats).value > 0.01
    with caplog.at_level("WARNING"):
        fid(imgs[:4], imgs[4:8], extractor=feats)
    assert "noisy" in caplog.text


def test_inception_and_clip_need_local_weights(monkeypatch):
    monkeypatch.delenv("DMQUANT_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="DMQUANT_INCEPTION_WEIGHTS"):
        fid(torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8), extractor="inception")
    with pytest.raises(FileNotFoundError, match="DMQUANT_CLEANFID_INCEPTION"):
        fid(torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8), extractor="clean-fid")
    with pytest.raises(FileNotFoundError, match="DMQUANT_CLIP_CHECKPOINT"):
        clip_score(torch.rand(2, 3, 8, 8), ["a", "b"])


def test_clip_score_formula():
    img, txt = torch.randn(5, 16), torch.randn(5, 16)
    cos = torch.nn.functional.cosine_similarity(img.double(), txt.double())
    assert torch.allclose(score_from_features(img, txt).double(), 100 * cos.clamp(min=0), atol=1e-4)


def test_psnr_against_formula_and_video_frames():
    a = torch.rand(3, 3, 16, 16)
    b = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    mse = ((a.double() - b.double()) ** 2).mean((1, 2, 3))
    assert torch.allclose(psnr(a, b).double(), 10 * torch.log10(1 / mse), atol=1e-4)
    assert psnr(a, a).eq(100).all()
    va, vb = torch.rand(2, 4, 3, 16, 16), torch.rand(2, 4, 3, 16, 16)
    per_frame = psnr(va.flatten(0, 1), vb.flatten(0, 1)).reshape(2, 4).mean(1)
    assert torch.allclose(psnr(va, vb), per_frame)


def test_ssim_matches_torchmetrics():
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    a = torch.rand(4, 3, 32, 32)
    b = (a * 0.8 + 0.1 * torch.rand_like(a)).clamp(0, 1)
    ref = torch.stack([tm_ssim(b[i:i + 1].double(), a[i:i + 1].double(), data_range=1.0) for i in range(4)])
    assert torch.allclose(ssim(b, a).double(), ref, atol=2e-3)
    assert torch.allclose(ssim(a, a), torch.ones(4))


def test_lpips_offline_behaviour(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("DMQUANT_LPIPS_BACKBONE", raising=False)
    with pytest.raises(FileNotFoundError, match="DMQUANT_LPIPS_BACKBONE"):
        lpips(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
    import torchvision

    path = tmp_path / "alex.pth"
    torch.save(torchvision.models.alexnet().state_dict(), path)  # random backbone: exercises the code path
    a = torch.rand(2, 3, 64, 64)
    d = lpips(a, a.flip(-1), backbone=path)
    assert d.shape == (2,) and (d > 0).all() and lpips(a, a, backbone=path).abs().max() < 1e-6


def test_grid_png_gif_html_and_table(tmp_path):
    fp = torch.rand(3, 3, 8, 8)
    cols = {"FP": fp, "w8a8": (fp + 0.01).clamp(0, 1), "w4a4": torch.rand(3, 3, 8, 8)}
    img = image_grid(["p1", "p2", "p3"], cols, scale=4)
    assert img.width > 3 * 32 and img.height > 3 * 32
    png = save_grid(tmp_path / "g", ["p1", "p2", "p3"], cols)
    gif = save_grid(tmp_path / "v", ["p1"], {"FP": torch.rand(1, 5, 3, 8, 8), "q": torch.rand(1, 5, 3, 8, 8)})
    from PIL import Image

    assert png.suffix == ".png" and Image.open(gif).n_frames == 5
    table = format_table([{"name": "FP", "adherence": 0.9}, {"name": "w8a8", "adherence": 0.9, "psnr": 30.0, "fid_fp": 0.5}], 16)
    assert "vs FP (same seeds)" in table and "vs prompts/dataset" in table and "16 samples" in table
    page = html_report(tmp_path / "r.html", "demo", table, [png, gif]).read_text()
    assert "data:image/png;base64" in page and "data:image/gif;base64" in page and "w8a8" in page
    with pytest.raises(ValueError, match="one sample per prompt"):
        image_grid(["p1"], cols)
