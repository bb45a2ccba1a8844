"""Mixed precision by measurement: allocation vs brute force, sensitivity vs float64, the searched
recipe end to end on a tiny pipeline (bytes as the report counts them, cache, seed), BOS-aware text
encoder, bounded memory."""
import copy
import itertools
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import dmquant
import dmquant.mixed
from dmquant.calibration import DenoiserCall, Trajectory
from dmquant.mixed import allocate, flow, measure, parse_budget, parse_candidates, search, weight_nbytes
from dmquant.recipes import get_recipe, load_recipe_file

FAST = {"num_prompts": 1, "batch_size": 1, "timesteps": "uniform:1", "steps": 2}
CANDS = "int4:group:64,int8:channel,fp"


def brute_force(cost, nbytes, limit, latency=None, latency_limit=None):
    best = None
    for picks in itertools.product(range(cost.shape[1]), repeat=cost.shape[0]):
        size = sum(int(nbytes[li, c]) for li, c in enumerate(picks))
        value = sum(float(cost[li, c]) for li, c in enumerate(picks))
        slow = latency is not None and sum(float(latency[li, c]) for li, c in enumerate(picks)) > latency_limit
        if size <= limit and not slow and (best is None or value < best[0] - 1e-12):
            best = (value, picks)
    return best


def random_problem(seed, layers=6, candidates=3):
    """(cost, bytes, latency) of a random allocation problem."""
    g = torch.Generator().manual_seed(seed)
    nbytes = torch.randint(10, 200, (layers, candidates), generator=g)
    cost = torch.rand(layers, candidates, generator=g, dtype=torch.float64)
    return cost, nbytes, torch.rand(layers, candidates, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
def test_allocation_is_the_exact_optimum(seed):
    cost, nbytes, _ = random_problem(seed)
    lo, hi = int(nbytes.min(1).values.sum()), int(nbytes.max(1).values.sum())
    for limit in (lo, (lo + hi) // 2, hi):
        picks = allocate(cost, nbytes, limit)
        value, _ = brute_force(cost, nbytes, limit)
        assert sum(int(nbytes[li, c]) for li, c in enumerate(picks)) <= limit
        assert sum(float(cost[li, c]) for li, c in enumerate(picks)) == pytest.approx(value, rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="budget too small"):
        allocate(cost, nbytes, lo - 1)


def test_allowed_mask_and_budget_forms():
    cost = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    nbytes = torch.tensor([[1, 10], [1, 10]])
    assert allocate(cost, nbytes, 100, allowed=torch.tensor([[True, False], [True, True]])) == [0, 1]

    class S:
        params, fixed_bytes = [1000, 3000], 500
    assert parse_budget("4.5bits", S) == 4.5 * 4000 / 8
    assert parse_budget("2KiB", S) == 2048 - 500 and parse_budget("3 KB", S) == 3000 - 500
    with pytest.raises(ValueError, match="average bits"):
        parse_budget("lots", S)


def test_weight_bytes_formula():
    spec = parse_candidates("int4:group:64,fp")[0].weight
    assert weight_nbytes((10, 100), spec) == 500 + 10 * 2 * 4  # packed nibbles + 2 float32 scales per row
    assert weight_nbytes((10, 100), None, 2) == 2000
    nvfp4 = parse_candidates("nvfp4,fp")[0].weight
    assert weight_nbytes((4, 32), nvfp4) == 64 + 4 * 2 + 4  # e4m3 block scales + fp32 tensor scale
    with pytest.raises(ValueError, match="two distinct"):
        parse_candidates("fp")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 32, 1)
        self.lin = nn.Linear(32, 32)
        self.out = nn.Conv2d(32, 8, 1)

    def forward(self, sample, timestep):
        h = torch.nn.functional.silu(self.conv(sample) + timestep.reshape(-1, 1, 1, 1) / 1000)
        h = self.lin(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return (self.out(h),)


def _rtn64(w, bits, group):
    """Symmetric round-to-nearest-even on rows (group None) or groups of columns, in float64."""
    rows = w.reshape(w.shape[0], -1).double()
    blocks = rows.reshape(rows.shape[0], -1, group) if group else rows.unsqueeze(1)
    qmax = 2 ** (bits - 1) - 1
    scale = blocks.abs().amax(-1, keepdim=True) / qmax
    return (torch.round(blocks / scale).clamp(-qmax - 1, qmax) * scale).reshape(w.shape)


def _tokens64(h, axis):
    """Dynamic per-token int8 of an activation whose channels sit on `axis`, in float64."""
    moved = h.movedim(axis, -1)
    return _rtn64(moved.reshape(-1, moved.shape[-1]), 8, None).reshape(moved.shape).movedim(-1, axis)


def _toy64(model, x, t, swap):
    """Toy.forward in float64 with the layers in `swap` given quantized weights and inputs."""
    def layer(name, h):
        m = getattr(model, name)
        conv = isinstance(m, nn.Conv2d)
        w = swap.get(name, m.weight.detach().double())
        if name in swap:
            h = _tokens64(h, 1 if conv else -1)
        f = torch.nn.functional.conv2d if conv else torch.nn.functional.linear
        return f(h, w, m.bias.detach().double())

    h = torch.nn.functional.silu(layer("conv", x.double()) + t.double().reshape(-1, 1, 1, 1) / 1000)
    h = layer("lin", h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return layer("out", h)[:, :4]


def test_sensitivity_matches_float64_recomputation():
    torch.manual_seed(0)
    model = Toy().eval()
    calls = [DenoiserCall({"sample": torch.randn(2, 4, 3, 3), "timestep": torch.full((2,), t)}, i, t / 1000)
             for i, t in enumerate((900.0, 100.0))]
    trajectory = Trajectory(calls=calls)
    cands = parse_candidates("int4:group:16,int8:channel,fp")
    spec = get_recipe("w4a8").input  # int8 per-token dynamic
    sens = measure(model, trajectory, cands, spec, groups=2, progress=False)
    assert sens.layers == ["conv", "lin", "out"] and sens.groups == [(0.1, 0.1), (0.9, 0.9)]
    assert torch.all(sens.quality[:, 2] == 0)
    for name, ci, (bits, group) in (("lin", 0, (4, 16)), ("conv", 1, (8, None)), ("out", 0, (4, 16))):
        w64 = _rtn64(getattr(model, name).weight.detach(), bits, group)
        for g, call in enumerate(sorted(calls, key=lambda c: c.noise_level)):
            x, t = call.kwargs["sample"], call.kwargs["timestep"]
            ref, q = _toy64(model, x, t, {}), _toy64(model, x, t, {name: w64})
            expected = float((q - ref).pow(2).sum() / ref.pow(2).sum())
            assert float(sens.quality[sens.layers.index(name), ci, g]) == pytest.approx(expected, rel=2e-3)
    assert sens.nbytes[1, 0] == weight_nbytes((32, 32), cands[0].weight)
    assert sens.fixed_bytes == sum(p.numel() * 4 for n, p in model.named_parameters() if n.endswith("bias"))


@pytest.fixture(scope="module")
def tiny_pixart():
    from dmquant.pipelines import build_tiny_pipeline

    return build_tiny_pipeline("pixart")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mixed-cache")


def test_search_recipe_quantizes_at_predicted_bytes(tiny_pixart, cache, tmp_path, monkeypatch):
    result = search(tiny_pixart, "w4a8", base="w4a8", candidates=CANDS, calibration=FAST, groups=1,
                    cache_dir=cache, progress=False)
    path = result.write(tmp_path / "r.yaml", heatmap=tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000
    recipe = load_recipe_file(path)
    assert recipe == result.recipe and recipe.overrides and recipe.exclude is not None
    pipe = dmquant.quantize(copy.deepcopy(tiny_pixart), path)
    uniform = dmquant.quantize(copy.deepcopy(tiny_pixart), "w4a8")
    assert dmquant.report(pipe).quant_bytes == result.allocation.total_bytes
    assert result.allocation.total_bytes <= dmquant.report(uniform).quant_bytes
    plan = pipe.transformer.dmquant_state.plan
    for name, cand in result.allocation.choice.items():
        assert (name in plan) == (cand != "fp")
        if cand == "int8:channel":
            assert plan[name].weight.format == "int8"
    # a second budget is served by the cache: nothing is measured again
    monkeypatch.setattr(flow, "measure", lambda *a, **k: pytest.fail("re-measured"))
    five = search(tiny_pixart, "5bits", base="w4a8", candidates=CANDS, calibration=FAST, groups=1,
                  cache_dir=cache, progress=False)
    assert five.allocation.average_bits <= 5 and five.sensitivity.meta["key"] == result.sensitivity.meta["key"]


@pytest.mark.parametrize("seed", range(3))
def test_latency_budget_is_a_second_exact_constraint(seed):
    cost, nbytes, latency = random_problem(seed)
    fast, slow = float(latency.min(1).values.sum()), float(latency.max(1).values.sum())
    limit = int(nbytes.max(1).values.sum())
    for lat_limit in (fast + 1e-9, (fast + slow) / 2):
        picks = allocate(cost, nbytes, limit, latency=latency, latency_limit=lat_limit)
        value, _ = brute_force(cost, nbytes, limit, latency, lat_limit)
        assert sum(float(latency[li, c]) for li, c in enumerate(picks)) <= lat_limit + 1e-9
        assert sum(float(cost[li, c]) for li, c in enumerate(picks)) == pytest.approx(value, rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="latency budget too small"):
        allocate(cost, nbytes, limit, latency=latency, latency_limit=fast * 0.99)


def test_latency_search_on_measured_layer_times(tiny_pixart):
    from dmquant.mixed.latency import latency_limit

    lat = torch.tensor([[2.0, 1.0], [4.0, 1.0]])
    assert latency_limit("0.5x", lat, ["int4", "fp"]) == pytest.approx(1.0)
    assert latency_limit("12ms", lat, ["int4", "fp"]) == pytest.approx(0.012)
    with pytest.raises(ValueError, match="latency budget"):
        latency_limit("fast", lat, ["int4", "fp"])
    result = search(tiny_pixart, "32bits", base="w4a8", candidates=CANDS, calibration=FAST, groups=1,
                    cache_dir=None, progress=False, latency="100x")
    a = result.allocation
    assert a.seconds is not None and a.seconds > 0 and "ms measured" in result.summary()


def test_cli_mixed_writes_a_loadable_recipe(cache, tmp_path, capsys):
    from dmquant.cli import main

    out = tmp_path / "r.yaml"
    code = main(["mixed", "--pipeline", "tiny-pixart", "--budget", "5bits", "--base", "w4a8", "--candidates", CANDS,
                 "--num-prompts", "1", "--steps", "2", "--timesteps", "uniform:1", "--groups", "1",
                 "--cache-dir", str(cache), "--out", str(out), "--report", str(tmp_path / "mixed.html")])
    assert code == 0, capsys.readouterr().err
    page = (tmp_path / "mixed.html").read_text()
    assert "data:image/png;base64," in page and "error (chosen)" in page and (tmp_path / "mixed.png").is_file()
    recipe = load_recipe_file(out)
    assert recipe.name == "w4a8-mixed-5bits" and "5bits" in out.read_text().splitlines()[1]
    assert main(["mixed", "--pipeline", "tiny-pixart", "--budget", "lots", "--out", str(out)]) == 2
    assert "unknown recipe 'lots'" in capsys.readouterr().err


def test_search_reproducible_from_seed(tiny_pixart, tmp_path):
    runs = [search(tiny_pixart, "5bits", base="w4a8", candidates=CANDS, calibration=FAST, groups=1, seed=3,
                   cache_dir=None, progress=False) for _ in range(2)]
    assert runs[0].recipe == runs[1].recipe
    assert torch.equal(runs[0].sensitivity.quality, runs[1].sensitivity.quality)
    with pytest.raises(ValueError, match="searched per model"):
        get_recipe("auto-4.5bits")


def test_auto_name_searches_on_the_model(monkeypatch):
    seen = {}

    def fake_search(model, budget, base, name):
        seen.update(model=model, budget=budget, base=base, name=name)
        return type("R", (), {"recipe": get_recipe("w4a8").replace(name=name)})

    monkeypatch.setattr(dmquant.mixed, "search", fake_search)
    recipe = dmquant.api.resolve_recipe("auto-1.2MiB", "pipe")
    assert recipe.name == "auto-1.2MiB"
    assert seen == {"model": "pipe", "budget": "1.2MiB", "base": "gptq-w4a8", "name": "auto-1.2MiB"}
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    dmquant.quantize(model, "auto-3bits")  # quantize hands its object to the search
    assert seen["model"] is model and model.dmquant_state.recipe.name == "auto-3bits"


def test_bos_aware_text_encoder():
    from dmquant.api import quantize_text_encoder_bos
    from dmquant.mixed.bos import bos_states
    from dmquant.pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd")
    ids = pipe.tokenizer(["a red circle", "blue square at the top"], padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        fp = pipe.text_encoder(ids).last_hidden_state
    recipe = {"name": "te", "weight": {"format": "int4", "granularity": "group:16"}, "components": ["text_encoder"],
              "input": {"format": "int8", "granularity": "token", "dynamic": True}, "exclude": []}
    from dmquant.config import Recipe

    quantize_text_encoder_bos(pipe, Recipe.from_dict(recipe))
    with torch.no_grad():
        bos = pipe.text_encoder(ids, output_hidden_states=True)
        pipe.text_encoder.dmquant_bos_hook.remove()
        plain = pipe.text_encoder(ids).last_hidden_state
    assert torch.equal(bos.last_hidden_state[:, 0], fp[:, 0]) and not torch.equal(plain[:, 0], fp[:, 0])
    assert torch.equal(bos.last_hidden_state[:, 1:], plain[:, 1:])
    assert (bos.last_hidden_state - fp).pow(2).sum() < (plain - fp).pow(2).sum()
    with pytest.raises(ValueError, match="not a causal"):
        t5 = build_tiny_pipeline("pixart")
        bos_states(t5.text_encoder, t5.tokenizer)


def test_sensitivity_streams_in_bounded_memory():
    """Peak RSS while measuring 32 x 4 MB layers stays far below one extra copy of the model."""
    code = textwrap.dedent("""
        import resource, torch
        from torch import nn
        from dmquant.calibration import DenoiserCall, Trajectory
        from dmquant.mixed import measure, parse_candidates
        torch.set_num_threads(1)
        class Big(nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = nn.ModuleList(nn.Linear(1024, 1024) for _ in range(32))
            def forward(self, sample, timestep):
                h = sample.flatten(2).transpose(1, 2)
                for m in self.layers:
                    h = m(h)
                return (h.transpose(1, 2).reshape(sample.shape),)
        model = Big().eval()
        calls = [DenoiserCall({"sample": torch.randn(1, 1024, 2, 2), "timestep": torch.tensor([t])}, 0, t / 1000)
                 for t in (800.0,)]
        with torch.no_grad():
            model(**calls[0].kwargs)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        measure(model, Trajectory(calls=calls), parse_candidates("int4:group:64,int8:channel"), None, progress=False)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    model_bytes = 32 * (1024 * 1024 + 1024) * 4
    assert int(out.stdout.split()[-1]) < 0.4 * model_bytes
