"""Data-free fine-tuning against the FP teacher (EfficientDM, QuEST, QVGen steps) on tiny pipelines:
the distillation lowers the output error, the QALoRA merge is exact and leaves a plain quantized model
(save/load bit-for-bit), QuEST leaves unselected layers untouched, QVGen's branch decays to rank 0, and
an interrupted run resumed from its checkpoint ends exactly where the uninterrupted one does."""
import math

import pytest
import torch

import dmquant
from dmquant.config import Step
from dmquant.finetune import LowRankDelta
from dmquant.finetune import distill as distill_module
from dmquant.finetune.qvgen import decay_ranks
from dmquant.pipelines import load
from dmquant.state import quant_layers
from dmquant.steps import STEPS

CALIB = {"num_prompts": 2, "steps": 4, "timesteps": "all"}


def pipeline(name):
    torch.manual_seed(0)
    return load(name)


def recipe(name, **args):
    """`name`'s fine-tuning step with `args`; the per-call objective unless `args` say otherwise (the
    shipped efficientdm-w4a4 trains through the sampler, tested in its own test)."""
    base = dmquant.get_recipe(name)
    ranges, step = base.steps
    return base.replace(steps=(ranges, Step(step.name, {**step.args, "objective": "call", **args})))


def recording(monkeypatch, step):
    results = []
    original = STEPS[step]
    monkeypatch.setitem(STEPS, step, lambda *a, **k: results.append(original(*a, **k)) or results[-1])
    return results


def probe(pipe):
    """A fixed denoiser call (its timestep sets the noise level the per-timestep scales key on)."""
    d = pipe.transformer
    g = torch.Generator().manual_seed(5)
    shape = (1, d.config.in_channels, *((3,) if d.config.get("video_length") else ()), 8, 8)
    kw = dict(hidden_states=torch.randn(*shape, generator=g), timestep=torch.tensor([500]),
              encoder_hidden_states=torch.randn(1, 5, d.config.caption_channels, generator=g))
    if "added_cond_kwargs" in d.forward.__code__.co_varnames:
        kw["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}

    def run(model=d):
        with torch.no_grad():
            return model(**kw, return_dict=False)[0]
    return run


def crash_at(monkeypatch, crash_step):
    """Interrupt the training loop when it draws the batch of `crash_step`; returns the real drawer."""
    batch = distill_module._batch

    def crashing(seed, step, n, size):
        if step == crash_step:
            raise KeyboardInterrupt
        return batch(seed, step, n, size)
    monkeypatch.setattr(distill_module, "_batch", crashing)
    return batch


def resumed_after_a_crash(monkeypatch, args, calibration):
    """tiny-pixart fine-tuned with `args` (which name a checkpoint), interrupted at step 3, then a fresh
    copy resumed from the checkpoint to the end."""
    batch = crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        dmquant.quantize(pipeline("tiny-pixart"), recipe("efficientdm-w4a4", **args), calibration=calibration)
    monkeypatch.setattr(distill_module, "_batch", batch)
    resumed = pipeline("tiny-pixart")
    dmquant.quantize(resumed, recipe("efficientdm-w4a4", **args, resume=True), calibration=calibration)
    return resumed


def test_efficientdm_distils_merges_exactly_and_saves(monkeypatch, tmp_path):
    pipe = pipeline("tiny-pixart")
    run = probe(pipe)
    ptq = pipeline("tiny-pixart")
    dmquant.quantize(ptq, dmquant.get_recipe("w4a4-static"), calibration=CALIB)
    pre_merge = {}
    merge = distill_module.merge_adapters

    def checked_merge(adapters):  # the quantized forward with the adapters still served, then the merge
        with distill_module.serving_adapters(adapters):
            pre_merge["out"] = run()
        merge(adapters)
    monkeypatch.setattr(distill_module, "merge_adapters", checked_merge)
    results = recording(monkeypatch, "efficientdm")
    # lsq_lr: the recipe's 3e-2 is tuned for 400 steps on the miniature; 16 steps on random weights take 1e-3
    dmquant.quantize(pipe, recipe("efficientdm-w4a4", iters=16, batch_size=2, lsq_lr=1e-3), calibration=CALIB)
    (res,) = results
    # bit-for-bit: the merged float weight is the very tensor the quantizer saw, scales unchanged
    assert torch.equal(run(), pre_merge["out"])
    assert res.mse_after < 0.7 * res.mse_before, (res.mse_before, res.mse_after)  # measured ~0.4
    layers = quant_layers(pipe.transformer)
    lora = sum(m.weight.shape[0] * 8 + 8 * m.weight[0].numel() for m in layers.values() if m.weight_quantizer)
    scales = sum(m.input_quantizer.scale.numel() for m in layers.values() if m.input_quantizer is not None)
    assert res.trainable_params == lora + scales and res.notes["lsq_scales"] > 0 and res.peak_memory_mb > 0
    # a plain quantized model: same modules and state as PTQ alone, nothing left trainable or served
    assert not any(isinstance(m, LowRankDelta) for m in pipe.transformer.modules())
    assert set(pipe.transformer.state_dict()) == set(ptq.transformer.state_dict())
    assert all(m.lowrank is None and "quantized_weight" not in m.__dict__ for m in layers.values())
    assert all(p.requires_grad for p in pipe.transformer.parameters())  # freezing undone
    with torch.no_grad():
        for name, m in layers.items():
            assert torch.equal(m.weight_quantizer(m.weight), m.quantized_weight()), name
    dmquant.save_quantized(pipe, tmp_path / "q")
    loaded = dmquant.load_quantized(tmp_path / "q")
    assert torch.equal(run(loaded.transformer), run())


def test_quest_trains_only_temporal_and_sensitive_layers(monkeypatch):
    pipe, ptq = pipeline("tiny-pixart"), pipeline("tiny-pixart")
    base = dmquant.get_recipe("quest-w4a4")
    dmquant.quantize(ptq, base.replace(steps=base.steps[:1]), calibration=CALIB)
    results = recording(monkeypatch, "quest")
    dmquant.quantize(pipe, recipe("quest-w4a4", iters=6, top=0.2), calibration=CALIB)
    (res,) = results
    temporal, sensitive = res.notes["temporal"], res.notes["sensitive"]
    assert temporal and all("adaln_single" in n for n in temporal)
    others = [n for n in quant_layers(pipe.transformer) if n not in temporal]
    assert len(sensitive) == round(0.2 * len(others)) and list(sensitive.values()) == sorted(sensitive.values())[::-1]
    trained = set(temporal) | set(sensitive)
    ptq_layers = quant_layers(ptq.transformer)
    with torch.no_grad():
        for name, layer in quant_layers(pipe.transformer).items():
            same_w = torch.equal(layer.quantized_weight(), ptq_layers[name].quantized_weight())
            same_s = torch.equal(layer.input_quantizer.scale, ptq_layers[name].input_quantizer.scale)
            assert (same_w and same_s) != (name in trained), name  # the rest is frozen at its PTQ state
    assert res.mse_after < res.mse_before


def test_qvgen_decays_the_auxiliary_branch_to_rank_zero(monkeypatch):
    assert decay_ranks(8, 0.5) == [8, 4, 2, 1, 0] and decay_ranks(3, 0.9) == [3, 2, 1, 0]
    pipe = pipeline("tiny-latte")
    results = recording(monkeypatch, "qvgen")
    dmquant.quantize(pipe, recipe("qvgen-w4a4", iters=10, aux_rank=4), calibration=CALIB)
    (res,) = results
    cuts = res.notes["rank_cuts"]
    assert [r for _, r in cuts] == [4, 2, 1, 0] and cuts[-1][0] < 10  # the last stage trains without it
    assert not any(isinstance(m, LowRankDelta) for m in pipe.transformer.modules())
    layers = quant_layers(pipe.transformer).values()
    assert all(m.lowrank is None and "quantized_weight" not in m.__dict__ for m in layers)
    assert res.mse_after < res.mse_before


def test_cosine_lr_factor_follows_the_formula():
    iters = 10
    for step in range(iters + 1):
        expected = 0.5 * (1 + math.cos(math.pi * step / iters))
        assert distill_module.lr_factor("cosine", step, iters) == pytest.approx(expected, abs=1e-15)
        assert distill_module.lr_factor("constant", step, iters) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        dmquant.quantize(pipeline("tiny-pixart"), recipe("efficientdm-w4a4", iters=1, lr_schedule="linear"),
                         calibration=CALIB)


def test_resume_continues_identically(monkeypatch, tmp_path):
    """qvgen with a cosine learning rate and QDrop: a checkpoint between two rank cuts; the resumed run
    redraws the same batches and drop masks and continues the same learning-rate curve (the loaded
    optimizer state holds the decayed rate of its last step, which the schedule overrides)."""
    r = recipe("qvgen-w4a4", iters=8, aux_rank=2, batch_size=2, lr_schedule="cosine", drop=0.25)
    full = pipeline("tiny-pixart")
    dmquant.quantize(full, r, calibration=CALIB)
    interrupted = pipeline("tiny-pixart")
    floats = {n: p.detach().clone() for n, p in interrupted.transformer.named_parameters()}
    batch = crash_at(monkeypatch, 5)
    ckpt = {"checkpoint": str(tmp_path / "ckpt"), "checkpoint_every": 2}
    with pytest.raises(KeyboardInterrupt):
        dmquant.quantize(interrupted, recipe("qvgen-w4a4", iters=8, aux_rank=2, batch_size=2,
                                             lr_schedule="cosine", drop=0.25, **ckpt), calibration=CALIB)
    assert all(torch.equal(p, floats[n]) for n, p in interrupted.transformer.named_parameters())  # untouched
    assert (tmp_path / "ckpt" / "qvgen.safetensors").is_file()
    monkeypatch.setattr(distill_module, "_batch", batch)
    results = recording(monkeypatch, "qvgen")
    lrs, adam_step = [], torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a: lrs.append(self.param_groups[0]["lr"])
                        or adam_step(self, *a))
    resumed = pipeline("tiny-pixart")
    dmquant.quantize(resumed, recipe("qvgen-w4a4", iters=8, aux_rank=2, batch_size=2, resume=True, drop=0.25,
                                     lr_schedule="cosine", **ckpt), calibration=CALIB)
    assert results[0].start == 4 and len(results[0].losses) == 4
    base = dmquant.get_recipe("qvgen-w4a4").steps[1].args.get("lr", 1e-3)
    assert lrs == pytest.approx([base * 0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(4, 8)], rel=1e-12)
    assert torch.equal(probe(resumed)(), probe(full)())
    with pytest.raises(ValueError, match="another run"):
        dmquant.quantize(pipeline("tiny-pixart"), recipe("qvgen-w4a4", iters=8, aux_rank=2, seed=1, resume=True,
                                                          lr_schedule="cosine", drop=0.25, **ckpt), calibration=CALIB)


def test_fine_tuning_needs_ranges_for_lsq_and_a_trajectory():
    with pytest.raises(ValueError, match="ranges"):
        r = dmquant.get_recipe("efficientdm-w4a4")
        dmquant.quantize(pipeline("tiny-pixart"), r.replace(steps=r.steps[1:]), calibration=CALIB)
    bare = dmquant.get_recipe("efficientdm-w4a4").replace(steps=(Step("efficientdm", {"iters": 1, "lsq": False}),))
    with pytest.raises(ValueError, match="trajectory"):
        dmquant.quantize(pipeline("tiny-pixart").transformer, bare, calibration=lambda m: None)


def _worker(tmp_path, name, *extra, launch=None):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    worker = str(Path(__file__).with_name("distill_worker.py"))
    out = str(tmp_path / f"{name}.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*(launch or [sys.executable]), worker, out, *extra]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600, env=env)
    return load_file(out)["y"]


def test_two_processes_train_like_one_and_bf16_autocast_runs(tmp_path, accelerate_launch):
    """accelerate: two processes split each batch (of calls, or with objective: sample of prompts) and sum
    gradients, so they train the same model as one process (up to float summation order); bf16 autocast
    trains a nearby model."""
    one = _worker(tmp_path, "one")
    two = _worker(tmp_path, "two", launch=accelerate_launch(2))
    assert torch.allclose(one, two, rtol=1e-4, atol=1e-5 * float(one.abs().max()))
    # objective: sample: each process samples its share of the step's prompts
    one, two = _worker(tmp_path, "one_s", "no", "sample"), _worker(tmp_path, "two_s", "no", "sample",
                                                                   launch=accelerate_launch(2))
    assert torch.allclose(one, two, rtol=1e-4, atol=1e-5 * float(one.abs().max()))
    bf16 = _worker(tmp_path, "bf16", "bf16")
    assert torch.isfinite(bf16).all() and not torch.equal(bf16, one)
    assert (bf16 - one).abs().max() < 0.1 * one.abs().max()


def test_student_trajectory_resamples_with_the_quantized_model(monkeypatch, tmp_path):
    """trajectory: student trains on the calls the quantized model meets when it samples itself,
    re-sampled every refresh_every steps: the first step's latents are the seeds' noise (as in the float
    trajectory), later ones drift; a resumed run re-samples where the uninterrupted one did."""
    from dmquant.finetune import qalora

    drawn = []
    original = qalora.distill_adapters

    def spy(*args, **kwargs):
        float_calls, resample = args[1], args[-1]

        def watched():
            drawn.append(resample())
            return drawn[-1]
        drawn.append(float_calls)
        return original(*args[:-1], watched, **kwargs)
    monkeypatch.setattr(qalora, "distill_adapters", spy)
    args = dict(iters=6, batch_size=2, lsq_lr=1e-3, trajectory="student", refresh_every=2, checkpoint_every=2)
    full = pipeline("tiny-pixart")
    results = recording(monkeypatch, "efficientdm")
    dmquant.quantize(full, recipe("efficientdm-w4a4", **args), calibration=CALIB)
    float_calls, *student = drawn
    assert len(student) == 3  # steps 0, 2, 4

    def latents(calls, step):
        return torch.cat([c.kwargs["hidden_states"] for c in calls if c.step == step])
    for calls in student:
        assert len(calls) == len(float_calls)
        assert torch.equal(latents(calls, 0), latents(float_calls, 0))
        assert not torch.equal(latents(calls, 3), latents(float_calls, 3))
    assert not torch.equal(latents(student[0], 3), latents(student[2], 3))  # the student changed meanwhile
    assert results[0].mse_after < results[0].mse_before

    resumed = resumed_after_a_crash(monkeypatch, {**args, "checkpoint": str(tmp_path / "ckpt")}, CALIB)
    assert results[-1].start == 2
    assert torch.equal(probe(resumed)(), probe(full)())
    with pytest.raises(ValueError, match="refresh_every"):
        dmquant.quantize(pipeline("tiny-pixart"), recipe("efficientdm-w4a4", trajectory="student", refresh_every=3),
                         calibration=CALIB)


def test_qdrop_mixes_quantized_and_float_elements_reproducibly():
    """QDrop's hook: inside a training call every element is either its float input or its quantized
    value, the float share is p within a binomial bound, the mask is a function of (seed, step, call)
    alone, and outside a call (evaluation, the merged model) the quantizer quantizes everything."""
    from dmquant.config import QuantSpec
    from dmquant.finetune.qdrop import QDrop
    from dmquant.nn.quantizer import TensorQuantizer

    q = TensorQuantizer(QuantSpec("int4", "token", dynamic=True))
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    quantized = q(x)
    differ = quantized != x
    for p in (0.25, 0.5):
        drop = QDrop([q], p, seed=3)
        with drop.call(step=7, index=2):
            mixed = q(x)
        with drop.call(step=7, index=2):
            again = q(x)
        with drop.call(step=7, index=3):
            other = q(x)
        assert torch.equal(q(x), quantized)  # outside a call
        drop.remove()
        assert torch.equal(mixed, again) and not torch.equal(mixed, other)
        is_float, is_quant = mixed == x, mixed == quantized
        assert bool((is_float | is_quant).all())
        n = int(differ.sum())
        share = float((is_float & differ).sum()) / n
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n), (p, share)
    assert not q._forward_hooks  # removed
    none = QDrop([q], 0.0, seed=3)
    with none.call(0, 0):
        assert torch.equal(q(x), quantized)  # p = 0: no hooks at all


def test_efficientdm_with_qdrop_trains_and_leaves_a_fully_quantized_model(monkeypatch):
    """drop: 0.5 trains (output error down), the before/after figures and the merged model quantize every
    activation (no hook left behind), and an out-of-range probability is refused."""
    from dmquant.nn.quantizer import TensorQuantizer

    pipe = pipeline("tiny-pixart")
    results = recording(monkeypatch, "efficientdm")
    dmquant.quantize(pipe, recipe("efficientdm-w4a4", iters=16, batch_size=2, lsq_lr=1e-3, drop=0.5),
                     calibration=CALIB)
    (res,) = results
    assert res.mse_after < 0.8 * res.mse_before, (res.mse_before, res.mse_after)
    assert not any(m._forward_hooks for m in pipe.transformer.modules() if isinstance(m, TensorQuantizer))
    plain = pipeline("tiny-pixart")
    dmquant.quantize(plain, recipe("efficientdm-w4a4", iters=16, batch_size=2, lsq_lr=1e-3), calibration=CALIB)
    assert not torch.equal(probe(pipe)(), probe(plain)())  # the drop changed what was trained
    with pytest.raises(ValueError, match="drop"):
        dmquant.quantize(pipeline("tiny-pixart"), recipe("efficientdm-w4a4", iters=1, drop=1.0), calibration=CALIB)


def test_guided_loss_is_the_error_of_the_guided_prediction(monkeypatch):
    """guidance: s makes the loss the MSE of u + s (c - u) over each call's [unconditional; conditional]
    halves: its first step's loss and the before figure equal that formula computed here in float64 from
    the float and the PTQ model; training lowers it; calls not batched that way, and scales that batch
    nothing, are refused."""
    from dmquant.algorithms.hooks import output_tensors
    from dmquant.finetune import qalora
    from dmquant.nn.switch import quantization_disabled

    seen = {}
    original = qalora.distill_adapters

    def spy(denoiser, calls, *args, **kwargs):
        with torch.no_grad():
            outs = [[output_tensors(denoiser(**c.kwargs))[0].double() for c in calls]]
            with quantization_disabled(denoiser):
                outs.append([output_tensors(denoiser(**c.kwargs))[0].double() for c in calls])
        seen.update(calls=calls, ptq=outs[0], fp=outs[1])
        return original(denoiser, calls, *args, **kwargs)
    monkeypatch.setattr(qalora, "distill_adapters", spy)
    results = recording(monkeypatch, "efficientdm")
    args = dict(iters=16, batch_size=2, lsq_lr=1e-3, guidance=3.0)
    dmquant.quantize(pipeline("tiny-pixart"), recipe("efficientdm-w4a4", **args), calibration=CALIB)
    (res,) = results

    def guided_mse(i):
        (qu, qc), (fu, fc) = seen["ptq"][i].chunk(2), seen["fp"][i].chunk(2)
        return float(((qu + 3.0 * (qc - qu)) - (fu + 3.0 * (fc - fu))).pow(2).mean())
    n = len(seen["calls"])
    assert all(c.kwargs["hidden_states"].shape[0] == 2 * CALIB["num_prompts"] for c in seen["calls"])
    first = distill_module._batch(0, 0, n, 2)
    assert res.losses[0] == pytest.approx(sum(map(guided_mse, first)) / 2, rel=1e-4)
    held = torch.linspace(0, n - 1, min(16, n)).round().long().unique().tolist()
    assert res.mse_before == pytest.approx(sum(map(guided_mse, held)) / len(held), rel=1e-4)
    per_half = sum(float((seen["ptq"][i] - seen["fp"][i]).pow(2).mean()) for i in held) / len(held)
    assert res.mse_before > per_half  # the guided error is another (larger) figure than the halves'
    assert res.mse_after < 0.8 * res.mse_before, (res.mse_before, res.mse_after)

    with pytest.raises(ValueError, match="unconditional"):  # no guidance: one half per prompt, halves differ
        dmquant.quantize(pipeline("tiny-pixart"), recipe("efficientdm-w4a4", **args),
                         calibration={**CALIB, "guidance_scale": 1.0})
    with pytest.raises(ValueError, match="guidance"):
        dmquant.quantize(pipeline("tiny-pixart"), recipe("efficientdm-w4a4", iters=1, guidance=1.0), calibration=CALIB)


def test_sample_objective_trains_the_final_latents_of_whole_sampling_runs(monkeypatch, tmp_path):
    """objective: sample: a step's loss is the final-latent MSE between the quantized and the float
    pipeline sampling the drawn calibration prompts from the same fresh noise, computed here with the
    stock pipeline call on an independent PTQ and float copy; training lowers it; the pipeline's modules
    collect no gradient and are left as they were; a resumed run ends where the uninterrupted one does."""
    from dmquant.pipelines import calibration_prompts
    from dmquant.pipelines.generate import call_defaults

    args = dict(iters=6, batch_size=2, lsq_lr=1e-3, objective="sample")
    calib = {**CALIB, "timesteps": "uniform:2"}
    results = recording(monkeypatch, "efficientdm")
    trained = pipeline("tiny-pixart")
    grads = {id(p): p.requires_grad for p in trained.text_encoder.parameters()}
    dmquant.quantize(trained, recipe("efficientdm-w4a4", **args), calibration=calib)
    (res,) = results
    assert {id(p): p.requires_grad for p in trained.text_encoder.parameters()} == grads
    assert all(p.grad is None for p in trained.text_encoder.parameters())

    fp, ptq = pipeline("tiny-pixart"), pipeline("tiny-pixart")
    dmquant.quantize(ptq, dmquant.get_recipe("w4a4-static"), calibration=calib)
    prompts = calibration_prompts(fp, CALIB["num_prompts"])

    def final_latents(pipe, step):
        batch = distill_module._batch(0, step, len(prompts), 2) if step >= 0 else list(range(len(prompts)))
        seeds = [2_000_000 + step * 1_000 + j for j in range(2)]  # step -1: the before / after figure's noise
        with torch.no_grad():
            return pipe(prompt=[prompts[i] for i in batch], generator=[torch.Generator().manual_seed(s) for s in seeds],
                        **call_defaults(pipe), num_inference_steps=CALIB["steps"], guidance_scale=4.0,
                        output_type="latent")[0].double()

    def error(pipe, step):
        return float((final_latents(pipe, step) - final_latents(fp, step)).pow(2).flatten(1).mean(1).mean())
    assert res.losses[0] == pytest.approx(error(ptq, 0), rel=1e-4)
    assert error(trained, 0) < 0.8 * error(ptq, 0), (error(trained, 0), error(ptq, 0))
    assert (res.mse_before, res.mse_after) == pytest.approx((error(ptq, -1), error(trained, -1)), rel=1e-4)
    assert res.mse_after < res.mse_before

    resumed = resumed_after_a_crash(monkeypatch, {**args, "checkpoint": str(tmp_path / "ckpt"),
                                                  "checkpoint_every": 2}, calib)
    assert results[-1].start == 2 and torch.equal(probe(resumed)(), probe(trained)())
    for bad in ({"guidance": 4.0}, {"trajectory": "student"}, {"objective": "images"}):
        with pytest.raises(ValueError, match="objective"):
            dmquant.quantize(pipeline("tiny-pixart"), recipe("efficientdm-w4a4", **{**args, **bad}), calibration=calib)


def test_a_diverging_fine_tuning_fails_loudly(monkeypatch):
    """A NaN loss stops the run with a clear error instead of merging NaN into the weights; a step whose
    backward overflows (finite loss, non-finite gradient) is skipped, and so many of them are an error."""
    guided = distill_module.guided
    monkeypatch.setattr(distill_module, "guided", lambda out, scale: out * float("nan"))
    with pytest.raises(FloatingPointError, match="diverged"):
        dmquant.quantize(pipeline("tiny-pixart"), recipe("efficientdm-w4a4", iters=2, batch_size=2), calibration=CALIB)

    injected = []

    def overflowing(out, scale, steps=1):  # sqrt at 0: forward 0, backward inf; in the first `steps` steps only
        if torch.is_grad_enabled() and len(injected) < 2 * steps:  # 2 calls a step: output and target
            injected.append(1)
            out = out + torch.sqrt(out - out.detach())
        return guided(out, scale)
    monkeypatch.setattr(distill_module, "guided", overflowing)
    results = recording(monkeypatch, "efficientdm")
    dmquant.quantize(pipeline("tiny-pixart"), recipe("efficientdm-w4a4", iters=8, batch_size=1, lsq_lr=1e-3),
                     calibration=CALIB)
    (res,) = results
    assert res.notes["skipped_steps"] == [0] and all(map(math.isfinite, res.losses))
    assert res.mse_after < res.mse_before
    injected.clear()
    monkeypatch.setattr(distill_module, "guided", lambda out, scale: overflowing(out, scale, steps=10**6))
    with pytest.raises(FloatingPointError, match="non-finite gradients at 11"):
        dmquant.quantize(pipeline("tiny-pixart"), recipe("efficientdm-w4a4", iters=12, batch_size=1), calibration=CALIB)


def test_a_fine_tuning_that_ends_worse_than_its_start_says_so(monkeypatch, caplog):
    """Finite losses all along but a model further from float than the PTQ start (a far too large rate):
    no error fires, so the run warns and notes it rather than handing back a worse model silently."""
    results = recording(monkeypatch, "efficientdm")
    with caplog.at_level("WARNING", logger="dmquant.finetune.distill"):
        dmquant.quantize(pipeline("tiny-pixart"), recipe("efficientdm-w4a4", iters=4, batch_size=1, lr=3.0,
                                                         lsq=False), calibration=CALIB)
    (res,) = results
    assert res.mse_after > res.mse_before and res.notes["worse_than_start"]
    assert "further from the float one than its start" in caplog.text


def test_learnt_step_sizes_stop_at_a_thousandth_of_their_calibrated_value():
    """LSQ may drive a step size towards zero (where its gradient is 0 x inf): a huge rate pushes rows
    to the floor, 1e-3 of the calibrated value, and the model stays finite."""
    from dmquant.finetune.distill import SCALE_FLOOR
    from dmquant.observe import static_quantizers

    ptq, tuned = pipeline("tiny-pixart"), pipeline("tiny-pixart")
    dmquant.quantize(ptq, dmquant.get_recipe("w4a4-static"), calibration=CALIB)
    dmquant.quantize(tuned, recipe("efficientdm-w4a4", iters=6, batch_size=1, lsq_lr=30.0), calibration=CALIB)
    calibrated = {q.name: q.scale for q in static_quantizers(ptq.transformer)}
    ratios = torch.cat([(q.scale / calibrated[q.name]).flatten() for q in static_quantizers(tuned.transformer)])
    assert float(ratios.min()) == pytest.approx(SCALE_FLOOR, rel=1e-5)
    assert bool(torch.isfinite(probe(tuned)()).all())
