"""The serving form (packed codes only, no float master) and the per-layer kernel dispatch.

References: the float-master model quantized with the same recipe (`pack=False`, the fake-quant
reference that the rest of the suite checks against float64 math), float64 products of the same
integer codes for the kernels, and brute force for the int16 saturation rule.
"""
import copy
import gc
import sys
import weakref

import pytest
import torch
from torch import nn

import dmquant
from dmquant.config import QuantSpec, Recipe
from dmquant.kernels import BACKENDS, cpu, select_kernel, weight_only
from dmquant.nn import QuantConv2d, QuantLinear, quantization_disabled
from dmquant.state import quant_layers

needs_cpu_kernels = pytest.mark.skipif(not cpu.onednn_available(), reason="no oneDNN int8 kernels in this build")
FORMATS = ["w8a8", "w4a8", "w4a16", "nvfp4", "mxfp4", "fp8"]


def _recipe(wfmt: str, afmt: str | None, wgran: str = "channel", agran: str = "token", sym: bool = True) -> Recipe:
    inp = None if afmt is None else QuantSpec(afmt, agran, dynamic=True)
    return Recipe(name=f"{wfmt}-{afmt}", weight=QuantSpec(wfmt, wgran, symmetric=sym), input=inp)


@pytest.mark.parametrize("recipe", FORMATS + ["asym-int3"])
def test_packed_layers_compute_exactly_what_float_masters_do(denoiser, recipe):
    family, model, run = denoiser
    if recipe == "asym-int3":
        recipe = _recipe("int3", "int8", "group:16", sym=False)
    master = dmquant.quantize(copy.deepcopy(model), recipe, pack=False)
    packed = dmquant.quantize(model, recipe)
    assert torch.equal(run(packed), run(master))
    for name, layer in quant_layers(packed).items():
        if layer.weight_quantizer is None:
            continue
        assert "weight" not in layer._parameters and layer.weight_packed.dtype == torch.uint8, name
        ref = quant_layers(master)[name].quantized_weight()
        assert torch.equal(layer.weight, ref), name  # the read-only view decodes to the fake-quantized master


def test_quantize_frees_every_float_weight_it_replaces():
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))
    refs = [weakref.ref(m.weight) for m in model if isinstance(m, nn.Linear)]
    dmquant.quantize(model, "w4a8")
    gc.collect()
    assert all(r() is None for r in refs), "a float master weight is still alive after quantize"
    assert sum(p.numel() for p in model.parameters()) == 64 + 32  # only the biases stay float


def test_packed_model_refuses_float_reference_and_keeps_following_dtype():
    model = nn.Sequential(nn.Linear(32, 16))
    dmquant.quantize(model, "w4a16")
    with quantization_disabled(model), pytest.raises(RuntimeError, match="pack=False"):
        model(torch.randn(2, 32))
    model.to(torch.bfloat16)
    assert model[0].weight_dtype == torch.bfloat16 and model[0].weight.dtype == torch.bfloat16
    assert model(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("wbits,abits", [(w, a) for w in range(2, 9) for a in range(2, 9)])
def test_reduce_range_rule_matches_brute_force_saturation(wbits, abits):
    """Without VNNI, u8*s8 pairs are summed in int16: the grid must be reduced exactly when the
    largest pair sum of uint8 activation codes (zero point 2**(a-1)) and weight codes overflows."""
    largest = (2**abits - 1) * 2 ** (wbits - 1) * 2
    saturates = largest > 32767 and not cpu.vnni_available()
    assert cpu.needs_reduce_range(wbits, abits) == saturates


def _codes64(x: torch.Tensor, bits: int, gran: str) -> torch.Tensor:
    """float64 symmetric fake quantization of activations (per token or per tensor)."""
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax(-1, keepdim=True) if gran == "token" else x.abs().max()
    s = (amax.float() / qmax).double()
    s = torch.where(s == 0, torch.ones_like(s), s)
    return torch.clamp(torch.round(x.double() / s), -qmax - 1, qmax) * s


@needs_cpu_kernels
@pytest.mark.parametrize("wbits,abits", [(4, 8), (4, 4), (2, 8), (6, 6)])
@pytest.mark.parametrize("gran", ["token", "tensor"])
def test_narrow_integers_run_exactly_on_the_int8_gemm(wbits, abits, gran):
    """W4A8 / W4A4 codes on the int8 GEMM: equal to a float64 product of the same codes on any CPU
    (no reduced grid is needed below 8x8 bits), to fp32 rescaling precision (1e-5 of the peak)."""
    torch.manual_seed(0)
    lin = nn.Linear(48, 40)
    q = QuantLinear.from_float(lin, QuantSpec(f"int{wbits}", "channel"),
                               QuantSpec(f"int{abits}", gran, dynamic=True), backend="auto", name="l")
    q.pack_weight()
    x = torch.randn(3, 7, 48) * torch.linspace(0.1, 4, 48)
    with torch.no_grad():
        y = q(x)
    assert q._kcache[1] is not None and "int8 GEMM" in q.kernel_name()
    w64 = q.decoded_weight(torch.float64)
    ref = _codes64(x, abits, gran) @ w64.T + lin.bias.double()
    assert torch.allclose(y.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@needs_cpu_kernels
def test_w4a8_convolution_on_the_int8_kernel_matches_fake():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    spec_a = QuantSpec("int8", "tensor", dynamic=True)
    fake = QuantConv2d.from_float(copy.deepcopy(conv), QuantSpec("int4", "channel"), spec_a, name="c")
    real = QuantConv2d.from_float(conv, QuantSpec("int4", "channel"), spec_a, backend="auto", name="c")
    real.pack_weight()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y, ref = real(x), fake(x)
    assert real._kcache[1] is not None
    assert torch.allclose(y, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@pytest.mark.skipif(not weight_only.available(), reason="no CPU weight-only kernels in this torch")
@pytest.mark.parametrize("wfmt,gran,sym", [("int4", "group:32", True), ("uint4", "group:64", False),
                                           ("int8", "channel", True)])
@pytest.mark.parametrize("tokens,kernel", [(5, "aten int"), (weight_only.DECODE_MIN_TOKENS, "decoded per call")])
def test_weight_only_kernels_match_the_decoded_weight(wfmt, gran, sym, tokens, kernel, decode_gemm):
    """bf16 activations times the exact decoded weight, in float64: the kernel differs only by bf16
    rounding of its scales and accumulation (relative 1e-2 of the output's peak). Few tokens run
    torch's packed kernels, many the decode-GEMM."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 64).to(torch.bfloat16)
    q = QuantLinear.from_float(lin, QuantSpec(wfmt.replace("u", ""), gran, symmetric=sym), None, backend="cpu", name="l")
    q.pack_weight()
    assert "decoded per call" in q.kernel_name() and "below" in q.kernel_name()  # before a call: both, and when
    x = torch.randn(tokens, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        y = q(x)
    assert q._kcache[1] is not None and kernel in q.kernel_name()
    ref = x.double() @ q.decoded_weight(torch.float64).T + lin.bias.double()
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.double(), ref, rtol=0, atol=1e-2 * ref.abs().max().item())



@pytest.mark.parametrize("wfmt,gran,sym", [("int4", "group:32", True), ("int4", "group:64", False), ("int8", "channel", True)])
def test_fp32_inputs_of_packed_weight_only_layers_decode_exactly_as_simulated(wfmt, gran, sym, decode_gemm):
    """fp32 activations: a packed layer takes the fp32 decode-GEMM, bit for bit the simulated path; a
    float-master layer stays simulated (its cached fake weight is faster) and says why."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    layers = [QuantLinear.from_float(lin, QuantSpec(wfmt, gran, symmetric=sym), None, backend=b, name="l")
              for b in ("cpu", "fake")]
    x = torch.randn(7, 128)
    assert "fp32 on packed layers" in select_kernel(layers[0], torch.float32)[1]
    for layer in layers:
        layer.pack_weight()
    with torch.no_grad():
        y, ref = layers[0](x), layers[1](x)
    assert "W{}A32 weight-only (fp32 GEMM on codes decoded per call)".format(wfmt[-1]) in layers[0].kernel_name()
    assert torch.equal(y, ref)


@pytest.mark.parametrize("wfmt,gran,sym,pack", [("int4", "group:32", True, True), ("int4", "group:64", False, True),
                                                ("int4", "tensor", False, True), ("int8", "channel", True, True),
                                                ("int4", "group:32", True, False), ("int4", "group:64", True, True),
                                                ("int4", "group:64", False, False)])
def test_decode_gemm_weight_is_the_exactly_rounded_dequantized_weight(wfmt, gran, sym, pack, decode_gemm):
    """The decode-GEMM's weight against float64, element by element: (code - zero of its group) *
    bf16(scale of its group), rounded once to bf16, bit for bit (96 inputs: groups of 64 are ragged);
    a packed int4 layer lends its own codes (same storage, no second copy)."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = QuantLinear.from_float(lin, QuantSpec(wfmt, gran, symmetric=sym), None, backend="cpu", name="l")
    if pack:
        q.pack_weight()
    packed = weight_only.prepare(q, torch.bfloat16, tokens=weight_only.DECODE_MIN_TOKENS)
    assert packed.decode and not weight_only.gives_codes(packed)
    qp = q.weight_quantizer.qparams
    size = int(gran.split(":")[1]) if gran.startswith("group") else 96
    column_group = torch.arange(96) // size
    per_row = lambda t: t.double().reshape(40, -1) if t.numel() >= 40 else t.double().reshape(1, 1).expand(40, 1)  # noqa: E731
    scale = per_row(qp.scale.bfloat16())[:, column_group]
    zero = 0 if qp.zero_point is None else per_row(qp.zero_point)[:, column_group]
    ref = (q.weight_codes().double() - zero) * scale
    assert torch.equal(weight_only.decode(packed), ref.bfloat16())
    if pack and wfmt == "int4":
        assert packed.weight.data_ptr() == q._buffers["weight_packed"].data_ptr()


@pytest.mark.parametrize("wfmt,gran,sym", [("int4", "group:24", True), ("int4", "group:64", True),
                                           ("int4", "channel", False), ("int8", "channel", True)])
def test_weight_only_convolution_matches_the_decoded_weight(wfmt, gran, sym, decode_gemm):
    """A W4A16 / W8A16 convolution runs its decoded 16-bit weight on the bf16 convolution: against the
    float64 convolution of the exact decoded weight, bf16 rounding only (relative 1e-2 of the peak)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1).to(torch.bfloat16)
    q = QuantConv2d.from_float(conv, QuantSpec(wfmt, gran, symmetric=sym), None, backend="cpu", name="c")
    q.pack_weight()
    x = torch.randn(2, 8, 6, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        y = q(x)
    assert "16-bit convolution on codes decoded per call" in q.kernel_name()
    ref = torch.nn.functional.conv2d(x.double(), q.decoded_weight(torch.float64), conv.bias.double(), padding=1)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.double(), ref, rtol=0, atol=1e-2 * ref.abs().max().item())


def test_dispatch_table_and_report_name_each_layers_kernel():
    assert BACKENDS["fake"] == () and set(BACKENDS["auto"]) >= set(BACKENDS["cpu"])
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    dmquant.quantize(model, _recipe("int4", "int8"), backend="auto")
    rep = dmquant.report(model)
    expected = "W4A8 int8 GEMM" if cpu.onednn_available() or cpu.fbgemm_available() else "simulated"
    assert all(expected in r.kernel for r in rep.rows) and expected in str(rep)
    fake = dmquant.quantize(nn.Sequential(nn.Linear(64, 64)), "w4a8")
    assert dmquant.report(fake).rows[0].kernel.startswith("simulated")
    with pytest.raises(ValueError, match="unknown backend"):
        dmquant.quantize(nn.Sequential(nn.Linear(8, 8)), "w8a8", backend="tpu")


def test_load_quantized_with_dtype_and_backend(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 64))
    x = torch.randn(4, 128)
    dmquant.quantize(model, "w4a16")
    ref = model(x)
    dmquant.save_quantized(model, tmp_path / "q")
    skeleton = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 64))
    loaded = dmquant.load_quantized(tmp_path / "q", model=skeleton, torch_dtype=torch.bfloat16, backend="auto")
    assert all(layer.is_packed for layer in quant_layers(loaded).values())
    y = loaded(x.bfloat16())
    assert y.dtype == torch.bfloat16
    if weight_only.available():
        assert all("weight-only" in r.kernel for r in dmquant.report(loaded).rows)
    assert torch.allclose(y.float(), ref, rtol=0, atol=2e-2 * ref.abs().max().item())  # bf16 activations


@pytest.mark.parametrize("recipe", ["w8a8-static", "smoothquant-w8a8"])
def test_calibration_never_caches_a_second_weight_copy(recipe):
    """Recipes calibrate on float masters: without the fake-weight cache only one layer's fake-quantized
    copy exists at a time, and no kernel prepacks a layer whose master still changes (peak memory ~ the
    float model, not 1.25x or twice it); after quantize the layers pack and the kernels run."""
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))
    cached = []

    def calibrate(m: nn.Module) -> None:
        m(torch.randn(4, 64))
        cached.extend(layer._wcache is not None or (layer._kcache is not None and layer._kcache[1] is not None)
                      for layer in quant_layers(m).values())

    dmquant.quantize(model, recipe, calibration=calibrate, backend="auto")
    assert cached and not any(cached)
    assert all(layer.is_packed and layer.cache_weight for layer in quant_layers(model).values())
    model(torch.randn(4, 64))
    if cpu.onednn_available() or cpu.fbgemm_available():
        assert all(layer._kcache[1] is not None for layer in quant_layers(model).values())


def test_attention_only_recipes_report_and_unpacked_vq_models_refuse_to_save(denoiser, tmp_path):
    family, model, run = denoiser
    dmquant.quantize(model, "sage-attn-int8")
    rows = dmquant.report(model).rows
    assert rows and all(r.kind == "attention" and "qkv int8" in r.input for r in rows)
    vq = nn.Sequential(nn.Linear(64, 64))
    dmquant.quantize(vq, "vq4dit-w2a16", calibration=lambda m: m(torch.randn(32, 64)), pack=False)
    with pytest.raises(ValueError, match="vector-quantized.*pack_weights"):
        dmquant.save_quantized(vq, tmp_path / "vq")
    assert not (tmp_path / "vq").exists()


@pytest.mark.parametrize("bits", range(2, 9))
def test_int8_codes_come_straight_from_the_packed_bytes(bits):
    """Sign extension of packed b-bit codes equals the grid values fake quantization decodes."""
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(40, 24), QuantSpec(f"int{bits}", "channel"), None, name="l")
    q.pack_weight()
    assert torch.equal(q.int_weight_codes().to(torch.float32), q.weight_codes())


def _mapping_rss_kib(address: int) -> int:
    """Resident KiB of the mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(a, 16) for a in head.split("-"))
                inside = start <= address < end
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise LookupError(hex(address))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise are Linux's")
def test_reclaim_file_pages_drops_a_mapped_weight_and_keeps_its_content(tmp_path):
    """A weight in a safetensors memory map (as diffusers loads it): reclaiming gives its pages back
    (the mapping's resident size falls) and reading it again gives the same bytes; anonymous memory
    is left alone."""
    from safetensors.torch import load_file, save_file

    from dmquant.memory import reclaim_file_pages

    save_file({"w": torch.randn(1024, 1024), "b": torch.randn(8)}, tmp_path / "m.safetensors")
    w = load_file(tmp_path / "m.safetensors")["w"]
    expected = w.clone()
    before = _mapping_rss_kib(w.data_ptr())
    reclaim_file_pages(w)
    after = _mapping_rss_kib(w.data_ptr())
    if before < 3000:
        pytest.skip("this safetensors build copies tensors out of the file instead of mapping it")
    assert after < before - 3000, (before, after)  # 4 MiB of pages gone, give or take the edges
    assert torch.equal(w, expected)
    anon = torch.randn(1024, 1024)
    copy_ = anon.clone()
    reclaim_file_pages(anon)
    assert torch.equal(anon, copy_)
