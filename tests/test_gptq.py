"""GPTQ against a textbook (OBQ-style, no Cholesky, no lazy batches) float64 reference, and end to end."""
import copy

import pytest
import torch
from torch import nn

import dmquant
from dmquant.algorithms import gptq
from dmquant.config import QuantSpec
from dmquant.nn import QuantModule
from dmquant.primitives import choose_qparams, dequantize, quantize, sqnr_db

torch.manual_seed(0)


def textbook_gptq(W, H, spec, damp=0.01):
    """Quantize columns left to right; after each, update the rest with the explicit inverse Hessian
    of the remaining columns: W[:, j] -= err * Hinv[i, j] / Hinv[i, i], then drop i from Hinv."""
    W, H = W.double().clone(), H.double().clone()
    n = W.shape[1]
    H += damp * H.diag().mean() * torch.eye(n, dtype=H.dtype)
    qp = choose_qparams(W.float(), spec.fmt, spec.gran, spec.symmetric)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    remaining = list(range(n))
    for i in range(n):
        q_all = dequantize(quantize(W.float(), spec.fmt, spec.gran, qp), spec.gran, qp).double()
        Q[:, i] = q_all[:, i]
        k = remaining.index(i)
        err = (W[:, i] - Q[:, i]) / Hinv[k, k]
        rest = remaining[k + 1:]
        W[:, rest] -= err[:, None] * Hinv[k, k + 1:][None, :]
        keep = [j for j in range(len(remaining)) if j != k]
        Hinv = Hinv[keep][:, keep] - Hinv[keep][:, [k]] @ Hinv[[k]][:, keep] / Hinv[k, k]
        remaining.pop(k)
    return Q


def correlated_problem(out_f=12, in_f=24, n=200):
    X = torch.randn(n, in_f, dtype=torch.float64) @ torch.randn(in_f, in_f, dtype=torch.float64)
    W = torch.randn(out_f, in_f)
    return W, 2 * X.T @ X / n, X


@pytest.mark.parametrize("spec", [QuantSpec("int4"), QuantSpec("int3", "group:8"), QuantSpec("int4", symmetric=False)],
                         ids=lambda s: s.short())
@pytest.mark.parametrize("block_size", [5, 128])
def test_matches_textbook_reference(spec, block_size):
    W, H, _ = correlated_problem()
    ours = gptq(W, H, spec, block_size=block_size).weight.double()
    ref = textbook_gptq(W, H, spec)
    # same scales, same greedy order: identical grid points (float32 output of float64 math)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_beats_round_to_nearest_on_layer_output():
    W, H, X = correlated_problem(32, 64, 500)
    spec = QuantSpec("int3", "group:16")
    qp = choose_qparams(W, spec.fmt, spec.gran)
    rtn = dequantize(quantize(W, spec.fmt, spec.gran, qp), spec.gran, qp).double()
    for act_order in (False, True):
        res = gptq(W, H, spec, act_order=act_order)
        err = lambda Q: ((X @ W.double().T - X @ Q.double().T) ** 2).mean()  # noqa: E731
        assert err(res.weight) < 0.8 * err(rtn)
        # result stays on the stored grid: re-quantizing with the same scales changes nothing
        again = dequantize(quantize(res.weight, spec.fmt, spec.gran, res.qparams), spec.gran, res.qparams)
        assert torch.equal(again, res.weight)


def test_dead_inputs_are_zeroed():
    W, H, _ = correlated_problem()
    H[3, :] = H[:, 3] = 0
    assert gptq(W, H, QuantSpec("int4")).weight[:, 3].abs().max() == 0


def test_recipe_runs_gptq_with_calibration(denoiser, tmp_path):
    family, model, run = denoiser
    ref = run(model)
    rtn = dmquant.quantize(copy.deepcopy(model), "w4a16")
    with pytest.raises(ValueError, match="calibration"):
        dmquant.quantize(copy.deepcopy(model), "gptq-w4a16")
    dmquant.quantize(model, "gptq-w4a16", calibration=run)
    out = run(model)
    assert sqnr_db(ref, out) > sqnr_db(ref, run(rtn)) - 1.0  # at least as good as RTN on its own data
    assert any(isinstance(m, QuantModule) for m in model.modules())
    dmquant.save_quantized(model, tmp_path / "g")
    assert torch.equal(run(dmquant.load_quantized(tmp_path / "g")), out)


def test_unknown_step_refused():
    with pytest.raises(ValueError, match="unknown recipe step"):
        dmquant.Recipe.from_dict({"name": "x", "weight": {"format": "int4"}, "steps": [{"name": "magic"}]})


def test_gptq_hessians_are_of_the_transformed_input(denoiser):
    """After SmoothQuant / rotation the weight multiplies transform(x): the Hessian must be of that
    (else GPTQ after a transform optimises the wrong objective)."""
    from dmquant.algorithms import HessianCollector

    family, model, run = denoiser
    dmquant.quantize(model, "smoothquant-w4a8", calibration=run)
    name, layer = next((n, m) for n, m in model.named_modules() if getattr(m, "transform", None) is not None
                       and isinstance(m, nn.Linear))
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(m.transform(a[0]).detach().double()))
    with HessianCollector({name: layer}) as hc, torch.no_grad():
        run(model)
    handle.remove()
    rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])
    ref = 2 * rows.T @ rows / rows.shape[0]
    assert torch.allclose(hc.hessians[name], ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))


def test_gptq_after_smoothing_beats_rtn(denoiser):
    import copy

    family, model, run = denoiser
    ref = run(model)
    recipe = dmquant.get_recipe("smoothquant-gptq-w4a8")
    rtn_model = copy.deepcopy(model)
    dmquant.quantize(rtn_model, recipe.replace(steps=recipe.steps[:1]), calibration=run)
    dmquant.quantize(model, recipe, calibration=run)
    assert sqnr_db(ref, run(model)) > sqnr_db(ref, run(rtn_model)) + 0.5


@pytest.mark.parametrize("conv,shape,kw", [
    (nn.Conv1d, (2, 3, 11), dict(kernel_size=3, stride=2, padding=1)),
    (nn.Conv1d, (2, 3, 11), dict(kernel_size=3, dilation=2, padding="same")),
    (nn.Conv2d, (2, 3, 7, 6), dict(kernel_size=3, padding=1, padding_mode="reflect")),
    (nn.Conv3d, (1, 2, 5, 6, 4), dict(kernel_size=(3, 1, 2), stride=(1, 2, 1), padding=(1, 0, 1))),
    (nn.Conv3d, (1, 2, 5, 6, 5), dict(kernel_size=3, dilation=(2, 1, 1), padding="valid")),
])
def test_conv_patches_reproduce_the_convolution(conv, shape, kw):
    """Rows x weight(out, in * kernel)^T must be torch's own convolution, position by position."""
    from dmquant.algorithms.hessian import conv_patches

    torch.manual_seed(0)
    layer = conv(shape[1], 4, bias=False, **kw).double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = layer(x)  # (N, out, *positions)
    rows = conv_patches(layer, x)
    ref = y.movedim(1, -1).reshape(-1, 4)
    assert torch.allclose(rows @ layer.weight.reshape(4, -1).T, ref, atol=1e-12)


@pytest.mark.parametrize("conv,shape", [(nn.Conv1d, (4, 8, 16)), (nn.Conv3d, (2, 8, 3, 6, 6))])
def test_gptq_step_covers_conv1d_and_conv3d(conv, shape):
    from dmquant.algorithms import apply_gptq
    from dmquant.nn import QuantConv1d, QuantConv3d

    torch.manual_seed(0)
    base = conv(8, 16, 3, padding=1)
    x = torch.randn(*shape) @ torch.randn(shape[-1], shape[-1])  # correlated positions
    qcls = QuantConv1d if conv is nn.Conv1d else QuantConv3d
    spec = QuantSpec("int3", "channel")
    rtn, ours = (qcls.from_float(copy.deepcopy(base), spec, None, name="c") for _ in range(2))
    losses = apply_gptq([ours], lambda: ours(x))
    assert list(losses) == ["0."]
    with torch.no_grad():
        ref = base(x)
        assert sqnr_db(ref, ours(x)) > sqnr_db(ref, rtn(x)) + 0.5


def test_grouped_conv_keeps_rtn_with_a_message(caplog):
    from dmquant.algorithms import apply_gptq
    from dmquant.nn import QuantConv2d

    layer = QuantConv2d.from_float(nn.Conv2d(8, 8, 3, groups=2), QuantSpec("int4"), None, name="g")
    before = layer.weight.detach().clone()
    with caplog.at_level("WARNING"):
        assert apply_gptq([layer], lambda: layer(torch.randn(1, 8, 5, 5))) == {}
    assert "grouped convolution" in caplog.text and torch.equal(layer.weight, before)


def test_sequential_gptq_uses_hessians_of_the_quantized_prefix():
    """Reference by hand: block 0 from the float inputs, then block 1 from block 0's quantized output."""
    from dmquant.algorithms import apply_gptq
    from dmquant.nn import QuantLinear

    torch.manual_seed(0)
    spec = QuantSpec("int3", "channel")
    blocks = nn.ModuleList([QuantLinear.from_float(nn.Linear(16, 16), spec, None, name=f"b{i}") for i in range(2)])
    model = nn.Module()
    model.blocks = blocks
    fp = copy.deepcopy(blocks)
    x = torch.randn(64, 16) @ torch.randn(16, 16)
    run = lambda: blocks[1](blocks[0](x))  # noqa: E731
    losses = apply_gptq([model], run, sequential=True)
    assert list(losses) == ["0.blocks.0", "0.blocks.1"]

    def hess(rows):
        rows = rows.double()
        return torch.zeros(16, 16, dtype=torch.float64).add_(rows.T @ rows, alpha=2 / rows.shape[0])

    w0 = gptq(fp[0].weight.detach(), hess(x), spec).weight
    with torch.no_grad():
        h1 = torch.nn.functional.linear(x, w0, fp[0].bias)
    w1 = gptq(fp[1].weight.detach(), hess(h1), spec).weight
    assert torch.equal(blocks[0].weight.detach(), w0) and torch.equal(blocks[1].weight.detach(), w1)
    # one pass would have used block 1's float inputs: a different solution
    one_pass = gptq(fp[1].weight.detach(), hess(fp[0](x).detach()), spec).weight
    assert not torch.equal(one_pass, w1)
