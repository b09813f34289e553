"""The forgetting report of a run (`<run>/forgetting/report.{json,md,html}`) and the comparison of runs.

report.json is the record; report.md and report.html are views of it, so a report can be re-rendered or
compared later from the JSON alone. The HTML is one self-contained file: its plots are inline PNGs.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import json
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .errors import UserError
from .forgetting import Change, largest_drop, mean_change, paired_change, pareto_front, within_budget
from .recipe import Recipe, recipe_to_dict
from .records import Evaluation

PACKAGES = ("finetune", "torch", "transformers", "peft", "accelerate", "lm_eval", "datasets")

HOW_TO_READ = [
    ("verdict", "PASS when no original task dropped by more than eval.max_drop, in the metric's units (0.02 = 2 "
                "points of accuracy); judged on the measured drop, the 95% CI says how sure it is."),
    ("base", "the score of the model before fine-tuning."),
    ("tuned", "the score of the fine-tuned model (the one in final/) on the same examples."),
    ("delta", "tuned - base. On original tasks a negative delta is forgetting; on target tasks a positive one "
              "is learning."),
    ("95% CI", "the range the true delta lies in with 95% confidence, from the per-example differences "
               "(delta +- 1.96 x their standard deviation / sqrt(n)); when every example changed alike it has "
               "no width, the limit of this approximation."),
    ("n", "the number of examples both models were scored on."),
    ("flips", "right->wrong: examples the base got right and the tuned model gets wrong; wrong->right: the reverse."),
    ("significant", "yes when the 95% CI excludes 0: the change is unlikely to be noise."),
    ("KL", "how far the tuned model's next-token probabilities moved from the base's, averaged over every token "
           "of general text (nats; 0 = unchanged)."),
    ("perplexity", "how surprised each model is by that text; a ratio above 1 means the tuned model finds "
                   "general text less likely than the base did."),
]


def provenance(recipe: Recipe | None = None) -> dict:
    """What made the report, as lm-eval's results say it: recipe, seed, package versions, git commit, date."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        git = None
    return {"recipe": recipe_to_dict(recipe) if recipe is not None else None,
            "seed": recipe.train.seed if recipe is not None else None, "versions": versions, "git": git,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _verdict(base: Evaluation, tuned: Evaluation, changes: dict[str, Change], max_drop: float) -> dict:
    worst = largest_drop(base.tasks, tuned.tasks)
    ok = within_budget(base.tasks, tuned.tasks, max_drop)
    if worst is None:
        text = "No original tasks were evaluated (eval.tasks is empty): only the drift measures forgetting."
    else:
        name, drop = worst
        c = changes[name]
        numbers = f"{c.metric} {c.base:.3f} -> {c.tuned:.3f}"
        if drop <= 0:
            text = f"PASS: no original task dropped (the one that gained least, {base.tasks[name].task}: {numbers})."
        else:
            text = (f"{'PASS' if ok else 'FAIL'}: the largest drop is {drop:.3f} on {base.tasks[name].task} "
                    f"({numbers}), {'within' if ok else 'over'} the budget of {max_drop:.3f} (eval.max_drop)"
                    f"{'; the drop is significant' if c.significant else '; the drop is within noise'}.")
    return {"max_drop": max_drop, "within_budget": ok, "text": text,
            "largest_drop": None if worst is None else {"task": base.tasks[worst[0]].task, "drop": worst[1]}}


def _curve_point(e: Evaluation) -> dict:
    return {"step": e.step, "tasks": {s.task: s.value for s in e.tasks.values()},
            "targets": {s.task: s.value for s in e.targets.values()}, "kl": e.drift.kl if e.drift else 0.0}


def build_report(base: Evaluation, tuned: Evaluation, *, max_drop: float, curve: list[Evaluation],
                 provenance: dict, final_note: str, method: str = "-") -> dict:
    """The report.json record. `curve` is every evaluation during training (the base is added as step 0);
    `final_note` says which checkpoint final/ is and why (e.g. "step 120, the best within budget"); `method` is what
    comparisons call the run (mitigations.method_label)."""
    changes = {spec: paired_change(base.tasks[spec], tuned.tasks[spec]) for spec in base.tasks}
    gains = {spec: paired_change(base.targets[spec], tuned.targets[spec]) for spec in base.targets}
    return {
        "verdict": _verdict(base, tuned, changes, max_drop),
        "tasks": {base.tasks[s].task: dataclasses.asdict(c) for s, c in changes.items()},
        "targets": {base.targets[s].task: dataclasses.asdict(c) for s, c in gains.items()},
        "drift": dataclasses.asdict(tuned.drift) if tuned.drift else None,
        "curve": [_curve_point(e) for e in [base, *curve]] if curve else [],
        "final": {"step": tuned.step, "why": final_note},
        "method": method,
        "provenance": provenance,
    }


# ---------------------------------------------------------------- views


def _fmt(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else f"{x:+.3f}" if signed else f"{x:.3f}"


def _task_rows(changes: dict) -> list[list[str]]:
    rows = []
    for name, c in changes.items():
        ci = "-" if c["ci95"] is None else f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"
        rows.append([name, c["metric"], _fmt(c["base"]), _fmt(c["tuned"]), _fmt(c["delta"], True), ci, str(c["n"]),
                     f"{c['flips']['correct_to_wrong']} / {c['flips']['wrong_to_correct']}",
                     "yes" if c["significant"] else "no"])
    return rows


TASK_HEADER = ["task", "metric", "base", "tuned", "delta", "95% CI", "n", "flips right->wrong / wrong->right",
               "significant"]


def _sections(report: dict) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) for each table, shared by the Markdown and HTML views."""
    out = [("Original tasks (what the model must not forget)", TASK_HEADER, _task_rows(report["tasks"]), "")]
    if report["targets"]:
        out.append(("Target tasks (the new skill)", TASK_HEADER, _task_rows(report["targets"]), ""))
    if report["drift"]:
        d = report["drift"]
        out.append(("Drift from the base model", ["KL(base ‖ tuned) per token", "perplexity base", "perplexity tuned",
                                                   "ratio", "tokens"],
                    [[f"{d['kl']:.4f}", f"{d['ppl_base']:.2f}", f"{d['ppl_tuned']:.2f}", f"{d['ppl_ratio']:.3f}",
                      str(d["tokens"])]], ""))
    if len(report["curve"]) > 1:
        names = list(report["curve"][0]["tasks"]) + list(report["curve"][0]["targets"])
        rows = [[str(p["step"]), *(_fmt({**p["tasks"], **p["targets"]}[n]) for n in names), f"{p['kl']:.4f}"]
                for p in report["curve"]]
        out.append(("Learning vs forgetting during training", ["step", *names, "KL"], rows,
                    "Step 0 is the base model."))
    return out


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _footer(report: dict) -> list[tuple[str, str]]:
    p = report["provenance"]
    versions = ", ".join(f"{k} {v}" for k, v in p["versions"].items() if v)
    return [("final/", report["final"]["why"]), ("seed", "-" if p["seed"] is None else str(p["seed"])),
            ("versions", versions), ("git", p["git"] or "-"), ("date", p["date"])]


def render_markdown(report: dict) -> str:
    parts = ["# Forgetting report", "", f"**{report['verdict']['text']}**", ""]
    for title, header, rows, note in _sections(report):
        parts += [f"## {title}", "", _markdown_table(header, rows), ""] + ([note, ""] if note else [])
    parts += ["## How to read this", ""] + [f"- **{k}**: {v}" for k, v in HOW_TO_READ] + [""]
    parts += ["## Provenance", ""] + [f"- **{k}**: {v}" for k, v in _footer(report)] + [""]
    return "\n".join(parts)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(width: float, height: float):
    # A Figure on the Agg canvas directly: no pyplot, so no global backend state and nothing opens a window.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _bars_plot(report: dict) -> str:
    changes = {**report["tasks"], **report["targets"]}
    fig = _figure(max(4.0, 1.4 * len(changes)), 3.2)
    ax = fig.add_subplot()
    xs = range(len(changes))
    ax.bar([x - 0.2 for x in xs], [c["base"] for c in changes.values()], 0.4, label="base", color="#9e9e9e")
    ax.bar([x + 0.2 for x in xs], [c["tuned"] for c in changes.values()], 0.4, label="tuned", color="#1f77b4",
           yerr=[(c["ci95"][1] - c["ci95"][0]) / 2 if c["ci95"] else 0 for c in changes.values()], capsize=4)
    ax.set_xticks(list(xs), [f"{n}\n({'target' if n in report['targets'] else 'original'})" for n in changes])
    ax.set_ylabel("score")
    ax.set_title("base vs tuned (error bar: 95% CI of the paired change)")
    ax.legend()
    return _png(fig)


def _curve_plot(report: dict) -> str:
    curve = report["curve"]
    fig = _figure(9, 3.2)
    scores, kl = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    steps = [p["step"] for p in curve]
    for kind, style in (("tasks", "-"), ("targets", "--")):
        for name in curve[0][kind]:
            scores.plot(steps, [p[kind][name] for p in curve], style, marker="o",
                        label=f"{name} ({'original' if kind == 'tasks' else 'target'})")
    scores.set_xlabel("step")
    scores.set_ylabel("score")
    scores.set_title("learning vs forgetting")
    scores.legend(fontsize="small")
    kl.plot(steps, [p["kl"] for p in curve], marker="o", color="#d62728")
    kl.set_xlabel("step")
    kl.set_ylabel("KL(base ‖ tuned) per token")
    kl.set_title("drift from the base")
    return _png(fig)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


STYLE = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
         "td:first-child,th:first-child{text-align:left}.verdict{font-size:1.2em;font-weight:bold}")


def _html_page(title: str, body: list[str]) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(body)}</body></html>")


def render_html(report: dict) -> str:
    body = [f"<p class='verdict'>{html.escape(report['verdict']['text'])}</p>"]
    for title, header, rows, note in _sections(report):
        body += [f"<h2>{html.escape(title)}</h2>", _html_table(header, rows)] + ([f"<p>{note}</p>"] if note else [])
    if report["tasks"] or report["targets"]:
        body.append(f"<img alt='base vs tuned per task' src='{_bars_plot(report)}'>")
    if len(report["curve"]) > 1:
        body.append(f"<img alt='scores and drift over training steps' src='{_curve_plot(report)}'>")
    body += ["<h2>How to read this</h2><ul>"] + [f"<li><b>{k}</b>: {html.escape(v)}</li>" for k, v in HOW_TO_READ]
    body += ["</ul><h2>Provenance</h2><ul>"] + [f"<li><b>{k}</b>: {html.escape(v)}</li>" for k, v in _footer(report)]
    return _html_page("Forgetting report", body + ["</ul>"])


def write_report(out_dir: Path, report: dict) -> None:
    """report.json, report.md and report.html in `out_dir` (created if needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(report), encoding="utf-8")


# ---------------------------------------------------------------- comparing runs


def _run_summary(run: Path) -> dict:
    path = run / "forgetting" / "report.json"
    if not path.is_file():
        raise UserError(f"{run} has no forgetting report ({path}); make one with `finetune eval`.")
    report = json.loads(path.read_text(encoding="utf-8"))
    drop = gain = (None, None)
    if report["tasks"]:
        mean, half = mean_change([Change(**c) for c in report["tasks"].values()])
        drop = (-mean, half)
    targets = [Change(**c) for c in report["targets"].values()]
    if targets:
        gain = mean_change(targets)
    before = sum(c.base for c in targets) / len(targets) if targets else None
    after = sum(c.tuned for c in targets) / len(targets) if targets else None
    return {"run": str(run), "method": report.get("method", "-"), "target_base": before, "target_tuned": after,
            "drop": drop[0], "drop_ci_half_width": drop[1],
            "gain": gain[0], "gain_ci_half_width": gain[1], "largest_drop": report["verdict"]["largest_drop"],
            "within_budget": report["verdict"]["within_budget"],
            "kl": report["drift"]["kl"] if report["drift"] else None}


def _plane_plot(runs: list[dict]) -> str:
    fig = _figure(6, 4.5)
    ax = fig.add_subplot()
    placed = [r for r in runs if r["gain"] is not None and r["drop"] is not None]
    for r in placed:
        ax.errorbar(r["drop"], r["gain"], xerr=r["drop_ci_half_width"] or 0, yerr=r["gain_ci_half_width"] or 0,
                    fmt="o", capsize=3, color="#d62728" if r["pareto"] else "#1f77b4")
    ax.axvline(0, color="#999", lw=0.8)
    for r, (dx, dy, ha) in zip(placed, _label_offsets([(r["drop"], r["gain"]) for r in placed],
                                                      [Path(r["run"]).name for r in placed], ax)):
        ax.annotate(Path(r["run"]).name, (r["drop"], r["gain"]), textcoords="offset points", xytext=(dx, dy), ha=ha,
                    fontsize=9)
    front = sorted((r["drop"], r["gain"]) for r in runs if r["pareto"])
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="#d62728", label="Pareto front")
    ax.set_xlabel("forgetting: mean drop on original tasks (lower is better)")
    ax.set_ylabel("learning: mean gain on target tasks (higher is better)")
    ax.set_title("learning vs forgetting (error bars: 95% CI)")
    ax.legend()
    return _png(fig)


def _label_offsets(points: list[tuple[float, float]], names: list[str], ax) -> list[tuple[int, int, str]]:
    """Where each point's name goes (offset in points, alignment): the first of right-above, right-below,
    left-above, left-below whose box overlaps no earlier label and no other point, so that close runs stay
    readable. Boxes are estimated in axes fractions for a 6-inch plot and 9-point text."""
    (x_lo, x_hi), (y_lo, y_hi) = ax.get_xlim(), ax.get_ylim()
    norm = [((x - x_lo) / (x_hi - x_lo), (y - y_lo) / (y_hi - y_lo)) for x, y in points]
    boxes, out = [], []
    for i, ((x, y), name) in enumerate(zip(norm, names)):
        width, height = 0.0145 * len(name), 0.05
        for dx, dy, ha in ((5, 4, "left"), (5, -13, "left"), (-5, 4, "right"), (-5, -13, "right")):
            x0 = x + 0.012 if ha == "left" else x - 0.012 - width
            y0 = y + 0.01 if dy > 0 else y - 0.01 - height
            box = (x0, y0, x0 + width, y0 + height)
            hits = any(b[0] < box[2] and box[0] < b[2] and b[1] < box[3] and box[1] < b[3] for b in boxes) or any(
                box[0] <= px <= box[2] and box[1] <= py <= box[3] for j, (px, py) in enumerate(norm) if j != i)
            if not hits:
                break
        boxes.append(box)
        out.append((dx, dy, ha))
    return out


def summary_table(result: dict) -> str:
    """The few numbers a terminal should show: what each run learned, what it cost, and whether it fits."""
    header = ["run", "method", "new task: before -> after", "original tasks: mean change (95% CI)", "KL drift",
              "within budget"]
    rows = []
    for r in result["runs"]:
        learned = "-" if r["target_base"] is None else f"{r['target_base']:.3f} -> {r['target_tuned']:.3f}"
        change = "-" if r["drop"] is None else f"{-r['drop']:+.3f}" + (
            "" if r["drop_ci_half_width"] is None else f" +- {r['drop_ci_half_width']:.3f}")
        rows.append([Path(r["run"]).name, r["method"], learned, change,
                     "-" if r["kl"] is None else f"{r['kl']:.4f}", "yes" if r["within_budget"] else "no"])
    return _markdown_table(header, rows)


def recommended(runs: list[dict]) -> int | None:
    """Index of the run within budget with the largest target gain (then the smallest drop); None if none fits."""
    fits = [i for i, r in enumerate(runs) if r["within_budget"]]
    return max(fits, key=lambda i: (runs[i]["gain"] or 0.0, -(runs[i]["drop"] or 0.0)), default=None)


def compare_runs(run_dirs: list[Path], out_dir: Path) -> dict:
    """`finetune report RUN [RUN...]`: one table over runs and the learning-forgetting plane (x: mean drop on the
    original tasks, y: mean gain on the target tasks, as in Biderman et al. 2024, "LoRA Learns Less and Forgets
    Less"), written as compare.{json,md,html} in `out_dir`. Runs on the Pareto front are those no other run
    beats in both forgetting less and learning more; runs without target tasks stay off the plane."""
    runs = [_run_summary(Path(r)) for r in run_dirs]
    placed = [i for i, r in enumerate(runs) if r["drop"] is not None and r["gain"] is not None]
    front = {placed[i] for i in pareto_front([(runs[j]["drop"], runs[j]["gain"]) for j in placed])}
    for i, r in enumerate(runs):
        r["pareto"] = i in front
    pick = recommended(runs)
    for i, r in enumerate(runs):
        r["recommended"] = i == pick
    header = ["run", "method", "largest drop", "mean drop (95% CI)", "mean target gain (95% CI)", "KL",
              "within budget", "Pareto front", "recommended"]

    def pm(x, half):
        return "-" if x is None else f"{x:+.3f}" + ("" if half is None else f" +- {half:.3f}")

    rows = [[r["run"], r["method"],
             "-" if r["largest_drop"] is None else f"{r['largest_drop']['drop']:+.3f} ({r['largest_drop']['task']})",
             pm(r["drop"], r["drop_ci_half_width"]), pm(r["gain"], r["gain_ci_half_width"]),
             "-" if r["kl"] is None else f"{r['kl']:.4f}", "yes" if r["within_budget"] else "no",
             "yes" if r["pareto"] else "", "**yes**" if r["recommended"] else ""] for r in runs]
    note = ("Drop and gain are means over tasks of the paired deltas; their intervals combine the tasks' intervals "
            "as independent (sqrt of the summed squared half-widths / number of tasks). A run is on the Pareto "
            "front when no other run has both a smaller or equal drop and a larger or equal gain. The recommended "
            "run is the one within its forgetting budget (eval.max_drop) that gained most on the target tasks.")
    out_dir.mkdir(parents=True, exist_ok=True)
    if pick is None:
        note += " No run here is within its budget, so none is recommended."
    result = {"runs": runs, "recommended": None if pick is None else runs[pick]["run"], "note": note}
    (out_dir / "compare.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out_dir / "compare.md").write_text("\n".join(["# Learning vs forgetting across runs", "",
                                                   _markdown_table(header, rows), "", note, ""]), encoding="utf-8")
    body = [_html_table(header, rows), f"<p>{html.escape(note)}</p>"]
    if placed:
        body.append(f"<img alt='learning-forgetting plane' src='{_plane_plot(runs)}'>")
    (out_dir / "compare.html").write_text(_html_page("Learning vs forgetting across runs", body), encoding="utf-8")
    return result
