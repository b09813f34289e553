"""The forecast of final forgetting (finetune/reports/forecast.py): its least squares, its prediction interval's
coverage, the probe it reads and the verdict it forecasts."""

import math
import random

from finetune.reports.forecast import features, fit, t_quantile, verdict


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
