"""How far the real kernels (`backend="auto"`) are from the simulated reference, layer by layer and for a
whole denoiser call, on a built-in miniature quantized with a recipe.

    python scripts/kernel_agreement.py --pipeline miniature-sd --recipe svdquant-w4a4

Prints SQNR (dB) of: simulated vs float, kernels vs float, kernels vs simulated for one call on a fixed
input, then the kernel each layer ran and the layers that agree least with the simulation when both
see the same input (exact kernels sit at fp32 rounding, > 100 dB).
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch

import dmquant
from dmquant.pipelines import load
from dmquant.state import quant_layers


def sqnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (x - ref).pow(2).mean().clamp_min(1e-30)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default="miniature-sd")
    ap.add_argument("--recipe", default="svdquant-w4a4")
    ap.add_argument("--show", type=int, default=5, help="layers listed, least agreeing first")
    a = ap.parse_args()
    torch.manual_seed(0)
    pipe = load(a.pipeline)
    unet = hasattr(pipe, "unet")
    den = pipe.unet if unet else pipe.transformer
    cfg = den.config
    text = cfg.cross_attention_dim if unet else cfg.caption_channels
    call = {"sample" if unet else "hidden_states": torch.randn(2, cfg.in_channels, 16, 16),
            "timestep": torch.tensor([500, 500]), "encoder_hidden_states": torch.randn(2, 8, text)}
    if not unet:  # PixArt
        call["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    with torch.no_grad():
        fp = den(**call).sample
    dmquant.quantize(pipe, a.recipe, calibration={"num_prompts": 4, "steps": 4})
    layers = quant_layers(den)

    def run(backend: str) -> torch.Tensor:
        for layer in layers.values():
            layer.backend = backend
        with torch.no_grad():
            return den(**call).sample

    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: inputs.__setitem__(n, args[0].detach().clone()))
             for n, m in layers.items()]
    sim = run("fake")
    for h in hooks:
        h.remove()
    ker = run("auto")
    print(f"one call: simulated vs FP {sqnr(sim, fp):.2f} dB, kernels vs FP {sqnr(ker, fp):.2f} dB, "
          f"kernels vs simulated {sqnr(ker, sim):.2f} dB")
    for kernel, n in Counter(r.kernel for r in dmquant.report(den).rows).most_common():
        print(f"  {n:4d} x {kernel}")
    per_layer = []
    for name, layer in layers.items():
        with torch.no_grad():
            layer.backend = "fake"
            ref = layer(inputs[name])
            layer.backend = "auto"
            per_layer.append((sqnr(layer(inputs[name]), ref), name))
    print("layers, same input, kernel vs simulated (least agreeing first):")
    for db, name in sorted(per_layer)[:a.show]:
        print(f"  {db:7.2f} dB  {name}")


if __name__ == "__main__":
    main()
