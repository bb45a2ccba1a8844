"""Real kernels vs independent references.

CPU (oneDNN / fbgemm int8): outputs are compared with a float64 product of the *same* int8 codes and
scales. The kernels compute activation codes with the reference's own rounding and accumulate in
exact int32, so the only difference is the fp32 rescaling of the output: tolerance 1e-5 of the
output's largest magnitude (fp32 relative precision 6e-8, times a few roundings; any wrong code
would cost about scale * |w| ~ 1e-3 of the output and fail). Dynamic-activation quantization error
is not in these comparisons: the reference quantizes the activations the same way, by formula.
GPU: the padding and scale math runs on CPU with an exact emulated matmul; the CUDA ops themselves
only where a GPU is present.
"""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmquant.config import QuantSpec
from dmquant.granularity import PerTensor, PerToken
from dmquant.kernels import available_backends, common, cpu, cuda, get_kernel, group_gemm
from dmquant.nn import QuantConv2d, QuantLinear
from dmquant.primitives import QParams, choose_qparams

W8 = QuantSpec("int8", "channel")
DYN_TOKEN = QuantSpec("int8", "token", dynamic=True)
DYN_TENSOR = QuantSpec("int8", "tensor", dynamic=True)
STATIC = QuantSpec("int8", "tensor")
needs_cpu_kernels = pytest.mark.skipif(not cpu.onednn_available(), reason="no oneDNN int8 kernels in this build")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Without VNNI the CPU kernels saturate int16 pair sums on the full 8-bit grid, so there the exact
# references run on the 7-bit reduce_range grid the kernels then use (step 2, codes -64..64).
GRID_STEP = 1 if cpu.vnni_available() else 2
CPU_IMPLS = [i for i, ok in (("onednn", cpu.onednn_available()), ("fbgemm", cpu.fbgemm_available())) if ok]


def close(y: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> bool:
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return torch.allclose(y.double(), ref.double(), rtol=0, atol=rtol * scale + 1e-12)


def int8_weight(out_f: int, *rest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel int8 codes and scales of a random weight."""
    w = torch.randn(out_f, *rest)
    scale = w.reshape(out_f, -1).abs().amax(1) / 127
    return torch.round(w / scale.view(-1, *[1] * len(rest))).to(torch.int8), scale


def act_q64(x: torch.Tensor, gran: str, scale: float | None = None, step: int = 1) -> torch.Tensor:
    """float64 fake-quantized activations: symmetric int8 (or the 7-bit reduce_range grid)."""
    if scale is None:
        flat = torch.cat([x.abs().reshape(-1), torch.zeros(1)])  # empty inputs: amax 0 -> scale 1
        amax = x.abs().amax(-1, keepdim=True) if gran == "token" else flat.max()
        s = amax.float() / 127
        s = torch.where(s == 0, torch.ones_like(s), s)
    else:
        s = torch.tensor(scale)
    lo, hi = (-128, 127) if step == 1 else (-64, 64)
    return torch.clamp(torch.round(x.float() / (s * step)), lo, hi).double() * (s.double() * step)


# -- shared scale math --------------------------------------------------------------------------
@pytest.mark.parametrize("gran", ["token", "tensor"])
def test_dynamic_scale_equals_fake_quant_primitives(gran):
    torch.manual_seed(0)
    x = torch.randn(9, 33) * torch.rand(9, 1) * 5
    x[3] = 0  # an all-zero row gets scale 1, like the reference
    ref = choose_qparams(x, QuantSpec("int8", gran, dynamic=True).fmt, PerToken() if gran == "token" else PerTensor())
    assert torch.equal(common.dynamic_scale(x, gran, 127.0), ref.scale.reshape(-1, 1))
    with pytest.raises(FloatingPointError, match="non-finite"):
        common.dynamic_scale(torch.tensor([[1.0, float("nan")]]), gran, 127.0)


def test_pad_to_keeps_values_and_reaches_multiples():
    t = torch.arange(15.0).reshape(3, 5)
    p = common.pad_to(common.pad_to(t, 1, 8), 0, 1, minimum=17)
    assert p.shape == (17, 8) and torch.equal(p[:3, :5], t) and p.sum() == t.sum()
    assert common.pad_to(t, 1, 5) is t


# -- CPU linear -----------------------------------------------------------------------------------
@needs_cpu_kernels
@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("shape,out_f,bias", [((3, 7, 64), 48, True), ((5, 37), 13, False), ((2, 1), 1, True),
                                              ((4, 2, 3, 256), 96, True), ((0, 16), 8, True)])
@pytest.mark.parametrize("mode", ["token", "tensor", "static"])
def test_cpu_linear_equals_float64_reference(impl, shape, out_f, bias, mode):
    torch.manual_seed(0)
    codes, scale = int8_weight(out_f, shape[-1])
    b = torch.randn(out_f) if bias else None
    packed = cpu.prepack_linear(codes, scale, b, impl=impl)
    x = torch.randn(*shape) * 3
    s = 0.7 * x.abs().max().item() / 127 if mode == "static" and x.numel() else (0.01 if mode == "static" else None)
    y = cpu.int8_linear(x, packed, s, "tensor" if mode != "token" else "token", reduce_range=GRID_STEP == 2)
    ref = act_q64(x, mode, s, step=GRID_STEP) @ (codes.double() * scale.double()[:, None]).T
    ref = ref if b is None else ref + b.double()
    assert y.shape == (*shape[:-1], out_f) and y.dtype == x.dtype
    assert close(y, ref)  # static at 0.7 * amax: clipped activations included


@needs_cpu_kernels
@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("mode", ["token", "static"])
def test_cpu_linear_reduce_range_uses_the_7bit_grid(impl, mode):
    """Without VNNI (forced here) activations step by 2s with uint8 codes <= 128."""
    torch.manual_seed(1)
    codes, scale = int8_weight(24, 40)
    packed = cpu.prepack_linear(codes, scale, None, impl=impl)
    x = torch.randn(6, 40)
    s = 0.5 * x.abs().max().item() / 127 if mode == "static" else None
    y = cpu.int8_linear(x, packed, s, "token", reduce_range=True)
    ref = act_q64(x, mode, s, step=2) @ (codes.double() * scale.double()[:, None]).T
    assert close(y, ref)


@needs_cpu_kernels
def test_fbgemm_own_dynamic_path_is_close_to_fp32():
    """`linear_dynamic` picks its own asymmetric range: only its accuracy is checked (SQNR)."""
    torch.manual_seed(2)
    codes, scale = int8_weight(64, 128)
    packed = cpu.prepack_linear(codes, scale, torch.randn(64), impl="fbgemm")
    x = torch.randn(10, 128)
    ref = F.linear(x, codes.float() * scale[:, None], packed.bias)
    y = cpu.int8_linear_fbgemm_dynamic(x, packed)
    assert 10 * torch.log10(ref.pow(2).mean() / (y - ref).pow(2).mean()) > 30
    with pytest.raises(ValueError, match="impl='fbgemm'"):
        cpu.int8_linear_fbgemm_dynamic(x, cpu.prepack_linear(codes, scale, impl="onednn"))


def group_weight(out_f: int, in_f: int, group: int, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric `bits`-wide codes (out, in), scales (out, groups) of a random weight, and the float64 weight
    they stand for (the last group may be shorter)."""
    n = -(-in_f // group)
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (out_f, in_f), dtype=torch.int8)
    scale = torch.rand(out_f, n) + 0.05
    per_input = scale.double().repeat_interleave(group, dim=1)[:, :in_f]
    return codes, scale, codes.double() * per_input


def act_q64_bits(x: torch.Tensor, gran: str, bits: int, scale: float | None = None) -> torch.Tensor:
    """float64 symmetric `bits`-wide fake-quantized activations (dynamic amax / qmax, or a static scale)."""
    qmax = 2 ** (bits - 1) - 1
    if scale is None:
        amax = x.abs().amax(-1, keepdim=True) if gran == "token" else x.abs().max()
        s = torch.where(amax == 0, torch.ones_like(amax), amax.float() / qmax)
    else:
        s = torch.tensor(scale)
    return torch.clamp(torch.round(x.float() / s), -qmax - 1, qmax).double() * s.double()


GROUP_IMPLS = [i for i, ok in (("onednn", cpu.onednn_available()), ("vnni", group_gemm.unsupported_reason(4) is None))
               if ok]


@pytest.mark.parametrize("impl", GROUP_IMPLS)
@pytest.mark.parametrize("in_f,group", [(128, 64), (96, 32), (40, 24), (64, 64)])
@pytest.mark.parametrize("mode", ["token", "tensor", "static"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("wbits", [4, 8])
def test_cpu_group_wise_linear_equals_float64_reference(impl, in_f, group, mode, bits, wbits):
    """dmquant's VNNI kernel (int4 codes as nibbles, int8 as bytes) and one oneDNN GEMM per group: every
    group's own scales, a ragged last group, 40 outputs (the VNNI layout pads to 32-column panels)."""
    torch.manual_seed(3)
    codes, scale, w64 = group_weight(40, in_f, group, wbits)
    b = torch.randn(40)
    packed = cpu.prepack_linear(codes, scale, b, group=group, impl=impl)
    assert packed.impl == impl
    x = torch.randn(3, 5, in_f) * 2
    s = 0.7 * x.abs().max().item() / (2 ** (bits - 1) - 1) if mode == "static" else None
    reduced = cpu.needs_reduce_range(wbits, bits)  # what layers pass: int8 x int8 without VNNI only
    y = cpu.int8_linear(x, packed, s, "tensor" if mode != "token" else "token", act_bits=bits, reduce_range=reduced)
    xq = act_q64(x, mode, s, step=2) if reduced else act_q64_bits(x, mode, bits, s)
    ref = xq @ w64.T + b.double()
    assert close(y, ref)
    assert torch.equal(cpu.unpack_linear(packed), codes)  # the layer may drop its own copy


@pytest.mark.skipif("vnni" not in GROUP_IMPLS, reason="dmquant's AVX512-VNNI kernel cannot run here")
@pytest.mark.parametrize("m,k", [(7, 37), (33, 1152), (3, 16), (5, 1)])
@pytest.mark.parametrize("zp,hi", [(8, 15), (128, 255), (64, 128)])
def test_vnni_activation_codes_are_the_references(m, k, zp, hi):
    """One-pass codes vs `_uint8_codes` (division, ties to even, clamp), per row and one scale; ties planted."""
    torch.manual_seed(6)
    x = torch.randn(m, k) * 3
    x[0, :3] = torch.tensor([0.5, 1.5, -2.5])[:min(3, k)]
    s = x.abs().amax(1, keepdim=True) / 7
    s[0] = 1.0
    assert torch.equal(group_gemm.codes(x, s, zp, hi), cpu._uint8_codes(x, s, zp, hi))
    assert torch.equal(group_gemm.codes(x, 0.37, zp, hi), cpu._uint8_codes(x, 0.37, zp, hi))


@pytest.mark.skipif(group_gemm.cpu_reason() is not None, reason="the CPU (or an ISA cap) has no AVX512-VNNI")
def test_vnni_kernel_builds_where_the_cpu_has_it():
    """Where the CPU can run it and a compiler exists, a failed build is a bug, not a skip."""
    import shutil

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler")
    assert group_gemm._build()[1] is None and cpu.group_impl(64) == "vnni"


@pytest.mark.skipif(not GROUP_IMPLS, reason="no group-wise CPU kernel here")
def test_cpu_group_wise_refusals(monkeypatch):
    codes, scale, _ = group_weight(8, 64, 32)
    with pytest.raises(ValueError, match="2 groups of 32"):
        cpu.prepack_linear(codes, scale[:, :1], group=32)
    with pytest.raises(ValueError, match="finite and positive"):
        cpu.prepack_linear(codes, -scale, group=32)
    with pytest.raises(ValueError, match="unknown group-wise implementation"):
        cpu.prepack_linear(codes, scale, group=32, impl="fbgemm")
    assert "not a multiple of 4" in group_gemm.unsupported_reason(6)
    with pytest.raises(ValueError, match="cannot run here: group size 6"):
        cpu.prepack_linear(torch.zeros(8, 12, dtype=torch.int8), torch.ones(8, 2), group=6, impl="vnni")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2_VNNI")  # VNNI, but no AVX-512: the kernel stands down
    assert group_gemm.cpu_reason() is not None and cpu.group_impl(64) == "onednn"


def test_cpu_bad_inputs_are_refused_clearly():
    with pytest.raises(ValueError, match="torch.int8"):
        cpu.prepack_linear(torch.zeros(4, 4), torch.ones(4))
    with pytest.raises(ValueError, match="output channels"):
        cpu.prepack_linear(torch.zeros(4, 4, dtype=torch.int8), torch.ones(3))
    assert "empty" in cpu.supports_linear(0, 4) and "overflow" in cpu.supports_linear(10**6, 4)
    assert "int8" in cpu.supports_linear(8, 8, "fp8_e4m3")
    if cpu.onednn_available():
        packed = cpu.prepack_linear(torch.zeros(4, 4, dtype=torch.int8), torch.ones(4))
        with pytest.raises(ValueError, match="expects 4"):
            cpu.int8_linear(torch.zeros(2, 5), packed)
        with pytest.raises(ValueError, match="finite and positive"):
            cpu.int8_linear(torch.zeros(2, 4), packed, input_scale=0.0)


# -- CPU convolution -----------------------------------------------------------------------------
CONVS = [  # (dims, in, out, kernel, stride, padding, dilation, groups, padding_mode, bias)
    (2, 8, 12, 3, 1, 1, 1, 1, "zeros", True),
    (2, 6, 9, (3, 2), 1, "same", (2, 1), 3, "zeros", False),
    (2, 6, 9, (3, 2), 2, (1, 0), (2, 1), 3, "replicate", True),
    (2, 5, 7, 1, 1, 0, 1, 1, "zeros", True),
    (2, 4, 8, 3, 1, 1, 1, 1, "circular", True),
    (2, 8, 8, 3, 1, 1, 1, 8, "zeros", True),  # depthwise
    (1, 5, 7, 3, 1, 2, 1, 1, "reflect", True),
    (3, 4, 6, 3, (1, 2, 1), 1, 1, 2, "zeros", True),
]


@needs_cpu_kernels
@pytest.mark.filterwarnings("ignore:Using padding='same'")  # the float64 reference's own notice
@pytest.mark.parametrize("nd,cin,cout,k,stride,pad,dil,groups,mode,bias", CONVS)
@pytest.mark.parametrize("act", ["dynamic", "static", "token"])
def test_cpu_conv_equals_float64_reference(nd, cin, cout, k, stride, pad, dil, groups, mode, bias, act):
    """Per-tensor scales run oneDNN's int8 convolution; per-pixel ("token") scales run tap by tap."""
    torch.manual_seed(0)
    if act == "token" and groups > 1:  # refused; the same geometry runs with groups=1
        assert "groups=1" in cpu.supports_conv(cin, cout, [k] * nd if isinstance(k, int) else k, groups, mode,
                                               per_token=True)
        groups = 1
    conv = getattr(nn, f"Conv{nd}d")(cin, cout, k, stride, pad, dil, groups, bias, mode).double()
    codes, scale = int8_weight(*conv.weight.shape)
    conv.weight.data = codes.double() * scale.double().view(-1, *[1] * (nd + 1))
    args = (codes, scale, None if conv.bias is None else conv.bias.float(), stride, pad, dil, groups, mode)
    x = torch.randn(2, cin, *[9] * nd) * torch.rand(2, 1, *[9] * nd).mul(4)  # pixels of unequal range
    if act == "token":
        packed = cpu.prepack_conv(*args, per_token=True)
        assert torch.equal(cpu.unpack_conv(packed), codes)
        per_pixel = lambda t: act_q64(t.movedim(0 if t.dim() == nd + 1 else 1, -1), "token", step=GRID_STEP)  # noqa: E731
        for xs in (x, x[1]):  # batched, unbatched
            y = cpu.int8_conv(xs, packed, None, "token", reduce_range=GRID_STEP == 2)
            ref = conv(per_pixel(xs).movedim(-1, 0 if xs.dim() == nd + 1 else 1))
            assert y.shape == ref.shape and close(y, ref)
        return
    packed = cpu.prepack_conv(*args)
    s = 0.8 * x.abs().max().item() / 127 if act == "static" else None
    y = cpu.int8_conv(x, packed, s, reduce_range=GRID_STEP == 2)
    ref = conv(act_q64(x, "tensor", s, step=GRID_STEP))
    assert y.shape == ref.shape and close(y, ref)
    s1 = s or x.abs().max().item() / 127
    y1 = cpu.int8_conv(x[1], packed, s1, reduce_range=GRID_STEP == 2)  # unbatched
    assert close(y1, conv(act_q64(x[1], "tensor", s1, step=GRID_STEP)))


@needs_cpu_kernels
def test_cpu_conv_refusals():
    assert "groups" in cpu.supports_conv(6, 4, (3, 3), groups=4)
    assert "padding_mode" in cpu.supports_conv(4, 4, (3, 3), padding_mode="mirror")
    assert "spatial" in cpu.supports_conv(4, 4, (1, 1, 1, 1))
    packed = cpu.prepack_conv(torch.zeros(4, 4, 3, 3, dtype=torch.int8), torch.ones(4))
    with pytest.raises(ValueError, match="4 channels"):
        cpu.int8_conv(torch.zeros(1, 3, 8, 8), packed)
    with pytest.raises(ValueError, match="per tap"):  # per-token activations need the per-tap packing
        cpu.int8_conv(torch.zeros(1, 4, 8, 8), packed, None, "token")
    taps = cpu.prepack_conv(torch.zeros(4, 4, 3, 3, dtype=torch.int8), torch.ones(4), per_token=True)
    with pytest.raises(ValueError, match="per tap"):
        cpu.int8_conv(torch.zeros(1, 4, 8, 8), taps, 0.1)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        cpu.int8_conv(torch.zeros(1, 4, 2, 2), taps, None, "token")
    with pytest.raises(FloatingPointError, match="non-finite"):
        cpu.int8_conv(torch.full((1, 4, 4, 4), float("nan")), taps, None, "token")
    with pytest.raises(ValueError, match="granularity"):
        cpu.int8_conv(torch.zeros(1, 4, 8, 8), taps, None, "channel")
    empty = cpu.int8_conv(torch.zeros(0, 4, 8, 8), taps, None, "token")
    assert empty.shape == (0, 4, 6, 6)


# -- quantized modules on the fbgemm backend ----------------------------------------------------
def _fake(q: nn.Module, x: torch.Tensor) -> torch.Tensor:
    backend, q.backend = q.backend, "fake"
    try:
        with torch.no_grad():
            return q(x)
    finally:
        q.backend = backend


def _kernel_and_fake(q: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel output, simulated output) of a layer; static activations get a scale that clips (0.6 amax)."""
    if not q.input_quantizer.spec.dynamic:
        q.input_quantizer.set_qparams(QParams(x.abs().max().reshape(1, 1) * 0.6 / 127))
    ref = _fake(q, x)
    with torch.no_grad():
        y = q(x)
    assert q._kcache[1] is not None, "the kernel was not used"
    return y, ref


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("spec", [DYN_TOKEN, DYN_TENSOR, STATIC], ids=["token", "tensor", "static"])
def test_modules_on_fbgemm_equal_fake_quant(kind, spec, full_grid_kernels):
    """The module's fake path (full 8-bit grid) is the reference; both run fp32, so 1e-5 covers both roundings."""
    torch.manual_seed(0)
    if kind == "linear":
        float_mod, x = nn.Linear(40, 24), torch.randn(2, 5, 40)
        q = QuantLinear.from_float(float_mod, W8, spec, backend="fbgemm", name="l")
    else:
        float_mod, x = nn.Conv2d(8, 16, 3, padding=1), torch.randn(2, 8, 6, 6)
        q = QuantConv2d.from_float(float_mod, W8, spec, backend="fbgemm", name="c")
    y, ref = _kernel_and_fake(q, x)
    assert y.shape == ref.shape and close(y, ref)
    if kind == "conv":  # an unbatched input is a batch of one on both paths (axis 0 is its channels)
        with torch.no_grad():
            assert close(q(x[1]), _fake(q, x[1])) and close(q(x[1]), ref[1])
    if kind == "conv" and spec is DYN_TOKEN:  # per-pixel scales: one GEMM per kernel tap
        assert "per kernel tap" in get_kernel("fbgemm").describe(q)


@needs_cpu_kernels
@pytest.mark.parametrize("act", [QuantSpec("int4", "token", dynamic=True), STATIC], ids=["int4-token", "static"])
def test_group_wise_linear_module_on_the_kernel_equals_fake_quant(act):
    """SVDQuant's layout (int4 weights in groups of 64, int4 per-token activations) on the int8 GEMM."""
    torch.manual_seed(4)
    x = torch.randn(2, 7, 192)
    q = QuantLinear.from_float(nn.Linear(192, 48), QuantSpec("int4", "group:64"), act, backend="fbgemm", name="l")
    y, ref = _kernel_and_fake(q, x)
    assert close(y, ref)
    expected = "AVX512-VNNI kernel, groups of 64" if cpu.group_impl(64) == "vnni" else "one GEMM per 64 inputs"
    assert expected in get_kernel("fbgemm").describe(q, q._kcache[1][1])


@needs_cpu_kernels
@pytest.mark.parametrize("act", [QuantSpec("int4", "token", dynamic=True), STATIC], ids=["int4-token", "static"])
def test_group_wise_convolution_runs_its_weight_requantized_to_int8(act):
    """Group-wise scales do not factor out of a window: the kernel multiplies the weight re-quantized
    per output channel. Exact against float64 with that weight; against the recipe's own (fake) output
    within the bound half an int8 step per weight gives: sum |x_q| * amax_row / 254."""
    torch.manual_seed(5)
    x = torch.randn(2, 16, 6, 6)
    q = QuantConv2d.from_float(nn.Conv2d(16, 8, 3, padding=1), QuantSpec("int4", "group:16"), act,
                               backend="fbgemm", name="c")
    y, ref = _kernel_and_fake(q, x)
    with torch.no_grad():
        xq = q.input_quantizer(x).double()
    assert not get_kernel("fbgemm").gives_codes(q, q._kcache[1][1])  # the layer keeps its own codes
    w = q.decoded_weight(torch.float64)
    codes, scale = common.requantize_int8(w)
    step = scale.double().view(-1, 1, 1, 1)
    assert ((codes.double() * step - w).abs() <= step / 2 + 1e-12).all()  # half an int8 step of each row
    reduced = cpu.needs_reduce_range(8, act.bits)  # int8 x int8 without VNNI: the kernel's 7-bit grid
    xk = act_q64(x, "tensor", q.input_quantizer.qparams.scale.item(), step=2) if reduced else xq
    exact = F.conv2d(xk, codes.double() * scale.double().view(-1, 1, 1, 1), q.bias.double(), padding=1)
    assert close(y, exact)
    bound = F.conv2d(xq.abs(), torch.ones_like(w), padding=1) * (scale.double().view(1, -1, 1, 1) / 2)
    assert reduced or ((y.double() - ref.double()).abs() <= bound + 1e-5 * ref.abs().max()).all()
    assert "re-quantized to int8 per channel" in get_kernel("fbgemm").describe(q)


@needs_cpu_kernels
def test_unsupported_layers_and_training_stay_on_fake():
    q8 = QuantLinear.from_float(nn.Linear(16, 16), QuantSpec("int8", "group:8"), DYN_TOKEN, backend="cuda")
    assert "the cuda kernels take no group-wise weights" in get_kernel("cuda").unsupported_reason(q8)
    q = QuantLinear.from_float(nn.Linear(16, 8), W8, DYN_TOKEN, backend="fbgemm")
    assert q(torch.randn(2, 16)).requires_grad and q._kcache is None  # gradients: fake path


# -- GPU math on CPU, and the CUDA ops where a GPU exists ----------------------------------------
def _exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.double() @ b.double()


@pytest.mark.parametrize("fmt,m", [("int8", 3), ("int8", 40), ("fp8_e4m3", 5)])
@pytest.mark.parametrize("static", [False, True])
def test_gpu_padding_and_scale_math_with_emulated_matmul(fmt, m, static):
    """36 -> 21 features (not multiples of 8/16) and M < 17 need padding; with an exact matmul the
    result must equal the fake-quant module (fp32 reference: 1e-5 relative)."""
    torch.manual_seed(0)
    spec_a = QuantSpec(fmt, "tensor") if static else QuantSpec(fmt, "token", dynamic=True)
    q = QuantLinear.from_float(nn.Linear(36, 21), QuantSpec(fmt, "channel"), spec_a, name="g")
    x = torch.randn(m, 36)
    if static:
        q.input_quantizer.set_qparams(QParams(x.abs().max().reshape(1, 1) / (127 if fmt == "int8" else 448)))
    kernel = get_kernel("cuda")
    packed = kernel.prepare(q)
    assert packed.weight_t.shape[0] % 8 == 0 and packed.weight_t.shape[1] % 8 == 0
    run = cuda.int8_linear_cuda if fmt == "int8" else cuda.fp8_linear_cuda
    y = run(x, packed, q.input_quantizer.scale if static else None, matmul=_exact)
    with torch.no_grad():
        ref = q(x)
    assert y.shape == (m, 21) and close(y, ref)


def test_gpu_prepack_checks():
    with pytest.raises(ValueError, match="torch.int8"):
        cuda.prepack_linear_int8(torch.zeros(4, 4), torch.ones(4))
    packed = cuda.prepack_linear(torch.zeros(4, 4, dtype=torch.int8), torch.ones(4))
    with pytest.raises(ValueError, match="prepack_linear_fp8"):
        cuda.fp8_linear_cuda(torch.zeros(2, 4), packed)
    assert "CUDA" in (cuda.supports_linear(8, 8) or "CUDA") and "not fp4" in cuda.supports_linear(8, 8, "fp4")


@needs_cuda
@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_cuda_kernels_match_fake(fmt):
    if fmt == "fp8_e4m3" and not cuda.fp8_supported():
        pytest.skip("fp8 needs compute capability 8.9+")
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(200, 72).cuda(), QuantSpec(fmt, "channel"),
                               QuantSpec(fmt, "token", dynamic=True), backend="cuda", name="g")
    x = torch.randn(3, 50, 200, device="cuda")
    ref = _fake(q, x)
    with torch.no_grad():
        y = q(x)
    assert q._kcache[1] is not None
    assert close(y, ref, rtol=1e-5 if fmt == "int8" else 1e-2)  # fp8: bf16 output rounding


# -- registry -------------------------------------------------------------------------------------
def test_registry():
    assert available_backends()[0] == "fake"
    assert ("fbgemm" in available_backends()) == (cpu.onednn_available() or cpu.fbgemm_available())
    assert get_kernel("fbgemm").conv is cpu.int8_conv and get_kernel("cuda").conv is None
    with pytest.raises(ValueError, match=r"unknown kernel backend 'tpu'.*fake.*fbgemm.*cuda"):
        get_kernel("tpu")


def test_import_is_lean():
    code = "import sys, dmquant.kernels; print(any(m in sys.modules for m in ('diffusers', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_lowrank_branch_adds_into_a_kernel_output_like_its_forward():
    """The in-place fused add equals out + branch(x); hooks and a biased `up` take the plain path."""
    from dmquant.transforms.lowrank import LowRankBranch

    torch.manual_seed(7)
    branch = LowRankBranch(nn.Linear(8, 3, bias=False), nn.Linear(3, 6, bias=False))
    x, out = torch.randn(2, 4, 8), torch.randn(2, 4, 6)
    with torch.no_grad():
        fused = branch.add_to(out.clone(), x)
        assert torch.allclose(fused, out + branch(x), rtol=0, atol=1e-6)
        handle = branch.up.register_forward_hook(lambda _m, _a, y: y * 2)
        assert torch.allclose(branch.add_to(out.clone(), x), out + branch(x), rtol=0, atol=1e-6)
        assert not torch.allclose(branch.add_to(out.clone(), x), fused, atol=1e-3)  # the hook ran
        handle.remove()
        branch.up.bias = nn.Parameter(torch.ones(6))
        assert torch.allclose(branch.add_to(out.clone(), x), out + branch(x), rtol=0, atol=1e-6)
