#!/usr/bin/env python
"""Whole-model benchmark on a PixArt-alpha-sized transformer (random weights, CPU):

1. checkpoint size: dmquant packed W4 (int4, group 128) vs the fp16 diffusers checkpoint;
2. end-to-end latency: W8A8 (per-token and per-tensor dynamic activations) on the CPU int8 kernels
   vs fp32 and vs fake quantization, same inputs, side by side; plus each path's SQNR against fp32.

    python scripts/benchmark.py            # full PixArt-alpha XL-2 shape (611 M params, ~3 min)
    python scripts/benchmark.py --small    # 4 layers, for a quick look
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

import dmquant
from dmquant.primitives import sqnr_db


def pixart_alpha(num_layers: int) -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        sample_size=64, num_layers=num_layers, attention_head_dim=72, num_attention_heads=16, in_channels=4,
        out_channels=8, cross_attention_dim=1152, caption_channels=4096, patch_size=2,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000,
    ).eval()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def checkpoint_sizes(model: torch.nn.Module, tmp: Path) -> tuple[int, int]:
    fp16 = copy.deepcopy(model).half()
    fp16.save_pretrained(tmp / "fp16")
    dmquant.quantize(fp16, dmquant.Recipe(name="w4-g128", weight=dmquant.QuantSpec("int4", "group:128")))
    dmquant.save_quantized(fp16, tmp / "w4")
    return dir_bytes(tmp / "fp16"), dir_bytes(tmp / "w4")


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (also builds the packed kernels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="4 layers instead of 28")
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 -> 256 tokens)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = pixart_alpha(4 if args.small else 28)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"PixArt-alpha-shaped transformer: {n_params / 1e6:.0f} M params, latent {args.latent}x{args.latent}")

    with tempfile.TemporaryDirectory() as tmp:
        fp16_bytes, w4_bytes = checkpoint_sizes(model, Path(tmp))
    print(f"checkpoint: fp16 {fp16_bytes / 2**20:.1f} MiB, dmquant W4 g128 {w4_bytes / 2**20:.1f} MiB "
          f"-> {fp16_bytes / w4_bytes:.2f}x smaller")

    x = torch.randn(1, 4, args.latent, args.latent)
    kw = dict(encoder_hidden_states=torch.randn(1, 120, 4096), timestep=torch.tensor([500]),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    rows = []
    with torch.no_grad():
        ref = model(x, **kw)[0]
        t_fp32 = timed(lambda: model(x, **kw), args.repeats)
        rows.append(("fp32", t_fp32, float("inf")))
        for recipe, backend in (("w8a8", "fbgemm"), ("w8a8-cpu", "fbgemm"), ("w8a8", "fake")):
            q = dmquant.quantize(copy.deepcopy(model), recipe, backend=backend)
            out = q(x, **kw)[0]
            rows.append((f"{recipe} [{backend}]", timed(lambda: q(x, **kw), args.repeats), sqnr_db(ref, out)))
            del q
    print(f"\n{'path':<24}{'latency':>10}{'speed vs fp32':>15}{'SQNR vs fp32':>15}")
    for name, t, db in rows:
        print(f"{name:<24}{t * 1e3:>8.0f}ms{t_fp32 / t:>14.2f}x{db:>13.1f}dB")


if __name__ == "__main__":
    main()
