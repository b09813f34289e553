"""The forecast of final forgetting (finetune/reports/forecast.py): its least squares, its prediction interval's
coverage, the probe it reads and the verdict it forecasts."""

import math
import random

from finetune.reports.forecast import features, fit, t_cdf, t_quantile, verdict, verdict_odds


def test_least_squares_recovers_a_known_line_and_its_interval_covers_new_points_as_often_as_it_says():
    rng = random.Random(0)
    covered, trials = 0, 2000
    for _ in range(trials):
        xs = [[1.0, rng.uniform(-3, 1), rng.uniform(-2, 2)] for _ in range(20)]
        ys = [0.02 - 0.04 * x[1] + 0.01 * x[2] + rng.gauss(0, 0.02) for x in xs]
        model = fit(xs, ys)
        new = [1.0, rng.uniform(-3, 1), rng.uniform(-2, 2)]
        _, lo, hi = model.predict(new)
        covered += lo <= 0.02 - 0.04 * new[1] + 0.01 * new[2] + rng.gauss(0, 0.02) <= hi
    # 2,000 trials: a binomial standard error of 0.5 points around 95%.
    assert 0.935 <= covered / trials <= 0.965
    exact = fit([[1.0, x, x * x] for x in range(6)], [1 + 2 * x - x * x for x in range(6)])
    assert [round(b, 9) for b in exact.beta] == [1, 2, -1] and exact.scale < 1e-9


def test_too_few_runs_or_identical_ones_give_no_fit():
    assert fit([[1.0, 0.5, 0.1]] * 3, [0.0, 0.1, 0.2]) is None  # n <= p + 1
    assert fit([[1.0, 0.5, 0.1]] * 6, [0.0] * 6) is None  # X'X singular


def test_the_forecast_reads_the_last_probe_within_the_first_tenth():
    probes = {"1": {"probe_kl_general": 0.0, "probe_kl_task": 0.0}, "4": {"probe_kl_general": 0.5,
              "probe_kl_task": 2.0}, "8": {"probe_kl_general": 9.0, "probe_kl_task": 9.0}}
    step, x = features(probes, max_steps=60)
    assert step == 4 and x == [1.0, math.log(0.5), math.log(2.0)]
    assert features(probes, max_steps=5) is None  # no probe within the first half-update


def test_the_forecast_verdict_is_the_final_verdicts_rule_on_the_forecast():
    widths = {"a": 0.03, "b": 0.03}
    assert verdict({"a": 0.0, "b": -0.01}, widths, 0.05) == "PASS"
    assert verdict({"a": 0.0, "b": -0.09}, widths, 0.05) == "FAIL"
    assert verdict({"a": 0.0, "b": -0.03}, widths, 0.05) == "INCONCLUSIVE"
    assert abs(t_quantile(0.975, 10) - 2.2281) < 1e-3


def test_verdict_odds_are_the_final_rule_applied_to_draws_from_the_forecast():
    # Draw each task's change from its forecast (point + scale * t), apply the final verdict's rule, count.
    rng = random.Random(1)
    forecasts = {"a": (-0.02, 0.03, 5), "b": (0.01, 0.05, 5)}
    widths = {"a": 0.03, "b": 0.035}
    odds = verdict_odds(forecasts, widths, 0.05)
    assert abs(sum(odds.values()) - 1) < 1e-9

    def t_draw(dof):
        return rng.gauss(0, 1) / math.sqrt(sum(rng.gauss(0, 1) ** 2 for _ in range(dof)) / dof)

    trials, counts = 20000, {"PASS": 0, "FAIL": 0, "INCONCLUSIVE": 0}
    for _ in range(trials):
        drawn = {k: p + s * t_draw(d) for k, (p, s, d) in forecasts.items()}
        counts[verdict(drawn, widths, 0.05)] += 1
    for k in counts:  # 20,000 draws: a standard error under 0.4 points
        assert abs(counts[k] / trials - odds[k]) < 0.015, (k, counts[k] / trials, odds[k])


def test_a_point_forecast_past_the_budget_with_a_wide_interval_is_no_fail_beyond_doubt():
    widths = {"a": 0.03}
    wide = verdict_odds({"a": (-0.12, 0.5, 4)}, widths, 0.05)
    assert verdict({"a": -0.12}, widths, 0.05) == "FAIL" and wide["FAIL"] < 0.95
    assert verdict_odds({"a": (-0.12, 0.01, 20)}, widths, 0.05)["FAIL"] > 0.99
    assert abs(t_cdf(2.0, 5) - 0.9490) < 1e-3 and abs(t_cdf(-2.0, 20) - 0.0296) < 1e-3
