"""TFMQ-DM's TIAR (adaround's `temporal`): the temporal features against a hand computation of the
UNet's time path, the reconstruction against round-to-nearest on a float64 tiny UNet and on DiTs, and
the whole TFMQ recipe (FSC -> TIAR -> BRECQ of the other blocks) on a tiny diffusers pipeline."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDERS, _inputs, _unet

import dmquant
from dmquant.algorithms import reconstruction
from dmquant.algorithms.tiar import TemporalFeatures, temporal_heads
from dmquant.calibration import DenoiserCall, Trajectory, TrajectoryRunner
from dmquant.config import QuantSpec, Recipe, Step
from dmquant.families import ROLES
from dmquant.nn.switch import quantization_disabled
from dmquant.state import quant_layers

TIMESTEPS = [999, 900, 750, 600, 450, 300, 150, 40, 1]


def _call(dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(2, 4, 8, 8, generator=g, dtype=dtype), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(2, 5, 32, generator=g, dtype=dtype))


def _runner(dtype: torch.dtype) -> TrajectoryRunner:
    """A recorded trajectory by hand: one call, and the noise levels of a 9-step sampler."""
    levels = [t / 1000 for t in TIMESTEPS]
    return TrajectoryRunner(Trajectory([DenoiserCall(_call(dtype), 0, 0.5)], levels))


def _features(model) -> TemporalFeatures:
    return TemporalFeatures(model, list(temporal_heads(model, ROLES["temporal"]).values()))


def _brute_force_features(unet, t: int) -> list[torch.Tensor]:
    """The UNet's time path written out in float64: sinusoidal projection -> time MLP -> per resnet
    SiLU + time_emb_proj, in the order the forward meets the resnets."""
    e = unet.time_embedding
    lin = lambda m, x: F.linear(x, m.weight.double(), m.bias.double())  # noqa: E731
    emb = lin(e.linear_2, F.silu(lin(e.linear_1, unet.time_proj(torch.tensor([t])).double())))
    resnets = [r for blocks in (unet.down_blocks, [unet.mid_block], unet.up_blocks) for b in blocks for r in b.resnets]
    return [emb] + [lin(r.time_emb_proj, F.silu(emb)) for r in resnets]


def test_temporal_features_match_the_time_path_by_hand():
    torch.manual_seed(0)
    unet = _unet().eval()
    heads = temporal_heads(unet, ROLES["temporal"])
    assert list(heads)[0] == "time_embedding" and sum(n.endswith("time_emb_proj") for n in heads) == 8
    ran_out = []
    unet.conv_out.register_forward_hook(lambda *_: ran_out.append(1))
    features = TemporalFeatures(unet, list(heads.values()))
    with torch.no_grad():
        got = features(**{**_call(), "timestep": torch.tensor(300)})
    ref = _brute_force_features(unet, 300)
    assert len(got) == len(ref) == 9 and not ran_out  # stopped after the last projection
    for g, r in zip(got, ref):
        assert torch.allclose(g[0].double(), r[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(g[0], g[1])  # every row: the timestep alone decides


def _temporal_only(iters: int | None = None) -> Recipe:
    """int4 weights on the temporal layers only, FSC-free: the weight rounding is all that differs
    (`iters`: TIAR's; None: round-to-nearest)."""
    steps = () if iters is None else (Step("adaround", {"temporal": "role:temporal", "iters": iters}),)
    return Recipe(name="t", weight=QuantSpec("int4", "channel"), include=(ROLES["temporal"],),
                  include_roles=("temporal",), steps=steps)


@pytest.mark.slow
def test_tiar_beats_round_to_nearest_on_the_visited_timesteps():
    torch.manual_seed(0)
    unet = _unet().double().eval()
    float_features = [_brute_force_features(unet, t) for t in TIMESTEPS]
    rtn = dmquant.quantize(copy.deepcopy(unet), _temporal_only())
    tiar = dmquant.quantize(copy.deepcopy(unet), _temporal_only(200), calibration=_runner(torch.float64))

    def error(model) -> float:
        features = _features(model)
        with torch.no_grad():
            return sum(float(((g[:1] - r) ** 2).sum()) for t, ref in zip(TIMESTEPS, float_features)
                       for g, r in zip(features(**{**_call(torch.float64), "timestep": torch.tensor(t)}), ref))

    assert error(tiar) < 0.7 * error(rtn), (error(tiar), error(rtn))  # measured 0.55 of RTN
    results = tiar.dmquant_state.steps[0].result
    (res,) = results.values()
    assert res.samples == len(TIMESTEPS) and not res.kept_rtn and res.mse < 0.7 * res.mse_rtn
    assert len(res.layers) == 10 and res.input_gap == 0  # the inputs are the timesteps: nothing drifts
    untouched = {n: p for n, p in unet.named_parameters() if "time_emb" not in n}
    for n, p in tiar.named_parameters():
        if n in untouched:
            assert torch.equal(p, untouched[n]), n


@pytest.mark.parametrize("family", ["pixart", "latte"])
def test_tiar_on_adaln_single(family):
    """DiTs: the temporal path is one module (adaLN-single), and the forward stops right after it."""
    torch.manual_seed(0)
    model = BUILDERS[family]().eval()
    args, kwargs = _inputs(family)
    call = DenoiserCall({"hidden_states": args[0], **kwargs, "return_dict": False}, 0, 0.5)
    blocks = []
    hook = model.transformer_blocks[0].register_forward_hook(lambda *_: blocks.append(1))
    with torch.no_grad():
        (t_mod, embedded), heads = TemporalFeatures(model, [model.adaln_single])(**call.kwargs), blocks[:]
    hook.remove()
    assert not heads and t_mod.shape[-1] == 6 * embedded.shape[-1]  # stopped before the first block
    runner = TrajectoryRunner(Trajectory([call], [t / 1000 for t in TIMESTEPS]))
    dmquant.quantize(model, _temporal_only(100), calibration=runner)
    (res,) = model.dmquant_state.steps[0].result.values()
    assert all(".adaln_single." in n for n in res.layers) and len(res.layers) == 3
    assert res.samples == len(TIMESTEPS) and res.mse < res.mse_rtn


def test_tiar_needs_a_recorded_trajectory():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="trajectory"):
        dmquant.quantize(_unet().eval(), _temporal_only(1), calibration=lambda m: m(**_call()))


@pytest.mark.slow
def test_tfmq_with_tiar_on_a_pipeline(monkeypatch):
    """`tfmq-tiar-w4a8`: FSC -> shortcut split -> ranges -> TIAR then BRECQ in one step: each block is
    matched to the float model (float temporal features) from quantized inputs (TIAR's temporal features),
    and the codes TIAR chose are the ones packed."""
    from dmquant.pipelines import generate, load

    torch.manual_seed(0)
    pipe = load("tiny-sd")
    base = dmquant.get_recipe("tfmq-tiar-w4a8")  # the shipped recipe, shortened
    assert base.steps[-1].name == "adaround" and "temporal" in base.steps[-1].args
    adaround = Step("adaround", {**base.steps[-1].args, "iters": 10, "batch_size": 2})
    temporal = dataclasses.replace(base.overrides[0], weight=QuantSpec("int4", "channel"))
    recipe = base.replace(steps=(*base.steps[:-1], adaround), overrides=(temporal,),
                          calibration={"num_prompts": 2, "steps": 5, "timesteps": "uniform:2"})
    unet, seen, chosen = pipe.unet, [], {}
    call = {**_call(), "encoder_hidden_states": torch.randn(2, 5, unet.config.cross_attention_dim)}
    with torch.no_grad():
        float_features = _features(unet)(**call)
    reconstruct = reconstruction._reconstruct

    def spy(unit, *args):
        if unit.name != "0.temporal" and not seen:  # the first block, after TIAR decided
            with torch.no_grad():
                features = _features(unet)  # the quantized layers, swapped in since
                with quantization_disabled(unet):
                    seen.append([torch.equal(a, b) for a, b in zip(features(**call), float_features)])
                seen.append([torch.equal(a, b) for a, b in zip(features(**call), float_features)])
        result, codes = reconstruct(unit, *args)
        if unit.name == "0.temporal":
            chosen.update({layer: reconstruction.rounded_weight(layer, c) for layer, c in codes.items()})
        return result, codes

    monkeypatch.setattr(reconstruction, "_reconstruct", spy)
    dmquant.quantize(pipe, recipe)
    results = unet.dmquant_state.steps[-1].result
    assert results["0.temporal"].samples == 5  # every visited timestep, not the 2 recorded steps
    assert len(results) > 1 and not any("time_emb" in n for k, r in results.items() if k != "0.temporal"
                                        for n in r.layers)
    assert seen == [[True] * 9, [False] * 9]  # float reference: float temporal path; quantized pass: TIAR's
    assert len(chosen) == 10 and all(torch.equal(layer.weight, w) for layer, w in chosen.items())
    assert quant_layers(unet)["time_embedding.linear_1"].weight_quantizer.spec.format == "int4"
    assert torch.isfinite(generate(pipe, ["a dog"], steps=5, progress=False)).all()
