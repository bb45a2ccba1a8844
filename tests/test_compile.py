"""torch.compile(fullgraph=True) on quantized models: no graph break, output equal to eager.

Two checks per recipe, to stay quick: a tiny diffusers denoiser traced whole with fullgraph (dynamo's
"eager" backend: any graph break fails), and inductor's generated code on quantized layers. Inductor
fuses the decode of packed codes with the matmul, so it computes eager's values up to float
reassociation: 1e-4 of the output's peak (one flipped int4 activation code would cost ~1e-2). Layers
on opaque CPU kernels run simulated inside a compiled graph, so both sides use the simulated backend.
"""
import pytest
import torch
from torch import nn

import dmquant

RECIPES = ["w8a8", "w4a16", "w4a4"]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("denoiser", ["pixart"], indirect=True)
def test_denoiser_traces_without_graph_breaks(denoiser, recipe):
    _, model, run = denoiser
    dmquant.quantize(model, recipe)
    eager = run(model)
    torch._dynamo.reset()
    out = run(torch.compile(model, fullgraph=True, backend="eager"))
    assert torch.allclose(out, eager, rtol=0, atol=1e-5 * eager.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_inductor_code_matches_eager(recipe):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    dmquant.quantize(model, recipe)
    x = torch.randn(6, 64)
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True, backend="inductor")(x)
    assert torch.allclose(out, eager, rtol=0, atol=1e-4 * eager.abs().max().item())
