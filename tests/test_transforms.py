"""Outlier transforms (smoothing, rotation, SVD branch, LoRA merging) against float64 references.

Float equivalence: with quantizers off, a transformed model must compute what the float model did
(every transform is an exact identity in real arithmetic; 1e-5 relative covers fp32 rounding through
a few layers, measured ~1e-6). Quantized checks compare against the quantization error itself.
"""
import copy

import pytest
import torch
from conftest import BUILDERS, _inputs
from torch import nn

import dmquant
from dmquant.config import Step
from dmquant.nn import quantization_disabled
from dmquant.plans import plan_from_json
from dmquant.timestep import noise_level
from dmquant.transforms import (
    ActivationStats,
    hadamard,
    merge_lora,
    random_orthogonal,
    rotate,
    smoothing_factors,
    svd_split,
    unmerge_lora,
)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _recipe(base, *steps):
    return dmquant.get_recipe(base).replace(name="test", steps=tuple(Step(n, a) for n, a in steps))


def _family(name):
    torch.manual_seed(0)
    if name == "dit":
        from diffusers import DiTTransformer2DModel

        model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=1,
                                      sample_size=8, patch_size=2, norm_num_groups=8).eval()
        g = torch.Generator().manual_seed(1)
        args, kw = (torch.randn(2, 4, 8, 8, generator=g),), dict(class_labels=torch.tensor([1, 3]))
    else:
        model, (args, kw) = BUILDERS[name]().eval(), _inputs(name)
        kw.pop("timestep")

    def run(m, t=(10, 700)):  # one timestep per call, as samplers do (timestep-aware steps need it)
        with torch.no_grad():
            return torch.cat([m(*args, **kw, timestep=torch.tensor([v, v]), return_dict=False)[0] for v in t])

    return model, run


# -- pure math ------------------------------------------------------------------------------------
@pytest.mark.parametrize("b", [1, 2, 8, 64])
def test_hadamard_and_random_rotations_are_orthogonal(b):
    h = hadamard(b, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(b, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full((b, b), b ** -0.5, dtype=torch.float64), rtol=0, atol=1e-15)
    q = random_orthogonal(3 * b, seed=b, dtype=torch.float64)
    assert torch.allclose(q.T @ q, torch.eye(3 * b, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, 4 * b, dtype=torch.float64)
    assert torch.allclose(rotate(x, h), x @ torch.block_diag(*[h] * 4), atol=1e-12)


def test_smoothing_factors_balance_activation_and_weight_ranges():
    act, w = torch.rand(32) * 50 + 0.1, torch.rand(32) + 0.01
    s = smoothing_factors(act, w, 0.5)
    assert torch.allclose(act.double() / s, w.double() * s)  # alpha 0.5: both ranges become sqrt(act * w)
    assert torch.allclose(smoothing_factors(act, w, 1.0), act.double())
    assert smoothing_factors(torch.zeros(3), torch.ones(3), 0.5).eq(1).all()  # dead channels untouched


def test_activation_stats_per_bucket_and_bounded():
    layer = dmquant.quantize(nn.Sequential(nn.Linear(8, 4)), "w8a8")[0]
    with ActivationStats({"l": layer}, samples=16, buckets=4) as stats:
        for level, amp in ((0.1, 1.0), (0.9, 5.0), (0.95, 2.0)):
            with noise_level(level):
                layer(torch.randn(40, 8).clamp(-1, 1) * amp)
    assert sorted(stats.absmax["l"]) == [0, 3]
    assert stats.absmax["l"][3].max() <= 5.0 and stats.absmax["l"][3].max() > 2.0
    assert {b: x.shape for b, x in stats.sample("l").items()} == {0: (16, 8), 3: (16, 8)}
    with ActivationStats({"l": layer}, buckets=2) as stats, pytest.raises(RuntimeError, match="noise level"):
        layer(torch.randn(2, 8))


def _rows_of(sample: torch.Tensor, *inputs: torch.Tensor) -> bool:
    rows = {tuple(r.tolist()) for r in torch.cat(inputs)}
    return all(tuple(r.tolist()) in rows for r in sample)


def test_activation_stats_share_the_rows_of_one_input_and_release_them():
    """q, k and v fed the very same tensor keep one sample of its rows; a call where v sees another
    input ends v's sharing: it keeps the rows of the calls it shared and goes on with its own (never
    q's rows of inputs v did not see); an input modified in place, or an owner called alone, is not
    shared; releasing q leaves k's rows."""
    q, k, v, o = dmquant.quantize(nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)]), "w8a8")
    torch.manual_seed(0)
    xs = [torch.randn(40, 8) for _ in range(4)]
    with ActivationStats({"q": q, "k": k, "v": v, "o": o}, samples=64) as stats:
        for x in xs[:2]:
            q(x), k(x), v(x), o(x + 1)
        q(xs[2]), k(xs[2]), v(xs[2] * 2), o(xs[2])
        x3 = xs[3].clone()
        q(x3), x3.mul_(3), k(x3)
    assert stats.sample("q")[0].shape == (64, 8) and _rows_of(stats.sample("q")[0], *xs)
    assert _rows_of(stats.sample("v")[0], xs[0], xs[1], xs[2] * 2)  # not q's rows of xs[2]
    assert _rows_of(stats.sample("k")[0], *xs[:3], xs[3] * 3)  # shared until x3 changed in place
    assert not _rows_of(stats.sample("k")[0], *xs[:3])
    with ActivationStats({"a": q, "b": k}, samples=200) as alone:
        q(xs[0]), k(xs[0]), q(xs[1]), q(xs[2]), k(xs[2])  # a called alone in between: b never saw xs[1]
    assert _rows_of(alone.sample("b")[0], xs[0], xs[2]) and alone.sample("b")[0].shape == (80, 8)
    with ActivationStats({"q": q, "k": k}, samples=16) as shared:
        q(xs[0]), k(xs[0])
    assert shared.sample("k")[0] is shared.sample("q")[0]  # one copy
    kept = shared.sample("k")[0]
    shared.release("q")
    assert shared.sample("q") == {} and shared.sample("k")[0] is kept
    shared.release("k")
    assert shared.sample("k") == {} and "q" in shared.absmax


# -- transforms keep the float model ------------------------------------------------------------------
CASES = {
    "unet": [("smoothquant", {"alpha": 0.5}), ("rotate", {}), ("svd", {"rank": 8})],
    "pixart": [("smoothquant", {"alpha": 0.5, "timestep_aware": True, "buckets": 2}),
               ("rotate", {"kind": "random"}), ("svd", {"rank": 8})],
    "dit": [("smoothquant", {"alpha": 0.5}), ("rotate", {})],
}


@pytest.mark.parametrize("family", list(CASES))
def test_transforms_keep_float_outputs(family):
    model, run = _family(family)
    ref = run(model)
    dmquant.quantize(model, _recipe("w4a4", *CASES[family]), calibration=run, pack=False)
    with quantization_disabled(model):
        assert _rel(run(model), ref) < 1e-5
    plan = model.dmquant_state.plan.values()
    smooth = {p.smooth for p in plan}
    if family == "pixart":  # adaLN-single is shared by all blocks: q/k/v/ff smooth online; to_v -> to_out folds
        assert {"online", "folded"} <= smooth and {p.rotation for p in plan if p.kind == "layer"} == {"random"}
    else:  # norms, adaLN-zero modulation and value projections take the scales
        assert "folded" in smooth and any(p.output_scale for p in plan)
        assert any((p.rotation or "").startswith("folded:hadamard") for p in plan)
        assert any(p.output_rotation for p in plan) and "hadamard" in {p.rotation for p in plan}
    if family != "dit":
        assert all(p.lowrank_rank == 8 for p in plan if p.kind == "layer" and p.weight is not None)


def test_step_order_is_enforced():
    model = nn.Sequential(nn.Linear(16, 16))
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="run smoothquant first"):
        dmquant.quantize(model, _recipe("w4a4", ("rotate", {}), ("smoothquant", {})), calibration=lambda m: m(x))


# -- the SVD branch ---------------------------------------------------------------------------------
def _spread_linear(out=48, inp=64, dtype=torch.float32):
    """A weight with a decaying spectrum (as trained layers have) and a bias."""
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g, dtype=torch.float64))
    sv = 1.0 / torch.arange(1, out + 1, dtype=torch.float64) ** 0.7
    layer = nn.Linear(inp, out)
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(sv) @ v[:out])
    return nn.Sequential(layer.to(dtype)), torch.linalg.svdvals(layer.weight.detach().double())


def test_svd_residual_is_the_spectral_tail_and_error_drops_with_rank():
    model, sv = _spread_linear()
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(x)
    errors = []
    for r in (0, 4, 16, 32):
        q = copy.deepcopy(model)
        dmquant.quantize(q, _recipe("w4a16", ("svd", {"rank": r})), calibration=lambda m: m(x), pack=False)
        residual = q[0].weight.detach().double()
        assert float(residual.norm()) == pytest.approx(float(sv[r:].norm()), rel=1e-5)
        with torch.no_grad(), quantization_disabled(q):
            assert _rel(q(x), ref) < 1e-6
        with torch.no_grad():
            errors.append(_rel(q(x), ref))
        assert q[0].lowrank is None if r == 0 else q[0].lowrank.rank == r
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 2, errors


def test_randomized_svd_of_large_weights_reaches_the_eckart_young_tail():
    """Above EXACT_SVD_MAX the branch comes from the seeded randomized SVD: its residual norm is the
    optimal one (the float64 spectral tail) within 1e-3, the reported tail is the real residual's, and
    two splits are identical."""
    from dmquant.transforms.lowrank import EXACT_SVD_MAX

    g = torch.Generator().manual_seed(5)
    n, m = EXACT_SVD_MAX + 64, EXACT_SVD_MAX + 200
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    w = (u / torch.arange(1, n + 1, dtype=torch.float64) ** 0.7) @ v.T  # singular values k^-0.7
    tail = float(torch.linalg.svdvals(w)[32:].norm())
    a, b = svd_split(w.float(), 32, torch.float32), svd_split(w.float(), 32, torch.float32)
    assert torch.equal(a.up, b.up) and torch.equal(a.down, b.down) and a.rank == 32
    assert float(a.residual.norm()) == pytest.approx(tail, rel=1e-3)
    assert a.tail_norm == pytest.approx(float(a.residual.norm()), rel=1e-4)


def test_half_precision_branch_stays_half():
    model, _ = _spread_linear(dtype=torch.bfloat16)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    dmquant.quantize(model, _recipe("w4a16", ("svd", {"rank": 8})), calibration=lambda m: m(x))
    branch = model[0].lowrank
    assert branch.down.weight.dtype == branch.up.weight.dtype == torch.bfloat16
    assert model(x).dtype == torch.bfloat16


def test_report_counts_branch_bytes():
    model, _ = _spread_linear()
    plain = dmquant.report(dmquant.quantize(copy.deepcopy(model), "w4a16"))
    branched = dmquant.report(dmquant.quantize(model, _recipe("w4a16", ("svd", {"rank": 8})),
                                               calibration=lambda m: m(torch.randn(2, 64))))
    assert branched.fp_bytes == plain.fp_bytes
    assert branched.quant_bytes - plain.quant_bytes == (48 + 64) * 8 * 4  # (out + in) * r fp32 numbers


# -- LoRA --------------------------------------------------------------------------------------------
def _unet_lora(model, r=4, seed=5):
    """Random LoRA factors (peft layout) for attention projections, a 1x1 and a 3x3 convolution."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, m in model.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_v", "to_out.0", "proj_in", "resnets.0.conv1")):
            lora[f"{name}.lora_A.weight"] = torch.randn(r, *m.weight.shape[1:], generator=g) * 0.3
            lora[f"{name}.lora_B.weight"] = torch.randn(m.weight.shape[0], r, *[1] * (m.weight.dim() - 2),
                                                        generator=g) * 0.3
    return lora


def _merged_float(model, lora, scale):
    """The reference: W + scale * B A added to the float weights in float64."""
    ref = copy.deepcopy(model)
    for key in [k for k in lora if k.endswith("lora_A.weight")]:
        layer = ref.get_submodule(key.removesuffix(".lora_A.weight"))
        a, b = lora[key].double(), lora[key.replace("lora_A", "lora_B")].double()
        delta = (b.flatten(1) @ a.flatten(1)).reshape(layer.weight.shape)
        with torch.no_grad():
            layer.weight.copy_(layer.weight.double() + scale * delta)
    return ref


def test_lora_merges_through_transforms_and_unmerges_exactly():
    model, run = _family("unet")
    lora = _unet_lora(model)
    want = run(_merged_float(model, lora, scale=0.5))
    fp = run(model)
    dmquant.quantize(model, _recipe("w8a8", ("smoothquant", {"alpha": 0.5}), ("rotate", {}), ("svd", {"rank": 8})),
                     calibration=run, pack=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base_out = run(model)
    merged = merge_lora(model, lora, name="style", scale=0.5)
    assert len(merged) == len(lora) // 2
    with quantization_disabled(model):
        assert _rel(run(model), want) < 1e-5  # exact mapping into each layer's smoothed / rotated space
    q_err = _rel(base_out, fp)
    assert _rel(run(model), want) < 1.5 * q_err  # within the quantization error the model already had
    assert _rel(base_out, want) > 5 * q_err  # and the adapter does matter
    assert unmerge_lora(model, "style")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(run(model), base_out)
    assert all(not p.lora for p in model.dmquant_state.plan.values())
    with pytest.raises(ValueError, match="not quantized layers"):
        merge_lora(model, {"time_embedding.linear_1.lora_A.weight": torch.zeros(2, 4),
                           "time_embedding.linear_1.lora_B.weight": torch.zeros(64, 2)})


def test_lora_from_peft_matches_peft():
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    model, run = _family("unet")
    with_lora = copy.deepcopy(model)
    with_lora.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "proj_in", "conv1"],
                                          init_lora_weights=False))
    want, fp = run(with_lora), run(model)
    dmquant.quantize(model, _recipe("w8a8", ("smoothquant", {"alpha": 0.5}), ("svd", {"rank": 8})), calibration=run,
                     pack=False)
    q_err = _rel(run(model), fp)
    merge_lora(model, get_peft_model_state_dict(with_lora), scale=8 / 4)
    with quantization_disabled(model):
        assert _rel(run(model), want) < 1e-5
    assert _rel(run(model), want) < 1.5 * q_err


# -- persistence -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["unet", "pixart"])
def test_save_load_keeps_branch_and_transforms_bitwise(family, tmp_path):
    model, run = _family(family)
    lora = _unet_lora(model) if family == "unet" else {}
    steps = [("smoothquant", {"alpha": 0.5}), ("rotate", {"kind": "random" if family == "pixart" else "hadamard"}),
             ("svd", {"rank": 8})]
    dmquant.quantize(model, _recipe("w4a4", *steps), calibration=run)
    if lora:
        merge_lora(model, lora, name="style")
    dmquant.save_quantized(model, tmp_path / "q")
    loaded = dmquant.load_quantized(tmp_path / "q")
    assert loaded.dmquant_state.plan == model.dmquant_state.plan
    assert torch.equal(run(loaded), run(model))
    state, back = model.state_dict(), loaded.state_dict()
    extras = [k for k in state if ".lowrank." in k or ".transform." in k]
    assert extras and all(torch.equal(state[k], back[k]) for k in extras)
    if lora:
        unmerge_lora(loaded, "style")  # the record survives the round trip


def test_plans_without_transform_keys_still_load():
    plan = plan_from_json({"a": {"kind": "layer", "weight": {"format": "int8"}, "input": None}})
    assert plan["a"].lowrank_rank == 0 and plan["a"].smooth is None and plan["a"].lora == ()


def test_kernel_path_sees_the_transformed_input(full_grid_kernels):
    g = torch.Generator().manual_seed(6)
    model = nn.Sequential(nn.Linear(64, 32))
    x = torch.randn(16, 64, generator=g) * torch.logspace(0, 2, 64)  # channel outliers
    recipe = _recipe("w8a8", ("smoothquant", {"alpha": 0.5}))
    fake = dmquant.quantize(copy.deepcopy(model), recipe, calibration=lambda m: m(x))
    real = dmquant.quantize(copy.deepcopy(model), recipe, calibration=lambda m: m(x), backend="fbgemm")
    with torch.no_grad():
        assert _rel(real(x), fake(x)) < 1e-4
    assert real[0].transform.smooth == "online" and real[0]._kcache[1] is not None  # the kernel ran


def test_transforms_refuse_layers_with_calibrated_input_scales(denoiser):
    """A static input scale measured before smoothing / rotation would be for the wrong tensor."""
    import dmquant
    from dmquant.config import QuantSpec, Recipe, Step

    _, model, run = denoiser
    for step in ("smoothquant", "rotate"):
        m = copy.deepcopy(model)
        recipe = Recipe(name="bad", weight=QuantSpec("int8"), input=QuantSpec("int8", "tensor"),
                        steps=(Step("ranges"), Step(step)))
        with pytest.raises(ValueError, match="calibrated input scales"):
            dmquant.quantize(m, recipe, calibration=run)


def test_kron_rotation_is_the_full_kronecker_product_and_keeps_the_float_function(tmp_path):
    """kron(R, H) for n = 3 * 32: applied without forming it, equal to x @ torch.kron(R, H) in float64,
    orthogonal; as a recipe step the rotated model computes the float function until quantized, and a
    quantized one reloads bitwise."""
    from dmquant.config import Recipe
    from dmquant.orthogonal import kron_factor, kron_rotate

    r, h = kron_factor(96, seed=1, dtype=torch.float64), hadamard(32, torch.float64)
    q = torch.kron(r, h)
    x = torch.randn(5, 96, dtype=torch.float64)
    assert torch.allclose(kron_rotate(x, r, h), x @ q, atol=1e-12)
    assert torch.allclose(q @ q.T, torch.eye(96, dtype=torch.float64), atol=1e-12)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 48), nn.GELU(), nn.Linear(48, 8))
    inputs = torch.randn(16, 96) * torch.linspace(0.1, 8, 96)  # a few loud channels
    with torch.no_grad():
        ref = model(inputs)
    recipe = Recipe.from_dict({"name": "kron", "weight": {"format": "int4", "granularity": "channel"},
                               "input": {"format": "int4", "granularity": "token", "dynamic": True},
                               "exclude": [], "steps": [{"name": "rotate", "args": {"kind": "kron"}}]})
    dmquant.quantize(model, recipe, calibration=lambda m: m(inputs), pack=False)
    assert model[0].transform.rotation == "kron" and model[0].transform.matrix.shape == (3, 3)
    with torch.no_grad(), dmquant.quantization_disabled(model):
        assert torch.allclose(model(inputs), ref, atol=1e-5)
    dmquant.pack_weights(model)
    dmquant.save_quantized(model, tmp_path / "k")
    fresh = nn.Sequential(nn.Linear(96, 48), nn.GELU(), nn.Linear(48, 8))
    loaded = dmquant.load_quantized(tmp_path / "k", model=fresh)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), model(inputs))
    with pytest.raises(ValueError, match="rotation kind"):
        Recipe.from_dict({**recipe.to_dict(), "steps": [{"name": "rotate", "args": {"kind": "givens"}}]})
