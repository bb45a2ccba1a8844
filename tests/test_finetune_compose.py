"""Fine-tuning composed with a PTQ start (issue 20): `svdquant -> efficientdm` on a tiny pipeline.

The QALoRA adapters train on layers that carry a smoothing transform and an SVD low-rank branch (the
adapter sits inside the weight quantizer, on the int4 residual, in the smoothed input space), merge
into the int4 residual exactly, and leave a model of the same modules, shapes and bytes as
svdquant-w4a4 (the 16-bit branch and the smoothing untouched), which saves and loads bit for bit."""
import torch

import dmquant
from dmquant.config import Step
from dmquant.finetune import LowRankDelta
from dmquant.finetune import distill as distill_module
from dmquant.pipelines import load
from dmquant.state import quant_layers
from dmquant.steps import STEPS

CALIB = {"num_prompts": 2, "steps": 4, "timesteps": "all"}


def pipeline():
    torch.manual_seed(0)
    return load("tiny-pixart")


def composed(**args):
    base = dmquant.get_recipe("svdquant-efficientdm-w4a4")
    *ptq, ft = base.steps
    return base.replace(steps=(*ptq, Step(ft.name, {**ft.args, **args})))


def probe(pipe):
    d = pipe.transformer
    g = torch.Generator().manual_seed(5)
    kw = dict(hidden_states=torch.randn(1, d.config.in_channels, 8, 8, generator=g), timestep=torch.tensor([500]),
              encoder_hidden_states=torch.randn(1, 5, d.config.caption_channels, generator=g),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None})

    def run(model=d):
        with torch.no_grad():
            return model(**kw, return_dict=False)[0]
    return run


def test_recipe_composes_the_svdquant_start_with_efficientdm():
    r = dmquant.get_recipe("svdquant-efficientdm-w4a4")
    assert [s.name for s in r.steps] == ["smoothquant", "svd", "efficientdm"]
    assert r.steps[-1].args["lsq"] is False  # dynamic activations: no static step sizes to learn
    base = dmquant.get_recipe("svdquant-w4a4")
    assert [s.name for s in base.steps] == ["smoothquant", "svd"] and r.weight == base.weight and r.input == base.input


def test_efficientdm_on_svdquant_trains_through_branch_merges_and_keeps_the_format(monkeypatch, tmp_path):
    ptq = pipeline()
    dmquant.quantize(ptq, "svdquant-w4a4", calibration=CALIB)
    pipe = pipeline()
    run = probe(pipe)
    seen, pre_merge = {}, {}
    merge = distill_module.merge_adapters

    def checked_merge(adapters):
        seen["layers"] = [a.layer for a in adapters.values()]
        with distill_module.serving_adapters(adapters):
            pre_merge["out"] = run()
        merge(adapters)
    monkeypatch.setattr(distill_module, "merge_adapters", checked_merge)
    results = []
    original = STEPS["efficientdm"]
    monkeypatch.setitem(STEPS, "efficientdm", lambda *a, **k: results.append(original(*a, **k)) or results[-1])
    dmquant.quantize(pipe, composed(iters=12, batch_size=2), calibration=CALIB)
    (res,) = results
    # the adapters trained on layers with both a smoothing transform and an SVD branch, and helped
    both = [m for m in seen["layers"] if m.transform is not None and m.lowrank is not None]
    assert both and len(both) == len(seen["layers"]), (len(both), len(seen["layers"]))
    assert res.notes["lsq_scales"] == 0 and res.mse_after < res.mse_before, (res.mse_before, res.mse_after)
    assert torch.equal(run(), pre_merge["out"])  # the merge into the int4 residual is exact
    # same deployed format as svdquant-w4a4: modules, state keys, shapes, dtypes; branch and smoothing unchanged
    a, b = pipe.transformer.state_dict(), ptq.transformer.state_dict()
    assert set(a) == set(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    qa, qb = quant_layers(pipe.transformer), quant_layers(ptq.transformer)
    for name, m in qa.items():
        if m.lowrank is not None:
            assert qb[name].lowrank.rank == m.lowrank.rank
            for (ka, va), (_, vb) in zip(m.lowrank.state_dict().items(), qb[name].lowrank.state_dict().items()):
                assert torch.equal(va, vb), (name, ka)
    assert not any(isinstance(m, LowRankDelta) for m in pipe.transformer.modules())
    ra, rb = dmquant.report(pipe), dmquant.report(ptq)
    assert (ra.fp_bytes, ra.quant_bytes) == (rb.fp_bytes, rb.quant_bytes)
    dmquant.save_quantized(pipe, tmp_path / "ft")
    dmquant.save_quantized(ptq, tmp_path / "ptq")
    size = {d: sum(f.stat().st_size for f in (tmp_path / d).rglob("*.safetensors")) for d in ("ft", "ptq")}
    assert abs(size["ft"] - size["ptq"]) < 1024, size  # only metadata (the recipe) differs
    loaded = dmquant.load_quantized(tmp_path / "ft")
    assert torch.equal(run(loaded.transformer), run())
