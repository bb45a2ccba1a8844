"""quantize() end to end on tiny diffusers denoisers, recipes, selection and the bad-input table."""
import copy

import pytest
import torch
from torch import nn

import dmquant
from dmquant.config import Recipe
from dmquant.nn import QuantAttnProcessor, QuantModule
from dmquant.primitives import sqnr_db


@pytest.mark.parametrize("recipe,min_db", [("w8a8", 30), ("w4a8", 12), ("fp8", 20), ("nvfp4", 8), ("w4a16", 12)])
def test_quantize_each_family(denoiser, recipe, min_db):
    family, model, run = denoiser
    ref = run(model)
    dmquant.quantize(model, recipe)
    out = run(model)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    db = sqnr_db(ref, out)
    assert db > min_db, f"{family} {recipe}: {db:.1f} dB"
    assert db < 200  # really quantized, not a no-op
    layers = [n for n, m in model.named_modules() if isinstance(m, QuantModule)]
    assert layers, "nothing was quantized"
    for kept in ("conv_in", "conv_out", "proj_out", "time_embedding", "adaln_single", "pos_embed"):
        assert not any(n == kept or n.startswith(kept + ".") for n in layers), kept


def test_w8a8_attention_routes_through_quantized_sdpa(denoiser, monkeypatch):
    family, model, run = denoiser
    dmquant.quantize(model, "w8a8-attn")
    procs = [m.processor for m in model.modules() if hasattr(m, "set_processor")]
    assert procs and all(isinstance(p, QuantAttnProcessor) for p in procs)
    calls = []
    from dmquant.nn import qattention

    original = qattention.AttentionQuantizers.sdpa
    monkeypatch.setattr(qattention.AttentionQuantizers, "sdpa",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    run(model)
    assert len(calls) >= len(procs)


def test_mixed_precision_overrides_and_filters(denoiser):
    family, model, _ = denoiser
    dmquant.quantize(model, "w4a8-mixed")
    for name, m in model.named_modules():
        if isinstance(m, QuantModule):
            expect = "int8" if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0") else "int4"
            assert m.weight_quantizer.spec.format == expect, name


def test_include_exclude_and_skip():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Conv1d(8, 8, 1))
    r = Recipe(name="r", weight=dmquant.QuantSpec("int8"), include=(r"^[02]$",), exclude=(r"^2$",))
    dmquant.quantize(model, r)
    assert isinstance(model[0], QuantModule) and not isinstance(model[2], QuantModule)
    assert not isinstance(model[3], QuantModule)


def test_static_scales_need_and_use_calibration(denoiser):
    family, model, run = denoiser
    with pytest.raises(ValueError, match="calibration"):
        dmquant.quantize(copy.deepcopy(model), "w8a8-static")
    ref = run(model)
    dmquant.quantize(model, "w8a8-static", calibration=run)
    scales = [m.input_quantizer.scale for m in model.modules() if isinstance(m, QuantModule)]
    assert all(s is not None and s.numel() == 1 for s in scales)
    assert sqnr_db(ref, run(model)) > 20


def test_recipe_yaml_roundtrip(tmp_path):
    r = dmquant.get_recipe("w4a8-mixed")
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r.to_dict()))
    assert dmquant.get_recipe(str(path)) == r
    assert set(dmquant.recipes()) >= {"w8a8", "w4a8", "w4a16", "w4a4", "fp8", "nvfp4"}


def test_text_encoder_and_vae_decoder_components():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    class Pipe:  # any object with the pipeline attributes works
        unet = nn.Sequential(nn.Linear(8, 8))
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=2, vocab_size=100))
        vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, latent_channels=4)

    pipe = dmquant.quantize(Pipe(), "w8a8-all")
    assert any(isinstance(m, QuantModule) for m in pipe.text_encoder.modules())
    assert any(isinstance(m, QuantModule) for m in pipe.vae.decoder.modules())
    assert not any(isinstance(m, QuantModule) for m in pipe.vae.encoder.modules())
    assert set(dmquant.state.quantized_components(pipe)) == {"unet", "text_encoder", "vae.decoder"}


# -- the bad-input table -------------------------------------------------------------------------
def test_unknown_recipe():
    with pytest.raises(ValueError, match="unknown recipe 'w3a3'.*w8a8"):
        dmquant.quantize(nn.Linear(4, 4), "w3a3")


def test_bits_out_of_range_and_unknown_format(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nweight: {format: int9}\n")
    with pytest.raises(ValueError, match="bits out of range"):
        dmquant.quantize(nn.Linear(4, 4), str(bad))
    bad.write_text("name: bad\nweight: {format: fp5_e9m9}\n")
    with pytest.raises(ValueError, match="unknown format"):
        dmquant.get_recipe(str(bad))
    bad.write_text("name: bad\nweight: {format: int8, granularty: channel}\n")
    with pytest.raises(ValueError, match="unknown key.*granularty"):
        dmquant.get_recipe(str(bad))


def test_wrong_model_type():
    class NotAPipeline:
        vae = nn.Linear(2, 2)

    with pytest.raises(TypeError, match=r"\.unet.*\.transformer"):
        dmquant.quantize(NotAPipeline(), "w8a8")


def test_double_quantization_refused():
    m = nn.Sequential(nn.Linear(4, 4))
    dmquant.quantize(m, "w8a8")
    with pytest.raises(ValueError, match="already quantized"):
        dmquant.quantize(m, "w8a8")


def test_nan_activations_raise_clearly():
    m = nn.Sequential(nn.Linear(4, 4))
    dmquant.quantize(m, "w8a8")
    with pytest.raises(FloatingPointError, match="0.input"):
        m(torch.tensor([[1.0, float("nan"), 0.0, 2.0]]))


def test_report_counts_bytes():
    m = nn.Sequential(nn.Linear(256, 256, bias=False))
    dmquant.quantize(m, Recipe(name="w4", weight=dmquant.QuantSpec("int4", "group:128")))
    rep = dmquant.report(m)
    # 256*256 int4 = 32 KiB of codes + 256*2 fp32 scales = 2 KiB, vs 256 KiB fp32
    assert rep.quant_bytes == 256 * 256 // 2 + 256 * 2 * 4
    assert rep.fp_bytes == 256 * 256 * 4
    assert "int4/group:128" in str(rep)
