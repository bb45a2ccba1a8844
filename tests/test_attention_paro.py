"""PAROAttention-style token reordering: candidate orders checked by brute force, each head's chosen
order equal to the brute-force argmin of the block-quantization error (float64), the quantized
attention against a reference written with explicit loops, and the `paro` step end to end on a tiny
PixArt pipeline with save / load keeping the orders."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import dmquant
from dmquant.config import AttentionSpec, QuantSpec, Recipe, Step
from dmquant.nn.qattention import ORDERS, AttentionQuantizers, token_orders
from dmquant.pipelines import load

INT4_TOK = QuantSpec("int4", "token", dynamic=True)


def test_token_orders_brute_force():
    s, t = 8, 4
    rows, cols, tiles = token_orders(s * s, t * t)
    assert torch.equal(rows, torch.arange(s * s))
    assert [int(i) for i in cols] == [r * s + c for c in range(s) for r in range(s)]
    for start in range(0, s * s, t * t):  # every block of 16 consecutive positions is one 4 x 4 patch
        block = tiles[start:start + t * t]
        r, c = block // s, block % s
        assert r.max() - r.min() == t - 1 and c.max() - c.min() == t - 1 and len(set(block.tolist())) == t * t
    assert token_orders(120, 16) is None  # text tokens: no grid
    assert torch.equal(token_orders(36, 16)[2], torch.arange(36))  # 4 does not divide 6: tiles fall back


def _grid_inputs(s=8):
    """Three heads whose token magnitudes vary by row, by column and by 4 x 4 tile of an s x s grid."""
    g = torch.Generator().manual_seed(0)
    r, c = torch.arange(s).repeat_interleave(s), torch.arange(s).repeat(s)
    checker = 4.0 ** ((r // 4 + c // 4) % 2)  # 4 x 4 tiles alternating between two magnitudes
    scale = torch.stack([4.0 ** (r / 2), 4.0 ** (c / 2), checker])  # (3 heads, tokens)
    q, k, v = (torch.randn(2, 3, s * s, 8, generator=g) * scale[None, :, :, None] for _ in range(3))
    return q, k, v


def _block_ref(x, block, qmax=7):
    out = torch.empty_like(x)
    for start in range(0, x.shape[-2], block):
        blk = x[..., start:start + block, :]
        sc = blk.abs().amax(dim=(-2, -1), keepdim=True) / qmax
        out[..., start:start + block, :] = torch.round(blk / sc).clamp(-qmax - 1, qmax) * sc
    return out


def test_search_picks_each_heads_best_order_and_quantizes_in_it():
    q, k, v = _grid_inputs()
    aq = AttentionQuantizers(AttentionSpec(qkv=INT4_TOK, block_size=16, reorder=True), "a", heads=3)
    aq.searching = True
    aq.sdpa(q, k, v)
    aq.searching = False
    orders = token_orders(64, 16)
    cost = torch.zeros(3, len(ORDERS), dtype=torch.float64)  # brute force, float64
    for i, perm in enumerate(orders):
        for x in (q.double(), k.double()):
            xp = x[..., perm, :]
            cost[:, i] += (_block_ref(xp, 16) - xp).pow(2).sum((0, 2, 3)) / xp.pow(2).sum((0, 2, 3))
    assert torch.allclose(aq.order_cost, cost, rtol=1e-4)
    aq.order.copy_(cost.argmin(-1))
    assert aq.order.tolist() == [0, 1, 2]  # row-major, column-major, tiles: what each head's pattern needs
    q, k = q / 16, k / 16  # moderate scores, so float32 and float64 softmax agree
    ref_q, ref_k = torch.empty_like(q, dtype=torch.float64), torch.empty_like(k, dtype=torch.float64)
    for h in range(3):
        perm = orders[h]
        ref_q[:, h, perm] = _block_ref(q[:, h, perm], 16).double()  # codes from float32 inputs, as the layer
        ref_k[:, h, perm] = _block_ref(k[:, h, perm], 16).double()
    assert torch.allclose(aq._reordered(aq.q, q).double(), ref_q, rtol=1e-6, atol=1e-6)
    expected = F.scaled_dot_product_attention(ref_q, ref_k, _block_ref(v, 1).double())  # V per token
    got = aq.sdpa(q, k, v).double()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), (got - expected).abs().max()


def test_reorder_needs_blocks_and_the_step_needs_a_reordering_recipe():
    with pytest.raises(ValueError, match="needs block_size"):
        AttentionSpec(qkv=INT4_TOK, reorder=True)
    pipe = load("tiny-pixart")
    with pytest.raises(ValueError, match="reorder: true"):
        dmquant.quantize(pipe, Recipe(name="x", attention=AttentionSpec(qkv=INT4_TOK), steps=(Step("paro"),)),
                         calibration={"num_prompts": 1, "steps": 2})


def test_paro_step_on_tiny_pixart_and_save_load(tmp_path):
    torch.manual_seed(0)
    pipe = load("tiny-pixart")
    recipe = Recipe(name="paro-int4", attention=AttentionSpec(qkv=INT4_TOK, block_size=4, reorder=True),
                    steps=(Step("paro"),))
    dmquant.quantize(pipe, recipe, calibration={"num_prompts": 2, "steps": 3, "timesteps": "all"})
    denoiser = pipe.transformer
    layers = [m for m in denoiser.modules() if isinstance(m, AttentionQuantizers)]
    self_attn = [m for m in layers if (m.order >= 0).any()]
    assert self_attn and all(m.order.numel() == m.order_cost.shape[0] > 0 for m in layers)
    assert all(bool((m.order == m.order_cost.argmin(-1)).all()) for m in self_attn)
    cross = [m for m in layers if (m.order < 0).all()]  # keys are text tokens: never a square grid
    assert len(self_attn) + len(cross) == len(layers)
    hidden = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(encoder_hidden_states=torch.randn(1, 6, denoiser.config.caption_channels),
                  timestep=torch.tensor([500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        out = denoiser(hidden[:, : denoiser.config.in_channels], **kwargs, return_dict=False)[0]
    dmquant.save_quantized(denoiser, tmp_path / "q")
    fresh = copy.deepcopy(load("tiny-pixart").transformer)
    loaded = dmquant.load_quantized(tmp_path / "q", model=fresh)
    loaded_layers = [m for m in loaded.modules() if isinstance(m, AttentionQuantizers)]
    assert [m.order.tolist() for m in loaded_layers] == [m.order.tolist() for m in layers]
    with torch.no_grad():
        again = loaded(hidden[:, : denoiser.config.in_channels], **kwargs, return_dict=False)[0]
    assert torch.equal(out, again) and math.isfinite(float(out.abs().sum()))
