"""No silent metrics: every requested metric is computed or the evaluation fails before it generates;
checkpoints of another model, FID below its sample floor and calibration on scored prompts are refused."""
import pytest

import dmquant
from dmquant.cli import main
from dmquant.eval import EvalConfig, evaluate, runner
from dmquant.eval.checks import check_checkpoint
from dmquant.eval.metrics.fid import MIN_SAMPLES
from dmquant.pipelines import calibration_prompts, load, miniature_prompts
from dmquant.pipelines.prompts import GENERIC_PROMPTS

PROMPTS = ["a red circle at the top", "a blue square", "a cyan cross in the center"]


@pytest.fixture
def no_generation(monkeypatch):
    """Any attempt to sample fails the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("generated samples before checking the request")

    monkeypatch.setattr(runner, "_generate_sharded", refuse)


@pytest.mark.parametrize("metrics,extra,message", [
    (("psnr", "clip"), {}, "CLIP score needs a local checkpoint"),
    (("psnr", "clip"), {"clip_checkpoint": "/nonexistent/clip.pt"}, "not found: /nonexistent/clip.pt"),
    (("lpips",), {"lpips_backbone": "/nonexistent/alex.pth"}, "LPIPS needs the torchvision alex backbone"),
    (("adherence",), {}, "adherence needs a miniature's judge"),
    (("vbench",), {}, "vbench scores videos; tiny-pixart makes images"),
    (("fid",), {}, f"refused below {MIN_SAMPLES}"),
    (("fid",), {}, "needs --fid-extractor"),
    (("fid",), {"fid_extractor": "inception", "inception_weights": "/nonexistent/i.pth"}, "Inception"),
])
def test_uncomputable_metrics_fail_before_generating(tmp_path, monkeypatch, no_generation, metrics, extra, message):
    monkeypatch.delenv("DMQUANT_CLIP_CHECKPOINT", raising=False)
    cfg = EvalConfig(pipeline="tiny-pixart", models=["w8a8"], prompts=PROMPTS, steps=2, metrics=metrics,
                     out=tmp_path / "ev", extra=extra)
    with pytest.raises(ValueError, match=message):
        evaluate(cfg)
    assert not (tmp_path / "ev").exists()


def test_cli_reports_the_missing_clip_checkpoint(tmp_path, monkeypatch, no_generation, capsys):
    monkeypatch.delenv("DMQUANT_CLIP_CHECKPOINT", raising=False)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    code = main(["eval", "--pipeline", "tiny-pixart", "--recipe", "w8a8", "--prompts", str(prompts),
                 "--metrics", "psnr,clip", "--out", str(tmp_path / "ev")])
    assert code == 2 and "CLIP score needs a local checkpoint" in capsys.readouterr().err


def _saved(tmp_path, pipeline):
    pipe = load(pipeline)
    dmquant.quantize(pipe, "w8a8")
    dmquant.save_quantized(pipe, tmp_path / pipeline)
    return tmp_path / pipeline


def test_checkpoint_of_another_model_is_refused(tmp_path, no_generation):
    pixart = _saved(tmp_path, "miniature-pixart")
    check_checkpoint("miniature-pixart", pixart)  # its own pipeline: accepted
    cfg = EvalConfig(pipeline="miniature-sd", models=[str(pixart)], prompts=miniature_prompts("miniature-sd", 4),
                     steps=2, metrics=("psnr",), out=tmp_path / "ev")
    with pytest.raises(ValueError, match="from a PixArtAlphaPipeline.*miniature-sd is a StableDiffusionPipeline"):
        evaluate(cfg)
    tiny = _saved(tmp_path, "tiny-pixart")
    with pytest.raises(ValueError, match="PixArtAlphaPipeline"):
        check_checkpoint("tiny-sd", tiny)
    (tmp_path / "other").mkdir()  # a local folder that is not where the checkpoint came from
    with pytest.raises(ValueError, match="quantized from .*miniature-pixart"):
        check_checkpoint(str(tmp_path / "other"), pixart)
    with pytest.raises(FileNotFoundError, match="not a saved dmquant directory"):
        check_checkpoint("miniature-sd", tmp_path / "other")


def test_calibration_prompts_are_disjoint_from_the_scored_ones():
    held_out = runner.calibration_prompts("miniature-sd", [], 8)
    scored = miniature_prompts("miniature-sd", 24) + held_out[:3]  # even when the first held-out ones are scored
    chosen = runner.calibration_prompts("miniature-sd", scored, 8)
    assert len(chosen) == 8 and not set(chosen) & set(scored)
    generic = runner.calibration_prompts("tiny-pixart", PROMPTS, 4)
    assert not set(generic) & set(PROMPTS)
    with pytest.raises(ValueError, match="disjoint from the 16 evaluation prompts"):
        runner.calibration_prompts("tiny-pixart", list(GENERIC_PROMPTS), 16)


@pytest.mark.parametrize("bad,message", [
    ("w4a4-nonexistent", "unknown recipe"),
    ("{tmp}/bad.yaml", "drop"),
    ("{tmp}/colon.yaml", "mapping values"),
])
def test_a_bad_recipe_fails_before_any_row_runs(tmp_path, no_generation, bad, message):
    """A typo in the last recipe of a list must not cost the runs before it."""
    (tmp_path / "bad.yaml").write_text("name: bad\nweight: {format: int4}\nsteps:\n"
                                       "  - {name: efficientdm, args: {drop: 1.5}}\n")
    (tmp_path / "colon.yaml").write_text("name: colon\ndescription: QDrop: p\nweight: {format: int4}\n")
    cfg = EvalConfig(pipeline="tiny-pixart", models=["w8a8", bad.format(tmp=tmp_path)], prompts=PROMPTS, steps=2,
                     metrics=("psnr",), out=tmp_path / "ev")
    with pytest.raises(ValueError, match=message):
        evaluate(cfg)


def test_a_recipe_is_calibrated_on_its_own_prompt_count(tmp_path, monkeypatch, no_generation):
    """Without --calib-prompts a recipe tuned on 5 calibration prompts is measured on 5 (others on 16);
    --calib-prompts wins; a count the held-out prompts cannot meet fails before any row runs."""
    (tmp_path / "five.yaml").write_text("name: five\nweight: {format: int8}\ncalibration: {num_prompts: 5}\n")
    (tmp_path / "many.yaml").write_text("name: many\nweight: {format: int8}\ncalibration: {num_prompts: 3000}\n")
    seen = []

    def spy(pipe, recipe, calibration):
        seen.append(calibration)
        return pipe

    monkeypatch.setattr(dmquant, "quantize", spy)
    monkeypatch.setattr(runner, "_load", lambda cfg: None)
    for extra in ({}, {"calib_prompts": 3}):
        cfg = EvalConfig(pipeline="miniature-sd", models=[], prompts=PROMPTS, steps=2, extra=extra)
        for model in (str(tmp_path / "five.yaml"), "w8a8"):
            runner._quantized_pipe(cfg, model)
    assert [c["num_prompts"] for c in seen] == [5, 16, 3, 3]
    assert all(c["exclude"] == PROMPTS for c in seen)  # the calibration set draws around the scored prompts
    assert not set(calibration_prompts("miniature-sd", 5, exclude=PROMPTS)) & set(PROMPTS)
    cfg = EvalConfig(pipeline="miniature-sd", models=["w8a8", str(tmp_path / "many.yaml")], prompts=PROMPTS,
                     steps=2, metrics=("psnr",), out=tmp_path / "ev")
    with pytest.raises(ValueError, match="disjoint"):
        evaluate(cfg)
