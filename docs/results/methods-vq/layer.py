"""Layer-level VQ4DiT vs round-to-nearest int2: relative output error tr(E H E^T) / tr(W H W^T) in dB
on a 128x128 layer with correlated inputs (a few loud channels). Run from the repository root:
    HF_HUB_OFFLINE=1 .venv/bin/python docs/results/methods-vq/layer.py
"""
import time, torch
from dmquant.algorithms.vq import vector_quantize, _output_error
from dmquant.config import QuantSpec
from dmquant.primitives import choose_qparams, fake_quantize
torch.manual_seed(0)
W = torch.randn(128, 128) * 0.05
X = torch.randn(2000, 128) @ (torch.randn(128, 128) * 0.3 + torch.eye(128)); X[:, :4] *= 8
H = 2 * X.T @ X / X.shape[0]
def rel(wh): return float(_output_error(wh, W, H) / _output_error(torch.zeros_like(W), W, H))
for g in ("channel", "group:64"):
    s = QuantSpec("int2", g); print("rtn int2", g, 10 * torch.log10(torch.tensor(1 / rel(fake_quantize(W, s.fmt, s.gran, choose_qparams(W, s.fmt, s.gran))))).item())
for bits, dim in ((2, 4), (3, 2)):
    t = time.time(); r = vector_quantize(W, H, bits, dim, iters=300)
    print(bits, dim, "db", -10 * torch.log10(torch.tensor(r.loss)).item(), "kmeans db", -10 * torch.log10(torch.tensor(r.kmeans_loss)).item(), time.time() - t)
