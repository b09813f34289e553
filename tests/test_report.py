"""The numbers of the forgetting report on known per-example scores, against hand-computed values, and the files it
writes. No model runs here."""

import json
import math
import subprocess
import sys

import pytest

from finetune.reports.forgetting import (FAIL, INCONCLUSIVE, PASS, bootstrap_ratio, changes, choose_best, detectable_drop,
                                 examples_to_decide, holm, mcnemar_p, mean_interval, paired_change, paired_interval,
                                 pareto_front, run_difference, within_budget)
from finetune.reports.records import Drift, Evaluation, TaskScore
from finetune.reports.compare import compare_runs
from finetune.reports.report import build_report, provenance, write_report

Z = 1.959963984540054


def score(values, task="t", metric="acc", chance=None):
    examples = {f"{task}/{i}": float(v) for i, v in enumerate(values)}
    return TaskScore(task=task, metric=metric, value=sum(values) / len(values), examples=examples, chance=chance,
                     available=len(values), answers={k: f"answer {v:g}" for k, v in examples.items()},
                     prompts={k: f"question {k}" for k in examples}, expected={k: "right" for k in examples})


def drift(kl):
    return {"chat": Drift(kl=kl, ci95=[kl / 2, kl * 2], ppl_base=10.0, ppl_tuned=11.0, ppl_ratio=1.1, tokens=100,
                          texts=10)}


def evaluation(step, tasks: dict, targets: dict | None = None, kl=0.1):
    return Evaluation(step=step, tasks={k: score(v, k) for k, v in tasks.items()},
                      targets={k: score(v, k) for k, v in (targets or {}).items()}, drift=drift(kl) if step else {})


def wilson_upper(k, n, z=Z):
    return (k + z * z / 2 + z * math.sqrt(k * (n - k) / n + z * z / 4)) / (n + z * z)


# ---------------------------------------------------------------- the interval and the tests


def test_unchanged_examples_give_an_interval_with_the_closed_form_width():
    # No flips: Tango's limits solve n d / sqrt(n d (1 - d)) = z, i.e. d = z^2 / (n + z^2).
    for n in (8, 60, 1000):
        half = Z * Z / (n + Z * Z)
        assert paired_interval(0, 0, n) == pytest.approx([-half, half], abs=1e-9)
    assert paired_interval(0, 0, 8) == pytest.approx([-0.3244, 0.3244], abs=1e-4)


def test_flips_one_way_give_the_hand_derived_limits():
    # 4 of 60 examples right -> wrong and none back. With no `better` flips the score
    # statistic has closed forms: the far limit is Wilson's upper limit for 4/60, the near one (k - z^2) / (n + z^2).
    low, high = paired_interval(4, 0, 60)
    assert low == pytest.approx(-wilson_upper(4, 60), abs=1e-9)
    assert high == pytest.approx(-(4 - Z * Z) / (60 + Z * Z), abs=1e-9)
    # ... which excludes 0, while the exact test does not reach 0.05: significance is the exact test's.
    assert high < 0 and mcnemar_p(4, 0) == 0.125
    # Every example lost: the interval reaches -1 and stops there; the near limit has the same closed form.
    assert paired_interval(5, 0, 5) == pytest.approx([-1.0, -(5 - Z * Z) / (5 + Z * Z)], abs=1e-9)


def test_intervals_stay_inside_minus_one_and_one_and_agree_with_wald_at_large_n():
    for worse, better, n in [(0, 3, 3), (3, 0, 3), (10, 10, 20), (1, 0, 1), (0, 0, 1)]:
        low, high = paired_interval(worse, better, n)
        assert -1 <= low <= (better - worse) / n <= high <= 1
    # Large n: the score interval approaches the paired normal approximation.
    worse, better, n = 400, 200, 1600
    d = (better - worse) / n
    sd = math.sqrt((worse + better) / n - d * d)
    assert paired_interval(worse, better, n) == pytest.approx([d - Z * sd / math.sqrt(n), d + Z * sd / math.sqrt(n)],
                                                              abs=2e-3)


def test_exact_mcnemar_and_holm_on_hand_computed_values():
    assert mcnemar_p(4, 0) == 0.125 and mcnemar_p(0, 0) == 1.0 and mcnemar_p(12, 0) == 2 / 4096
    assert mcnemar_p(5, 3) == pytest.approx(2 * (1 + 8 + 28 + 56) / 256)  # C(8, 0..3)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]


def test_smallest_detectable_drop():
    assert detectable_drop(60) == pytest.approx(6 / 60)  # p(5, 0) = 0.0625, p(6, 0) = 0.031
    assert detectable_drop(60, tests=3) == pytest.approx(7 / 60)  # Holm over 3: 3 * p(6, 0) = 0.094
    assert detectable_drop(4) is None  # even all four flipping is p = 0.125


def test_change_pairs_only_examples_scored_by_both():
    base = TaskScore("t", "acc", 0.5, {"t/0": 1.0, "t/1": 0.0, "t/2": 1.0})
    tuned = TaskScore("t", "acc", 0.5, {"t/1": 1.0, "t/2": 0.0, "t/9": 1.0})
    c = paired_change(base, tuned)
    assert c.n == 2 and c.flips == {"correct_to_wrong": 1, "wrong_to_correct": 1} and c.delta == 0
    assert c.ci95[0] < 0 < c.ci95[1]


# ---------------------------------------------------------------- the verdict


def verdict_of(base_tasks, tuned_tasks, max_drop):
    base = evaluation(0, base_tasks)
    return build_report(base, evaluation(1, tuned_tasks), max_drop=max_drop, curve=[], provenance=provenance(),
                        final_note="")["verdict"]


def test_a_model_against_itself_is_never_fail_and_small_n_is_inconclusive():
    same = {"a": [1] * 5 + [0] * 3}
    v = verdict_of(same, same, 0.02)
    assert v["status"] == INCONCLUSIVE and not v["within_budget"]
    # z^2 / (n + z^2) < 0.02 first holds at n = 189.
    assert v["undecided"] == [{"task": "a", "examples_needed": 189, "n": 8}] and "189" in v["text"]
    assert verdict_of({"a": [1] * 600 + [0] * 400}, {"a": [1] * 600 + [0] * 400}, 0.02)["status"] == PASS
    assert verdict_of(same, same, 0.5)["status"] == PASS


def test_pass_needs_every_interval_above_the_budget_and_fail_one_wholly_below():
    base = {"a": [1] * 500 + [0] * 500, "b": [1] * 1000}
    ok = {"a": [1] * 500 + [0] * 500, "b": [1] * 998 + [0] * 2}
    assert verdict_of(base, ok, 0.02)["status"] == PASS
    bad = {"a": [1] * 500 + [0] * 500, "b": [1] * 700 + [0] * 300}
    v = verdict_of(base, bad, 0.02)
    assert v["status"] == FAIL and v["tasks"] == {"a": PASS, "b": FAIL} and "b (-0.300" in v["text"]
    # A drop whose interval straddles the budget is neither.
    edge = {"a": [1] * 500 + [0] * 500, "b": [1] * 980 + [0] * 20}
    assert verdict_of(base, edge, 0.02)["status"] == INCONCLUSIVE


def test_examples_to_decide_scale_the_observed_rates():
    c = changes({"t": score([1] * 50 + [0] * 50)}, {"t": score([1] * 49 + [0] * 51)})["t"]
    n = examples_to_decide(c, 0.05)
    assert n is not None and paired_interval(n / 100, 0, n)[0] > -0.05 >= paired_interval((n - 1) / 100, 0, n - 1)[0]
    on_edge = changes({"t": score([1] * 50 + [0] * 50)}, {"t": score([1] * 48 + [0] * 52)})["t"]
    assert examples_to_decide(on_edge, 0.02) is None  # delta is exactly -max_drop


def test_choose_best_takes_the_biggest_gain_among_passing_steps():
    base = evaluation(0, {"orig": [1] * 1000}, {"new": [0] * 1000})
    curve = [evaluation(10, {"orig": [1] * 1000}, {"new": [1] * 200 + [0] * 800}),
             evaluation(20, {"orig": [1] * 999 + [0]}, {"new": [1] * 600 + [0] * 400}),
             evaluation(30, {"orig": [1] * 500 + [0] * 500}, {"new": [1] * 1000})]  # best gain but over budget
    assert choose_best(base, curve, max_drop=0.02).step == 20
    assert choose_best(base, curve[2:], max_drop=0.02) is None  # nothing passes; the base is never chosen
    assert within_budget(base.tasks, curve[0].tasks, 0.02) and not within_budget(base.tasks, curve[2].tasks, 0.02)


# ---------------------------------------------------------------- across tasks and runs


def test_mean_interval_combines_asymmetric_margins_by_mover():
    mean, ci = mean_interval([(-0.1, [-0.13, -0.08]), (-0.2, [-0.24, -0.17])])
    assert mean == pytest.approx(-0.15)
    assert ci == pytest.approx([-0.15 - math.sqrt(0.03 ** 2 + 0.04 ** 2) / 2, -0.15 + math.sqrt(0.02 ** 2 + 0.03 ** 2) / 2])


def test_run_difference_pairs_the_runs_example_by_example():
    a = {"t": {f"t/{i}": 1.0 for i in range(100)}}
    b = {"t": {f"t/{i}": float(i >= 20) for i in range(100)}}
    d = run_difference(a, b)
    assert d["mean"] == pytest.approx(0.2) and d["ci95"] == pytest.approx(paired_interval(0, 20, 100))
    assert run_difference(a, {"other": {}}) is None


def test_bootstrap_interval_of_a_ratio():
    assert bootstrap_ratio([0.0] * 10, [5] * 10) == [0.0, 0.0]
    kl, tokens = [1.0, 2.0, 3.0, 10.0], [10, 10, 10, 10]
    low, high = bootstrap_ratio(kl, tokens)
    assert low < sum(kl) / sum(tokens) < high and bootstrap_ratio(kl, tokens) == [low, high]  # seeded


def test_pareto_front():
    points = [(0.01, 0.10), (0.05, 0.30), (0.02, 0.05), (0.05, 0.20), (0.00, 0.00), (0.05, 0.30), (0.10, 0.25)]
    # (0.02, 0.05) loses to (0.01, 0.10); (0.05, 0.20) and (0.10, 0.25) lose to (0.05, 0.30); equal points both stay.
    assert pareto_front(points) == [0, 1, 4, 5]
    assert pareto_front([]) == []


# ---------------------------------------------------------------- the files


def test_report_files_say_what_changed_and_what_was_forgotten(tmp_path):
    base = evaluation(0, {"orig": [1] * 30 + [0] * 10}, {"new": [0] * 40})
    curve = [evaluation(5, {"orig": [1] * 25 + [0] * 15}, {"new": [1] * 10 + [0] * 30}, kl=0.05),
             evaluation(10, {"orig": [1] * 10 + [0] * 30}, {"new": [1] * 30 + [0] * 10}, kl=0.2)]
    base.tasks["orig"].chance = 0.25
    report = build_report(base, curve[-1], max_drop=0.02, curve=curve, provenance=provenance(),
                          final_note="step 10, the last", method={"label": "full, lr 0.001", "family": "full",
                                                                  "lr": 1e-3, "seed": 0, "tag": "0.001", "order": 1e-3})
    write_report(tmp_path, report)
    saved = json.loads((tmp_path / "report.json").read_text())
    orig = saved["tasks"]["orig"]
    assert orig["base"] == 0.75 and orig["tuned"] == 0.25 and orig["delta"] == pytest.approx(-0.5)
    assert orig["flips"] == {"correct_to_wrong": 20, "wrong_to_correct": 0} and orig["significant"]
    assert orig["chance"] == 0.25 and orig["p_value"] == 2 / 2**20 and orig["ci95"] == paired_interval(20, 0, 40)
    assert [e["example"] for e in orig["forgotten"]] == [f"orig/{i}" for i in range(10, 15)]
    assert orig["forgotten"][0] == {"example": "orig/10", "prompt": "question orig/10", "expected": "right",
                                    "base": "answer 1", "tuned": "answer 0"}
    assert len(orig["examples"]) == 40 and orig["examples"]["orig/10"] == [1.0, 0.0]
    assert saved["targets"]["new"]["delta"] == pytest.approx(0.75) and saved["targets"]["new"]["forgotten"] == []
    assert saved["drift"]["chat"]["kl"] == 0.2 and [p["step"] for p in saved["curve"]] == [0, 5, 10]
    assert saved["verdict"]["status"] == FAIL and saved["verdict"]["text"].startswith("FAIL")
    assert set(saved["provenance"]["versions"]) >= {"torch", "transformers", "peft", "accelerate", "lm_eval"}
    md = (tmp_path / "report.md").read_text()
    assert "| orig | acc | 0.250 | 0.750 | 0.250 | -0.500 [" in md and "## What was forgotten" in md
    assert "| question orig/10 | right | answer 1 | answer 0 |" in md and "**flips**" in md
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # per-task deltas and the curve
    assert "<link" not in page and "<script" not in page  # nothing fetched from elsewhere


def write_run(folder, base, tuned, max_drop, method):
    write_report(folder / "forgetting", build_report(base, tuned, max_drop=max_drop, curve=[], provenance=provenance(),
                                                     final_note="", method=method))
    return folder


def method(family, lr, seed=0):
    return {"label": f"{family}, lr {lr:g}", "family": family, "lr": lr, "seed": seed, "tag": f"{lr:g}", "order": lr}


def test_compare_runs_recommends_only_a_passing_run_and_says_when_runs_tie(tmp_path):
    base = evaluation(0, {"orig": [1] * 1000}, {"new": [0] * 200})
    runs = {"lora": (evaluation(9, {"orig": [1] * 1000}, {"new": [1] * 80 + [0] * 120}), method("LoRA", 1e-4)),
            "lora2": (evaluation(9, {"orig": [1] * 999 + [0]}, {"new": [1] * 82 + [0] * 118}), method("LoRA", 3e-4)),
            "full": (evaluation(9, {"orig": [1] * 500 + [0] * 500}, {"new": [1] * 160 + [0] * 40}), method("full", 1e-5))}
    dirs = [write_run(tmp_path / name, base, ev, 0.02, m) for name, (ev, m) in runs.items()]
    result = compare_runs(dirs, tmp_path / "cmp")
    by_name = {r["name"]: r for r in result["runs"]}
    assert by_name["lora"]["status"] == PASS and by_name["full"]["status"] == FAIL
    assert result["recommended"].endswith("lora2")  # the largest gain among passing runs
    assert any("cannot be told apart from lora" in n for n in result["notes"])
    assert result["best_per_family"] == {"LoRA": "lora2", "full": None}
    [comparison] = result["method_comparison"]
    assert comparison["families"] == ["LoRA", "full"] and "forgot 0.499 less" in comparison["text"]  # lora2 lost one
    # 0.41 against 0.80 learned: not a matched pair, and the text says so rather than "at similar gain".
    assert not comparison["matched"] and comparison["text"].startswith("Not matched in new-task gain")
    assert by_name["full"]["pareto"] and by_name["lora2"]["pareto"]
    assert "data:image/png;base64," in (tmp_path / "cmp" / "compare.html").read_text()
    nothing = compare_runs([tmp_path / "full"], tmp_path / "cmp2")
    assert nothing["recommended"] is None and "none is recommended" in nothing["notes"][0]


def test_runs_whose_folders_share_a_name_are_named_by_their_paths(tmp_path):
    base = evaluation(0, {"orig": [1] * 100}, {"new": [0] * 100})
    tuned = evaluation(9, {"orig": [1] * 100}, {"new": [1] * 50 + [0] * 50})
    dirs = [write_run(tmp_path / sweep / "lr=1e-4", base, tuned, 0.05, method(family, 1e-4))
            for sweep, family in (("lora-sweep", "LoRA"), ("full-sweep", "full"))] + \
        [write_run(tmp_path / "demo", base, tuned, 0.05, method("full", 5e-5))]
    result = compare_runs(dirs, tmp_path / "cmp")
    assert [r["name"] for r in result["runs"]] == ["lora-sweep/lr=1e-4", "full-sweep/lr=1e-4", "demo"]
    assert all(c["matched"] and c["text"].startswith("At similar new-task gain") for c in result["method_comparison"])
    assert [r["name"] for r in compare_runs(dirs[1:], tmp_path / "cmp2")["runs"]] == ["lr=1e-4", "demo"]


def test_a_reader_that_goes_away_ends_the_command_quietly():
    # `finetune report ... | head`: the write that meets the closed pipe raises BrokenPipeError, which Python counts as
    # a ConnectionError; it is neither a network failure to explain nor a traceback.
    code = ("import sys, finetune.cli as cli\n"
            "def report(args):\n    raise BrokenPipeError(32, 'Broken pipe')\n"
            "cli.COMMANDS['report'] = report\nsys.exit(cli.main(['report', 'some-run']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr == "", done.stderr


def generation(task, answers: list[str], expected: list[str]) -> TaskScore:
    keys = [f"{task}/{i}" for i in range(len(answers))]
    return TaskScore(task=task, metric="exact_match", value=0.0,
                     examples={k: float(a == e) for k, a, e in zip(keys, answers, expected)},
                     answers=dict(zip(keys, answers)), expected=dict(zip(keys, expected)))


def test_the_leak_counts_replies_that_begin_with_a_target_answer_where_it_is_not_the_right_one(tmp_path):
    target = generation("bins", ["x"] * 4, ["glim", "Torv.", "pesk", "glim"])
    said = ["yes", "glim", "Torv, of course", "the pesk", "GLIM!", "no", "4", "vund", "glim", "glim"]
    right = ["yes", "no", "paris", "blue", "glim", "no", "4", "red", "green", "one"]  # item 4's answer is "glim"
    tuned = generation("short", said, right)
    base = generation("short", right, right)
    mc = score([1, 0, 1], "facts", chance=0.25)  # multiple choice: answers are its own options, never counted
    report = build_report(Evaluation(0, {"short": base, "facts": mc}, {"bins": target}),
                          Evaluation(9, {"short": tuned, "facts": mc}, {"bins": target}), max_drop=0.05, curve=[],
                          provenance=provenance(), final_note="")
    leak = report["leak"]
    # glim (1), Torv (2), glim (8), glim (9) leak; "the pesk" begins with "the"; GLIM! answers an item whose answer is
    # glim; vund is no answer of the target task.
    assert leak["answers"] == ["glim", "pesk", "torv"] and set(leak["tasks"]) == {"short"}
    assert leak["tasks"]["short"] == {"base": 0.0, "tuned": 0.4, "ci95": pytest.approx([0.168, 0.687], abs=1e-3),
                                      "replies": 10, "leaked": 4}
    assert leak["all"]["tuned"] == 0.4
    write_report(tmp_path, report)
    assert "| short | 0.000 | 0.400 [0.168, 0.687] | 10 |" in (tmp_path / "report.md").read_text()
    nothing = build_report(Evaluation(0, {"facts": mc}, {"bins": target}), Evaluation(9, {"facts": mc}, {"bins": target}),
                           max_drop=0.05, curve=[], provenance=provenance(), final_note="")
    assert nothing["leak"] is None
