"""One-pass vs sequential GPTQ on the miniature-pixart denoiser: SQNR of the denoiser output (dB).

Calibration: one batch of 4 latents at t = 100/400/700/950 with random text embeddings (seed 0);
evaluation: another such batch (seed 1). Run from the repository root:
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python docs/results/methods-gptq/sequential.py
"""
import copy, torch, dmquant
from dmquant.pipelines import load
from dmquant.primitives import sqnr_db
from dmquant.config import Recipe, QuantSpec, Step
pipe = load("miniature-pixart"); t = pipe.transformer.eval()
def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 4, 8, 8, generator=g),), dict(encoder_hidden_states=torch.randn(4, 120, 64, generator=g), timestep=torch.tensor([100, 400, 700, 950]), added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
ca, ck = inputs(0); ea, ek = inputs(1)
with torch.no_grad(): ref = t(*ea, **ek)[0]
for fmt, gran in (("int4", "group:32"), ("int3", "group:32")):
    for seq in (False, True):
        r = Recipe(name="g", weight=QuantSpec(fmt, gran), steps=(Step("gptq", {"act_order": True, "sequential": seq}),))
        m = copy.deepcopy(t); dmquant.quantize(m, r, calibration=lambda mm: mm(*ca, **ck))
        with torch.no_grad(): print(fmt, gran, "sequential" if seq else "one-pass", round(sqnr_db(ref, m(*ea, **ek)[0]), 2), flush=True)
    m = copy.deepcopy(t); dmquant.quantize(m, Recipe(name="rtn", weight=QuantSpec(fmt, gran)))
    with torch.no_grad(): print(fmt, gran, "rtn", round(sqnr_db(ref, m(*ea, **ek)[0]), 2), flush=True)
