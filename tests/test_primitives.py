"""Scale choice, quantize/dequantize and fake quantization against float64 references."""
import math

import pytest
import torch
from reference import nearest_on_grid

from dmquant.formats import get_format
from dmquant.granularity import PerChannel, PerGroup, PerTensor, PerToken, parse_granularity
from dmquant.primitives import QParams, choose_qparams, dequantize, fake_quantize, qparams_from_range, quantize, sqnr_db

torch.manual_seed(0)


def ref_int(x64, bits, group, symmetric):
    """Textbook min-max integer quantization per row-group, in float64."""
    rows, cols = x64.shape
    out = torch.empty_like(x64)
    for r in range(rows):
        for start in range(0, cols, group):
            blk = x64[r, start:start + group]
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                s = blk.abs().max() / qmax
                s = s if s > 0 else torch.tensor(1.0, dtype=torch.float64)
                q = torch.clamp(torch.round(blk / s), -qmax - 1, qmax)
                out[r, start:start + group] = q * s
            else:
                lo, hi = min(blk.min(), 0), max(blk.max(), 0)
                s = (hi - lo) / (2**bits - 1)
                z = torch.clamp(torch.round(-lo / s), 0, 2**bits - 1)
                q = torch.clamp(torch.round(blk / s) + z, 0, 2**bits - 1)
                out[r, start:start + group] = (q - z) * s
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [None, 16, 24])  # 24 does not divide 40: ragged last group
def test_int_matches_textbook_reference(bits, symmetric, group):
    x = torch.randn(6, 40) * torch.logspace(-2, 1, 6)[:, None]
    gran = PerChannel() if group is None else PerGroup(group)
    fmt = get_format(f"int{bits}")
    qp = choose_qparams(x, fmt, gran, symmetric)
    got = dequantize(quantize(x, fmt, gran, qp), gran, qp).double()
    ref = ref_int(x.double(), bits, group or 40, symmetric)
    # float32 scale arithmetic vs float64: codes identical, values within float32 rounding.
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_codes_are_exact_integers_in_range():
    x = torch.randn(8, 64)
    for sym in (True, False):
        qp = choose_qparams(x, get_format("int4"), PerChannel(), sym)
        codes = quantize(x, get_format("int4"), PerChannel(), qp)
        assert torch.equal(codes, codes.round())
        lo, hi = (-8, 7) if sym else (0, 15)
        assert codes.min() >= lo and codes.max() <= hi


def test_per_tensor_and_per_token_shapes():
    x = torch.randn(5, 12)
    assert choose_qparams(x, get_format("int8"), PerTensor()).scale.shape == (1, 1)
    assert choose_qparams(x, get_format("int8"), PerToken()).scale.shape == (5, 1)
    assert choose_qparams(x, get_format("int8"), PerGroup(5)).scale.shape == (5, 3)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"])
def test_minifloat_scaled_quantization(name):
    fmt = get_format(name)
    x = torch.randn(4, 32) * 3
    qp = choose_qparams(x, fmt, PerChannel())
    amax = x.double().abs().amax(1, keepdim=True)
    s = amax / fmt.max_value
    ref = nearest_on_grid((x.double() / s).float(), fmt).double() * s
    got = fake_quantize(x, fmt, PerChannel(), qp).double()
    assert torch.allclose(got, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["mxfp4", "mxfp6", "mxfp8"])
def test_mx_scales_are_spec_powers_of_two(name):
    """OCP MX v1.0: X = 2^(floor(log2(amax)) - emax_elem), elements rounded with saturation."""
    fmt = get_format(name)
    x = torch.randn(3, 96) * 5
    qp = choose_qparams(x, fmt, PerGroup(32))
    emax = math.floor(math.log2(fmt.element.max_value))
    blocks = x.double().reshape(3, 3, 32)
    ref_scale = 2.0 ** (torch.floor(torch.log2(blocks.abs().amax(-1))) - emax)
    assert torch.equal(qp.scale.double(), ref_scale)
    ref = nearest_on_grid((blocks / ref_scale[..., None]).float(), fmt.element).double() * ref_scale[..., None]
    got = fake_quantize(x, fmt, PerGroup(32), qp).double()
    assert torch.equal(got, ref.reshape(3, 96))


def test_nvfp4_two_level_scales():
    fmt, e4m3 = get_format("nvfp4"), get_format("fp8_e4m3")
    x = torch.randn(4, 64) * 2
    qp = choose_qparams(x, fmt, PerGroup(16))
    x64 = x.double()
    ts = x64.abs().max() / (6 * 448)
    blocks = x64.reshape(4, 4, 16)
    bs = nearest_on_grid((blocks.abs().amax(-1) / 6 / ts).float(), e4m3).double()
    assert torch.allclose(qp.tensor_scale.double(), ts.reshape(1, 1), rtol=1e-7)
    assert torch.equal(qp.scale.double(), bs)
    eff = (bs * ts)[..., None]
    ref = nearest_on_grid((blocks / eff).float(), fmt.element).double() * eff
    got = fake_quantize(x, fmt, PerGroup(16), qp).double()
    assert torch.allclose(got, ref.reshape(4, 64), rtol=1e-6)


def test_fake_quantize_is_idempotent_and_matches_quant_dequant():
    x = torch.randn(16, 48)
    for name, gran in [("int4", PerGroup(16)), ("nvfp4", PerGroup(16)), ("fp8_e4m3", PerChannel())]:
        fmt = get_format(name)
        qp = choose_qparams(x, fmt, gran)
        y = fake_quantize(x, fmt, gran, qp)
        assert torch.equal(y, dequantize(quantize(x, fmt, gran, qp), gran, qp))
        assert torch.equal(fake_quantize(y, fmt, gran, qp), y)


def test_ste_gradients():
    """Straight-through: gradient 1 inside the range, 0 where values clip; the scale gets a gradient."""
    fmt = get_format("int4")
    x = torch.linspace(-2, 2, 41).reshape(1, 41).requires_grad_()
    scale = torch.tensor([[1.0 / 7]], requires_grad=True)  # range [-8/7, 1]: |x| beyond clips
    y = fake_quantize(x, fmt, PerTensor(), QParams(scale))
    y.sum().backward()
    inside = (x.detach() >= -8 / 7) & (x.detach() <= 1.0)
    assert torch.equal(x.grad, inside.float())
    assert scale.grad is not None and scale.grad.abs().item() > 0


def test_sqnr_levels():
    """Sanity bands: int8 per-channel on Gaussian data ~ 6 dB/bit."""
    x = torch.randn(64, 256)
    for bits, low in [(8, 38), (4, 15)]:
        fmt = get_format(f"int{bits}")
        y = fake_quantize(x, fmt, PerChannel(), choose_qparams(x, fmt, PerChannel()))
        assert sqnr_db(x, y) > low


def test_range_api_and_errors():
    qp = qparams_from_range(torch.tensor([[-1.0]]), torch.tensor([[3.0]]), get_format("int8"), symmetric=False)
    assert torch.allclose(qp.scale, torch.tensor([[4 / 255]])) and qp.zero_point.item() == 64
    with pytest.raises(ValueError, match="integer format"):
        choose_qparams(torch.randn(2, 4), get_format("fp8_e4m3"), PerChannel(), symmetric=False)
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(2, 3, 4), get_format("int8"), PerTensor(), qp)
    with pytest.raises(ValueError, match="granularity"):
        parse_granularity("per-row")
    assert parse_granularity("group:64") == PerGroup(64) and str(PerGroup(64)) == "group:64"
