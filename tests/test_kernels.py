"""Real kernels vs references: fbgemm on this CPU; the GPU paths' padding and scale math with an
emulated matmul (the CUDA ops themselves run only where a GPU is present)."""
import pytest
import torch
from torch import nn

import dmquant
from dmquant.config import QuantSpec
from dmquant.kernels import available_backends, fbgemm, get_kernel, gpu
from dmquant.nn import QuantLinear

W8 = QuantSpec("int8", "channel")
needs_fbgemm = pytest.mark.skipif(not fbgemm.available(), reason="no fbgemm engine in this torch build")


def layer(in_f, out_f, input_spec, bias=True, backend="fbgemm"):
    torch.manual_seed(0)
    return QuantLinear.from_float(nn.Linear(in_f, out_f, bias=bias), W8, input_spec, backend=backend, name="l")


def fake(q, x):
    backend, q.backend = q.backend, "fake"
    try:
        return q(x)
    finally:
        q.backend = backend


@needs_fbgemm
@pytest.mark.parametrize("in_f,out_f,bias", [(64, 48, True), (37, 5, False), (256, 256, True)])
def test_fbgemm_static_scale_equals_fake_quant(in_f, out_f, bias):
    """Static scale: fbgemm's uint8 with zero point 128 is the same grid as symmetric int8, so only
    fp32 accumulation order differs (tolerance: a few ulps of the output scale)."""
    q = layer(in_f, out_f, QuantSpec("int8", "tensor"), bias)
    x = torch.randn(3, 7, in_f)
    q.input_quantizer.set_qparams(dmquant.primitives.QParams(x.abs().max().reshape(1, 1) / 127))
    with torch.no_grad():
        y, ref = q(x), fake(q, x)
    assert q._kcache[1] is not None, "kernel was not used"
    assert y.shape == (3, 7, out_f)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@needs_fbgemm
def test_fbgemm_dynamic_matches_its_documented_numerics():
    """Dynamic: per-tensor asymmetric uint8 with reduce_range (0..127), emulated in float64."""
    q = layer(96, 32, QuantSpec("int8", "tensor", dynamic=True))
    x = torch.randn(10, 96) * 3
    with torch.no_grad():
        y = q(x)
    x64 = x.double()
    lo, hi = min(x64.min().item(), 0.0), max(x64.max().item(), 0.0)
    s = (hi - lo) / 127
    zp = round(-lo / s)
    xq = (torch.clamp(torch.round(x64 / s) + zp, 0, 127) - zp) * s
    w = q.weight_quantizer(q.weight.detach()).double()
    ref = xq @ w.T + q.bias.detach().double()
    assert torch.allclose(y.double(), ref, rtol=1e-4, atol=2e-4 * ref.abs().max().item())


@needs_fbgemm
def test_unsupported_layers_fall_back_to_fake():
    q4 = QuantLinear.from_float(nn.Linear(16, 16), QuantSpec("int4", "group:8"),
                                QuantSpec("int8", "token", dynamic=True), backend="fbgemm", name="w4")
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert torch.equal(q4(x), fake(q4, x))
    assert q4._kcache[1] is None and "int8" in fbgemm.unsupported_reason(q4)


def test_grad_mode_uses_fake_path():
    q = layer(16, 8, QuantSpec("int8", "tensor", dynamic=True))
    y = q(torch.randn(2, 16))
    assert y.requires_grad and q._kcache is None


@pytest.mark.parametrize("wfmt,m", [("int8", 3), ("int8", 40), ("fp8_e4m3", 5)])
def test_gpu_padding_and_scale_math_with_emulated_matmul(wfmt, m):
    """The CUDA ops' shape rules are met by padding; with an exact emulated matmul the result must
    equal the fake-quant reference (float64 accumulation vs fp32: tight tolerance)."""
    torch.manual_seed(0)
    spec_w = QuantSpec(wfmt, "channel")
    spec_a = QuantSpec(wfmt, "token", dynamic=True)
    q = QuantLinear.from_float(nn.Linear(36, 21), spec_w, spec_a, name="g")  # 36, 21: not multiples of 8/16
    prep = gpu.prepare(q)
    x = torch.randn(m, 36)
    xq, s = gpu.quantize_input(x, q)
    exact = lambda a, b: a.double() @ b.double()  # noqa: E731
    y = gpu.linear(prep, xq, s, matmul=exact)
    with torch.no_grad():
        ref = q(x)
    assert y.shape == (m, 21)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe", ["w8a8", "fp8"])
def test_cuda_kernels_match_fake(recipe):
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).cuda()
    dmquant.quantize(model, recipe)
    x = torch.randn(64, 256, device="cuda")
    with torch.no_grad():
        ref = model(x)
        for m in model.modules():
            if hasattr(m, "backend"):
                m.backend = "cuda"
        y = model(x)
    assert all(m._kcache[1] is not None for m in model.modules() if hasattr(m, "_kcache"))
    assert dmquant.primitives.sqnr_db(ref, y) > 30  # fp8 products are rounded to bf16 output


def test_registry():
    assert "fake" in available_backends()
    assert get_kernel("fbgemm") is fbgemm
    with pytest.raises(ValueError, match="unknown kernel backend"):
        get_kernel("tpu")
