"""The family table (`dmquant.families`) against every tiny family pipeline: what it keeps in high
precision, its block/temporal patterns and timestep scale match the real classes, and each family goes
through a dynamic and a calibrated (static, per-timestep) recipe, 2 sampling steps, save/load bitwise."""
import ast
import inspect
import re
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

import dmquant
from dmquant import families
from dmquant.calibration import CalibrationSet
from dmquant.families import FAMILIES, family_for_module, family_of, find_family
from dmquant.nn import TensorQuantizer, is_attention, quant_class_for
from dmquant.pipelines import build_tiny_pipeline, generate
from dmquant.recipes import get_recipe
from dmquant.timestep import current_noise_level

NAMES = ["sd", "sdxl", "pixart", "sd3", "flux", "latte", "cogvideox", "wan"]
VIDEO_KW = {f: dict(num_frames=9, height=16, width=16, max_sequence_length=16) for f in ("cogvideox", "wan")}
CALL_KW = {**VIDEO_KW, "flux": dict(height=32, width=32)}  # the tiny FLUX's default is 256 px
PROMPTS = ["a red circle at the top", "a blue square moving up"]
CALIBRATION = {"num_prompts": 2, "timesteps": "uniform:2", "steps": 2}
# What the core excluded before the table held the roles (the regression baselines were made with it).
TODAY_EXCLUDE = (
    (r"(^|\.)(time_embed|time_embedding|add_embedding|time_proj|time_emb_proj|adaln_single|caption_projection|"
     r"pos_embed|patch_embed|patch_embedding|x_embedder|context_embedder|time_text_embed|condition_embedder|"
     r"timestep_embedder|guidance_embedder)(\.|$)"),
    r"(^|\.)norm[\w]*(\.|$)",
    r"^(conv_in|conv_out|proj_in|proj_out|conv_norm_out|norm_out)$",
)
TODAY_BLOCKS = (r"(^|\.)(down|up)_blocks\.\d+\.(resnets|attentions)\.\d+$",
                r"(^|\.)mid_block\.(resnets|attentions)\.\d+$",
                r"(^|\.)((temporal_|single_)?transformer_)?blocks\.\d+$")
TODAY_TEMPORAL = r"(^|\.)(time_embedding|time_emb_proj|adaln_single|timestep_embedder)(\.|$)"
# Measured over the 8 tiny pipelines (random weights, 2 steps, this CPU): w8a8 43.9-112 dB, w8a8-tsa
# 39.1-105 dB vs float (lowest: sdxl, then sd); the bounds leave ~10 dB for other CPUs and code paths.
MIN_PSNR = {"w8a8": 34.0, "w8a8-tsa": 29.0}


def _denoiser(pipe):
    return getattr(pipe, family_of(pipe).denoiser)


def _selected(denoiser, exclude):
    """The layers (and attention modules) a recipe with these excludes would quantize."""
    rx = [re.compile(p) for p in exclude]
    return {n for n, m in denoiser.named_modules() if n and (quant_class_for(m) is not None or is_attention(m))
            and not any(p.search(n) for p in rx)}


def _matching(denoiser, patterns):
    return {n for n, _ in denoiser.named_modules() if n and any(re.search(p, n) for p in patterns)}


def _units(denoiser, patterns):
    """Block-reconstruction units: the outermost modules matching a pattern."""
    heads = []
    for n in sorted(_matching(denoiser, patterns), key=lambda n: n.count(".")):
        if not any(n.startswith(h + ".") for h in heads):
            heads.append(n)
    return set(heads)


def _psnr(a, b):
    mse = (a.double() - b.double()).pow(2).mean()
    return float(10 * torch.log10(1 / mse)) if mse > 0 else float("inf")


@pytest.fixture(scope="module")
def tiny():
    """{family: pipeline} built once for the read-only checks (the quantizing tests build their own)."""
    return {}


def _tiny(cache, name):
    if name not in cache:
        cache[name] = build_tiny_pipeline(name)
    return cache[name]


def test_the_table_is_pure_data():
    """dmquant.families sits at the bottom of the import graph: no torch, diffusers or dmquant imports."""
    tree = ast.parse(Path(families.__file__).read_text())
    imported = {a.name if isinstance(n, ast.Import) else n.module for n in ast.walk(tree)
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert imported <= {"__future__", "dataclasses", "typing"}, imported


def test_lookup_by_pipeline_denoiser_and_name():
    assert family_of("FluxPipeline").timestep_scale == 1.0 and family_of("PixArtSigmaPipeline").name == "pixart"
    assert family_of("UNet2DConditionModel").name == "sd"  # shared class names resolve to the first
    assert find_family("StableDiffusionImg2ImgPipeline") is None and family_for_module(torch.nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match="unsupported pipeline class"):
        family_of("NotAPipeline")
    assert families.skip_patterns(None) == dmquant.filters.DEFAULT_EXCLUDE
    assert families.skip_patterns(FAMILIES["sd"], without=("temporal",)) == (families.ROLES["first_last"],)
    with pytest.raises(ValueError, match="unknown roles"):
        families.skip_patterns(None, without=("embeddings",))
    assert families.timestep_scale_for(torch.nn.Linear(2, 2)) == 1000.0
    assert families.blocks_for(None) == TODAY_BLOCKS and families.temporal_for(None) == TODAY_TEMPORAL


def test_generic_default_is_todays_exclude():
    """DEFAULT_EXCLUDE (every role) matches exactly the names today's three regexes matched."""
    names = ["time_embed.linear_1", "a.time_proj", "adaln_single", "x.caption_projection.y", "norm", "norm_out",
             "norm_out.linear", "blocks.0.norm2.linear", "normal", "transformer_blocks.0.attn.norm_q", "conv_in",
             "up.conv_in", "proj_out", "blocks.0.proj_out", "pos_embedder", "x_embedder", "guidance_embedder.l",
             "blocks.3.ff.net.0.proj", "time_text_embed.text_embedder.linear_1", "my_norm", "context_embedders"]

    def hits(patterns, name):
        return any(re.search(p, name) for p in patterns)

    for name in names:
        assert hits(dmquant.filters.DEFAULT_EXCLUDE, name) == hits(TODAY_EXCLUDE, name), name


@pytest.mark.parametrize("name", NAMES)
def test_entry_keeps_todays_plan_and_its_patterns_are_real(name, tiny):
    """For each family: the plan under the family's skip roles = the plan under today's generic
    excludes (= the plan under DEFAULT_EXCLUDE); each role matches a quantizable layer; the block and
    temporal patterns select what today's generic ones do (Wan's temporal layers are new: none before)."""
    pipe = _tiny(tiny, name)
    fam, denoiser = family_of(pipe), _denoiser(pipe)
    assert fam.name == name and family_for_module(denoiser) is fam and find_family(pipe) is fam
    today = _selected(denoiser, TODAY_EXCLUDE)
    assert _selected(denoiser, fam.skip_patterns) == today == _selected(denoiser, dmquant.filters.DEFAULT_EXCLUDE)
    layers = {n for n, m in denoiser.named_modules() if quant_class_for(m) is not None}
    for role in fam.skip:
        assert _matching(denoiser, [families.ROLES[role]]) & layers, (name, role)
    assert _units(denoiser, fam.blocks) == _units(denoiser, TODAY_BLOCKS) != set()
    # tfmq-w4a8 names the role it quantizes (include_roles) instead of pasting the other roles' regexes
    tfmq = get_recipe("tfmq-w4a8")
    assert tfmq.exclude is None and tfmq.include_roles == ("temporal",)
    assert _selected(denoiser, families.skip_patterns(fam, without=("temporal",))) \
        == _selected(denoiser, families.skip_patterns(None, without=("temporal",)))
    if name == "wan":
        assert not _matching(denoiser, [TODAY_TEMPORAL]) & layers
        assert {n for n in _matching(denoiser, [fam.temporal]) if n in layers} == {
            "condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
            "condition_embedder.time_proj"}
    else:
        assert _matching(denoiser, [fam.temporal]) == _matching(denoiser, [TODAY_TEMPORAL]) != set()


@pytest.mark.parametrize("name", NAMES)
def test_calibration_reads_the_table(name, tiny):
    """Timestep scale and the sampling call's size come from the family unless set explicitly."""
    pipe = _tiny(tiny, name)
    fam = family_of(pipe)
    default = CalibrationSet()
    assert default.resolved_timestep_scale(pipe) == fam.timestep_scale == (1.0 if name == "flux" else 1000.0)
    assert CalibrationSet(timestep_scale=7.0).resolved_timestep_scale(pipe) == 7.0
    kwargs = default.pipeline_kwargs(pipe)
    expected = {"cogvideox": {"max_sequence_length": 16}, "latte": {"video_length": 8},
                "wan": {"num_frames": 9, "height": 64, "width": 64}}.get(name, {})
    assert kwargs == expected
    own = CalibrationSet(height=32, width=48, call_kwargs={"max_sequence_length": 8}).pipeline_kwargs(pipe)
    assert own["height"] == 32 and own["width"] == 48 and own["max_sequence_length"] == 8
    if fam.is_video:
        assert CalibrationSet(num_frames=5).pipeline_kwargs(pipe)[fam.frames_kwarg] == 5
    else:
        with pytest.raises(ValueError, match="num_frames is for video"):
            CalibrationSet(num_frames=5).pipeline_kwargs(pipe)


@pytest.mark.parametrize("name", NAMES)
def test_stock_pipeline_timestep_over_scale_is_the_noise_level(name, tiny):
    """What each stock pipeline passes as the timestep, divided by the table's scale, is a noise level
    in [0, 1] that starts at 0.5 or above (FLUX passes t / 1000, the others t in [0, 1000])."""
    pipe = _tiny(tiny, name)
    fam, denoiser, seen = family_of(pipe), _denoiser(pipe), []
    signature = inspect.signature(denoiser.forward)

    def record(_m, args, kwargs):
        t = signature.bind_partial(*args, **kwargs).arguments[fam.timestep_kwarg]
        seen.append(float(torch.as_tensor(t).reshape(-1)[0]))

    handle = denoiser.register_forward_pre_hook(record, with_kwargs=True)
    try:
        generate(pipe, PROMPTS[:1], seed=0, steps=2, progress=False, **CALL_KW.get(name, {}))
    finally:
        handle.remove()
    levels = [t / fam.timestep_scale for t in seen]
    assert levels and all(0 <= v <= 1 for v in levels) and max(levels) >= 0.5, levels  # CogVideoX DDIM: 500, 0


def _quantize_generate_roundtrip(name, recipe, tmp_path, calibration=None):
    kw = CALL_KW.get(name, {})
    reference = generate(build_tiny_pipeline(name), PROMPTS, seed=1, steps=2, progress=False, **kw)
    pipe = dmquant.quantize(build_tiny_pipeline(name), recipe, calibration=calibration)
    out = generate(pipe, PROMPTS, seed=1, steps=2, progress=False, **kw)
    assert torch.isfinite(out).all() and out.shape == reference.shape
    assert _psnr(out, reference) > MIN_PSNR[recipe], (name, recipe, _psnr(out, reference))
    dmquant.save_quantized(pipe, tmp_path / "q")
    loaded = dmquant.load_quantized(tmp_path / "q")  # Wan's optional transformer, SD3's null text_encoder_3
    pipe.save_pretrained(tmp_path / "d")  # diffusers' own layout and loader (dmquant registered with it)
    absent = {"text_encoder_3": None, "tokenizer_3": None} if name == "sd3" else {}  # SD3 saved without T5
    native = DiffusionPipeline.from_pretrained(tmp_path / "d", **absent)
    native.set_progress_bar_config(disable=True)
    assert torch.equal(generate(native, PROMPTS, seed=1, steps=2, progress=False, **kw), out), name
    again = generate(loaded, PROMPTS, seed=1, steps=2, progress=False, **kw)
    assert torch.equal(out, again)
    return pipe


@pytest.mark.parametrize("name", NAMES)
def test_dynamic_recipe_on_every_family(name, tmp_path):
    _quantize_generate_roundtrip(name, "w8a8", tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_calibrated_per_timestep_recipe_on_every_family(name, tmp_path):
    """w8a8-tsa: static per-tensor activation scales, one per noise-level group, calibrated on the
    float trajectory (the family's video size and timestep scale), then sampled and round-tripped."""
    settings = {**CALIBRATION, **(CALL_KW["flux"] if name == "flux" else {})}
    pipe = _quantize_generate_roundtrip(name, "w8a8-tsa", tmp_path, calibration=settings)
    denoiser = _denoiser(pipe)
    grouped = [q for q in denoiser.modules() if isinstance(q, TensorQuantizer) and q.spec.timestep_groups > 1]
    assert grouped and all(q.scale.shape[0] == 2 and q.noise_edges is not None for q in grouped)  # 2 steps seen
    calibration = denoiser.dmquant_state.provenance["calibration"]
    assert calibration["recorded_steps"] == [0, 1]
    assert calibration["call_kwargs"] == CalibrationSet(**settings).pipeline_kwargs(pipe)
    assert calibration["recorded_calls"] == (4 if name == "wan" else 2)  # Wan: separate conditional/unconditional calls


@pytest.mark.parametrize("name", ["flux", "sd3", "pixart"])
def test_per_timestep_hook_reads_the_family_noise_level(name):
    """The noise level quantizers key on (hook: t / the family's timestep scale) spans [0, 1] on every
    family, FLUX included (its pipeline passes t / 1000), and the calibrated group edges lie inside."""
    settings = {**CALIBRATION, **(CALL_KW["flux"] if name == "flux" else {})}
    pipe = dmquant.quantize(build_tiny_pipeline(name), "w8a8-tsa", calibration=settings)
    denoiser, seen = _denoiser(pipe), []
    assert denoiser.dmquant_state.timestep_scale == family_of(pipe).timestep_scale
    handle = denoiser.register_forward_pre_hook(lambda *_: seen.append(current_noise_level()))
    try:
        generate(pipe, PROMPTS[:1], seed=0, steps=2, progress=False, **CALL_KW.get(name, {}))
    finally:
        handle.remove()
    assert len(seen) == 2 and max(seen) > 0.5 and all(0 <= v <= 1 for v in seen), seen
    edges = {float(q.noise_edges[0]) / 1e6 for q in denoiser.modules()
             if isinstance(q, TensorQuantizer) and q.noise_edges is not None}
    assert edges and all(min(seen) < e < max(seen) for e in edges), (edges, seen)


def test_recipes_name_roles_and_bad_roles_fail_when_built():
    from dmquant.config import Override, Recipe, Step

    base = {"name": "r", "weight": {"format": "int4"}}
    assert Override("role:temporal").pattern == families.ROLES["temporal"]
    assert Step("adaround", {"skip": "role:temporal"}).args["skip"] == families.ROLES["temporal"]
    with pytest.raises(ValueError, match="unknown role 'tempo'"):
        Override("role:tempo")
    with pytest.raises(ValueError, match="unknown role"):
        Recipe.from_dict({**base, "include_roles": ["tempo"]})
    with pytest.raises(ValueError, match="not both"):
        Recipe.from_dict({**base, "include_roles": ["temporal"], "exclude": []})
