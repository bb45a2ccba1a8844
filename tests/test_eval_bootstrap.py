"""Bootstrap intervals over prompts against brute force, numpy and a coverage experiment; tables mark
only the differences the paired interval separates."""
import itertools
import json

import numpy as np
import pytest
import torch

from dmquant.eval.bootstrap import (
    bootstrap_ci,
    paired_ci,
    percentile_interval,
    resample_indices,
    runs_interval,
    separated,
)
from dmquant.eval.table import compare_rows, format_table, leaders


def test_interval_matches_the_exact_bootstrap_distribution():
    """n = 5 prompts: all 5^5 equally likely resamples enumerated. The Monte Carlo interval's ends must
    sit at the exact distribution's 2.5 % and 97.5 % points (CDF within 0.01)."""
    values = np.array([31.0, 35.5, 29.0, 40.0, 33.0])
    exact = np.array([values[list(idx)].mean() for idx in itertools.product(range(5), repeat=5)])
    lo, hi = bootstrap_ci(values.tolist(), resamples=20000, seed=3)
    assert abs((exact <= lo).mean() - 0.025) < 0.01
    assert abs((exact >= hi).mean() - 0.025) < 0.01


def test_percentiles_equal_numpy_on_the_same_resamples():
    values = torch.randn(12, dtype=torch.float64)
    idx = resample_indices(12, 500, seed=7)
    stats = values[idx].mean(1).numpy()
    lo, hi = percentile_interval(torch.from_numpy(stats), 0.9)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(stats, [5, 95])), abs=1e-12)
    assert bootstrap_ci(values, resamples=500, confidence=0.9, seed=7) == pytest.approx((lo, hi), abs=1e-12)


def test_coverage_of_the_mean_on_synthetic_data():
    """Normal data, n = 40: the 95 % percentile interval covers the true mean in ~93-95 % of trials."""
    g = torch.Generator().manual_seed(0)
    hits = sum(lo <= 0 <= hi for lo, hi in (bootstrap_ci(torch.randn(40, generator=g), resamples=1000, seed=t)
                                            for t in range(300)))
    assert 0.90 <= hits / 300 <= 0.98


def test_paired_interval_removes_the_shared_prompt_effect():
    g = torch.Generator().manual_seed(1)
    prompt_effect = 10 * torch.randn(16, generator=g)  # prompts differ far more than the models do
    a = prompt_effect + 0.5 + 0.05 * torch.randn(16, generator=g)
    b = prompt_effect
    diff = paired_ci(a, b)
    assert separated(diff) and 0.4 < diff[0] < diff[1] < 0.6
    assert diff == pytest.approx(bootstrap_ci(a - b), abs=1e-6)  # same indices, and the mean is linear
    unpaired = (bootstrap_ci(a)[0] - bootstrap_ci(b)[1], bootstrap_ci(a)[1] - bootstrap_ci(b)[0])
    assert not separated(unpaired)  # comparing two marginal intervals would have hidden it
    assert paired_ci(b + 2.0, b) == pytest.approx((2.0, 2.0))


def test_callable_statistic_equals_the_vectorised_mean():
    values = torch.rand(9, dtype=torch.float64)
    assert bootstrap_ci(lambda idx: values[idx].mean(), n=9, resamples=300) == pytest.approx(
        bootstrap_ci(values, resamples=300), abs=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 2 prompts"):
        bootstrap_ci([1.0])
    with pytest.raises(ValueError, match="same prompts"):
        paired_ci([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=95)
    with pytest.raises(ValueError, match="needs n"):
        bootstrap_ci(lambda idx: 0.0)


def test_table_bolds_only_what_the_interval_cannot_separate():
    g = torch.Generator().manual_seed(2)
    base = 30 + 5 * torch.randn(12, generator=g)
    jitter = 0.01 * torch.randn(12, generator=g)
    rows = [{"name": name, "psnr": float(v.mean()), "psnr_ci": list(bootstrap_ci(v)),
             "per_prompt": {"psnr": v.tolist()}}
            for name, v in (("a", base + 3), ("b", base + 3 + jitter - jitter.mean()), ("c", base))]
    assert leaders(rows, "psnr") == {0, 1}
    text = format_table(rows)
    assert f"**{rows[0]['psnr']:.2f}** [" in text and f"**{rows[1]['psnr']:.2f}** [" in text
    line_c = next(line for line in text.splitlines() if line.startswith("| c "))
    assert "**" not in line_c and f"{rows[2]['psnr']:.2f} [" in line_c
    assert "bootstrap interval over prompts" in text


def test_compare_states_a_difference_only_where_the_paired_interval_separates_it(tmp_path, capsys):
    g = torch.Generator().manual_seed(3)
    base = 30 + 5 * torch.randn(16, generator=g)
    noise = 0.3 * torch.randn(16, generator=g)
    lpips = 0.2 + 0.01 * torch.randn(16, generator=g)
    series = {"a": (base + 1, lpips - 0.05), "b": (base, lpips), "c": (base + noise - noise.mean(), lpips)}
    rows = [{"name": n, "psnr": float(p.mean()), "lpips": float(q.mean()), "per_prompt": {"psnr": p.tolist(), "lpips": q.tolist()}}
            for n, (p, q) in series.items()]
    lines = compare_rows(rows, "a", "b").splitlines()
    psnr, lp = next(x for x in lines if x.startswith("| PSNR")), next(x for x in lines if x.startswith("| LPIPS"))
    assert "[1.000, 1.000]" in psnr and psnr.rstrip(" |").endswith("a better")
    assert lp.rstrip(" |").endswith("a better")  # lower LPIPS is better
    ci = paired_ci(rows[2]["per_prompt"]["psnr"], rows[1]["per_prompt"]["psnr"])
    assert not separated(ci) and "not separable" in compare_rows(rows, "c", "b", ["psnr"])
    with pytest.raises(ValueError, match="no row named d"):
        compare_rows(rows, "a", "d")
    with pytest.raises(ValueError, match="fid_fp: no per-prompt values"):
        compare_rows(rows, "a", "b", ["fid_fp"])
    with pytest.raises(ValueError, match="more than one row"):
        compare_rows([*rows, rows[0]], "a", "b")
    with pytest.raises(ValueError, match="share no metric"):
        compare_rows([{"name": "a"}, {"name": "b"}], "a", "b")
    assert "PSNR" in compare_rows(rows, "a", "b", [" psnr"])
    (tmp_path / "metrics.json").write_text(json.dumps({"rows": rows}))
    from dmquant.cli import main

    assert main(["compare", str(tmp_path), "a", "b", "--metrics", "psnr"]) == 0
    assert "a better" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "nowhere"), "a", "b"]) == 2
    (tmp_path / "other.json").write_text(json.dumps({"model": "x"}))
    assert main(["compare", str(tmp_path / "other.json"), "a", "b"]) == 2


def test_fid_interval_is_centred_on_the_estimate():
    """Resampling repeats images and inflates FID: the plain percentile interval of the resampled FIDs
    lies above the full-sample FID; centred, it contains it and keeps the resampled width."""
    from dmquant.eval.metrics.fid import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 48, generator=g, dtype=torch.float64)  # many features per sample, as Inception's
    b = torch.randn(64, 48, generator=g, dtype=torch.float64) * 1.05 + 0.05
    value = frechet_distance(a, b)
    fid = lambda idx: frechet_distance(a[idx], b[idx])  # noqa: E731
    raw = bootstrap_ci(fid, 64, resamples=100)
    lo, hi = bootstrap_ci(fid, 64, resamples=100, center=value)
    assert raw[0] > value  # the bug this fixes: the estimate outside its own interval
    assert lo <= value <= hi and hi - lo == pytest.approx(raw[1] - raw[0])


def test_runs_interval_is_welchs_and_matches_scipy():
    from scipy.stats import ttest_ind

    g = torch.Generator().manual_seed(4)
    for na, nb in ((2, 2), (3, 2), (5, 4)):
        a, b = (37 + torch.randn(na, generator=g)).tolist(), (36 + 2 * torch.randn(nb, generator=g)).tolist()
        lo, hi = runs_interval(a, b)
        ref = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
        assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-9)
    # by hand: a = [1, 3] (variance of the mean 1), b constant: 1 degree of freedom, t = 12.7062
    assert runs_interval([1, 3], [0, 0, 0]) == pytest.approx((2 - 12.7062047, 2 + 12.7062047), abs=1e-6)
    assert runs_interval([2, 2], [1, 1]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="at least 2 runs"):
        runs_interval([1.0], [1.0, 2.0])


def test_compare_over_calibration_runs_needs_both_intervals(tmp_path, capsys):
    """Three runs of a recipe that each beat b by ~1 dB on every prompt: both intervals separate. Runs that
    scatter by +-3 dB (the seed spread measured on miniature-sd) average to +1 and separate over prompts
    (the prompts are shared), but not over runs: not stated."""
    g = torch.Generator().manual_seed(5)
    base = 30 + 5 * torch.randn(16, generator=g)

    def row(name, p):
        return {"name": name, "psnr": float(p.mean()), "per_prompt": {"psnr": p.tolist()}}
    steady = [row(f"a{s}", base + 1 + 0.05 * s + 0.1 * torch.randn(16, generator=g)) for s in range(3)]
    scattered = [row(f"c{s}", base + off + 0.1 * torch.randn(16, generator=g)) for s, off in enumerate((4, -2, 1))]
    refs = [row(f"b{s}", base + 0.1 * torch.randn(16, generator=g)) for s in range(2)]
    rows = steady + scattered + refs
    line = compare_rows(rows, "a0,a1,a2", "b0,b1", ["psnr"]).splitlines()[-1]
    assert line.rstrip(" |").endswith("a0,a1,a2 better") and line.count("[") == 2
    line = compare_rows(rows, "c0,c1,c2", "b0,b1", ["psnr"]).splitlines()[-1]
    paired = paired_ci(torch.tensor([r["per_prompt"]["psnr"] for r in scattered]).mean(0),
                       torch.tensor([r["per_prompt"]["psnr"] for r in refs]).mean(0))
    assert separated(paired) and "not separable" in line
    with pytest.raises(ValueError, match="at least 2 calibration runs"):
        compare_rows(rows, "a0,a1", "b0", ["psnr"])
    from dmquant.cli import main

    meta = {"prompts": ["p"] * 16}
    (tmp_path / "one.json").write_text(json.dumps({**meta, "rows": steady + refs[:1]}))
    (tmp_path / "two.json").write_text(json.dumps({**meta, "rows": refs}))  # b0 again, identical: one row
    assert main(["compare", str(tmp_path / "one.json"), "a0,a1,a2", "b0,b1", "--also", str(tmp_path / "two.json")]) == 0
    assert "a0,a1,a2 better" in capsys.readouterr().out
    (tmp_path / "clash.json").write_text(json.dumps({**meta, "rows": [row("b0", base)]}))
    assert main(["compare", str(tmp_path / "one.json"), "a0", "b0", "--also", str(tmp_path / "clash.json")]) == 2
    assert "different per-prompt values" in capsys.readouterr().err
    (tmp_path / "other.json").write_text(json.dumps({"prompts": ["q"] * 16, "rows": refs}))
    assert main(["compare", str(tmp_path / "one.json"), "a0", "b1", "--also", str(tmp_path / "other.json")]) == 2
    assert "other prompts" in capsys.readouterr().err
