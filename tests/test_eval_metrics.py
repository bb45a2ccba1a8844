"""Metrics against independent references: scipy sqrtm and closed forms, float64 formulas written here,
PIL resizing, and manual CLIP computations on tiny random CLIP models built offline."""
import json
import math
import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import correlate1d

from dmquant.eval import FIDResult, clip_score, fid, frechet_distance, lpips, psnr, ssim
from dmquant.eval.metrics.clip import score_from_features
from dmquant.eval.metrics.fid import resolve_extractor

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- Fréchet distance / FID

def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula (Heusel et al. 2017) with scipy's general matrix square root."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("n_a, n_b, dim", [(400, 300, 8), (64, 80, 32)])
def test_frechet_matches_scipy(n_a, n_b, dim):
    a = torch.randn(n_a, dim, dtype=torch.float64) @ torch.randn(dim, dim, dtype=torch.float64)
    b = torch.randn(n_b, dim, dtype=torch.float64) * 1.5 + 0.3
    assert frechet_distance(a, b) == pytest.approx(scipy_frechet(a.numpy(), b.numpy()), rel=1e-7)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)  # symmetric


def test_frechet_closed_form_for_diagonal_gaussians():
    """Diagonal covariances: ||mu_a - mu_b||^2 + sum (sqrt(va) - sqrt(vb))^2, on samples with exact moments."""
    va, vb = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    mu_a, mu_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])

    def exact_samples(mu, var):  # all 8 +-1 sign patterns: sample mean mu, unbiased covariance diag(var)
        n = 8
        signs = torch.tensor([[1 if (i >> k) & 1 else -1 for k in range(3)] for i in range(n)], dtype=torch.float64)
        return mu.double() + signs * (var.double() * (n - 1) / n).sqrt()

    expected = float((mu_a - mu_b).pow(2).sum() + (va.sqrt() - vb.sqrt()).pow(2).sum())
    assert frechet_distance(exact_samples(mu_a, va), exact_samples(mu_b, vb)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(exact_samples(mu_a, va), exact_samples(mu_a, va)) == pytest.approx(0, abs=1e-9)


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="equal D"):
        frechet_distance(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.randn(1, 3), torch.randn(5, 3))


class FakeJudge:
    """Duck-typed like dmquant.pipelines.judge(name): only `.features` is used by FID."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean((2, 3))


def test_fid_with_pluggable_extractors_reports_counts_and_warns(caplog):
    imgs = torch.rand(20, 3, 8, 8)
    result = fid(imgs, imgs.flip(0), extractor=lambda x: x.mean((2, 3)))
    assert isinstance(result, FIDResult) and result.value == pytest.approx(0, abs=1e-9)
    assert (result.n_a, result.n_b) == (20, 20) and "n=20/20" in str(result)
    other = imgs * 0.5
    via_judge = fid(imgs, other, extractor=FakeJudge(), batch_size=7)  # batching must not change the value
    assert via_judge.value == pytest.approx(frechet_distance(imgs.mean((2, 3)), other.mean((2, 3))), rel=1e-9)
    assert via_judge.extractor == "fakejudge"
    with caplog.at_level("WARNING"):
        fid(imgs[:4], imgs[4:8], extractor=FakeJudge())
    assert "noisy" in caplog.text


def test_named_inceptions_need_local_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("DMQUANT_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("DMQUANT_CLEANFID_INCEPTION", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))  # clean-fid's own cache: empty here
    x = torch.rand(4, 3, 8, 8)
    with pytest.raises(FileNotFoundError, match="DMQUANT_INCEPTION_WEIGHTS"):
        fid(x, x, extractor="inception")
    with pytest.raises(FileNotFoundError, match="DMQUANT_CLEANFID_INCEPTION"):
        fid(x, x, extractor="clean-fid", weights=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown extractor"):
        fid(x, x, extractor="dino")


def test_inception_without_torch_fidelity_says_what_to_install(tmp_path):
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if _TORCH_FIDELITY_AVAILABLE:
        pytest.skip("torch-fidelity is installed")
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"")
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        fid(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), extractor="inception", weights=weights)


@pytest.mark.slow
def test_inception_fid_runs_from_a_given_weights_file(tmp_path, monkeypatch):
    """torch-fidelity's Inception (declared in the `full` extra) from a local file: random weights of
    the right architecture stand in for the real file, which tests may not download."""
    pytest.importorskip("torch_fidelity")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with monkeypatch.context() as m:  # build the bare architecture: skip its weight loading once
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        skeleton = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=str(empty))
    weights = tmp_path / "pt_inception.pth"
    torch.save(skeleton.state_dict(), weights)
    a, b = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    same = fid(a, a, extractor="inception", weights=weights)
    other = fid(a, b, extractor="inception", weights=weights)
    assert same.extractor == "inception" and abs(same.value) < 1e-6 and math.isfinite(other.value)
    features, _ = resolve_extractor("inception", weights)
    assert features(a).shape == (3, 2048)  # Inception pool features (random weights: values are not FIDs)
    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(1), "code": print}, bad)  # a pickle with more than tensors
    with pytest.raises(ValueError, match="not a plain PyTorch state dict"):
        fid(a, b, extractor="inception", weights=bad)


class _Layers(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


class _FakeCleanFidInception(torch.nn.Module):
    """Same interface as clean-fid's TorchScript file: a `.layers` module on normalised 299 x 299 input."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_cleanfid_path_resizes_like_clean_fid(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(_FakeCleanFidInception()).save(str(path))
    a, b = torch.rand(6, 3, 16, 16), torch.rand(5, 3, 16, 16) * 0.7

    def reference_features(images):  # uint8 -> PIL bicubic in float per channel (clean mode) -> (x-128)/128
        out = []
        for img in (images * 255).round().to(torch.uint8).numpy():
            chans = [np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC))
                     for c in img]
            x = (torch.from_numpy(np.stack(chans).clip(0, 255)).double() - 128) / 128
            out.append(torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten())
        return torch.stack(out)

    expected = frechet_distance(reference_features(a), reference_features(b))
    result = fid(a, b, extractor="clean-fid", weights=path)
    assert result.extractor == "clean-fid" and result.value == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------- PSNR / SSIM / LPIPS

def test_psnr_against_formula_and_video_frames():
    a = torch.rand(3, 3, 16, 16)
    b = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    mse = ((a.double() - b.double()) ** 2).mean((1, 2, 3))
    assert torch.allclose(psnr(a, b).double(), 10 * torch.log10(1 / mse), atol=1e-4)
    assert torch.allclose(psnr(a * 255, b * 255, data_range=255.0), psnr(a, b), atol=1e-4)
    assert psnr(a, a).eq(100).all()  # identical: capped, not inf
    va, vb = torch.rand(2, 4, 3, 16, 16), torch.rand(2, 4, 3, 16, 16)
    per_frame = psnr(va.flatten(0, 1), vb.flatten(0, 1)).reshape(2, 4).mean(1)
    assert torch.allclose(psnr(va, vb), per_frame)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, b[:2])


def scipy_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 with separable scipy filtering over valid windows, float64, mean over channels."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    g /= g.sum()

    def filt(t):
        return correlate1d(correlate1d(t, g, axis=0), g, axis=1)[5:-5, 5:-5]

    c1, c2, vals = 0.01**2, 0.03**2, []
    for p, q in zip(x, y):
        mx, my = filt(p), filt(q)
        sxx, syy, sxy = filt(p * p) - mx**2, filt(q * q) - my**2, filt(p * q) - mx * my
        vals.append((((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))).mean())
    return float(np.mean(vals))


def test_ssim_matches_float64_reference():
    a = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    b = (a * 0.8 + 0.1 * torch.rand_like(a)).clamp(0, 1)
    ref = torch.tensor([scipy_ssim(b[i].numpy(), a[i].numpy()) for i in range(4)], dtype=torch.float64)
    assert torch.allclose(ssim(b, a).double(), ref, atol=1e-6)
    assert torch.allclose(ssim(a, a), torch.ones(4))
    assert ssim(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)).abs().max() < 0.2  # independent noise


@pytest.mark.parametrize("size,bound", [(32, 0.08), (64, 0.02), (128, 0.006)])
def test_ssim_gap_to_torchmetrics_is_what_the_docstring_states(size, bound):
    """torchmetrics averages reflect-padded windows, we average valid ones: the docstring states the gap
    measured on miniature-like images; it must hold (and at 32 px be far above 1e-3, as it is)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    from dmquant.pipelines import make_images

    torch.manual_seed(0)
    a = F.interpolate(make_images(8, seed=1).pixels, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    gaps = []
    for noise in (0.01, 0.03, 0.1):
        b = (a + noise * torch.randn_like(a)).clamp(0, 1)
        tm = torch.stack([tm_ssim(b[i:i + 1].double(), a[i:i + 1].double(), data_range=1.0) for i in range(8)])
        gaps.append(float((ssim(b, a).double() - tm).abs().max()))
    assert max(gaps) <= bound
    if size == 32:
        assert max(gaps) > 0.01  # the old "~1e-3" claim was wrong here


def test_lpips_offline_behaviour(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("DMQUANT_LPIPS_BACKBONE", raising=False)
    with pytest.raises(FileNotFoundError, match="DMQUANT_LPIPS_BACKBONE"):
        lpips(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="net must be"):
        lpips(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32), net="squeeze")
    import torchvision

    path = tmp_path / "alex.pth"
    torch.save(torchvision.models.alexnet().state_dict(), path)  # random backbone: exercises the code path
    a = torch.rand(2, 3, 64, 64)
    d = lpips(a, a.flip(-1), backbone=path)
    assert d.shape == (2,) and (d > 0).all() and lpips(a, a, backbone=path).abs().max() < 1e-6


# ---------------------------------------------------------------- CLIP score

def test_clip_score_formula():
    img, txt = torch.randn(5, 16), torch.randn(5, 16)
    cos = torch.nn.functional.cosine_similarity(img.double(), txt.double())
    assert torch.allclose(score_from_features(img, txt).double(), 100 * cos.clamp(min=0), atol=1e-4)


def test_clip_needs_a_local_checkpoint(monkeypatch, tmp_path):
    monkeypatch.delenv("DMQUANT_CLIP_CHECKPOINT", raising=False)
    with pytest.raises(FileNotFoundError, match="DMQUANT_CLIP_CHECKPOINT"):
        clip_score(torch.rand(2, 3, 8, 8), ["a", "b"])
    with pytest.raises(FileNotFoundError, match="not found"):
        clip_score(torch.rand(2, 3, 8, 8), ["a", "b"], checkpoint=tmp_path / "nope.pt")


def _uint8_images(n: int, size: int) -> torch.Tensor:
    return (torch.rand(n, 3, size, size) * 255).round() / 255  # exactly representable as uint8


def test_open_clip_score_on_a_tiny_local_model(tmp_path):
    import open_clip

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                           "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "dmq-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "dmq-tiny-clip.json")
    model = open_clip.create_model("dmq-tiny-clip").eval()
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "tiny.safetensors"))
    images, prompts = _uint8_images(3, 32), ["a red circle", "a blue square", "a green cross"]
    scores = clip_score(images, prompts, model_name="dmq-tiny-clip", checkpoint=tmp_path / "tiny.safetensors")

    _, _, preprocess = open_clip.create_model_and_transforms("dmq-tiny-clip")  # reference: open_clip's PIL path
    pil = [Image.fromarray((im * 255).round().byte().permute(1, 2, 0).numpy()) for im in images]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(p) for p in pil])).double()
        txt = model.encode_text(open_clip.get_tokenizer("dmq-tiny-clip")(prompts)).double()
    expected = 100 * torch.nn.functional.cosine_similarity(img, txt).clamp(min=0)
    assert scores.shape == (3,) and torch.allclose(scores.double(), expected, atol=1e-3)
    video = images[:, None].expand(3, 4, 3, 32, 32)  # static video: the per-frame mean equals the image score
    assert torch.allclose(clip_score(video, prompts, model_name="dmq-tiny-clip",
                                     checkpoint=tmp_path / "tiny.safetensors"), scores, atol=1e-4)


def _tiny_hf_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", "ab"] + chars + [c + "</w>" for c in chars])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[("a", "b")])
    cfg = CLIPConfig(text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32,
                                  "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                     projection_dim=16)
    model = CLIPModel(cfg).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return model, CLIPProcessor.from_pretrained(folder)


def test_hf_clip_folder_through_torchmetrics(tmp_path):
    model, processor = _tiny_hf_clip(tmp_path / "clip")
    images, prompts = _uint8_images(3, 32), ["a red circle", "blue square", "cross"]
    scores = clip_score(images, prompts, checkpoint=tmp_path / "clip")
    pixels = [(im * 255).round().to(torch.uint8) for im in images]
    with torch.no_grad():  # manual reference: projected pooler outputs, float64 cosine
        img = model.get_image_features(processor(images=pixels, return_tensors="pt")["pixel_values"]).pooler_output
        tok = processor(text=prompts, return_tensors="pt", padding=True)
        txt = model.get_text_features(tok["input_ids"], tok["attention_mask"]).pooler_output
    expected = 100 * torch.nn.functional.cosine_similarity(img.double(), txt.double()).clamp(min=0)
    assert scores.shape == (3,) and torch.allclose(scores.double(), expected, atol=1e-3)
