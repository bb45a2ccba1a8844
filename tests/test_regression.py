"""Quality regression gates on the trained miniatures, and proof that they catch a degraded recipe."""
from pathlib import Path

import pytest

from dmquant.cli import main
from dmquant.eval import assert_quality, check_baseline

BASELINES = sorted((Path(__file__).resolve().parents[1] / "baselines").glob("*.json"))


@pytest.mark.parametrize("baseline", BASELINES, ids=lambda p: p.stem)
def test_builtin_recipes_hold_their_baselines(baseline):
    assert_quality(baseline)


def test_degraded_recipe_fails_with_a_readable_diff(tmp_path):
    w8 = next(b for b in BASELINES if b.stem == "miniature-pixart-w8a8")
    degraded = tmp_path / "w2.yaml"
    degraded.write_text("name: w2a8\nweight: {format: int2, granularity: channel}\n"
                        "input: {format: int8, granularity: token, dynamic: true}\n")
    with pytest.raises(AssertionError, match=r"FAIL psnr"):
        assert_quality(w8, model=str(degraded))
    checks = check_baseline(w8, model="w4a4")
    assert not all(c.ok for c in checks)


def test_regress_cli_exit_codes(tmp_path, capsys):
    w8 = next(b for b in BASELINES if b.stem == "miniature-pixart-w8a8")
    assert main(["regress", "--baseline", str(w8)]) == 0
    assert "ok   psnr" in capsys.readouterr().out
    copy = tmp_path / "b.json"
    copy.write_text(w8.read_text().replace('"model": "w8a8"', '"model": "w4a4"'))
    assert main(["regress", "--baseline", str(copy)]) == 1
    assert main(["regress", "--baseline", str(copy), "--update"]) == 0
    assert main(["regress", "--baseline", str(copy)]) == 0  # the deliberate update is the new reference
