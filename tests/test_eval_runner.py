"""The evaluation harness: identical seeds, FP cache, other backends, multi-process sharding, prompt files."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dmquant.eval import EvalConfig, evaluate, load_prompts, runner

PROMPTS = ["a red circle at the top", "a blue square", "a cyan cross in the center"]


def config(tmp_path, models, metrics=("psnr", "ssim")):
    return EvalConfig(pipeline="tiny-pixart", models=models, prompts=PROMPTS, steps=2, metrics=metrics,
                      out=tmp_path / "ev")


def test_evaluate_writes_results_and_reuses_fp_cache(tmp_path, monkeypatch):
    rows = evaluate(config(tmp_path, ["w8a8", "w4a4"]))
    assert [r["name"] for r in rows] == ["FP", "w8a8", "w4a4"]
    assert rows[1]["psnr"] > rows[2]["psnr"] > 10 and 0 < rows[2]["ssim"] <= 1
    out = tmp_path / "ev"
    for f in ("metrics.json", "results.md", "grid.png", "report.html"):
        assert (out / f).is_file(), f
    assert json.loads((out / "metrics.json").read_text())["num_samples"] == 3
    loads = []
    real_load = runner.load
    monkeypatch.setattr(runner, "load", lambda name: loads.append(name) or real_load(name))
    again = evaluate(config(tmp_path, ["w8a8"]))
    assert len(loads) == 1  # only the quantized copy: FP samples came from the cache
    assert again[1]["psnr"] == rows[1]["psnr"]


def test_fp_cache_key_follows_the_weight_files(tmp_path):
    """Retrained weights in the same folder must not reuse FP samples of the old ones."""
    weights = tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"old")
    cfg = EvalConfig(pipeline=str(tmp_path / "pipe"), models=[], prompts=PROMPTS)
    before = cfg.key()
    assert cfg.key() == before
    weights.write_bytes(b"newer")
    assert cfg.key() != before


@pytest.mark.parametrize("backend,layers", [("quanto:int8", "40/40"), ("torchao:int8dq", "40/40"),
                                            ("torch:bf16", "all (cast)")])
def test_other_libraries_through_the_same_harness(tmp_path, backend, layers):
    """Like for like: the peers quantize exactly dmquant w8a8's 40 layers; every row has its bytes."""
    rows = evaluate(config(tmp_path, [backend, "w8a8"]))
    fp, peer, ours = rows
    assert peer["name"] == backend and peer["psnr"] > 20 and peer["layers"] == layers and ours["layers"] == "40"
    assert peer["psnr_ci"][0] <= peer["psnr"] <= peer["psnr_ci"][1]
    assert 0 < peer["model_mb"] < fp["model_mb"] and 0 < ours["model_mb"] < fp["model_mb"]
    if backend == "torch:bf16":
        assert peer["model_mb"] == pytest.approx(fp["model_mb"] / 2)


def test_peer_layer_sets_and_bytes_are_counted_not_assumed():
    from optimum import quanto
    from torch import nn

    from dmquant.eval.backends import apply_backend, module_bytes
    from dmquant.pipelines import load

    pipe = apply_backend(load("tiny-sd"), "torchao:int8dq")  # torchao has no Conv2d: the row says so
    assert pipe.backend_info["layers"] == "70/107" and pipe.backend_info["recipe"] == "w8a8"
    layer = nn.Sequential(nn.Linear(64, 32))
    quanto.quantize(layer, weights=quanto.qint8)
    quanto.freeze(layer)
    # int8 codes + fp32 per-channel scales + fp32 bias + quanto's two scalar activation scales
    assert module_bytes(layer) == 32 * 64 + 32 * 4 + 32 * 4 + 2 * 4


@pytest.mark.parametrize("spec,weight_type", [("diffusers:torchao-int8wo", "Int8Tensor"),
                                              ("diffusers:quanto-w8", "WeightQBytesTensor")])
def test_diffusers_native_peers_reload_the_denoiser_like_for_like(spec, weight_type):
    """diffusers' own quantization_config path (what a diffusers user runs), on the recipe's layers only."""
    from dmquant.eval.backends import apply_backend, module_bytes
    from dmquant.pipelines import load

    fp = load("tiny-pixart")
    fp_bytes = module_bytes(fp.transformer)
    x = torch.randn(1, fp.transformer.config.in_channels, 8, 8)
    kw = dict(encoder_hidden_states=torch.randn(1, 8, fp.transformer.caption_projection.linear_1.in_features),
              timestep=torch.tensor([500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        ref = fp.transformer(x, **kw).sample
    pipe = apply_backend(fp, spec)
    done, total = pipe.backend_info["layers"].split("/")
    assert done == total  # exactly the w8a8 recipe's Linear layers, nothing else (no "+N other")
    assert type(pipe.transformer.transformer_blocks[0].attn1.to_q.weight).__name__ == weight_type
    assert type(pipe.transformer.proj_out.weight) is torch.nn.Parameter  # kept in float like dmquant's w8a8
    assert pipe.backend_info["bytes"] < fp_bytes
    with torch.no_grad():
        out = pipe.transformer(x, **kw).sample
    assert 10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean()) > 30  # int8 weights: close to FP


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(config(tmp_path, ["w8a8"], metrics=("psnr", "vibes")))
    with pytest.raises(ValueError, match="unknown backend"):
        evaluate(config(tmp_path, ["quanto:int3"]))


@pytest.mark.slow
def test_two_processes_give_identical_numbers(tmp_path, accelerate_launch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    args = ["-m", "dmquant.cli", "eval", "--pipeline", "tiny-pixart", "--recipe", "w8a8", "--prompts", str(prompts),
            "--steps", "2", "--metrics", "psnr,ssim", "--batch-size", "1"]
    # Same float summation order in both runs: thread count changes BLAS reductions, not the sharding.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], check=True, capture_output=True, env=env)
    subprocess.run([*accelerate_launch(2), *args, "--out", str(tmp_path / "two")], check=True, capture_output=True, timeout=300,
                   env=env)
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text())["rows"] for d in ("one", "two"))
    assert one[1]["psnr"] == two[1]["psnr"] and one[1]["ssim"] == two[1]["ssim"]


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a\n\nb\n")
    (tmp_path / "p.json").write_text(json.dumps({"annotations": [{"caption": "x"}, {"caption": "y"}]}))
    (tmp_path / "p.csv").write_text("Prompt,Category\nhello,c\nworld,d\n")
    assert load_prompts(tmp_path / "p.txt") == ["a", "b"]
    assert load_prompts(tmp_path / "p.json") == ["x", "y"]
    assert load_prompts(tmp_path / "p.csv", limit=1) == ["hello"]
    assert len(load_prompts("miniature-sd", 5)) == 5
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "bad.json").write_text(json.dumps([{"nothing": 1}]))
    with pytest.raises(ValueError, match="caption"):
        load_prompts(tmp_path / "bad.json")
