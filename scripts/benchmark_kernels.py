"""Time dmquant's real low-bit kernels against fp32 at SD-UNet and PixArt shapes, with their error.

    python scripts/benchmark_kernels.py            # ~1-2 minutes on 2 cores
    python scripts/benchmark_kernels.py --quick    # two shapes each, fewer runs

Each row: median time of N runs after warm-up, speed-up over fp32 (>1 is faster), and the error
against the fp32 layer with the original float weights (max abs, and relative L2 ||y - ref|| / ||ref||),
which is the quantization error of the path. Packing is done once, outside the timing, as modules do.
Timings on a shared machine drift by tens of percent: compare ratios within one run.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from dmquant.kernels import cpu, cuda

LINEARS = [  # (name, tokens, in, out)
    ("4096x4096, 256 tok", 256, 4096, 4096),
    ("PixArt 1152x1152", 1024, 1152, 1152),
    ("PixArt 1152x4608", 1024, 1152, 4608),
    ("PixArt 4608x1152", 1024, 4608, 1152),
    ("UNet 320 (2x64x64)", 8192, 320, 320),
    ("UNet 640 (2x32x32)", 2048, 640, 640),
    ("UNet 1280 (2x16x16)", 512, 1280, 1280),
]
CONVS = [("conv3x3 320 @64x64", 320, 64), ("conv3x3 640 @32x32", 640, 32), ("conv3x3 1280 @16x16", 1280, 16)]
ATTENTION = [("PixArt Q K^T 2x16 heads, 1024 tok, d 72", 32, 1024, 72)]  # (name, batch x heads, tokens, head dim)
QUICK = {"4096x4096, 256 tok", "PixArt 1152x1152", "conv3x3 640 @32x32", "conv3x3 1280 @16x16",
         ATTENTION[0][0]}


def timed(fn: Callable[[], torch.Tensor], runs: int, sync: bool) -> tuple[float, torch.Tensor]:
    """Median milliseconds over `runs` calls after two warm-up calls, and the last output."""
    with torch.no_grad():
        out = fn()
        fn()
        times = []
        for _ in range(runs):
            if sync:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn()
            if sync:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, out


def int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.reshape(w.shape[0], -1).abs().amax(1) / 127
    return torch.round(w / scale.view(-1, *[1] * (w.dim() - 1))).to(torch.int8), scale


def int4_group_weight(w: torch.Tensor, group: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 codes and (out, in / group) scales, SVDQuant's weight layout."""
    g = w.reshape(w.shape[0], -1, group)
    scale = g.abs().amax(-1, keepdim=True) / 7
    return torch.round(g / scale).clamp(-8, 7).to(torch.int8).reshape(w.shape), scale.squeeze(-1)


def fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(1) / 448
    return (w / scale[:, None]).to(torch.float8_e4m3fn), scale


def linear_paths(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    codes, scale = int8_weight(w)
    s_static = x.abs().max().item() / 127  # a calibrated per-tensor scale for this input
    paths: dict[str, Callable[[], torch.Tensor]] = {}
    if x.is_cuda:
        p8 = cuda.prepack_linear_int8(codes, scale, b)
        paths["cuda int8 _int_mm (token)"] = lambda: cuda.int8_linear_cuda(x, p8)
        if cuda.fp8_supported():
            pf = cuda.prepack_linear_fp8(*fp8_weight(w), b)
            paths["cuda fp8 _scaled_mm (token)"] = lambda: cuda.fp8_linear_cuda(x, pf)
    else:
        if cpu.onednn_available():
            pd = cpu.prepack_linear(codes, scale, b, impl="onednn")
            paths["onednn int8 dynamic/token"] = lambda: cpu.int8_linear(x, pd)
            paths["onednn int8 dynamic/tensor"] = lambda: cpu.int8_linear(x, pd, granularity="tensor")
            paths["onednn int8 static"] = lambda: cpu.int8_linear(x, pd, s_static)
            if w.shape[1] % 64 == 0:  # W4A4 with int4 weights in groups of 64, int4 per-token activations
                c4, s4 = int4_group_weight(w)
                for impl in ("onednn", "vnni") if cpu.group_impl(64) == "vnni" else ("onednn",):
                    pg = cpu.prepack_linear(c4, s4, b, impl=impl, group=64)
                    paths[f"W4A4 group:64 ({impl})"] = lambda pg=pg: cpu.int8_linear(x, pg, act_bits=4)
        if cpu.fbgemm_available():
            pf = cpu.prepack_linear(codes, scale, b, impl="fbgemm")
            paths["fbgemm int8 dynamic/token"] = lambda: cpu.int8_linear(x, pf)
            paths["fbgemm int8 static"] = lambda: cpu.int8_linear(x, pf, s_static)
            paths["fbgemm linear_dynamic (asym)"] = lambda: cpu.int8_linear_fbgemm_dynamic(x, pf)
    paths["weight-only int8 (dequant+mm)"] = lambda: F.linear(x, codes.to(x.dtype) * scale[:, None], b)
    return paths


def conv_paths(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    codes, scale = int8_weight(w)
    s_static = x.abs().max().item() / 127
    paths: dict[str, Callable[[], torch.Tensor]] = {}
    if not x.is_cuda and cpu.onednn_available():
        pc = cpu.prepack_conv(codes, scale, b, padding=1)
        paths["onednn int8 conv dynamic"] = lambda: cpu.int8_conv(x, pc)
        paths["onednn int8 conv static"] = lambda: cpu.int8_conv(x, pc, s_static)
        pt = cpu.prepack_conv(codes, scale, b, padding=1, per_token=True)
        paths["int8 conv per token (GEMM per tap)"] = lambda: cpu.int8_conv(x, pt, None, "token")
    paths["weight-only int8 (dequant+conv)"] = lambda: F.conv2d(
        x, codes.to(x.dtype) * scale.view(-1, 1, 1, 1), b, padding=1)
    return paths


def attention_paths(q: torch.Tensor, k: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """Q K^T of SageAttention's int8 Q/K per 16-token block, quantization included: the int8 GEMM
    against the simulated product of the dequantized blocks."""
    from dmquant.config import AttentionSpec, QuantSpec
    from dmquant.kernels.attention import int8_scores
    from dmquant.nn.qattention import AttentionQuantizers

    aq = AttentionQuantizers(AttentionSpec(qkv=QuantSpec("int8", "token", dynamic=True), block_size=16))
    return {"int8 Q K^T torch._int_mm (block 16)": lambda: int8_scores(*aq._codes(aq.q, q), *aq._codes(aq.k, k)),
            "simulated int8 Q K^T (block 16)": lambda: aq._blocked(aq.q, q) @ aq._blocked(aq.k, k).transpose(-1, -2)}


def bench(name: str, ref_fn: Callable[[], torch.Tensor], paths: dict[str, Callable[[], torch.Tensor]],
          runs: int, sync: bool) -> list[tuple[str, ...]]:
    t_ref, ref = timed(ref_fn, runs, sync)
    rows = [(name, "fp32", f"{t_ref:.1f}", "1.00", "-", "-")]
    for path, fn in paths.items():
        t, y = timed(fn, runs, sync)
        err = (y.float() - ref).contiguous()
        rel = err.norm() / ref.norm()
        rows.append((name, path, f"{t:.1f}", f"{t_ref / t:.2f}", f"{err.abs().max().item():.3g}", f"{rel.item():.2e}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two linear and two conv shapes, 3 runs")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per path (default 7, quick 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = args.runs or (3 if args.quick else 7)
    dev, sync = torch.device(args.device), args.device == "cuda"
    print(f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}, "
          f"VNNI {cpu.vnni_available()}, oneDNN {cpu.onednn_available()}, fbgemm {cpu.fbgemm_available()}, "
          f"median of {runs} runs\n")
    rows: list[tuple[str, ...]] = []
    for name, m, k, n in LINEARS:
        if args.quick and name not in QUICK:
            continue
        torch.manual_seed(0)
        x, w, b = torch.randn(m, k, device=dev), torch.randn(n, k, device=dev) / k**0.5, torch.randn(n, device=dev)
        rows += bench(f"linear {name}", lambda: F.linear(x, w, b), linear_paths(x, w, b), runs, sync)
    for name, c, h in CONVS:
        if args.quick and name not in QUICK:
            continue
        torch.manual_seed(0)
        x, w = torch.randn(2, c, h, h, device=dev), torch.randn(c, c, 3, 3, device=dev) / (9 * c) ** 0.5
        b = torch.randn(c, device=dev)
        rows += bench(name, lambda: F.conv2d(x, w, b, padding=1), conv_paths(x, w, b), runs, sync)
    for name, heads, tokens, dim in ATTENTION:
        torch.manual_seed(0)
        q, k = torch.randn(heads, tokens, dim, device=dev), torch.randn(heads, tokens, dim, device=dev)
        rows += bench(name, lambda: q @ k.transpose(-1, -2), attention_paths(q, k), runs, sync)
    header = ("shape", "path", "ms", "x fp32", "max abs err", "rel L2 err")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(v.ljust(wd) for v, wd in zip(r, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
    for r in rows:
        print(line(r))


if __name__ == "__main__":
    main()
