"""dmquant inside diffusers: quantize on load, save_pretrained / from_pretrained of quantized models and
pipelines, bitwise. References: `dmquant.quantize` on the same float weights, and the saved model's
own outputs."""
import pytest
import torch
from diffusers import DiffusionPipeline, PipelineQuantizationConfig

import dmquant
from dmquant.pipelines import DmquantConfig, build_tiny_pipeline, generate
from dmquant.state import quant_layers


def test_quantize_on_load_matches_quantize_and_round_trips_bitwise(denoiser, tmp_path):
    family, model, run = denoiser
    cls = type(model)
    model.save_pretrained(tmp_path / "fp")
    loaded = cls.from_pretrained(tmp_path / "fp", quantization_config=DmquantConfig("w4a8"))
    reference = dmquant.quantize(model, "w4a8")
    assert torch.equal(run(loaded), run(reference))
    assert all(layer.is_packed for layer in quant_layers(loaded).values() if layer.weight_quantizer is not None)
    for source, name in ((loaded, "a"), (reference, "b")):  # from diffusers' loader and from dmquant.quantize
        source.save_pretrained(tmp_path / name)
        again = cls.from_pretrained(tmp_path / name)
        assert again.dmquant_state.plan == source.dmquant_state.plan
        assert torch.equal(run(again), run(source))


def test_pipeline_save_pretrained_keeps_quantization(tmp_path):
    pipe = build_tiny_pipeline("pixart")
    dmquant.quantize(pipe, "w8a8-static", calibration={"prompts": ["a red circle", "a blue square"], "steps": 2})
    images = generate(pipe, ["a green cross"], seed=0, steps=2)
    pipe.save_pretrained(tmp_path / "p")
    again = DiffusionPipeline.from_pretrained(tmp_path / "p")
    again.set_progress_bar_config(disable=True)
    assert again.transformer.dmquant_state.recipe.name == "w8a8-static"
    assert torch.equal(generate(again, ["a green cross"], seed=0, steps=2), images)


def test_pipeline_quantization_config_routes_dmquant_to_a_component(tmp_path):
    pipe = build_tiny_pipeline("pixart")
    pipe.save_pretrained(tmp_path / "fp")
    mapping = PipelineQuantizationConfig(quant_mapping={"transformer": DmquantConfig("w8a8")})
    q = DiffusionPipeline.from_pretrained(tmp_path / "fp", quantization_config=mapping)
    assert q.transformer.dmquant_state.recipe.name == "w8a8"
    assert getattr(q.vae, "dmquant_state", None) is None


def test_calibrating_recipes_and_bad_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe"):
        DmquantConfig("w9a9")
    pipe = build_tiny_pipeline("pixart")
    pipe.transformer.save_pretrained(tmp_path / "fp")
    with pytest.raises(ValueError, match=r"needs calibration data.*dmquant.quantize"):
        type(pipe.transformer).from_pretrained(tmp_path / "fp", quantization_config=DmquantConfig("w8a8-static"))


def test_quantized_text_encoder_never_reloads_as_float(tmp_path):
    """transformers knows no "dmquant" method: its from_pretrained must not hand back random floats."""
    pipe = build_tiny_pipeline("pixart")
    enc = pipe.text_encoder
    dmquant.quantize(pipe, dmquant.get_recipe("w8a8").replace(components=("text_encoder",)))
    enc.save_pretrained(tmp_path / "enc")
    with pytest.raises(Exception, match="dmquant"):
        type(enc).from_pretrained(tmp_path / "enc")


def test_user_attention_processor_is_refused_or_kept_quantized(denoiser):
    """set_attn_processor on quantized attention never silently drops it: a plain processor is refused,
    `keep_quantization(processor)` runs it with the layer's own quantizers."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from dmquant.nn import QuantAttnProcessor
    from dmquant.nn.qattention import keep_quantization

    def set_all(model, processor):  # Latte has no set_attn_processor: each Attention's set_processor
        for m in model.modules():
            if hasattr(m, "set_processor"):
                m.set_processor(processor)

    family, model, run = denoiser
    q = dmquant.quantize(model, "w8a8-attn", pack=False)  # float masters kept for the float check below
    before = run(q)
    with pytest.raises(ValueError, match=r"quantized by dmquant.*keep_quantization"):
        (q.set_attn_processor if hasattr(q, "set_attn_processor") else lambda p: set_all(q, p))(AttnProcessor2_0())
    assert all(isinstance(m.processor, QuantAttnProcessor) for m in q.modules() if hasattr(m, "dmquant_attention"))
    set_all(q, keep_quantization(AttnProcessor2_0()))
    procs = [m.processor for m in q.modules() if hasattr(m, "dmquant_attention")]
    assert procs and all(isinstance(p, QuantAttnProcessor) and p.quantizers is not None for p in procs)
    assert len({id(p.quantizers) for p in procs}) == len(procs)  # each layer keeps its own quantizers
    torch.testing.assert_close(run(q), before, rtol=1e-5, atol=1e-5)
    with dmquant.quantization_disabled(q):
        assert not torch.allclose(run(q), before, atol=1e-6)  # the quantization was live, not a no-op


@pytest.mark.parametrize("name", ["miniature-sd", "miniature-pixart", "miniature-latte", "tiny-sd", "tiny-sdxl",
                                  "tiny-pixart", "tiny-sd3", "tiny-flux", "tiny-latte", "tiny-cogvideox", "tiny-wan"])
def test_stock_call_works_on_every_miniature_and_tiny_pipeline(name, tmp_path):
    """`pipe("a prompt")`, diffusers' own __call__: sizes the model was built for, not the stock defaults
    (Latte 16 x 512 px, Wan 81 x 480 x 832, PixArt's resolution bins), also after quantization."""
    from dmquant.pipelines import load

    pipe = load(name)  # dmquant's loader gives the stock pipeline its model's call defaults
    if name in ("miniature-pixart", "tiny-sd"):
        dmquant.quantize(pipe, "w8a8")
    out = pipe("a red circle", num_inference_steps=2, output_type="pt")
    samples = out.frames if hasattr(out, "frames") else out.images
    assert torch.isfinite(torch.as_tensor(samples)).all()
    assert samples.shape[-1] <= 256 and samples.shape[-2] <= 256  # not the 512 px+ stock defaults
    pipe.save_pretrained(tmp_path / "p")  # still the stock class on disk
    assert f'"_class_name": "{type(pipe).__name__}"' in (tmp_path / "p" / "model_index.json").read_text()
    assert type(pipe).__mro__[1].__module__.startswith("diffusers")
