"""Attention-output SQNR of int4 attention variants on miniature-pixart's own Q, K, V.

Records every denoiser attention call (4 prompts x 10 steps, classifier-free guidance batch) and runs
each `AttentionSpec` on those tensors against float64 attention. Run from the repository root:
`HF_HUB_OFFLINE=1 .venv/bin/python docs/results/methods-attention/layer.py`.
"""
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dmquant.config import AttentionSpec, QuantSpec
from dmquant.nn.qattention import AttentionQuantizers
from dmquant.pipelines import loading
from dmquant.pipelines.prompts import miniature_prompts

SDPA = F.scaled_dot_product_attention
SYM = QuantSpec("int4", "token", dynamic=True)
ASYM = QuantSpec("int4", "token", dynamic=True, symmetric=False)
V_CHAN = QuantSpec("int4", "channel", dynamic=True, symmetric=False)
SPECS = {
    "int4 per token (w8a8-attn4)": AttentionSpec(qkv=SYM),
    "+ K/V smoothing": AttentionSpec(qkv=SYM, smooth_k=True, smooth_v=True),
    "asymmetric": AttentionSpec(qkv=ASYM),
    "asymmetric + Q/K smoothing": AttentionSpec(qkv=ASYM, smooth_q=True, smooth_k=True),
    "asymmetric, V per channel": AttentionSpec(qkv=ASYM, v=V_CHAN),
    "w8a8-attn4-sage2 (+ Q/K smoothing)": AttentionSpec(qkv=ASYM, v=V_CHAN, smooth_q=True, smooth_k=True),
}


class Record(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA and args[0].shape[0] == 8:  # the denoiser's CFG batch, not the text encoder
            mask = kwargs.get("attn_mask")  # float masks in float64 too: SDPA mixes dtypes wrongly
            mask = mask.double() if mask is not None and mask.is_floating_point() else mask
            self.calls.append((*(a.detach().double() for a in args[:3]), mask))
        return func(*args, **kwargs)


def main() -> None:
    pipe = loading.load("miniature-pixart")
    with torch.no_grad(), Record() as rec:
        pipe(miniature_prompts("miniature-pixart", 24)[-4:], num_inference_steps=10,
             generator=torch.Generator().manual_seed(0))
    print(f"{len(rec.calls)} attention calls")
    for name, spec in SPECS.items():
        quantizers = AttentionQuantizers(spec)
        err = ref_energy = 0.0
        for q, k, v, mask in rec.calls:
            ref = SDPA(q, k, v, attn_mask=mask)
            err += (quantizers.sdpa(q, k, v, attn_mask=mask) - ref).pow(2).sum().item()
            ref_energy += ref.pow(2).sum().item()
        print(f"| {name} | {10 * math.log10(ref_energy / err):.2f} |")


if __name__ == "__main__":
    main()
