"""FP-referenced image metrics on the same seeds: PSNR, SSIM, LPIPS. Inputs in [0, 1], (N, 3, H, W)
or videos (N, F, 3, H, W) (scored per frame, averaged per sample). All return per-sample values."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F


def _frames(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() == 5:
        return a.flatten(0, 1), b.flatten(0, 1), a.shape[1]
    if a.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) or (N, F, C, H, W), got {tuple(a.shape)}")
    return a, b, 1


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, max_db: float = 100.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample (higher is better; identical images -> max_db)."""
    x, y, f = _frames(a, b)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    db = (10 * torch.log10(data_range**2 / mse)).clamp(max=max_db)
    return db.reshape(-1, f).mean(1).float()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03),
    averaged over channels and valid windows, per sample (1 = identical, higher is better).
    torchmetrics 1.9 instead averages over a reflect-padded full image, so its border windows differ
    and the gap shrinks with size: measured |ours - torchmetrics| up to 0.08 at 32 px, 0.02 at 64 px
    and 0.006 at 128 px (procedural shapes plus Gaussian noise, sigma 0.01-0.1, three draws;
    tests/test_eval_metrics.py holds these bounds). Compare SSIM only within one implementation."""
    x, y, f = _frames(a, b)
    x, y = x.double(), y.double()
    c = x.shape[1]
    w = _gaussian_window().to(x).expand(c, 1, 11, 11)
    conv = lambda t: F.conv2d(t, w, groups=c)  # noqa: E731  ('valid' windows, like the reference code)
    mu_x, mu_y = conv(x), conv(y)
    sxx, syy, sxy = conv(x * x) - mu_x**2, conv(y * y) - mu_y**2, conv(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return m.flatten(1).mean(1).reshape(-1, f).mean(1).float()


LPIPS_ENV = "DMQUANT_LPIPS_BACKBONE"
_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


def lpips_backbone_file(net: str = "alex", backbone: str | os.PathLike | None = None) -> Path:
    """The local torchvision backbone file LPIPS will use, or a FileNotFoundError saying where to put it
    (checked before an evaluation generates anything)."""
    if net not in _BACKBONE_FILES:
        raise ValueError(f"net must be one of {list(_BACKBONE_FILES)}")
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    path = Path(backbone or os.environ.get(LPIPS_ENV) or torch_home / "hub" / "checkpoints" / _BACKBONE_FILES[net])
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS needs the torchvision {net} backbone weights ({_BACKBONE_FILES[net]}), "
                                f"not found at {path}: pass backbone=<file> or set ${LPIPS_ENV}; "
                                "dmquant never downloads them")
    return path


def lpips(a: torch.Tensor, b: torch.Tensor, net: str = "alex",
          backbone: str | os.PathLike | None = None) -> torch.Tensor:
    """LPIPS perceptual distance per sample (lower is better), with the torchvision backbone from a
    local file: `backbone=`, $DMQUANT_LPIPS_BACKBONE, or $TORCH_HOME/hub/checkpoints/ (the linear
    heads ship inside the lpips package). Never downloads: a missing file is a FileNotFoundError."""
    model = _lpips_model(net, str(lpips_backbone_file(net, backbone)))
    x, y, f = _frames(a, b)
    with torch.no_grad():
        d = torch.cat([model(xc * 2 - 1, yc * 2 - 1).flatten() for xc, yc in zip(x.split(64), y.split(64))])
    return d.reshape(-1, f).mean(1)


@lru_cache(maxsize=2)
def _lpips_model(net: str, backbone_file: str):
    import lpips as lpips_pkg
    import torchvision

    model = lpips_pkg.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)  # heads ship in the package
    tv = {"alex": torchvision.models.alexnet, "vgg": torchvision.models.vgg16}[net]()
    tv.load_state_dict(torch.load(backbone_file, map_location="cpu", weights_only=True))
    feats = list(tv.features.children())
    # lpips' backbone slices name their layers by index into torchvision's `features`: swap them in.
    for sl in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5):
        for name in list(sl._modules):
            sl._modules[name] = feats[int(name)]
    return model.eval()
