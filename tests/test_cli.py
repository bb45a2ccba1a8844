"""The dmquant CLI end to end on a tiny pipeline, and its error exits."""
import json

from dmquant.cli import main
from dmquant.kernels.cpu import group_impl, onednn_available


def test_quantize_info_recipes(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--pipeline", "tiny-pixart", "--recipe", "w4a8", "--out", str(out)]) == 0
    assert json.loads((out / "quantization.json").read_text())["kind"] == "pipeline"
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "recipe=w4a8" in text and "W int4 / A int8" in text and "MB on disk" in text
    assert main(["info", str(out), "--kernels"]) == 0  # group-wise int4 on an int8 GEMM, or why not
    expected = {"vnni": "x W4A8 group-wise int8 GEMM (dmquant's AVX512-VNNI kernel, groups of 64)",
                "onednn": "x W4A8 int8 GEMM (oneDNN) one GEMM per 64 inputs"}[group_impl(64)]
    if group_impl(64) == "onednn" and not onednn_available():
        expected = "x simulated (group-wise weights need oneDNN"
    assert expected in capsys.readouterr().out
    assert main(["recipes"]) == 0 and "nvfp4" in capsys.readouterr().out


def test_static_recipe_calibrates_from_prompts(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "s"
    assert main(["quantize", "--pipeline", "tiny-sd", "--recipe", "w8a8-static", "--out", str(out),
                 "--calibration-prompts", str(prompts), "--steps", "2"]) == 0
    prov = json.loads((out / "quantization.json").read_text())["components"]["unet"]["parts"][""]["provenance"]
    assert prov["calibration"]["prompts"] == ["a red circle", "a blue square"]


def test_errors_exit_2(tmp_path, capsys):
    assert main(["quantize", "--pipeline", "tiny-pixart", "--recipe", "w3a3", "--out", str(tmp_path / "x")]) == 2
    assert "unknown recipe" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert main(["quantize", "--pipeline", "nobody/nothing", "--recipe", "w8a8", "--out", str(tmp_path / "y")]) == 2
    assert "never downloads" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_calibrate_reports_time_memory_and_trajectory(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["calibrate", "--pipeline", "tiny-sd", "--recipe", "w4a8-tsa", "--num-prompts", "2", "--steps", "3",
                 "--timesteps", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 denoiser calls at steps [0, 2]" in text and "peak memory" in text
    prov = json.loads((out / "quantization.json").read_text())["components"]["unet"]["parts"][""]["provenance"]
    assert prov["calibration"]["timesteps"] == "2" and len(prov["calibration"]["prompts"]) == 2
    assert main(["calibrate", "--pipeline", "tiny-sd", "--recipe", "w4a8-tsa", "--num-prompts", "3", "--steps", "3",
                 "--timesteps", "all", "--samples", "4", "--out", str(tmp_path / "s")]) == 0
    assert "4 denoiser calls at steps [0, 1, 2]" in capsys.readouterr().out  # single-prompt calls, 2 + 1 + 1
    prov = json.loads((tmp_path / "s" / "quantization.json").read_text())["components"]["unet"]["parts"][""]
    assert prov["provenance"]["calibration"]["calls_per_step"] == [2, 1, 1]
    assert main(["calibrate", "--pipeline", "tiny-sd", "--recipe", "w4a8-tsa", "--timesteps", "sometimes",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "timestep selection" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_device_dtype_and_guidance_reach_loading_calibration_and_sampling(tmp_path, monkeypatch, capsys):
    """--device / --dtype / --guidance-scale go end to end: the pipelines eval loads (FP, recipe, saved
    checkpoint) run in that dtype on that device, every sampling call gets the guidance scale, and
    calibration of a static recipe records its trajectory with it."""
    import torch

    from dmquant.eval import runner

    out = tmp_path / "q"
    assert main(["calibrate", "--pipeline", "tiny-pixart", "--recipe", "w8a8-static", "--num-prompts", "2",
                 "--steps", "2", "--dtype", "bfloat16", "--guidance-scale", "1.5", "--out", str(out)]) == 0
    part = json.loads((out / "quantization.json").read_text())["components"]["transformer"]["parts"][""]
    assert part["provenance"]["calibration"]["guidance_scale"] == 1.5
    calls = []
    real_generate = runner.generate

    def spy(pipe, prompts, **kwargs):
        calls.append((pipe.transformer.dtype, str(pipe.device), kwargs["guidance_scale"]))
        return real_generate(pipe, prompts, **kwargs)

    monkeypatch.setattr(runner, "generate", spy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a green cross\na blue square\n")
    assert main(["eval", "--pipeline", "tiny-pixart", "--recipe", "w8a8", "--quantized", str(out), "--prompts", str(prompts),
                 "--steps", "2", "--metrics", "psnr", "--device", "cpu", "--dtype", "bfloat16",
                 "--guidance-scale", "1.5", "--out", str(tmp_path / "ev")]) == 0
    assert len(calls) == 3 and set(calls) == {(torch.bfloat16, "cpu", 1.5)}  # FP, w8a8, the saved checkpoint
    meta = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert (meta["device"], meta["dtype"], meta["guidance_scale"]) == ("cpu", "bfloat16", 1.5)


def test_backend_flag_means_kernels_only_and_runtime_flags_fail_early(tmp_path, capsys):
    args = ["--pipeline", "miniature-pixart", "--recipe", "w8a8", "--num-prompts", "2", "--out", str(tmp_path / "e")]
    assert main(["eval", *args, "--backend", "quanto:int8"]) == 2
    assert "--peer quanto:int8" in capsys.readouterr().err
    assert main(["eval", *args, "--dtype", "float8"]) == 2
    assert "--dtype float8" in capsys.readouterr().err
    assert main(["quantize", "--pipeline", "tiny-pixart", "--recipe", "w8a8", "--out", str(tmp_path / "q"),
                 "--device", "nowhere"]) == 2
    assert "--device nowhere" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and not (tmp_path / "q").exists()
