"""The numbers of the forgetting report on known per-example scores, and the files it writes. No model runs here."""

import json
import math

import pytest

from finetune.drift import Drift
from finetune.evaluate import Evaluation, TaskScore
from finetune.forgetting import Change, choose_best, mean_change, paired_change, pareto_front, within_budget
from finetune.report import build_report, compare_runs, provenance, write_report


def score(values, task="t", metric="acc"):
    return TaskScore(task=task, metric=metric, value=sum(values) / len(values),
                     examples={f"{task}/{i}": float(v) for i, v in enumerate(values)})


def evaluation(step, tasks: dict, targets: dict | None = None, kl=0.1):
    return Evaluation(step=step, tasks={k: score(v, k) for k, v in tasks.items()},
                      targets={k: score(v, k) for k, v in (targets or {}).items()},
                      drift=Drift(kl=kl, ppl_base=10.0, ppl_tuned=11.0, ppl_ratio=1.1, tokens=100) if step else None)


def test_paired_interval_and_flips_on_known_vectors():
    base, tuned = score([1, 1, 0, 0, 1]), score([0, 1, 1, 0, 0])
    c = paired_change(base, tuned)
    # differences -1, 0, 1, 0, -1: mean -0.2, sample variance 2.8 / 4 = 0.7
    half = 1.959963984540054 * math.sqrt(0.7) / math.sqrt(5)
    assert c.delta == pytest.approx(-0.2) and c.n == 5
    assert c.ci95 == pytest.approx([-0.2 - half, -0.2 + half])
    assert c.flips == {"correct_to_wrong": 2, "wrong_to_correct": 1}
    assert not c.significant  # the interval (about -0.93, 0.53) holds 0


def test_consistent_loss_is_significant_and_unchanged_model_is_not():
    base = score([1] * 20 + [0] * 20)
    worse = paired_change(base, score([0] * 12 + [1] * 8 + [0] * 20))
    assert worse.delta == pytest.approx(-0.3) and worse.significant and worse.ci95[1] < 0
    assert worse.flips == {"correct_to_wrong": 12, "wrong_to_correct": 0}
    same = paired_change(base, base)
    assert same.delta == 0 and same.ci95 == [0, 0] and not same.significant
    assert same.flips == {"correct_to_wrong": 0, "wrong_to_correct": 0}


def test_only_examples_scored_by_both_are_paired():
    base = TaskScore("t", "acc", 0.5, {"t/0": 1.0, "t/1": 0.0, "t/2": 1.0})
    tuned = TaskScore("t", "acc", 0.5, {"t/1": 1.0, "t/2": 0.0, "t/9": 1.0})
    c = paired_change(base, tuned)
    assert c.n == 2 and c.flips == {"correct_to_wrong": 1, "wrong_to_correct": 1}
    one = paired_change(TaskScore("t", "acc", 1.0, {"t/0": 1.0}), TaskScore("t", "acc", 0.0, {"t/0": 0.0}))
    assert one.ci95 is None and not one.significant  # one example says nothing about noise


def test_pareto_front():
    points = [(0.01, 0.10), (0.05, 0.30), (0.02, 0.05), (0.05, 0.20), (0.00, 0.00), (0.05, 0.30), (0.10, 0.25)]
    # (0.02, 0.05) loses to (0.01, 0.10); (0.05, 0.20) and (0.10, 0.25) lose to (0.05, 0.30); equal points both stay.
    assert pareto_front(points) == [0, 1, 4, 5]
    assert pareto_front([]) == []


def test_budget_is_the_largest_drop_on_any_original_task():
    base = {"a": score([1] * 10, "a"), "b": score([1] * 10, "b")}
    tuned = {"a": score([1] * 10, "a"), "b": score([1] * 8 + [0] * 2, "b")}
    assert within_budget(base, tuned, 0.2)  # a drop equal to the budget passes, float rounding or not
    assert not within_budget(base, tuned, 0.19)
    assert within_budget({}, {}, 0.0)
    assert within_budget(base, {"a": score([1] * 10, "a"), "b": score([1] * 10, "b")}, 0.0)


def test_choose_best_takes_the_biggest_gain_within_budget():
    base = evaluation(0, {"orig": [1] * 10}, {"new": [0] * 10})
    curve = [evaluation(10, {"orig": [1] * 10}, {"new": [1] * 2 + [0] * 8}),
             evaluation(20, {"orig": [1] * 9 + [0]}, {"new": [1] * 6 + [0] * 4}),
             evaluation(30, {"orig": [1] * 5 + [0] * 5}, {"new": [1] * 10})]  # best gain but over budget
    assert choose_best(base, curve, max_drop=0.1).step == 20
    assert choose_best(base, curve, max_drop=0.0).step == 10
    assert choose_best(base, curve, max_drop=0.5).step == 30
    assert choose_best(base, curve[2:], max_drop=0.1) is None  # nothing within budget; the base is never chosen
    no_targets = evaluation(0, {"orig": [1] * 10})
    steps = [evaluation(s, {"orig": [1] * 10}) for s in (5, 10)] + [evaluation(15, {"orig": [0] * 10})]
    assert choose_best(no_targets, steps, max_drop=0.1).step == 10  # the latest within budget


def test_mean_change_combines_task_intervals_as_independent():
    a = Change("acc", 0.5, 0.4, -0.1, [-0.13, -0.07], 100, {}, True)
    b = Change("acc", 0.5, 0.3, -0.2, [-0.24, -0.16], 100, {}, True)
    mean, half = mean_change([a, b])
    assert mean == pytest.approx(-0.15) and half == pytest.approx(math.sqrt(0.03 ** 2 + 0.04 ** 2) / 2)


def test_report_files_say_what_changed(tmp_path):
    base = evaluation(0, {"orig": [1] * 30 + [0] * 10}, {"new": [0] * 40})
    curve = [evaluation(5, {"orig": [1] * 25 + [0] * 15}, {"new": [1] * 10 + [0] * 30}, kl=0.05),
             evaluation(10, {"orig": [1] * 10 + [0] * 30}, {"new": [1] * 30 + [0] * 10}, kl=0.2)]
    report = build_report(base, curve[-1], max_drop=0.02, curve=curve, provenance=provenance(),
                          final_note="step 10, the last")
    write_report(tmp_path, report)
    saved = json.loads((tmp_path / "report.json").read_text())
    orig = saved["tasks"]["orig"]
    assert orig["base"] == 0.75 and orig["tuned"] == 0.25 and orig["delta"] == pytest.approx(-0.5)
    assert orig["flips"] == {"correct_to_wrong": 20, "wrong_to_correct": 0} and orig["significant"]
    assert saved["targets"]["new"]["delta"] == pytest.approx(0.75)
    assert saved["drift"]["kl"] == 0.2 and [p["step"] for p in saved["curve"]] == [0, 5, 10]
    assert not saved["verdict"]["within_budget"] and saved["verdict"]["text"].startswith("FAIL")
    assert "0.500 on orig" in saved["verdict"]["text"]
    assert set(saved["provenance"]["versions"]) >= {"torch", "transformers", "peft", "accelerate", "lm_eval"}
    md = (tmp_path / "report.md").read_text()
    assert "| task | metric | base | tuned | delta | 95% CI |" in md
    assert "| orig | acc | 0.750 | 0.250 | -0.500 |" in md and "**flips**" in md
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # per-task bars and the curve
    assert "<link" not in page and "<script" not in page  # nothing fetched from elsewhere


def test_compare_runs_marks_the_pareto_front(tmp_path):
    base = evaluation(0, {"orig": [1] * 20}, {"new": [0] * 20})
    tuned = {"lora": evaluation(9, {"orig": [1] * 19 + [0]}, {"new": [1] * 8 + [0] * 12}),
             "full": evaluation(9, {"orig": [1] * 10 + [0] * 10}, {"new": [1] * 16 + [0] * 4}),
             "bad": evaluation(9, {"orig": [1] * 10 + [0] * 10}, {"new": [1] * 4 + [0] * 16})}
    for name, ev in tuned.items():
        write_report(tmp_path / name / "forgetting", build_report(base, ev, max_drop=0.1, curve=[],
                                                                  provenance=provenance(), final_note=""))
    result = compare_runs([tmp_path / n for n in tuned], tmp_path / "cmp")
    assert {r["run"].split("/")[-1]: r["pareto"] for r in result["runs"]} == {"lora": True, "full": True,
                                                                              "bad": False}
    lora = result["runs"][0]
    assert lora["drop"] == pytest.approx(0.05) and lora["gain"] == pytest.approx(0.4) and lora["within_budget"]
    assert "Pareto front" in (tmp_path / "cmp" / "compare.md").read_text()
    assert "data:image/png;base64," in (tmp_path / "cmp" / "compare.html").read_text()
