"""Packed save/load: bitwise round trips, real size reduction, atomic writes, corrupt files refused."""
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import dmquant
from dmquant.config import Recipe
from dmquant.serialization import WEIGHTS


@pytest.mark.parametrize("recipe", ["w8a8-attn", "w4a8", "nvfp4", "mxfp4", "fp8"])
def test_bitwise_roundtrip_each_family(denoiser, recipe, tmp_path):
    family, model, run = denoiser
    dmquant.quantize(model, recipe)
    out = run(model)
    dmquant.save_quantized(model, tmp_path / "q")
    loaded = dmquant.load_quantized(tmp_path / "q")
    assert type(loaded) is type(model)
    assert torch.equal(run(loaded), out)
    assert loaded.dmquant_state.recipe == model.dmquant_state.recipe


def test_static_scales_and_asymmetric_roundtrip(denoiser, tmp_path):
    family, model, run = denoiser
    r = dmquant.get_recipe("w8a8-static").replace(weight=dmquant.QuantSpec("int3", "group:16", symmetric=False))
    dmquant.quantize(model, r, calibration=run)
    out = run(model)
    dmquant.save_quantized(model, tmp_path / "q")
    assert torch.equal(run(dmquant.load_quantized(tmp_path / "q")), out)


def test_weights_are_really_packed(tmp_path):
    model = nn.Sequential(nn.Linear(256, 512, bias=False))
    dmquant.quantize(model, Recipe(name="w4", weight=dmquant.QuantSpec("int4", "group:128")))
    dmquant.save_quantized(model, tmp_path / "q")
    state = load_file(str(tmp_path / "q" / "model" / WEIGHTS))
    assert state["0.weight.packed"].dtype == torch.uint8
    assert state["0.weight.packed"].numel() == 256 * 512 // 2  # two int4 per byte
    assert "0.weight" not in state
    nv = nn.Sequential(nn.Linear(256, 64, bias=False))
    dmquant.quantize(nv, "nvfp4")
    dmquant.save_quantized(nv, tmp_path / "nv")
    st = load_file(str(tmp_path / "nv" / "model" / WEIGHTS))
    assert st["0.weight_quantizer.scale.e4m3"].dtype == torch.uint8  # e4m3 block scales as bytes


def test_provenance_recorded(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8))
    dmquant.quantize(model, "w8a8")
    dmquant.save_quantized(model, tmp_path / "q")
    part = json.loads((tmp_path / "q" / "quantization.json").read_text())["components"]["model"]["parts"][""]
    prov = part["provenance"]
    assert prov["recipe"] == "w8a8" and prov["config_hash"] == dmquant.get_recipe("w8a8").config_hash()
    assert "torch" in prov["versions"] and "seed" in prov


# -- bad checkpoints and atomicity ---------------------------------------------------------------
@pytest.fixture()
def saved(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    dmquant.quantize(model, "w4a8")
    dmquant.save_quantized(model, tmp_path / "q")
    return tmp_path / "q"


def test_corrupt_byte_refused(saved):
    f = saved / "model" / WEIGHTS
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt checkpoint.*sha256"):
        dmquant.load_quantized(saved)


def test_truncated_safetensors_refused(saved):
    f = saved / "model" / WEIGHTS
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        dmquant.load_quantized(saved)
    # even when the manifest's hashes are stripped, safetensors' own check refuses it
    m = json.loads((saved / "quantization.json").read_text())
    m["files"] = {}
    (saved / "quantization.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="cannot read"):
        dmquant.load_quantized(saved)


def test_bad_manifest_and_missing_dir(saved, tmp_path):
    (saved / "quantization.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        dmquant.load_quantized(saved)
    with pytest.raises(FileNotFoundError, match="not a dmquant checkpoint"):
        dmquant.load_quantized(tmp_path / "nowhere")


def test_mismatched_skeleton_refused(saved):
    with pytest.raises(ValueError, match="does not match"):
        dmquant.load_quantized(saved, model=nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8)))


def test_failed_save_leaves_previous_checkpoint_intact(saved, monkeypatch):
    before = (saved / "quantization.json").read_text()
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    dmquant.quantize(model, "w8a8")
    import dmquant.serialization as ser

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ser, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        dmquant.save_quantized(model, saved)
    assert (saved / "quantization.json").read_text() == before
    assert [p.name for p in saved.parent.iterdir()] == ["q"]  # no temporary leftovers
    assert dmquant.load_quantized(saved, model=nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)))


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    model = nn.Sequential(nn.Linear(4, 4))
    dmquant.quantize(model, "w8a8")
    with pytest.raises(FileExistsError, match="refusing"):
        dmquant.save_quantized(model, tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_unquantized_object_refused(tmp_path):
    with pytest.raises(ValueError, match="nothing to save"):
        dmquant.save_quantized(nn.Linear(2, 2), tmp_path / "x")


def test_half_precision_model_stores_half_scales_and_roundtrips(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 32)).half()
    dmquant.quantize(model, Recipe(name="w4", weight=dmquant.QuantSpec("int4", "group:32")))
    x = torch.randn(4, 128).half()
    with torch.no_grad():
        out = model(x)
    dmquant.save_quantized(model, tmp_path / "q")
    st = load_file(str(tmp_path / "q" / "model" / WEIGHTS))
    assert st["0.weight_quantizer.scale"].dtype == torch.float16 and st["0.bias"].dtype == torch.float16
    loaded = dmquant.load_quantized(tmp_path / "q", model=nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 32)))
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
