"""SageAttention2-style attention quantization against float64 references written out step by step."""
import copy

import pytest
import torch
import torch.nn.functional as F

import dmquant
from dmquant.config import AttentionSpec, QuantSpec, Recipe
from dmquant.kernels.cpu import vnni_available
from dmquant.nn.qattention import AttentionQuantizers
from dmquant.primitives import sqnr_db
from dmquant.recipes import get_recipe

INT8_TOK = QuantSpec("int8", "token", dynamic=True)
INT4_TOK = QuantSpec("int4", "token", dynamic=True)
FP8_CHAN = QuantSpec("fp8_e4m3", "channel", dynamic=True)
FP8_TOK = QuantSpec("fp8_e4m3", "token", dynamic=True)


def _inputs(seed=0, n=20, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for _ in range(3))
    bias = offset * torch.randn(1, 3, 1, 8, generator=g)  # channel offsets shared by all tokens (to_k/to_v bias)
    return q, k + bias, v + bias


def _int_blocks(x, block, qmax):
    """Reference per-block symmetric int quantization of (..., L, D): loops over blocks in float64."""
    out = torch.empty_like(x, dtype=torch.float64)
    for start in range(0, x.shape[-2], block):
        blk = x[..., start:start + block, :].double()
        s = blk.abs().amax(dim=(-2, -1), keepdim=True) / qmax
        out[..., start:start + block, :] = torch.round(blk / s).clamp(-qmax - 1, qmax) * s
    return out


def _fp8(x, dim):
    """Reference e4m3 with one scale per slice along `dim` (amax / 448), via torch's own float8 cast."""
    s = x.double().abs().amax(dim=dim, keepdim=True) / 448
    return (x.double() / s).float().to(torch.float8_e4m3fn).double() * s


@pytest.mark.parametrize("mask", [None, "bool", "causal"])
def test_smoothing_alone_is_exact(mask):
    """Subtracting K's channel means shifts each score row by a constant; V's mean comes back through
    rows of P that sum to one: without quantizers the result is float attention."""
    q, k, v = _inputs(offset=5.0)
    kw = {}
    if mask == "bool":
        m = torch.rand(20, 20, generator=torch.Generator().manual_seed(3)) > 0.4
        m[:, 0] = True
        kw["attn_mask"] = m
    elif mask == "causal":
        kw["is_causal"] = True
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)
    for smooth_q in (False, True):
        aq = AttentionQuantizers(AttentionSpec(smooth_k=True, smooth_q=smooth_q, smooth_v=True))
        assert torch.allclose(aq.sdpa(q, k, v, **kw).double(), ref, atol=2e-5)
    aq_p = AttentionQuantizers(AttentionSpec(probs=QuantSpec("fp8_e4m3", "token", dynamic=True), smooth_v=True))
    assert torch.isfinite(aq_p.sdpa(q, k, v, **kw)).all()


def test_sage_attention_matches_float64_reference():
    spec = AttentionSpec(qkv=INT8_TOK, v=FP8_CHAN, probs=FP8_TOK, block_size=8, smooth_k=True, smooth_v=True)
    aq = AttentionQuantizers(spec, "attn")
    q, k, v = _inputs(offset=3.0)
    out = aq.sdpa(q, k, v)
    k_s = k.double() - k.double().mean(-2, keepdim=True)
    v_mean = v.double().mean(-2, keepdim=True)
    qq, kq = _int_blocks(q, 8, 127), _int_blocks(k_s.float(), 8, 127)
    vq = _fp8((v.double() - v_mean).float(), dim=-2)  # one scale per channel, across tokens
    p = torch.softmax(qq @ kq.transpose(-1, -2) / 8**0.5, -1)
    ref = _fp8(p.float(), dim=-1) @ vq + v_mean
    assert torch.allclose(out.double(), ref, atol=1e-5), (out.double() - ref).abs().max()


@pytest.mark.parametrize("block,probs", [(8, FP8_TOK), (0, None)])
def test_int8_qk_on_the_int8_gemm_matches_float64_reference(block, probs, monkeypatch):
    """With a kernel backend, int8 Q K^T runs on torch._int_mm (counted) and gives the float64
    reference of the same rounding; the fake backend and int4 Q/K stay simulated and say why."""
    from dmquant.kernels import attention as int8_attention

    spec = AttentionSpec(qkv=INT8_TOK, v=FP8_CHAN, probs=probs, block_size=block, smooth_k=True, smooth_v=True)
    q, k, v = _inputs(offset=3.0)
    calls = []
    real = int8_attention.int8_scores
    monkeypatch.setattr(int8_attention, "int8_scores", lambda *a: calls.append(1) or real(*a))
    kernel = AttentionQuantizers(spec, "attn", backend="auto")
    if not vnni_available():  # without VNNI torch._int_mm saturates full-range int8 (measured: errors of 1e6)
        assert "VNNI" in kernel.kernel_name()
        assert torch.equal(kernel.sdpa(q, k, v), AttentionQuantizers(spec, "attn").sdpa(q, k, v)) and not calls
        pytest.skip("int8 Q K^T on torch._int_mm needs VNNI (CPU or ONEDNN_MAX_CPU_ISA); the refusal is checked")
    assert kernel.kernel_name() == "int8 Q K^T (torch._int_mm)"
    out = kernel.sdpa(q, k, v)
    assert calls == [1]
    k_s = k.double() - k.double().mean(-2, keepdim=True)
    v_mean = v.double().mean(-2, keepdim=True)
    qq, kq = _int_blocks(q, block or 1, 127), _int_blocks(k_s.float(), block or 1, 127)
    p = torch.softmax(qq @ kq.transpose(-1, -2) / 8**0.5, -1)
    ref = (_fp8(p.float(), dim=-1) if probs else p) @ _fp8((v.double() - v_mean).float(), dim=-2) + v_mean
    assert torch.allclose(out.double(), ref, atol=1e-5), (out.double() - ref).abs().max()
    simulated = AttentionQuantizers(spec, "attn").sdpa(q, k, v)
    assert calls == [1] and torch.allclose(simulated, out, atol=1e-5)
    assert "fake backend" in AttentionQuantizers(spec, "attn").kernel_name()
    assert "int8 Q/K" in AttentionQuantizers(AttentionSpec(qkv=INT4_TOK), "a", backend="auto").kernel_name()
    with torch.enable_grad():  # training needs the straight-through estimator: simulated
        assert "gradients" in kernel.int8_reason(q.requires_grad_(True), k)


@pytest.mark.skipif(not vnni_available(), reason="torch._int_mm saturates without VNNI (the library refuses it)")
def test_int8_scores_is_the_exact_integer_product():
    """Brute force: every score is sum(q_code * k_code) in integers, times the two row scales."""
    from dmquant.kernels.attention import int8_scores

    g = torch.Generator().manual_seed(0)
    qc, kc = (torch.randint(-128, 128, (2, 3, n, 16), generator=g, dtype=torch.int8) for n in (5, 7))
    qs, ks = torch.rand(2, 3, 5, generator=g), torch.rand(2, 3, 7, generator=g)
    exact = torch.einsum("bhld,bhsd->bhls", qc.long(), kc.long())
    assert torch.equal((exact.abs() < 2**24).all(), torch.tensor(True))  # exact in float32 too
    ref = exact.double() * qs.double()[..., :, None] * ks.double()[..., None, :]
    assert torch.allclose(int8_scores(qc, qs, kc, ks).double(), ref, rtol=1e-6, atol=0)


def _asym(x, dim, levels=15):
    """Reference asymmetric uint grid with one (scale, zero point) per slice along `dim`, in float64."""
    x = x.double()
    lo, hi = x.amin(dim, keepdim=True).clamp(max=0), x.amax(dim, keepdim=True).clamp(min=0)
    s = (hi - lo) / levels
    z = torch.round(-lo / s)
    return (torch.round(x / s) + z).clamp(0, levels).sub(z) * s


def test_query_smoothing_matches_float64_reference():
    """SageAttention2's Q smoothing: (Q - mean Q) and (K - mean K) are rounded, the float correction
    mean(Q) (K - mean K)^T joins the scores with the mask; V asymmetric with one scale per channel."""
    asym_tok = QuantSpec("int4", "token", dynamic=True, symmetric=False)
    spec = AttentionSpec(qkv=asym_tok, v=QuantSpec("int4", "channel", dynamic=True, symmetric=False),
                         smooth_q=True, smooth_k=True)
    q, k, v = _inputs(seed=2, offset=3.0)
    q = q + 2.0  # a mean Q shares across tokens
    mask = torch.rand(20, 20, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[:, 0] = True
    out = AttentionQuantizers(spec, "a").sdpa(q, k, v, attn_mask=mask)
    k_s = k.double() - k.double().mean(-2, keepdim=True)
    q_mean = q.double().mean(-2, keepdim=True)
    scores = (_asym(q.double() - q_mean, -1) @ _asym(k_s, -1).transpose(-1, -2) + q_mean @ k_s.transpose(-1, -2))
    scores = (scores / 8**0.5).masked_fill(~mask, float("-inf"))
    ref = torch.softmax(scores, -1) @ _asym(v, -2)
    assert torch.allclose(out.double(), ref, atol=1e-5), (out.double() - ref).abs().max()


def test_block_size_one_scale_per_block_of_tokens():
    aq = AttentionQuantizers(AttentionSpec(qkv=INT4_TOK, block_size=6), "a")
    x = torch.randn(2, 3, 20, 8)  # 20 tokens: blocks of 6, 6, 6 and a ragged 2
    assert torch.allclose(aq._blocked(aq.q, x).double(), _int_blocks(x, 6, 7), atol=1e-6)


def test_smoothing_lifts_int4_attention_with_channel_offsets():
    q, k, v = _inputs(seed=1, n=64, offset=4.0)
    ref = F.scaled_dot_product_attention(q, k, v)
    plain = AttentionQuantizers(AttentionSpec(qkv=INT4_TOK)).sdpa(q, k, v)
    smooth = AttentionQuantizers(AttentionSpec(qkv=INT4_TOK, smooth_k=True, smooth_v=True)).sdpa(q, k, v)
    gain = sqnr_db(ref, smooth) - sqnr_db(ref, plain)
    assert gain > 5, gain  # measured 8.4 dB (34.0 -> 42.4) at offset 4


def test_log_format_on_probabilities_matches_reference():
    """Registry formats work on any activation: twin-log softmax outputs, per query row."""
    aq = AttentionQuantizers(AttentionSpec(probs=QuantSpec("utwinlog_4", "token", dynamic=True)), "a")
    q, k, v = _inputs()
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8**0.5, -1)
    rowmax = p.amax(-1, keepdim=True)
    levels = torch.tensor([0.0] + [2 ** (-i / 2) for i in range(14, -1, -1)], dtype=torch.float64)
    pq = levels[((p / rowmax).unsqueeze(-1) - levels).abs().argmin(-1)] * rowmax  # nearest level, brute force
    assert torch.allclose(aq.sdpa(q, k, v).double(), pq @ v.double(), atol=1e-5)


def test_attention_spec_round_trip_and_errors():
    r = get_recipe("w8a8-attn8")
    assert r.attention.smooth_k and r.attention.block_size == 16 and r.attention.v.format == "fp8_e4m3"
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(ValueError, match="block_size needs qkv with granularity: token"):
        AttentionSpec.from_dict({"qkv": {"format": "int8", "granularity": "tensor", "dynamic": True}, "block_size": 8})
    with pytest.raises(ValueError, match="non-negative integer"):
        AttentionSpec(qkv=INT8_TOK, block_size=-1)
    with pytest.raises(ValueError, match="unknown key"):
        AttentionSpec.from_dict({"smooth_kq": True})


@pytest.mark.parametrize("recipe", ["sage-attn-int8", "w8a8-attn8", "w8a8-attn4-sage2"])
def test_sage_recipes_on_tiny_pixart(recipe):
    from conftest import BUILDERS
    from conftest import _inputs as model_inputs

    torch.manual_seed(0)
    model = BUILDERS["pixart"]().eval()
    args, kwargs = model_inputs("pixart")
    with torch.no_grad():
        ref = model(*args, **kwargs, return_dict=False)[0]
        qm = copy.deepcopy(model)
        dmquant.quantize(qm, recipe)
        out = qm(*args, **kwargs, return_dict=False)[0]
    n_attn = sum(hasattr(m, "dmquant_attention") for m in qm.modules())
    assert n_attn == 4  # self- and cross-attention of both blocks
    assert sqnr_db(ref, out) > 25, sqnr_db(ref, out)
    if recipe != "w8a8-attn4-sage2":  # int8 Q/K: with a kernel backend Q K^T runs on the int8 GEMM
        km = copy.deepcopy(model)
        dmquant.quantize(km, recipe, backend="auto")
        names = {m.dmquant_attention.kernel_name() for m in km.modules() if hasattr(m, "dmquant_attention")}
        rows = [r.kernel for r in dmquant.report(km).rows if r.kind == "attention"]
        if vnni_available():
            assert names == {"int8 Q K^T (torch._int_mm)"}
            assert rows == ["int8 Q K^T (torch._int_mm), softmax and P V simulated"] * 4
        else:  # the int8 GEMM would saturate: simulated, and the report says why
            assert len(names) == 1 and "VNNI" in names.pop() and all("VNNI" in r for r in rows)
        assert all(r.kernel.startswith("simulated") for r in dmquant.report(qm).rows if r.kind == "attention")
        with torch.no_grad():
            kernel_out = km(*args, **kwargs, return_dict=False)[0]
        assert sqnr_db(out, kernel_out) > 40, sqnr_db(out, kernel_out)  # the same rounding, other summation


def test_rotation_is_exact_alone_and_quantizes_the_rotated_tensors():
    """(Q H)(K H)^T = Q K^T and P (V H) H = P V for the normalised Hadamard H; with int4 Q/K/V the
    rotated tensors are what is rounded (float64 reference, per-token symmetric int4)."""
    from dmquant.orthogonal import hadamard

    q, k, v = _inputs(offset=3.0)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    alone = AttentionQuantizers(AttentionSpec(rotate=True)).sdpa(q, k, v)
    assert torch.allclose(alone.double(), ref, atol=2e-5)
    h = hadamard(8, torch.float64)
    qq, kk, vv = (_int_blocks(x.double() @ h, 1, 7) for x in (q, k, v))  # one "block" per token = per token
    expected = F.scaled_dot_product_attention(qq, kk, vv) @ h
    got = AttentionQuantizers(AttentionSpec(qkv=INT4_TOK, rotate=True)).sdpa(q, k, v)
    assert torch.allclose(got.double(), expected, atol=1e-4)
