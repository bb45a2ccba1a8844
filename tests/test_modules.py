"""Quantized modules vs the float module run in float64 on the *dequantized* weights and inputs:
this separates implementation bugs (must be ~0) from the expected rounding error."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmquant.config import AttentionSpec, QuantSpec
from dmquant.nn import QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear, TensorQuantizer, quant_class_for
from dmquant.nn.qattention import AttentionQuantizers

torch.manual_seed(0)
W_SPECS = [QuantSpec("int8"), QuantSpec("int4", "group:16"), QuantSpec("int4", "group:16", symmetric=False),
           QuantSpec("fp8_e4m3"), QuantSpec("nvfp4"), QuantSpec("mxfp4")]
A_SPEC = QuantSpec("int8", "token", dynamic=True)


def float64_reference(layer, x, functional, **kw):
    wq = layer.weight_quantizer(layer.weight.detach()).double()
    xq = layer.input_quantizer(x).double()
    bias = None if layer.bias is None else layer.bias.detach().double()
    return functional(xq, wq, bias, **kw)


@pytest.mark.parametrize("wspec", W_SPECS, ids=lambda s: s.short())
def test_linear_matches_dequantized_float64(wspec):
    lin = nn.Linear(48, 20)  # 48 not a multiple of 32: odd sizes must work
    q = QuantLinear.from_float(lin, wspec, A_SPEC, name="lin")
    x = torch.randn(3, 7, 48)
    with torch.no_grad():
        out = q(x)
        ref = float64_reference(q, x, F.linear)
    assert out.shape == (3, 7, 20)
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert not torch.equal(out, lin(x))  # quantization really happened


@pytest.mark.parametrize("cls,base,shape,func", [
    (QuantConv1d, nn.Conv1d, (2, 8, 11), F.conv1d),
    (QuantConv2d, nn.Conv2d, (2, 8, 9, 7), F.conv2d),
    (QuantConv3d, nn.Conv3d, (1, 8, 4, 5, 6), F.conv3d),
])
def test_convs_match_dequantized_float64(cls, base, shape, func):
    conv = base(8, 12, 3, padding=1, stride=1)
    q = quant_class_for(conv).from_float(conv, QuantSpec("int4", "group:8"), A_SPEC, name="c")
    assert type(q) is cls and isinstance(q, base)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.allclose(q(x).double(), float64_reference(q, x, func, padding=1), atol=1e-5)


def test_grouped_conv_and_no_bias():
    conv = nn.Conv2d(8, 8, 3, groups=4, bias=False)
    q = QuantConv2d.from_float(conv, QuantSpec("int8"), None, name="g")
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        ref = F.conv2d(x.double(), q.weight_quantizer(q.weight).double(), groups=4)
        assert torch.allclose(q(x).double(), ref, atol=1e-5)


def test_shares_parameters_and_caches_weight():
    lin = nn.Linear(16, 16)
    q = QuantLinear.from_float(lin, QuantSpec("int8"), None)
    assert q.weight is lin.weight
    with torch.no_grad():
        q(torch.randn(2, 16))
        cached = q._wcache[1]
        q(torch.randn(2, 16))
        assert q._wcache[1] is cached
        q.weight.mul_(2)  # in-place change invalidates the cache
        q(torch.randn(2, 16))
        assert q._wcache[1] is not cached


def test_static_activation_quantizer_needs_scale_and_rejects_nan():
    tq = TensorQuantizer(QuantSpec("int8", "tensor"), channel_axis=-1, name="act")
    with pytest.raises(RuntimeError, match="calibrate"):
        tq(torch.randn(3, 4))
    tq.start_observing()
    tq(torch.tensor([[-2.0, 1.0]]))
    tq(torch.tensor([[0.5, 4.0]]))
    tq.finish_observing()
    assert torch.allclose(tq.scale, torch.tensor([[4.0 / 127]]))
    dyn = TensorQuantizer(A_SPEC, channel_axis=-1, name="dyn")
    with pytest.raises(FloatingPointError, match="NaN"):
        dyn(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="per tensor"):
        TensorQuantizer(QuantSpec("int8", "channel"), channel_axis=-1)


def test_conv_activation_quantized_per_pixel_over_channels():
    tq = TensorQuantizer(A_SPEC, channel_axis=1)
    x = torch.randn(2, 6, 3, 3)
    rows = x.movedim(1, -1).reshape(-1, 6)
    scale = rows.abs().amax(1, keepdim=True) / 127
    ref = (torch.round(rows / scale) * scale).reshape(2, 3, 3, 6).movedim(-1, 1)
    assert torch.allclose(tq(x), ref, atol=1e-6)


@pytest.mark.parametrize("mask", [None, "bool", "float", "causal"])
def test_attention_quantizers_match_float64_reference(mask):
    spec = AttentionSpec(qkv=A_SPEC, probs=QuantSpec("int8", "token", symmetric=False, dynamic=True))
    aq = AttentionQuantizers(spec, "attn")
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    kw, m = {}, None
    if mask == "bool":
        m = torch.rand(10, 10) > 0.3
        m[:, 0] = True
        kw["attn_mask"] = m
    elif mask == "float":
        m = torch.randn(10, 10)
        kw["attn_mask"] = m
    elif mask == "causal":
        kw["is_causal"] = True
    out = aq.sdpa(q, k, v, **kw)
    qq, kq, vq = (aq.q(q).double(), aq.k(k).double(), aq.v(v).double())
    s = qq @ kq.transpose(-1, -2) / 8**0.5
    if mask == "bool":
        s = s.masked_fill(~m, float("-inf"))
    elif mask == "float":
        s = s + m.double()
    elif mask == "causal":
        s = s.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
    p = aq.probs(torch.softmax(s, -1).float()).double()
    assert torch.allclose(out.double(), p @ vq, atol=1e-5)
    # and without probs quantization the routed call is torch's own SDPA on quantized Q/K/V
    aq2 = AttentionQuantizers(AttentionSpec(qkv=A_SPEC), "a2")
    ref2 = F.scaled_dot_product_attention(aq2.q(q), aq2.k(k), aq2.v(v), **kw)
    assert torch.allclose(aq2.sdpa(q, k, v, **kw), ref2, atol=1e-6)
