"""LoRA on a quantized denoiser through peft and diffusers' LoRA loaders: adapters run beside the packed
layers (checked against a float64 model whose weights are the decoded codes plus B A), swap and unload
without touching the codes, fuse into dmquant's low-rank branch (never into a decoded copy, which would
drop them), and save / load both ways: fused (as branch ranks) or unfused (the adapter on its own)."""
import copy

import pytest
import torch
from diffusers import DiffusionPipeline

import dmquant
from dmquant.pipelines import build_tiny_pipeline
from dmquant.state import quant_layers

peft = pytest.importorskip("peft")
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402


def _pixart_inputs(model):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10, 700]),
                encoder_hidden_states=torch.randn(2, 5, model.config.caption_channels, generator=g),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _run(model, inputs, dtype=torch.float32):
    with torch.no_grad():
        args = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
        return model(**args, return_dict=False)[0]


def _lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def test_peft_lora_beside_quantized_layers_matches_float64_reference_and_fuses_into_the_branch():
    pipe = build_tiny_pipeline("pixart")
    model = pipe.transformer.eval()
    fp = copy.deepcopy(model)
    dmquant.quantize(model, "w4a16")
    layers = quant_layers(model)
    inputs = _pixart_inputs(model)
    base = _run(model, inputs)
    config = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=r".*(to_q|to_v|ff\.net\.0\.proj)$")
    inject_adapter_in_model(config, model, adapter_name="a")
    wrapped = _lora_layers(model)
    assert wrapped and all(isinstance(m.get_base_layer(), dmquant.nn.QuantModule) for m in wrapped.values())
    unfused = _run(model, inputs)

    # float64 reference: every quantized weight decoded from its codes, plus scaling * B A where adapted
    ref = copy.deepcopy(fp).double()
    for name, layer in layers.items():
        ref.get_submodule(name).weight.data = layer.decoded_weight(torch.float64)
    for name, m in wrapped.items():
        ref.get_submodule(name).weight.data += m.get_delta_weight("a").double()
    expected = _run(ref, inputs, torch.float64)
    assert (unfused - base).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(unfused.double(), expected, rtol=1e-5, atol=1e-5)

    # fuse: the adapter goes into each layer's low-rank branch (the codes stay), and the plan says so
    codes = {n: li.weight_packed.clone() for n, li in layers.items()}
    for m in wrapped.values():
        m.merge()
    torch.testing.assert_close(_run(model, inputs).double(), expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(codes[n], li.weight_packed) for n, li in layers.items())
    name = next(iter(wrapped))
    assert wrapped[name].get_base_layer().lowrank.adapters == [("peft:a", 4)]
    assert model.dmquant_state.plan[name].lora == (("peft:a", 4),)
    for m in wrapped.values():
        m.unmerge()
    assert torch.equal(_run(model, inputs), unfused)
    assert all(m.get_base_layer().lowrank is None for m in wrapped.values())


def test_dora_adapter_is_refused_at_merge_not_dropped():
    model = build_tiny_pipeline("pixart").transformer.eval()
    dmquant.quantize(model, "w4a16")
    inject_adapter_in_model(LoraConfig(r=2, use_dora=True, target_modules=["to_q"]), model, adapter_name="d")
    layer = next(iter(_lora_layers(model).values()))
    with pytest.raises(ValueError, match="DoRA.*low-rank branch"):
        layer.merge()
    assert layer.get_base_layer().lowrank is None and not layer.merged


def _sd_lora(layers, names, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n in names:
        shape = layers[n].weight_shape
        sd[f"unet.{n}.lora_A.weight"] = torch.randn(2, *shape[1:], generator=g) * 0.2
        sd[f"unet.{n}.lora_B.weight"] = torch.randn(shape[0], 2, *[1] * (len(shape) - 2), generator=g) * 0.2
    return sd


def test_diffusers_load_lora_weights_swap_fuse_save_and_reload(tmp_path):
    """StableDiffusionPipeline.load_lora_weights on a quantized UNet (attention linears and a conv)."""
    pipe = build_tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet.eval()
    dmquant.quantize(pipe, "w4a16")
    layers = quant_layers(unet)
    names = [n for n in layers if n.endswith(("attn1.to_q", "attn2.to_v"))] + ["down_blocks.0.resnets.0.conv1"]
    g = torch.Generator().manual_seed(1)
    inputs = dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 5, unet.config.cross_attention_dim, generator=g))
    base = _run(unet, inputs)
    codes = {n: li.weight_packed.clone() for n, li in layers.items()}

    pipe.load_lora_weights(_sd_lora(layers, names, 0), adapter_name="a")
    pipe.load_lora_weights(_sd_lora(layers, names, 1), adapter_name="b")
    assert type(unet.get_submodule(names[-1])).__name__ == "DmquantConv2d"
    pipe.set_adapters("a", 0.7)
    out_a = _run(unet, inputs)
    pipe.set_adapters("b")
    out_b = _run(unet, inputs)
    pipe.set_adapters(["a", "b"], [0.7, 1.0])
    out_ab = _run(unet, inputs)
    assert (out_a - base).abs().max() > 1e-2 and (out_a - out_b).abs().max() > 1e-2
    assert min((out_ab - out_a).abs().max(), (out_ab - out_b).abs().max()) > 1e-2
    pipe.disable_lora()
    assert torch.equal(_run(unet, inputs), base)
    pipe.enable_lora()
    assert all(torch.equal(codes[n], li.weight_packed) for n, li in layers.items())  # swaps never re-quantize

    pipe.set_adapters("a", 0.7)
    pipe.fuse_lora(adapter_names=["a"])
    assert layers[names[0]].lowrank.adapters == [("peft:a", 2)]
    torch.testing.assert_close(_run(unet, inputs), out_a, rtol=1e-5, atol=1e-5)
    pipe.unfuse_lora()
    assert all(li.lowrank is None for li in layers.values())
    torch.testing.assert_close(_run(unet, inputs), out_a, rtol=1e-6, atol=1e-6)

    # unfused: the adapter is saved on its own, the quantized base without it; both load back
    type(pipe).save_lora_weights(tmp_path / "lora_a", unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="a"))
    pipe.save_pretrained(tmp_path / "with_adapters")
    with pytest.raises(ValueError, match="unfused LoRA adapters.*unload_lora"):
        DiffusionPipeline.from_pretrained(tmp_path / "with_adapters")
    pipe.unload_lora_weights()
    assert torch.equal(_run(unet, inputs), base)
    pipe.save_pretrained(tmp_path / "base")
    again = DiffusionPipeline.from_pretrained(tmp_path / "base")
    again.load_lora_weights(tmp_path / "lora_a", adapter_name="a")
    again.set_adapters("a", 0.7)
    torch.testing.assert_close(_run(again.unet, inputs), out_a, rtol=1e-5, atol=1e-5)

    # fused and unloaded: the adapter is part of the quantized model, in both save formats
    again.fuse_lora()
    again.unload_lora_weights()
    fused = _run(again.unet, inputs)
    torch.testing.assert_close(fused, out_a, rtol=1e-5, atol=1e-5)
    again.save_pretrained(tmp_path / "fused")
    third = DiffusionPipeline.from_pretrained(tmp_path / "fused")
    assert quant_layers(third.unet)[names[0]].lowrank.adapters == [("peft:a", 2)]
    torch.testing.assert_close(_run(third.unet, inputs), fused, rtol=1e-5, atol=1e-5)
    dmquant.save_quantized(again, tmp_path / "fused_dq")
    fourth = dmquant.load_quantized(tmp_path / "fused_dq")
    torch.testing.assert_close(_run(fourth.unet, inputs), fused, rtol=1e-5, atol=1e-5)
    third.set_progress_bar_config(disable=True)
    assert third("a red circle", num_inference_steps=2, output_type="pt").images.shape[0] == 1


def test_quantized_models_refuse_what_would_silently_turn_float(tmp_path):
    """LoRA loaded before quantize, unfused adapters at save_quantized, fuse_qkv_projections."""
    from peft import LoraConfig, inject_adapter_in_model

    import dmquant
    from dmquant.pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("pixart")
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), pipe.transformer)
    with pytest.raises(ValueError, match="unfused LoRA adapters"):
        dmquant.quantize(pipe, "w8a8")
    pipe = dmquant.quantize(build_tiny_pipeline("pixart"), "w8a8")
    with pytest.raises(ValueError, match="fuse before quantizing"):
        pipe.transformer.fuse_qkv_projections()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), pipe.transformer)
    with pytest.raises(ValueError, match="nothing was written"):
        dmquant.save_quantized(pipe, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_merging_goes_into_the_branch_without_importing_the_diffusers_layer():
    """`import dmquant` alone (no dmquant.pipelines): quantize registers the peft merge, so a merge
    lands in the low-rank branch instead of a decoded copy of the weight that would be discarded."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, torch
        from torch import nn
        import dmquant
        from peft import LoraConfig, inject_adapter_in_model
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))
        dmquant.quantize(model, dmquant.Recipe.from_dict({"name": "w", "weight": {"format": "int8"}, "exclude": []}))
        x = torch.randn(4, 32)
        model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), model)
        with torch.no_grad():
            unfused = model(x)
            model[0].merge()
            fused = model(x)
        assert "dmquant.pipelines" not in sys.modules
        assert model[0].base_layer.lowrank is not None, "merge did not reach the low-rank branch"
        assert torch.allclose(unfused, fused, atol=1e-5), (unfused - fused).abs().max()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
