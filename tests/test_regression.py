"""Quality regression gates on the trained miniatures, proof that they catch a degraded recipe, and
that each baseline's tolerance comes from a recorded measurement on both CPU float code paths."""
import json
from pathlib import Path

import pytest

from dmquant.cli import main
from dmquant.eval import assert_quality, check_baseline
from dmquant.eval.regression import DEFAULT_TOLERANCE, Check
from dmquant.eval.spread import gate_from_runs
from dmquant.recipes import get_recipe

BASELINES = sorted((Path(__file__).resolve().parents[1] / "baselines").glob("*.json"))


@pytest.mark.regression
@pytest.mark.parametrize("baseline", BASELINES, ids=lambda p: p.stem)
def test_builtin_recipes_hold_their_baselines(baseline):
    assert_quality(baseline)


@pytest.mark.parametrize("baseline", BASELINES, ids=lambda p: p.stem)
def test_baselines_record_how_their_tolerance_was_measured(baseline):
    """Near-lossless gates (PSNR >= 40 dB, where sampling chaos moves PSNR by dB between CPUs) carry a
    measured spread: reference = worst run, tolerance = max(floor, observed range), values on both float
    code paths. Every gate runs fake quantization (float math; no CPU int8 kernel with its 7-bit grid)
    and keeps per-prompt values for the paired interval in `regress`."""
    base = json.loads(baseline.read_text())
    assert get_recipe(base["model"]).backend == "fake"
    for gate in base["metrics"].values():
        assert len(gate["per_prompt"]) == len(base["prompts"])
    if base["metrics"]["psnr"]["value"] < 40:
        return
    assert {"command", "variants", "rule", "cpu"} <= set(base["spread_measured"])
    for key, gate in base["metrics"].items():
        assert {"avx2", "default"} <= set(gate["paths"])
        spread = gate["spread"]
        assert spread["runs"] >= 4 and spread["min"] <= gate["value"] <= spread["max"]
        assert gate["tolerance"] >= max(DEFAULT_TOLERANCE[key], spread["max"] - spread["min"]) - 1e-3


def test_gate_from_runs_takes_the_worst_value_and_the_range():
    runs = [{"variant": v, "metrics": {"psnr": p, "lpips": d, "per_prompt": {"psnr": [p], "lpips": [d]}}}
            for v, p, d in (("avx2", 50.0, 0.01), ("default", 48.5, 0.03), ("avx2+ulp0", 51.2, 0.02))]
    gates = gate_from_runs(runs, {"psnr": {}, "lpips": {}}, {"psnr": 1.0, "lpips": 0.05},
                           {"psnr": "higher", "lpips": "lower"})
    assert gates["psnr"]["value"] == 48.5 and gates["psnr"]["tolerance"] == pytest.approx(2.7)
    assert gates["psnr"]["paths"] == {"avx2": 50.0, "default": 48.5}
    assert gates["lpips"]["value"] == 0.03 and gates["lpips"]["tolerance"] == 0.05  # the floor
    assert gates["psnr"]["per_prompt"] == [50.0]  # the first (recording) path's prompts


def test_a_check_fails_only_beyond_tolerance_and_where_the_interval_separates_it():
    assert Check("psnr", 50.0, 48.0, 1.0, "higher", (-3.0, -1.0)).ok is False
    assert "worse [" in str(Check("psnr", 50.0, 48.0, 1.0, "higher", (-3.0, -1.0)))
    unclear = Check("psnr", 50.0, 48.0, 1.0, "higher", (-3.0, 0.5))
    assert unclear.ok and "no separable difference" in str(unclear)
    assert Check("psnr", 50.0, 48.0, 1.0, "higher").ok is False  # no per-prompt record: tolerance alone
    assert Check("lpips", 0.02, 0.05, 0.01, "lower", (0.01, 0.04)).ok is False
    assert Check("psnr", 50.0, 49.5, 1.0, "higher", (-3.0, -1.0)).ok  # within tolerance


@pytest.mark.regression
def test_degraded_recipe_fails_with_a_readable_diff(tmp_path):
    w8 = next(b for b in BASELINES if b.stem == "miniature-pixart-w8a8")
    degraded = tmp_path / "w2.yaml"
    degraded.write_text("name: w2a8\nweight: {format: int2, granularity: channel}\n"
                        "input: {format: int8, granularity: token, dynamic: true}\n")
    with pytest.raises(AssertionError, match=r"FAIL psnr .*worse \["):
        assert_quality(w8, model=str(degraded))
    checks = check_baseline(w8, model="w4a4")
    assert not all(c.ok for c in checks)


@pytest.mark.regression
def test_regress_cli_exit_codes(tmp_path, capsys):
    w8 = next(b for b in BASELINES if b.stem == "miniature-pixart-w8a8")
    assert main(["regress", "--baseline", str(w8)]) == 0
    assert "ok   psnr" in capsys.readouterr().out
    copy = tmp_path / "b.json"
    copy.write_text(w8.read_text().replace('"model": "w8a8"', '"model": "w4a4"'))
    assert main(["regress", "--baseline", str(copy)]) == 1
    assert main(["regress", "--baseline", str(copy), "--update"]) == 0
    assert "spread_measured" not in json.loads(copy.read_text())  # the old measurement no longer applies
    assert main(["regress", "--baseline", str(copy)]) == 0  # the deliberate update is the new reference
