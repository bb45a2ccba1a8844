"""Timestep-aware calibration: range estimators vs float64 references, per-timestep and split scales,
step selection, trajectory recording/replay, and the calibration recipes end to end on tiny pipelines."""
import math

import numpy as np
import pytest
import torch

import dmquant
import dmquant.observe
from dmquant.calibration import CalibrationSet, Trajectory, eda_steps, parse_selection, uniform_steps
from dmquant.config import QuantSpec, Recipe
from dmquant.formats import get_format
from dmquant.granularity import PerChannel
from dmquant.nn import TensorQuantizer
from dmquant.observers import RangeObserver, estimate_qparams, parse_observer
from dmquant.timestep import attach_timestep_hook, current_noise_level, noise_level


# -- range estimators ---------------------------------------------------------------------------
def _int_fq64(x: np.ndarray, scale: float, qmax: int) -> np.ndarray:
    return np.clip(np.round(x / scale), -qmax - 1, qmax) * scale


def test_observer_parsing_and_errors():
    assert str(parse_observer("percentile")) == "percentile:99.99"
    assert str(parse_observer("lp:3")) == "lp:3" and parse_observer("mse").p == 2.0
    for bad in ("median", "percentile:20", "ema:1.5", "mse:2", "lp:x"):
        with pytest.raises(ValueError):
            parse_observer(bad)
    with pytest.raises(ValueError, match="observer must be minmax"):
        QuantSpec("nvfp4", observer="mse")
    with pytest.raises(ValueError, match="timestep_groups"):
        QuantSpec("int8", "token", dynamic=True, timestep_groups=4)


def test_percentile_matches_numpy_nearest_rank():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_001, generator=g)
    obs = RangeObserver(parse_observer("percentile:99.9"))
    obs.update(x)
    ref = np.asarray(x, dtype=np.float64)
    assert float(obs.hi) == pytest.approx(np.percentile(ref, 99.9, method="inverted_cdf"), abs=0)
    assert float(obs.lo) == pytest.approx(np.percentile(ref, 0.1, method="inverted_cdf"), abs=0)


def test_ema_follows_its_formula():
    obs = RangeObserver(parse_observer("ema:0.5"))
    for amax in (1.0, 3.0, 2.0):
        obs.update(torch.tensor([-amax, amax]))
    expect = 0.5 * (0.5 * 1.0 + 0.5 * 3.0) + 0.5 * 2.0
    assert float(obs.hi) == pytest.approx(expect) and float(obs.lo) == pytest.approx(-expect)


def test_mse_search_matches_brute_force_and_beats_minmax():
    """Activation search = exhaustive float64 search over the same clipping ratios (heavy tails)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, generator=g) ** 3  # heavy tails
    obs = RangeObserver(parse_observer("mse"))
    obs.update(x)
    scale = float(obs.qparams(get_format("int4"), True).scale)
    xs = np.asarray(x, dtype=np.float64)
    amax = np.abs(xs).max()
    errors = {r: ((_int_fq64(xs, amax * r / 50 / 7, 7) - xs) ** 2).sum() for r in range(1, 51)}
    best = min(errors, key=errors.get)
    assert scale == pytest.approx(amax * best / 50 / 7, rel=1e-5)
    assert errors[best] < 0.8 * errors[50]  # clipping the tail beats min-max clearly here


def test_weight_lp_search_per_channel_never_worse_than_minmax():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 64, generator=g)
    w[:, 0] *= 8  # one outlier column
    fmt = get_format("int4")
    for est in ("mse", "lp:2.4", "percentile:99"):
        qp = estimate_qparams(w, fmt, PerChannel(), True, parse_observer(est))
        mm = estimate_qparams(w, fmt, PerChannel(), True, parse_observer("minmax"))
        err = lambda s: ((torch.clamp(torch.round(w / s[:, :1]), -8, 7) * s[:, :1] - w) ** 2).sum(1)  # noqa: E731
        if est != "percentile:99":
            assert (err(qp.scale) <= err(mm.scale) + 1e-6).all()
        assert (qp.scale <= mm.scale + 1e-9).all()


# -- per-timestep and split scales ---------------------------------------------------------------
def _calibrated(spec: QuantSpec, batches: dict[float, torch.Tensor], split: int | None = None) -> TensorQuantizer:
    q = TensorQuantizer(spec, -1, "q")
    q.start_observing()
    if split is not None:
        q.set_split(split)
    for level, x in batches.items():
        with noise_level(level):
            q(x)
    q.finish_observing()
    return q


def test_timestep_groups_scale_per_noise_level_group():
    data = {0.1: torch.full((4, 8), 1.0), 0.2: torch.full((4, 8), 2.0), 0.6: torch.full((4, 8), 8.0),
            0.9: torch.full((4, 8), 16.0)}
    q = _calibrated(QuantSpec("int8", "tensor", timestep_groups=2), data)
    assert q.scale.shape == (2, 1)
    assert torch.allclose(q.scale.reshape(-1), torch.tensor([2.0, 16.0]) / 127)
    assert q.noise_edges.tolist() == [400_000]  # millionths of the noise level
    x = torch.linspace(-3, 3, 8).reshape(1, 8)
    for level, s in ((0.05, 2 / 127), (0.39, 2 / 127), (0.41, 16 / 127), (1.0, 16 / 127)):
        with noise_level(level):  # unseen noise levels fall into the nearest group
            ref = torch.clamp(torch.round(x.double() / s), -128, 127) * s
            assert torch.allclose(q(x).double(), ref, atol=1e-6)
    with pytest.raises(RuntimeError, match="no timestep is known"):
        q(x)
    q.half()  # a half-precision model keeps its group edges exactly
    assert q.noise_edges.dtype == torch.int64 and q.noise_edges.tolist() == [400_000]


def test_split_segments_have_their_own_scales():
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(6, 3, generator=g), 50 * torch.randn(6, 5, generator=g)], dim=1)
    q = _calibrated(QuantSpec("int8", "tensor"), {0.0: x}, split=3)
    s0, s1 = x[:, :3].abs().max() / 127, x[:, 3:].abs().max() / 127
    assert torch.allclose(q.scale.reshape(-1), torch.stack([s0, s1]))
    ref = torch.cat([torch.round(x[:, :3].double() / s0) * s0, torch.round(x[:, 3:].double() / s1) * s1], 1)
    assert torch.allclose(q(x).double(), ref, atol=1e-5)
    one = _calibrated(QuantSpec("int8", "tensor"), {0.0: x})
    small = lambda y: (y[:, :3] - x[:, :3]).pow(2).sum()  # noqa: E731  the small half keeps its resolution
    assert small(q(x)) < 0.01 * small(one(x))


def test_timestep_hook_reads_positional_and_keyword_timesteps():
    from dmquant.pipelines import load

    unet = load("tiny-sd").unet
    hook = attach_timestep_hook(unet, 1000.0)
    seen = []
    handle = unet.conv_in.register_forward_hook(lambda *a: seen.append(current_noise_level()))
    x, text = torch.randn(1, unet.config.in_channels, 8, 8), torch.randn(1, 4, unet.config.cross_attention_dim)
    with torch.no_grad():
        unet(x, 250, text)
        unet(x, timestep=torch.tensor([500]), encoder_hidden_states=text)
        unet(torch.cat([x, x]), torch.tensor([1, 2]), torch.cat([text, text]))
    handle.remove()
    hook.remove()
    assert seen[:2] == [0.25, 0.5] and math.isnan(seen[2]) and current_noise_level() is None


# -- step selection -------------------------------------------------------------------------------
def test_timestep_selection():
    assert uniform_steps(20, 5) == [0, 5, 10, 14, 19] and uniform_steps(4, 10) == [0, 1, 2, 3]
    assert parse_selection(8) == parse_selection("uniform:8") and str(parse_selection("eda:3")) == "eda:3"
    for bad in ("uniform", "eda:0", "random:3", "all:2"):
        with pytest.raises(ValueError):
            parse_selection(bad)
    # three tight clusters of step features: density x diversity takes one step from each
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    feats = torch.cat([c + 0.1 * torch.randn(5, 2, generator=g) for c in centres])
    chosen = eda_steps(feats, 3)
    assert sorted(i // 5 for i in chosen) == [0, 1, 2]


# -- trajectories and recipes on tiny pipelines ---------------------------------------------------
@pytest.fixture
def tiny_sd():
    from dmquant.pipelines import load

    torch.manual_seed(0)
    return load("tiny-sd")


def test_trajectory_records_selected_steps_and_replays_exactly(tiny_sd):
    runner = CalibrationSet(prompts=["a red circle", "a blue square", "a cat"], batch_size=2, steps=6,
                            timesteps="uniform:3").prepare(tiny_sd)
    traj: Trajectory = runner.trajectory
    assert len(traj.calls) == 2 * 3 and sorted({c.step for c in traj.calls}) == [0, 2, 5]
    sched = type(tiny_sd.scheduler).from_config(tiny_sd.scheduler.config)
    sched.set_timesteps(6)
    assert traj.visited == pytest.approx([float(t) / 1000 for t in sched.timesteps])
    assert [c.noise_level for c in traj.calls[:3]] == pytest.approx([traj.visited[i] for i in (0, 2, 5)])
    # one call per visited timestep (TFMQ's finite set), with exactly the sampler's timesteps
    assert [float(torch.as_tensor(c.kwargs["timestep"]).reshape(-1)[0]) for c in traj.timestep_calls()] == \
        [float(t) for t in sched.timesteps]
    outs = []
    handle = tiny_sd.unet.register_forward_hook(lambda m, a, o: outs.append(o[0].clone()))
    traj.replay(tiny_sd.unet)
    traj.replay(tiny_sd.unet)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(outs[:6], outs[6:]))
    assert runner.description["recorded_calls"] == 6 and traj.nbytes > 0


def test_eda_selection_on_a_pipeline(tiny_sd):
    runner = CalibrationSet(prompts=["a red circle", "a cat"], steps=8, timesteps="eda:3").prepare(tiny_sd)
    assert len({c.step for c in runner.trajectory.calls}) == 3


def _tiny_recipe(**changes) -> Recipe:
    base = dict(name="t", weight=QuantSpec("int8", "channel"), input=QuantSpec("int8", "tensor", observer="mse"),
                calibration={"num_prompts": 2, "steps": 4, "timesteps": "all", "batch_size": 2})
    base.update(changes)
    return Recipe(**base)


def test_pipeline_calibrates_itself_and_bare_models_need_data(tiny_sd, denoiser):
    from dmquant.pipelines import generate

    dmquant.quantize(tiny_sd, _tiny_recipe())
    prov = tiny_sd.unet.dmquant_state.provenance["calibration"]
    assert prov["recorded_calls"] == 4 and len(prov["prompts"]) == 2 and prov["seconds"] > 0
    assert torch.isfinite(generate(tiny_sd, ["a dog"], steps=3, progress=False)).all()
    _, model, _ = denoiser
    with pytest.raises(ValueError, match="bare model"):
        dmquant.quantize(model, _tiny_recipe())


def test_timestep_aware_model_saves_loads_and_runs_other_schedules(tiny_sd, tmp_path):
    from dmquant.pipelines import generate

    recipe = _tiny_recipe(input=QuantSpec("int8", "tensor", timestep_groups=3))
    dmquant.quantize(tiny_sd, recipe)
    q = next(m.input_quantizer for m in tiny_sd.unet.modules() if getattr(m, "input_quantizer", None) is not None)
    assert q.scale.shape == (3, 1) and q.noise_edges.shape == (2,)
    a = generate(tiny_sd, ["a cat"], steps=7, progress=False)  # a step count it was not calibrated with
    dmquant.save_quantized(tiny_sd, tmp_path / "q")
    loaded = dmquant.load_quantized(tmp_path / "q")
    assert torch.equal(a, generate(loaded, ["a cat"], steps=7, progress=False))


def test_real_kernels_use_the_current_timestep_scale(tiny_sd, full_grid_kernels):
    """fbgemm static int8 with per-timestep scales equals the fake-quant reference at each timestep."""
    recipe = _tiny_recipe(input=QuantSpec("int8", "tensor", timestep_groups=2), include=(r"ff\.net",))
    dmquant.quantize(tiny_sd, recipe)
    layer = next(m for n, m in tiny_sd.unet.named_modules() if n.endswith("ff.net.2"))
    x = torch.randn(2, 5, layer.in_features)
    assert not torch.equal(layer.input_quantizer.scale[0], layer.input_quantizer.scale[1])
    for level in (0.05, 0.95):
        with noise_level(level), torch.no_grad():
            layer.backend = "fake"
            ref = layer(x)
            layer.backend = "fbgemm"
            out = layer(x)
        assert layer._kcache is not None and layer._kcache[1] is not None  # the kernel really ran
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_shortcut_splitting_and_temporal_calibration(tiny_sd):
    from dmquant.pipelines import generate

    recipe = dmquant.get_recipe("tfmq-w4a8")
    recipe = recipe.replace(steps=recipe.steps[:3], calibration={"num_prompts": 2, "steps": 5, "timesteps": "uniform:2"})
    dmquant.quantize(tiny_sd, recipe)
    unet = tiny_sd.unet
    split = {n: int(m.input_quantizer.split_at) for n, m in unet.named_modules()
             if getattr(getattr(m, "input_quantizer", None), "split_at", None) is not None}
    assert split and all(".up_blocks." in f".{n}" for n in split)
    for name, k in split.items():  # hidden channels first, then the skip from the down path
        layer = unet.get_submodule(name)
        assert 0 < k < layer.in_channels
    temporal = unet.time_embedding.linear_1.input_quantizer
    assert temporal.scale.shape[0] == 5  # one scale per visited timestep (finite set calibration)
    other = unet.get_submodule(next(iter(split))).input_quantizer
    assert other.scale.shape[0] == 2  # the rest: timestep groups over the 2 recorded steps
    assert torch.isfinite(generate(tiny_sd, ["a dog"], steps=5, progress=False)).all()


def test_pooled_streams_keep_their_samples():
    """Merging the noise levels of a timestep group pools their search samples (bounded), rather than
    shrinking them to one call's worth (which starved per-group MSE searches of outliers)."""
    est = parse_observer("mse")
    parts = []
    for seed in range(3):
        obs = RangeObserver(est)
        obs.update(torch.randn(20_000, generator=torch.Generator().manual_seed(seed)))
        parts.append(obs)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.sample.numel() == 3 * RangeObserver.SAMPLE_PER_CALL
    assert float(merged.hi) == max(float(p.hi) for p in parts)


def test_static_calibration_on_the_cpu_kernel_backend_under_no_grad():
    """Calibration replays run under no_grad: the kernel path must stay off while inputs observe."""
    from torch import nn

    model = nn.Sequential(nn.Linear(64, 32)).eval()
    x = torch.randn(8, 64)

    def run(m):
        with torch.no_grad():
            m(x)

    dmquant.quantize(model, "w8a8-mse", calibration=run, backend="fbgemm")
    with torch.no_grad():
        out = model(x)
    assert model[0].input_quantizer.calibrated and torch.isfinite(out).all()


def test_failed_observation_leaves_no_quantizer_observing():
    seen, unseen = TensorQuantizer(QuantSpec("int8", "tensor"), -1, "seen"), TensorQuantizer(QuantSpec("int8", "tensor"), -1, "unseen")
    with pytest.raises(RuntimeError, match="unseen saw no data"):
        with dmquant.observe.observing_quantizers([unseen, seen]):
            seen(torch.ones(2, 3))
    assert seen.calibrated and not seen.observing and not unseen.observing
    with pytest.raises(ValueError, match="calibrated already"):
        seen.set_split(1)


def test_other_components_calibrate_without_touching_the_denoiser_statistics(tiny_sd):
    """Text-encoder scales come from a sampling run in the final pass; the denoiser's stay the
    trajectory's (the same as calibrating the denoiser alone)."""
    from dmquant.pipelines import load

    alone = load("tiny-sd")
    dmquant.quantize(alone, _tiny_recipe())
    dmquant.quantize(tiny_sd, _tiny_recipe(components=("denoiser", "text_encoder")))
    scales = lambda m: [q.scale for q in dmquant.observe.static_quantizers(m)]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(scales(alone.unet), scales(tiny_sd.unet)))
    assert scales(tiny_sd.text_encoder) and all(s is not None for s in scales(tiny_sd.text_encoder))
