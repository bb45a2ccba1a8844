"""dmquant's int4 x fp16 GEMM (AVX512-FP16) against float64.

The kernel rounds each activation (scaled per row by a power of two) and each decoded weight to fp16,
and sums products in fp16 over at most 64 inputs before an fp32 sum. Each rounding is relative 2^-11
of a value whose magnitude is at most that of the partial sum it joins, so the error of an output is
bounded by (2^-10 + 32 * 2^-11) * sum_k |x_k w_k| < 2^-5 * (|x| @ |w|.T); a wrong code or scale costs
about |x| |w| of one input and fails it. Typical errors are far smaller (checked at 2e-3 of the peak).
"""
import pytest
import torch
from torch import nn

from dmquant.config import QuantSpec
from dmquant.kernels import f16_gemm, weight_only
from dmquant.nn import QuantConv2d, QuantLinear

needs_f16 = pytest.mark.skipif(f16_gemm.unsupported_reason() is not None,
                               reason=f"no fp16 kernel here: {f16_gemm.unsupported_reason()}")


def _weights(n: int, k: int, group: int | None, asym: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group is None else -(-k // group)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, groups, generator=g) * 0.2 + 0.01
    zero = torch.randint(0, 16, (n, groups), generator=g).float() if asym else torch.full((n, groups), 8.0)
    size = k if group is None else group
    per_input = lambda t: t.double().repeat_interleave(size, dim=1)[:, :k]  # noqa: E731
    return q, scale, zero, (q.double() - per_input(zero)) * per_input(scale)


def _check(y: torch.Tensor, x: torch.Tensor, w64: torch.Tensor, bias: torch.Tensor | None, conv: dict | None = None):
    """`y` against float64, within the bound above; `conv`: F.conv2d's arguments (x, w64 then 4-D)."""
    product = (lambda a, b: torch.nn.functional.conv2d(a, b, **conv)) if conv is not None else (lambda a, b: a @ b.T)
    b64 = 0 if bias is None else bias.double().reshape(-1, *([1, 1] if conv is not None else []))
    ref = product(x.double(), w64) + b64
    bound = 2.0 ** -5 * product(x.double().abs(), w64.abs()) + 1e-6 * ref.abs().max()
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), float((err / bound).max())
    assert err.max() <= 2e-3 * ref.abs().max()


@needs_f16
@pytest.mark.parametrize("m,k,n,group,asym,bias", [(1, 64, 64, None, False, True), (5, 40, 70, None, True, False),
                                                   (13, 256, 128, 64, False, True), (7, 200, 96, 32, True, True),
                                                   (37, 96, 64, 64, False, False), (130, 1152, 200, 128, True, True)])
def test_f16_kernel_equals_float64_reference(m, k, n, group, asym, bias):
    """Ragged rows (1-13: every tile remainder), inputs (40, 200: padding to 64), groups (96 / 64, 200
    / 32) and columns (70, 200); symmetric (zero 8) and asymmetric zero points; codes read back."""
    q, scale, zero, w64 = _weights(n, k, group, asym)
    b = torch.randn(n) if bias else None
    packed = f16_gemm.pack(q, scale, zero, group, b)
    assert torch.equal(f16_gemm.unpack(packed), q)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * 5
    x[0, : k // 2] *= 1e-3  # a row with a wide range
    y = f16_gemm.linear(x.reshape(1, m, k), packed)
    assert y.shape == (1, m, n) and y.dtype == torch.float32
    _check(y[0], x, w64, b)


@needs_f16
@pytest.mark.parametrize("n,c,h,w,out,kernel,stride,padding,dilation,group", [
    (2, 8, 6, 6, 64, (3, 3), (1, 1), (1, 1), (1, 1), 24),      # ragged groups of the (c, i, j) inputs
    (1, 6, 9, 20, 70, (3, 3), (2, 2), (0, 1), (1, 1), None),   # stride 2 (gathers), 20 columns (a ragged vector)
    (3, 4, 11, 37, 64, (2, 3), (1, 2), (1, 0), (2, 1), 8),     # uneven kernel, dilation, padding and stride
    (2, 16, 5, 5, 32, (1, 1), (1, 1), (0, 0), (1, 1), 16)])    # a 1x1 convolution
def test_f16_convolution_equals_float64_reference(n, c, h, w, out, kernel, stride, padding, dilation, group):
    k = c * kernel[0] * kernel[1]
    q, scale, zero, w64 = _weights(out, k, group, asym=True)
    b = torch.randn(out)
    packed = f16_gemm.pack(q, scale, zero, group, b)
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(2)) * 3
    x[0, :, :2] *= 1e-3  # windows with a wide range
    y = f16_gemm.conv2d(x, packed, kernel, stride, padding, dilation)
    conv = {"stride": stride, "padding": padding, "dilation": dilation}
    assert y.dtype == torch.float32
    _check(y, x, w64.reshape(out, c, *kernel), b, conv)


@needs_f16
def test_activation_rows_are_scaled_by_exact_powers_of_two():
    x = torch.tensor([[3.0, -0.5, 0.0], [0.0, 0.0, 0.0], [1e-3, 2e-3, -4e-3]])
    a, row = f16_gemm.half_rows(x, 64)
    assert a.shape == (3, 64) and a.dtype == torch.float16 and (a[:, 3:] == 0).all()
    assert row.tolist() == [4.0, 1.0, 2.0 ** -7]  # just above each row's peak (1 for zeros)
    assert torch.equal(a[:, :3], (x / row[:, None]).half())


def test_f16_pack_refusals():
    q, scale, zero, _ = _weights(8, 64, 32, False)
    with pytest.raises(ValueError, match="4-bit codes"):
        f16_gemm.pack(q + 1 if int(q.max()) == 15 else q.clone().fill_(16), scale, zero, 32)
    with pytest.raises(ValueError, match=r"must be \(8, 2\)"):
        f16_gemm.pack(q, scale[:, :1], zero, 32)
    with pytest.raises(ValueError, match="odd"):
        f16_gemm.pack(q, scale, zero, 33)
    bad = scale.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        f16_gemm.pack(q, bad, zero, 32)


def test_f16_kernel_stands_down_under_an_isa_cap(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert "AVX-512" in f16_gemm.cpu_reason() or "AVX512" in f16_gemm.cpu_reason()
    layer = QuantLinear.from_float(nn.Linear(64, 64), QuantSpec("int4", "group:32"), None, backend="cpu", name="l")
    assert not weight_only.f16_fits(layer)
    with pytest.raises(RuntimeError, match="cannot run here"):
        f16_gemm.linear(torch.zeros(1, 64), f16_gemm.pack(*_weights(64, 64, None, False)[:3]))


@needs_f16
def test_f16_kernel_builds_where_the_cpu_has_it():
    """Where the CPU can run it and a compiler exists, a failed build is a bug, not a skip."""
    assert f16_gemm.unsupported_reason(64) is None and f16_gemm.unsupported_reason(33) is not None


@needs_f16
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wfmt,gran,sym", [("int4", "group:32", True), ("int4", "group:64", False),
                                           ("int4", "channel", True), ("int4", "tensor", False)])
def test_w4a16_layers_run_on_the_f16_kernel_and_hold_one_copy(wfmt, gran, sym, dtype):
    """A packed W4A16 linear takes the fp16 kernel for fp32 and (from 48 tokens) bf16 inputs, gives its
    codes back exactly (so it drops its own copy), and matches float64 with the layer's decoded weight."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 80).to(dtype)
    q = QuantLinear.from_float(lin, QuantSpec(wfmt, gran, symmetric=sym), None, backend="cpu", name="l")
    q.pack_weight()
    codes, w64 = q.packed_codes().clone(), q.decoded_weight(torch.float64)
    assert "AVX512-FP16" in q.kernel_name()
    x = torch.randn(weight_only.DECODE_MIN_TOKENS, 96, dtype=dtype)
    with torch.no_grad():
        y = q(x)
    assert y.dtype == dtype and "AVX512-FP16 kernel" in q.kernel_name()
    assert q._buffers["weight_packed"] is None and torch.equal(q.packed_codes(), codes)
    if dtype == torch.float32:
        _check(y, x, w64, lin.bias.detach())
    else:  # the output is rounded to bf16 too
        ref = x.double() @ w64.T + lin.bias.double()
        assert torch.allclose(y.double(), ref, rtol=0, atol=1e-2 * ref.abs().max().item())


@needs_f16
@pytest.mark.parametrize("gran,sym", [("group:24", True), ("channel", False)])
def test_w4a16_convolutions_run_on_the_f16_kernel(gran, sym):
    """A packed W4A16 Conv2d takes the fp16 kernel for fp32 inputs, holds one copy of its codes and
    matches the float64 convolution of its decoded weight."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    q = QuantConv2d.from_float(conv, QuantSpec("int4", gran, symmetric=sym), None, backend="cpu", name="c")
    q.pack_weight()
    codes, w64 = q.packed_codes().clone(), q.decoded_weight(torch.float64)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y = q(x)
    assert "AVX512-FP16 kernel: activations in fp16 per pixel's window" in q.kernel_name()
    assert q._buffers["weight_packed"] is None and torch.equal(q.packed_codes(), codes)
    _check(y, x, w64, conv.bias.detach(), {"padding": (1, 1)})


@needs_f16
def test_f16_kernel_extremes_stay_finite():
    """A group whose codes all sit on the zero point (so its scale bounds nothing) beside tiny weights,
    rows of denormals and rows near FLT_MAX: finite, within the bound; an empty batch; wrong widths."""
    q, scale, zero, _ = _weights(64, 128, 32, asym=False)
    q[0, :32] = 8  # the zero point: a group of zeros with scale 1, as min-max gives it
    scale[0, 0], scale[0, 1:] = 1.0, 1e-6
    w64 = (q.double() - 8) * scale.double().repeat_interleave(32, dim=1)
    packed = f16_gemm.pack(q, scale, zero, 32)
    x = torch.randn(3, 128)
    x[1] *= 1e-39  # float32 denormals
    x[2] *= 1e37
    y = f16_gemm.linear(x, packed)
    assert torch.isfinite(y).all()
    for i in range(3):  # each row against its own scale
        _check(y[i:i + 1], x[i:i + 1], w64, None)
    assert f16_gemm.linear(torch.zeros(0, 128), packed).shape == (0, 64)
    with pytest.raises(ValueError, match="takes 128 inputs"):
        f16_gemm.linear(torch.zeros(2, 100), packed)
    conv = f16_gemm.pack(*_weights(16, 8 * 9, None, False)[:3])
    assert f16_gemm.conv2d(torch.zeros(0, 8, 6, 6), conv, (3, 3), (1, 1), (1, 1), (1, 1)).shape == (0, 16, 6, 6)
    with pytest.raises(ValueError, match="takes 8 channels"):
        f16_gemm.conv2d(torch.zeros(1, 4, 6, 6), conv, (3, 3), (1, 1), (1, 1), (1, 1))
