#!/usr/bin/env python
"""What SVDQuant's low-rank branch costs beside the low-bit GEMM, in bytes and CPU time.

PixArt-alpha-sized Linear layers (random weights), per rank r:
- bytes: the stored int4 (group 64) weight vs the branch, (in + out) * r numbers in 16 bit;
- latency: the layer on the CPU int8 kernel (W8A8: the low-bit GEMM this CPU has; there is no int4
  GEMM here) with and without the branch, and fp32, same inputs, median of repeats.

    python scripts/benchmark_lowrank.py                  # 1152 / 4608 shapes, 1024 tokens
    python scripts/benchmark_lowrank.py --tokens 256 --ranks 16,32,64 --threads 2
"""
from __future__ import annotations

import argparse
import copy

import torch
from benchmark import timed  # scripts/ is on sys.path when run as a script
from torch import nn

import dmquant
from dmquant.payload import extra_nbytes, weight_nbytes
from dmquant.transforms import apply_svd

SHAPES = ((1152, 1152), (1152, 4608), (4608, 1152))  # attention projections, FFN up and down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--ranks", default="16,32,64")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    ranks = [int(r) for r in args.ranks.split(",")]
    print(f"{'in x out':<12}{'rank':>5}{'int4 weight':>13}{'branch fp16':>13}{'+bytes':>8}"
          f"{'fp32':>9}{'w8a8':>9}{'w8a8+branch':>13}{'+time':>8}")
    with torch.no_grad():
        for n_in, n_out in SHAPES:
            model = nn.Sequential(nn.Linear(n_in, n_out)).eval()
            x = torch.randn(args.tokens, n_in)
            int4 = weight_nbytes(dmquant.quantize(copy.deepcopy(model), "w4a16")[0])
            w8a8 = lambda: dmquant.quantize(copy.deepcopy(model), "w8a8", backend="fbgemm")  # noqa: E731
            q = w8a8()
            t_fp, t_q = timed(lambda: model(x), args.repeats), timed(lambda: q(x), args.repeats)
            for r in ranks:
                qb = w8a8()  # fresh: packed kernel weights cannot be deep-copied
                apply_svd([qb], lambda: None, rank=r)
                branch = extra_nbytes(qb[0]) // qb[0].weight.element_size() * 2  # stored in 16 bit
                t_b = timed(lambda: qb(x), args.repeats)
                print(f"{f'{n_in}x{n_out}':<12}{r:>5}{int4 / 2**10:>10.0f} KB{branch / 2**10:>10.0f} KB"
                      f"{100 * branch / int4:>7.1f}%{t_fp * 1e3:>7.1f}ms{t_q * 1e3:>7.1f}ms{t_b * 1e3:>11.1f}ms"
                      f"{100 * (t_b / t_q - 1):>7.1f}%")


if __name__ == "__main__":
    main()
