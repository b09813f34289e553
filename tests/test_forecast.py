"""The forecast of final forgetting (finetune/reports/forecast.py): its least squares, its intervals' coverage, the
odds it gives, whether it uses the probes, the probe it reads and the verdict it forecasts."""

import math
import random

import pytest

from finetune.reports.forecast import (calibration_at, describe, draws, features, fit, forecast_run, interval, odds,
                                       verdict)


def test_least_squares_recovers_a_known_curve_and_too_few_or_identical_runs_give_no_fit():
    exact = fit([[1.0, x, x * x] for x in range(6)], [1 + 2 * x - x * x for x in range(6)])
    assert [round(b, 9) for b in exact.beta] == [1, 2, -1]
    assert fit([[1.0, 0.5, 0.1]] * 3, [0.0, 0.1, 0.2]) is None  # n <= p + 1
    assert fit([[1.0, 0.5, 0.1]] * 6, [0.0] * 6) is None  # X'X singular


def runs(changes: list[float], logs: list[tuple[float, float]], n: int = 400) -> list[dict]:
    """Calibration runs as read_calibration gives them: one task `a`, each run's change and log KLs."""
    return [{"x": [1.0, *lg], "max_drop": 0.05, "tasks": {"a": {"delta": d, "n": n}},
             "verdict": verdict({"a": d}, {"a": 1.96 * math.sqrt(0.1 / n)}, 0.05)} for d, lg in zip(changes, logs)]


def test_the_interval_covers_a_new_runs_change_as_often_as_its_level_says():
    # Jackknife+ promises at least 1 - 2a; with 20 exchangeable runs, [min, max] of the draws covers ~19/21 = 0.905.
    rng = random.Random(0)
    covered, trials = 0, 2000
    for _ in range(trials):
        logs = [(rng.uniform(-3, 1), rng.uniform(-2, 2)) for _ in range(21)]
        changes = [0.02 - 0.04 * a + 0.01 * b + rng.gauss(0, 0.02) for a, b in logs]
        cal = runs(changes[:20], logs[:20])
        lo, hi = interval([d["a"] for d in draws(cal, ["a"], [1.0, *logs[20]], "probes")])
        covered += lo <= changes[20] <= hi
    # 2,000 trials: a binomial standard error of 0.7 points.
    assert 0.87 <= covered / trials <= 0.94
    assert interval([0.1] * 8) == [-1.0, 1.0]  # 8 draws resolve no 90% bound: the ends of the scale


def test_the_draws_are_those_of_refitting_without_each_run():
    rng = random.Random(2)
    logs = [(rng.uniform(-3, 1), rng.uniform(-2, 2)) for _ in range(12)]
    cal = runs([0.02 - 0.04 * a + 0.01 * b + rng.gauss(0, 0.02) for a, b in logs], logs)
    x = [1.0, 0.3, -0.7]
    for inputs, cut in (("probes", 3), ("none", 1)):
        refit = []
        for j, held in enumerate(cal):
            model = fit([r["x"][:cut] for i, r in enumerate(cal) if i != j],
                        [r["tasks"]["a"]["delta"] for i, r in enumerate(cal) if i != j])
            refit.append(model.at(x[:cut]) + held["tasks"]["a"]["delta"] - model.at(held["x"][:cut]))
        assert [d["a"] for d in draws(cal, ["a"], x, inputs)] == pytest.approx(refit, abs=1e-12)
    assert draws(cal[:4], ["a"], x, "probes") == []  # 3 runs left to fit 3 coefficients


def test_without_the_probes_the_draws_are_the_calibration_runs_own_changes_and_the_odds_their_verdicts_shares():
    changes = [0.0, -0.02, -0.04, -0.2, 0.01]
    cal = runs(changes, [(0.0, float(i)) for i in range(5)])
    drawn = draws(cal, ["a"], [1.0, 7.0, 7.0], "none")
    assert [round(d["a"], 12) for d in drawn] == changes
    widths = {"a": 0.031}
    assert odds(drawn, widths, 0.05) == {"PASS": 2 / 5, "INCONCLUSIVE": 2 / 5, "FAIL": 1 / 5}
    # A run's tasks are drawn together: two tasks that fail in the same run make one FAIL in five, not two.
    both = [{"a": d["a"], "b": d["a"]} for d in drawn]
    assert odds(both, {"a": 0.031, "b": 0.031}, 0.05)["FAIL"] == 1 / 5


def test_the_probes_are_used_where_they_foretell_the_calibration_runs_and_left_out_where_they_do_not():
    probes = {"4": {"probe_kl_general": 0.5, "probe_kl_task": math.exp(2.5)}}
    used = left_out = lower = 0
    for seed in range(60):
        rng = random.Random(seed)
        logs = [(rng.uniform(-2, 1), rng.uniform(-1, 3)) for _ in range(20)]
        if seed < 10:  # the change follows log KL task: the run to forecast would lose 0.125
            told = forecast_run(runs([-0.05 * b + rng.gauss(0, 0.005) for _, b in logs], logs), probes, 60, 0.05)
            used += told["inputs"] == "probes" and abs(told["tasks"]["a"]["change"] + 0.125) < 0.02
        else:  # the change is noise whatever the probes: two more coefficients can only mislead
            noise = forecast_run(runs([rng.gauss(-0.03, 0.04) for _ in logs], logs), probes, 60, 0.05)
            left_out += noise["inputs"] == "none"
            lower += noise["skill"]["probes"] < noise["skill"]["none"]
    # By chance the probes' leave-one-out score can beat the spread's on noise too; most of the time it must not, and
    # a lead within its standard error does not take them (the lower score alone would, more often).
    assert used == 10 and left_out > 40 and 50 - left_out < lower


def test_a_point_forecast_past_the_budget_with_a_wide_spread_is_no_fail_beyond_doubt():
    probes = {"4": {"probe_kl_general": 0.5, "probe_kl_task": 2.0}}
    logs = [(0.0, math.log(2.0) + 0.01 * i) for i in range(20)]
    wide = forecast_run(runs([-0.12 + (0.3 if i % 4 == 0 else 0.0) for i in range(20)], logs), probes, 60, 0.05)
    assert wide["verdict"] == "FAIL" and wide["odds"]["FAIL"] == 0.75 and not wide["beyond_doubt"]
    sure = forecast_run(runs([-0.12 + 0.001 * (i % 3) for i in range(20)], logs), probes, 60, 0.05)
    assert sure["verdict"] == "FAIL" and sure["beyond_doubt"]


def test_probes_beyond_every_calibration_runs_are_never_beyond_doubt():
    rng = random.Random(3)
    logs = [(rng.uniform(-2, 1), rng.uniform(0, 3)) for _ in range(20)]
    cal = runs([-0.05 * b + rng.gauss(0, 0.002) for _, b in logs], logs)
    inside = forecast_run(cal, {"4": {"probe_kl_general": 1.0, "probe_kl_task": math.exp(2.5)}}, 60, 0.05)
    assert inside["inputs"] == "probes" and inside["verdict"] == "FAIL" and inside["beyond_doubt"]
    # Every fit extrapolates alike out there: the draws agree, but no calibration run was anywhere near.
    far = forecast_run(cal, {"4": {"probe_kl_general": 1.0, "probe_kl_task": math.exp(8.0)}}, 60, 0.05)
    assert far["verdict"] == "FAIL" and far["vouched"]["FAIL"] >= 0.95 and far["outside"] and not far["beyond_doubt"]
    assert "not beyond doubt (the run's probes lie beyond every calibration run's" in describe(far)


def test_odds_beyond_doubt_need_enough_calibration_runs_to_vouch_for_them():
    probes = {"4": {"probe_kl_general": 0.5, "probe_kl_task": 2.0}}
    for n, beyond in ((6, False), (18, False), (19, True)):
        logs = [(0.0, math.log(2.0) + 0.01 * i) for i in range(n)]
        told = forecast_run(runs([-0.12 + 0.001 * (i % 3) for i in range(n)], logs), probes, 60, 0.05)
        # Every draw fails: the share is 1, but n runs vouch for n/(n+1) at most.
        assert told["odds"]["FAIL"] == 1.0 and told["vouched"]["FAIL"] == n / (n + 1)
        assert told["beyond_doubt"] is beyond
        assert ("beyond doubt" if beyond else f"{n} calibration runs vouch for odds up to") in describe(told)


def test_the_forecast_reads_the_last_probe_within_the_first_tenth():
    probes = {"1": {"probe_kl_general": 0.0, "probe_kl_task": 0.0}, "4": {"probe_kl_general": 0.5,
              "probe_kl_task": 2.0}, "8": {"probe_kl_general": 9.0, "probe_kl_task": 9.0}}
    step, x = features(probes, max_steps=60)
    assert step == 4 and x == [1.0, math.log(0.5), math.log(2.0)]
    assert features(probes, max_steps=5) is None  # no probe within the first half-update


def test_a_forecast_is_fitted_on_the_runs_probed_at_the_same_share_of_their_updates():
    def row(name, max_steps, *steps):
        return {"run": name, "max_steps": max_steps, "reproduced": True,
                "probes": {str(s): {"probe_kl_general": s / 10, "probe_kl_task": s / 5} for s in steps}}

    rows = [row("a", 60, 1, 2, 4, 8, 16), row("b", 120, 2, 4, 8, 16, 32), row("c", 60, 1, 2, 4, 6),
            row("d", 30, 2, 4, 8), {**row("e", 60, 4, 16), "reproduced": False}]
    # Update 16 of 60 is 32 of 120 and 8 of 30; run c's last probe within that share is update 6: not the same point.
    assert [(r["run"], r["step"]) for r in calibration_at(rows, 16 / 60)] == [("a", 16), ("b", 32), ("d", 8)]
    assert [(r["run"], r["step"]) for r in calibration_at(rows, 4 / 60)] == [("a", 4), ("b", 8), ("c", 4), ("d", 2)]
    assert calibration_at(rows, 4 / 60)[1]["x"] == [1.0, math.log(0.8), math.log(1.6)]


def test_the_forecast_verdict_is_the_final_verdicts_rule_on_the_forecast():
    widths = {"a": 0.03, "b": 0.03}
    assert verdict({"a": 0.0, "b": -0.01}, widths, 0.05) == "PASS"
    assert verdict({"a": 0.0, "b": -0.09}, widths, 0.05) == "FAIL"
    assert verdict({"a": 0.0, "b": -0.03}, widths, 0.05) == "INCONCLUSIVE"
