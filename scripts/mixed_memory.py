"""Peak memory of the mixed-precision sensitivity measurement on an SD1.5-sized UNet (860 M params).

The measurement swaps one layer at a time for its quantized form (sharing the float parameters), so
its peak over the float model should be about one layer's quantization temporaries, not a model copy.
Random weights (no download): memory does not depend on the values. One recorded call at a small latent.

    python scripts/mixed_memory.py --layers 8     # the 8 largest layers, int4 g64 and int8 candidates
"""
from __future__ import annotations

import argparse
import logging
import resource
import time

import torch

from dmquant.calibration import DenoiserCall, Trajectory
from dmquant.mixed import measure, parse_candidates, quantizable_layers

SD15 = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
log = logging.getLogger("mixed_memory")


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="measure the N largest layers")
    parser.add_argument("--latent", type=int, default=8, help="latent side of the recorded call")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15).eval()
    model_gib = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**30
    call = DenoiserCall({"sample": torch.randn(1, 4, args.latent, args.latent), "timestep": torch.tensor([500]),
                         "encoder_hidden_states": torch.randn(1, 77, 768), "return_dict": False}, 0, 0.5)
    with torch.no_grad():
        unet(**call.kwargs)  # the float forward's own peak, before measuring
    layers = sorted(quantizable_layers(unet).items(), key=lambda kv: -kv[1].weight.numel())[: args.layers]
    before, t0 = peak_gib(), time.perf_counter()
    measure(unet, Trajectory(calls=[call]), parse_candidates("int4:group:64,int8:channel"), None,
            layers=[n for n, _ in layers], groups=1)
    after = peak_gib()
    largest = layers[0][1].weight.numel() * 4 / 2**30
    log.info("model %.2f GiB; peak RSS %.2f GiB before measuring, %.2f GiB after (+%.3f GiB) for %d layers "
                 "x 2 candidates in %.0f s; largest layer %.3f GiB", model_gib, before, after, after - before,
                 len(layers), time.perf_counter() - t0, largest)


if __name__ == "__main__":
    main()
