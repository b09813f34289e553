"""Forgetting measured inside `finetune train`: base before, every eval.every updates, the budget policy, the report."""

import json

from conftest import conflicting_recipe, metrics, run


def test_train_measures_base_curve_and_writes_the_report(tmp_path, base_dir, tasks):
    run_dir, _ = run(conflicting_recipe(tmp_path, base_dir, tasks, every=10, max_drop=0.05))
    report = json.loads((run_dir / "forgetting" / "report.json").read_text())
    assert [p["step"] for p in report["curve"]] == [0, 10, 20]
    original, new = report["tasks"]["original"], report["targets"]["conflict"]  # keyed by lm-eval's task name
    assert original["base"] > 0.9 and original["delta"] < 0 and original["significant"]
    assert new["delta"] > 0
    assert not report["verdict"]["within_budget"]
    assert report["final"] == {"step": 20, "why": "final/ is the model after step 20, the last update"}
    for name in ("report.md", "report.html"):
        assert (run_dir / "forgetting" / name).is_file()


def test_over_budget_with_stop_ends_the_run_at_the_first_evaluation(tmp_path, base_dir, tasks):
    run_dir, _ = run(conflicting_recipe(tmp_path, base_dir, tasks, every=5, max_drop=0.0, on_over_budget="stop"))
    assert metrics(run_dir)[-1]["step"] == 5 and (run_dir / "final").is_dir()
    report = json.loads((run_dir / "forgetting" / "report.json").read_text())
    assert report["final"]["step"] == 5
    assert "no evaluated step stayed within the forgetting budget" in report["final"]["why"]


def test_keep_best_makes_final_the_best_step_within_budget_and_keeps_the_last(tmp_path, base_dir, tasks):
    # A budget no step can break: the best is the step that gained most, the latest among equals.
    run_dir, _ = run(conflicting_recipe(tmp_path, base_dir, tasks, every=5, max_drop=1.0,
                                        on_over_budget="keep_best"))
    report = json.loads((run_dir / "forgetting" / "report.json").read_text())
    gains = {p["step"]: p for p in report["curve"]}
    assert sorted(gains) == [0, 5, 10, 15, 20]
    assert (run_dir / "final").is_dir() and not (run_dir / "best").exists()
    best = max((p for p in report["curve"] if p["step"]), key=lambda p: (p["targets"]["conflict"], p["step"]))
    assert report["final"]["step"] == best["step"]
    assert (run_dir / "last").is_dir() == (best["step"] != 20)


def test_eval_of_a_finished_run_draws_the_curve_from_its_checkpoints(tmp_path, base_dir, tasks):
    from finetune.cli import main as cli_main

    recipe = conflicting_recipe(tmp_path, base_dir, tasks)
    for lora in ([], ["lora.r=4"]):
        out = tmp_path / ("lora" if lora else "full")
        run_dir, _ = run(recipe, f"output.dir={out}", "output.save_every=5", "output.keep=2", *lora)
        trained = json.loads((run_dir / "forgetting" / "report.json").read_text())
        assert [p["step"] for p in trained["curve"]] == [0, 20]  # eval.every: 0 measures the base and the end
        assert cli_main(["eval", str(base_dir), str(run_dir), "--checkpoints"]) == 0
        report = json.loads((run_dir / "forgetting-2" / "report.json").read_text())
        assert [p["step"] for p in report["curve"]] == [0, 10, 15, 20]  # keep: 2 left steps 10 and 15
        # The end of the curve is final/, measured as training measured it.
        assert report["tasks"]["original"]["tuned"] == trained["tasks"]["original"]["tuned"]
        assert report["curve"][0]["tasks"]["original"] == trained["tasks"]["original"]["base"]
        middle = report["curve"][1]["targets"]["conflict"]
        assert report["curve"][0]["targets"]["conflict"] < middle  # step 10 had already learned some
