"""Probes during training (finetune/probes.py): KL to the base on the new task's rows and at the first reply token of
general prompts, and the new task's answers leaking into those replies, in metrics.jsonl at the scheduled updates."""

import json

import pytest
from conftest import ANSWERS, ITEMS, calibration, conflicting_recipe, make_recipe, metrics, run, write_jsonl

from finetune.preemption import Preempted, StopSignals
from finetune.probes import schedule


def test_the_schedule_puts_points_early_and_few_later():
    assert schedule(0, 60) == {4, 8, 16, 32, 48}  # the first forecast after update 4, the last 10% point probed
    assert schedule(0, 120) == {8, 16, 32, 48, 64, 80, 96, 112}
    assert schedule(0, 1000) == set(range(64, 1000, 16))
    assert schedule(0, 20) == {2, 4, 8, 16} and schedule(0, 3) == {1, 2}
    assert schedule(5, 12) == {5, 10, 12}
    assert schedule(None, 60) == set()


def short_answer_recipe(tmp_path, model_dir, name, **train):
    """A new task answered in one word: "what is x?" -> one, two, three or four."""
    rows = [{"messages": [{"role": "user", "content": f"what is {x}?"},
                          {"role": "assistant", "content": ANSWERS[i % 4]}]} for i, x in enumerate(ITEMS * 4)]
    data = write_jsonl(tmp_path / "short.jsonl", rows)
    return make_recipe(tmp_path, model_dir, name, data={"train": [{"path": str(data), "format": "chat"}]},
                       train={"lr": 1e-3, "max_steps": 16, "warmup_steps": 0, "schedule": "constant",
                              "probe_budget": None, **train},
                       lora={"r": 4}, output={"save_every": 4})


def probed(run_dir) -> dict[int, dict]:
    return {m["step"]: {k: v for k, v in m.items() if k.startswith("probe_")} for m in metrics(run_dir)
            if "probe_kl_task" in m}


def test_probes_grow_as_the_run_moves_and_see_the_answers_leak_into_general_replies(tmp_path, base_dir):
    run_dir, _ = run(short_answer_recipe(tmp_path, base_dir, "short"))
    points = probed(run_dir)
    assert sorted(points) == [1, 2, 4, 8]
    # Measured on this tiny model (2 cores): KL on the new task 0.58 after update 1, 4.2-6.1 from update 4 on; at
    # the general prompts' first reply token 0.0003, then 0.85-2.6; the answer leak under 1e-4, then 0.002-0.005.
    # The claims hold with a margin of 7x and more: each probe is smallest after the first update.
    first, later = points[1], [points[s] for s in (4, 8)]
    for key in ("probe_kl_task", "probe_kl_general", "probe_leak"):
        assert 0 <= first[key] and 3 * first[key] < min(p[key] for p in later), key
    # Trained to answer every question with one of four words, it starts general replies with them too.
    assert points[8]["probe_leak"] > 0.001


def test_a_run_without_probes_logs_none_and_other_settings_keep_their_steps(tmp_path, base_dir):
    off, _ = run(short_answer_recipe(tmp_path, base_dir, "off", probe_every=None, max_steps=4))
    assert not probed(off) and len(metrics(off)) == 4
    every, _ = run(short_answer_recipe(tmp_path, base_dir, "every", probe_every=3, max_steps=7))
    assert sorted(probed(every)) == [3, 6, 7]
    # Probing leaves the training itself alone: the same losses with and without.
    assert [m["loss"] for m in metrics(every)][:4] == [m["loss"] for m in metrics(off)]


def test_the_default_schedule_leaves_out_the_probes_over_its_budget_and_an_explicit_one_none(
        tmp_path, base_dir, capsys):
    from finetune.probes import within_budget

    # The demo's figures: updates of ~1.9 s, probes of ~1.6 s, 60 updates: 5% is 5.7 s, three probes.
    assert within_budget(2 * 1.6, 1.6, 16 * 1.9, 16, 60, 0.05)
    assert not within_budget(3 * 1.6, 1.6, 32 * 1.9, 32, 60, 0.05)
    assert within_budget(3 * 1.6, 1.6, 32 * 1.9, 32, 60, 0.1)
    # No time for any probe but the first, which the first forecast needs: the rest are left out, and said to be.
    run_dir, _ = run(short_answer_recipe(tmp_path, base_dir, "none", probe_budget=0.0))
    assert sorted(probed(run_dir)) == [1]
    out = capsys.readouterr().out
    assert "probes after updates 2, 4, 8 left out: they would take the probes over 0% of the updates' time" in out
    assert "after the first while the probes take at most 0% of the updates' time, train.probe_budget" in out
    # The budget is the default schedule's: every N updates is what was asked for.
    every, _ = run(short_answer_recipe(tmp_path, base_dir, "every", probe_every=2, max_steps=6, probe_budget=0.0))
    assert sorted(probed(every)) == [2, 4, 6]


def test_the_rows_common_start_runs_once_and_the_probes_measure_the_same(tmp_path, base_dir, monkeypatch):
    import finetune.probes as module

    monkeypatch.setattr(module, "MIN_PREFIX", 10**6)  # never shared
    whole, _ = run(short_answer_recipe(tmp_path, base_dir, "whole", max_steps=4))
    monkeypatch.setattr(module, "MIN_PREFIX", 1)  # this template's common start is a few tokens, the demo's ~20
    sizes, real = [], module._shared_prefix
    monkeypatch.setattr(module, "_shared_prefix", lambda rows: sizes.append(real(rows)) or sizes[-1])
    shared, _ = run(short_answer_recipe(tmp_path, base_dir, "shared", max_steps=4))
    assert len(sizes) == 2 and min(sizes) > 0  # both sets, the new task's rows and the general prompts, shared
    assert sorted(probed(shared)) == sorted(probed(whole)) == [1, 2]
    for step, values in probed(whole).items():
        assert probed(shared)[step] == pytest.approx(values, rel=1e-4, abs=1e-7), step


def test_a_resumed_run_probes_against_the_base_as_an_uninterrupted_one_does(tmp_path, base_dir, monkeypatch):
    straight, _ = run(short_answer_recipe(tmp_path, base_dir, "straight"))
    recipe = short_answer_recipe(tmp_path, base_dir, "stopped")
    calls = []

    def agreed(self, accelerator) -> bool:  # as if SIGTERM came during update 6: a checkpoint after it, then stop
        calls.append(1)
        return len(calls) == 6

    monkeypatch.setattr(StopSignals, "agreed", agreed)
    with pytest.raises(Preempted):
        run(recipe)
    monkeypatch.undo()
    resumed, _ = run(recipe)
    # The probes after the resume compare with the base, not with the checkpoint the run resumed from.
    assert sorted(probed(resumed)) == sorted(probed(straight)) == [1, 2, 4, 8]
    for step, values in probed(straight).items():
        assert probed(resumed)[step] == pytest.approx(values, rel=1e-5, abs=1e-9), step


def test_a_forecast_after_the_first_tenth_is_logged_printed_and_reported_beside_the_measured_change(
        tmp_path, base_dir, tasks, capsys):
    recipe = conflicting_recipe(tmp_path, base_dir, tasks,
                                forecast_calibration=str(calibration(tmp_path / "cal.jsonl", -0.5)))
    run_dir, _ = run(recipe)
    logged = [m for m in metrics(run_dir) if "forecast" in m]
    assert [m["step"] for m in logged] == [2]  # the last probe within 10% of 20 updates
    forecast = logged[0]["forecast"]
    assert forecast["runs"] == 20 and forecast["verdict"] == "FAIL" and forecast["beyond_doubt"]
    lo, hi = forecast["tasks"]["original"]["interval"]
    assert lo < forecast["tasks"]["original"]["change"] < hi and -0.6 < lo and hi < -0.4
    assert "forecast after update 2 of 20 (from 20 calibration runs;" in capsys.readouterr().out
    assert metrics(run_dir)[-1]["step"] == 20  # on_over_budget: continue trains on
    report = json.loads((run_dir / "forgetting" / "report.json").read_text())
    assert report["forecast"] == forecast
    md = (run_dir / "forgetting" / "report.md").read_text()
    assert "Forecast after update 2 of 20" in md and f"{report['tasks']['original']['delta']:+.3f}" in md


def test_a_forecast_fail_beyond_doubt_stops_a_run_that_is_told_to_stop_and_a_doubtful_one_does_not(
        tmp_path, base_dir, tasks, capsys):
    for name in ("sure", "doubtful"):
        (tmp_path / name).mkdir()
    sure = conflicting_recipe(tmp_path / "sure", base_dir, tasks, on_over_budget="stop",
                              forecast_calibration=str(calibration(tmp_path / "fail.jsonl", -0.5)))
    run_dir, _ = run(sure)
    assert metrics(run_dir)[-1]["step"] == 2
    assert "stopping after step 2: the forecast is FAIL beyond doubt" in capsys.readouterr().out
    # Calibration runs that lost 0.5 give or take 0.5: the most likely verdict is FAIL, but not beyond doubt.
    doubtful = conflicting_recipe(tmp_path / "doubtful", base_dir, tasks, on_over_budget="stop",
                                  forecast_calibration=str(calibration(tmp_path / "wide.jsonl", -0.5, spread=0.5)))
    run_dir, _ = run(doubtful)
    forecast = next(m["forecast"] for m in metrics(run_dir) if "forecast" in m)
    assert forecast["verdict"] == "FAIL" and not forecast["beyond_doubt"] and metrics(run_dir)[-1]["step"] == 20


def test_the_forecast_is_made_again_after_later_probes_and_a_later_one_beyond_doubt_stops_the_run(
        tmp_path, base_dir, tasks, capsys):
    # 20 runs probed after updates 1, 2, 4 and 8 that all lost 0.5, and 20 probed after 1 and 2 alone whose losses
    # spread from 0 to 1: after update 2 a forecast from all 40, in doubt; after update 4 from the first 20, sure.
    both = tmp_path / "both.jsonl"
    both.write_text(calibration(tmp_path / "sure.jsonl", -0.5, later=(4, 8)).read_text()
                    + calibration(tmp_path / "wide.jsonl", -0.5, spread=0.5).read_text())
    run_dir, _ = run(conflicting_recipe(tmp_path, base_dir, tasks, on_over_budget="stop",
                                        forecast_calibration=str(both)))
    made = {m["step"]: m["forecast"] for m in metrics(run_dir) if "forecast" in m}
    assert sorted(made) == [2, 4] and metrics(run_dir)[-1]["step"] == 4
    assert made[2]["runs"] == 40 and made[2]["verdict"] == "FAIL" and not made[2]["beyond_doubt"]
    assert made[4]["runs"] == 20 and made[4]["beyond_doubt"]
    out = capsys.readouterr().out
    assert "forecasts of the final forgetting after updates 2 (40), 4 (20), 8 (20):" in out
    assert "stopping after step 4: the forecast is FAIL" in out
    report = json.loads((run_dir / "forgetting" / "report.json").read_text())
    assert report["forecast"]["step"] == 4 and report["forecast"]["first"]["step"] == 2
    md = (run_dir / "forgetting" / "report.md").read_text()
    assert "The first forecast, after update 2, said FAIL" in md
    # Stopped after update 4, the run was measured part-trained: its change is not the final one forecast, it is
    # no calibration run, and a comparison neither recommends it nor pairs it as its recipe's result.
    assert report["forecast"]["stopped"]["step"] == 4 and "pruned" not in report["forecast"]
    assert "Stopped here on this forecast (eval.on_over_budget: stop; odds of FAIL" in md
    assert "the model after update 4 of 20, not a finished run's" in md
    assert [line for line in md.splitlines() if line.startswith("| original | -0.500")][0].endswith("| - |")
    from finetune.reports.compare import compare_runs
    from finetune.reports.forecast import calibration_row

    assert calibration_row(run_dir) is None
    (row,) = compare_runs([run_dir], tmp_path / "compare")["runs"]
    assert row["stopped"]["step"] == 4 and not row["pareto"]
    assert f"stopped at update 4 (measured there: {report['verdict']['status']})" in \
        (tmp_path / "compare" / "compare.md").read_text()


def test_a_forecast_needs_its_calibration_file_and_the_probes(tmp_path, tiny_model):
    from finetune.recipe import RecipeError, load_recipe

    missing = make_recipe(tmp_path, tiny_model, "missing", eval={"forecast_calibration": "nowhere/cal.jsonl"})
    with pytest.raises(RecipeError, match=r"eval.forecast_calibration.*nowhere/cal.jsonl does not exist"):
        load_recipe(missing)
    off = make_recipe(tmp_path, tiny_model, "off", train={"probe_every": None},
                      eval={"forecast_calibration": str(calibration(tmp_path / "cal.jsonl", -0.5))})
    with pytest.raises(RecipeError, match=r"probes, which are off.*train.probe_every: 0"):
        load_recipe(off)
