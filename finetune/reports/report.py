"""The forgetting report of a run (`<run>/forgetting/report.{json,md,html}`); compare.py compares runs.

report.json is the record; report.md and report.html are views of it, so a report can be re-rendered or compared
later from the JSON alone (it keeps every example's base and tuned score). The HTML is one self-contained file: its
plots are inline PNGs. No torch here: comparing reports is quick.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import json
import math
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .forgetting import Change, changes, verdict
from .forecast import change_text, cut_short, first_text, inputs_text, odds_text, pruned_text, sure_text
from .leak import answer_leak
from ..recipe import Recipe, recipe_to_dict
from .records import Evaluation, TaskScore

PACKAGES = ("finetune", "torch", "transformers", "peft", "accelerate", "lm_eval", "datasets")
FORGOTTEN_SHOWN = 5  # right -> wrong examples kept per original task
UNNAMED = {"label": "-", "family": "-", "lr": None, "seed": None, "tag": None, "order": None}

HOW_TO_READ = [
    ("verdict", "a non-inferiority decision against eval.max_drop (in the metric's units: 0.02 = 2 points). PASS: "
                "every original task's 95% interval lies above -max_drop. FAIL: some task's simultaneous interval "
                "(Bonferroni over the tasks) lies wholly below it. INCONCLUSIVE: neither can be claimed at this n; the "
                "verdict says roughly how many examples would decide it."),
    ("metric", "the score each task is judged by: the task YAML's metadata.headline_metric, else the first of acc, "
               "acc_norm, exact_match it lists. acc_norm divides each option's log-likelihood by its length in "
               "characters; on one- or two-character answers plain acc is what users expect. Other metrics are "
               "listed below the table."),
    ("chance", "the score of guessing (multiple choice: one over the number of options). A base near chance "
               "has little to forget."),
    ("delta", "tuned - base on the same examples. On original tasks a negative delta is forgetting; on target tasks "
              "a positive one is learning."),
    ("95% CI", "Tango's score interval for a paired difference of proportions: it stays within [-1, 1] and keeps a "
               "width even when no example changed (with n examples, at least +-3.84/(n+3.84))."),
    ("flips", "right->wrong: examples the base got right and the tuned model gets wrong; wrong->right: the reverse. "
              "Only these move the score."),
    ("p (Holm)", "the exact McNemar test on the flips, Holm-adjusted over the tasks of the table; significant below "
                 "0.05."),
    ("detectable", "the smallest drop this n can show at all: that many examples flipping right->wrong and none "
                   "back would just be significant."),
    ("answer leak", "the share of replies to original-task prompts (generation tasks) whose first word is an answer "
                    "of the target tasks, where that is not the right answer: the new task's answer format taking "
                    "over old prompts. Counted on the replies the evaluation already made; Wilson's 95% interval."),
    ("drift", "how far the tuned model's next-token probabilities moved from the base's: KL(base || tuned) per "
              "token, on texts the base model wrote itself. chat: its replies to general requests in its chat "
              "template (measured on the reply tokens); text: continuations of general text. The interval "
              "resamples whole texts."),
    ("perplexity", "how surprised each model is by those texts; a ratio above 1 means the tuned model finds them "
                   "less likely than the base did."),
]


def provenance(recipe: Recipe | None = None, evaluation: str | None = None) -> dict:
    """What made the report, as lm-eval's results say it: recipe, seed, package versions, git commit, date, and
    `evaluation`: the precision the evaluation chose, and why (ForgettingEval.precision)."""
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
    return {"recipe": recipe_to_dict(recipe) if recipe is not None else None, "evaluation": evaluation,
            "seed": recipe.train.seed if recipe is not None else None, "versions": versions, "git": git,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------- the record


def headline_drift(drift: dict) -> dict | None:
    """The drift a summary quotes: on chat replies where the model has a chat template, else on raw text."""
    return drift.get("chat") or drift.get("text") if drift else None


def _task_record(change: Change, base: TaskScore, tuned: TaskScore, original: bool) -> dict:
    record = dataclasses.asdict(change)
    record["available"] = base.available
    record["other_metrics"] = {
        m: dataclasses.asdict(c) for m in base.others if m in tuned.others
        for c in [changes({m: _as_headline(base, m)}, {m: _as_headline(tuned, m)})[m]]}
    keys = [k for k in base.examples if k in tuned.examples]
    record["examples"] = {k: [base.examples[k], tuned.examples[k]] for k in keys}
    lost = [k for k in keys if base.examples[k] >= 0.5 > tuned.examples[k]] if original else []
    record["forgotten"] = [{"example": k, "prompt": base.prompts.get(k, ""), "expected": base.expected.get(k, ""),
                            "base": base.answers.get(k, ""), "tuned": tuned.answers.get(k, "")}
                           for k in lost[:FORGOTTEN_SHOWN]]
    return record


def _as_headline(score: TaskScore, metric: str) -> TaskScore:
    examples = score.others[metric]
    return TaskScore(task=score.task, metric=metric, value=sum(examples.values()) / max(len(examples), 1),
                     examples=examples, chance=score.chance)


def _curve_point(e: Evaluation) -> dict:
    return {"step": e.step, "tasks": {s.task: s.value for s in e.tasks.values()},
            "targets": {s.task: s.value for s in e.targets.values()},
            "kl": {kind: d.kl for kind, d in e.drift.items()}}


def build_report(base: Evaluation, tuned: Evaluation, *, max_drop: float, curve: list[Evaluation],
                 provenance: dict, final_note: str, method: dict | None = None,
                 settings: tuple[str, str] = ("eval.max_drop", "eval.limit"), forecast: dict | None = None) -> dict:
    """The report.json record. `curve` is every evaluation during training (the base is added as step 0);
    `final_note` says which checkpoint final/ is and why (e.g. "step 120, the best within budget"); `method` says
    how comparisons name and group the run (mitigations.describe); `settings` what the verdict calls the budget and
    the limit on examples; `forecast` the forecast made during training (reports/forecast.py), shown beside what
    was measured."""
    lost = changes(base.tasks, tuned.tasks)
    gained = changes(base.targets, tuned.targets)
    names = {spec: base.tasks[spec].task for spec in base.tasks}
    limited = any(c.n < (base.tasks[s].available or c.n) for s, c in lost.items())
    return {
        "verdict": verdict(lost, names, max_drop, limited, settings),
        "tasks": {base.tasks[s].task: _task_record(c, base.tasks[s], tuned.tasks[s], True) for s, c in lost.items()},
        "targets": {base.targets[s].task: _task_record(c, base.targets[s], tuned.targets[s], False)
                    for s, c in gained.items()},
        "drift": {kind: dataclasses.asdict(d) for kind, d in tuned.drift.items()},
        "leak": answer_leak(base.tasks, tuned.tasks, base.targets),
        "curve": [_curve_point(e) for e in [base, *curve]] if curve else [],
        "final": {"step": tuned.step, "why": final_note},
        "method": method or UNNAMED,
        "provenance": provenance,
        **({"forecast": forecast} if forecast else {}),
    }


# ---------------------------------------------------------------- views of one report


def _fmt(x: float | None, signed: bool = False) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}" if signed else f"{x:.3f}"


def _ci(ci: list[float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _ci_plain(ci: list[float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _n(c: dict) -> str:
    return f"{c['n']}" + (f" of {c['available']}" if c.get("available") and c["available"] > c["n"] else "")


def _task_rows(report: dict, kind: str) -> list[list[str]]:
    statuses = report["verdict"].get("tasks", {})
    rows = []
    for name, c in report[kind].items():
        row = [name, c["metric"], _fmt(c["chance"]), _fmt(c["base"]), _fmt(c["tuned"]),
               f"{_fmt(c['delta'], True)} {_ci(c['ci95'])}", _n(c),
               f"{c['flips']['correct_to_wrong']} / {c['flips']['wrong_to_correct']}",
               f"{c['p_holm']:.3g}" + (" (significant)" if c["significant"] else ""), _fmt(c["detectable_drop"])]
        if kind == "tasks":
            row.append(statuses.get(name, "-"))
        rows.append(row)
    return rows


TASK_HEADER = ["task", "metric", "chance", "base", "tuned", "delta [95% CI]", "n", "flips right->wrong / wrong->right",
               "p (McNemar, Holm)", "detectable drop"]


def _other_rows(report: dict) -> list[list[str]]:
    return [[name, m, _fmt(o["base"]), _fmt(o["tuned"]), f"{_fmt(o['delta'], True)} {_ci(o['ci95'])}",
             f"{o['flips']['correct_to_wrong']} / {o['flips']['wrong_to_correct']}"]
            for kind in ("tasks", "targets") for name, c in report[kind].items()
            for m, o in c.get("other_metrics", {}).items()]


def _drift_rows(report: dict) -> list[list[str]]:
    return [[kind, f"{d['kl']:.4f} {_kl_ci(d)}", f"{d['ppl_base']:.2f}", f"{d['ppl_tuned']:.2f}",
             f"{d['ppl_ratio']:.3f}", str(d["texts"]), str(d["tokens"])] for kind, d in report["drift"].items()]


def _kl_ci(d: dict) -> str:
    return f"[{d['ci95'][0]:.4f}, {d['ci95'][1]:.4f}]"


def _sections(report: dict) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) for each table, shared by the Markdown and HTML views."""
    out = []
    if report["tasks"]:
        out.append(("Original tasks (what the model must not forget)", TASK_HEADER + ["vs budget"],
                    _task_rows(report, "tasks"), f"Budget: a drop of at most {report['verdict']['max_drop']:.3f} "
                                                 f"({report['verdict'].get('setting', 'eval.max_drop')}) on every "
                                                 "task."))
    if report["targets"]:
        out.append(("Target tasks (the new skill)", TASK_HEADER, _task_rows(report, "targets"), ""))
    others = _other_rows(report)
    if others:
        out.append(("Other metrics of the same examples", ["task", "metric", "base", "tuned", "delta [95% CI]",
                                                           "flips"], others, ""))
    leak = report.get("leak")
    if leak:
        rows = [[name, _fmt(t["base"]), f"{_fmt(t['tuned'])} {_ci_plain(t['ci95'])}", str(t["replies"])]
                for name, t in [*leak["tasks"].items(), ("all", leak["all"])]]
        shown = ", ".join(leak["answers"][:8]) + (" ..." if len(leak["answers"]) > 8 else "")
        out.append(("Leak of the new task's answers into original-task replies",
                    ["task", "base", "tuned [95% CI]", "replies"], rows,
                    f"The share of replies to original-task prompts whose first word is an answer of the target tasks "
                    f"({shown}), where that is not the right answer. It is the mechanism of forgetting when the new "
                    "answer format takes over short prompts."))
    forecast = report.get("forecast")
    if forecast:
        rows = []
        # A run pruned or stopped early, or whose final/ is an earlier step, was measured part-trained: its change
        # is not the final change the forecast is of.
        step = report["final"]["step"]
        early = bool(cut_short(forecast)) or (step is not None and step < forecast["max_steps"])
        for task, c in forecast["tasks"].items():
            measured = report["tasks"].get(task, {}).get("delta")
            inside = "" if measured is None else "-" if early else (
                "yes" if c["interval"][0] <= measured <= c["interval"][1] else "no")
            rows.append([task, change_text(c), _fmt(measured, True), inside])
        out.append((f"Forecast after update {forecast['step']} of {forecast['max_steps']}, beside what was measured",
                    ["task", f"forecast change [{forecast['level']:.0%} PI]", "measured change", "measured inside"],
                    rows,
                    f"From {forecast['runs']} calibration runs (eval.forecast_calibration) and "
                    f"{inputs_text(forecast)}. Verdict odds: {odds_text(forecast)}; most likely "
                    f"{forecast['verdict']}, {sure_text(forecast)}. "
                    "Measured: "
                    f"{report['verdict']['status']}." + first_text(forecast) + (pruned_text(forecast) or (
                        f" What was measured is the model after update {step} of {forecast['max_steps']}, not the "
                        "last update's: whether the interval holds it is not asked." if early else ""))))
    if report["drift"]:
        out.append(("Drift from the base model", ["texts the base wrote", "KL(base ‖ tuned) per token [95% CI]",
                                                  "perplexity base", "perplexity tuned", "ratio", "texts", "tokens"],
                    _drift_rows(report), ""))
    if report.get("unpaired"):
        rows = [[task, _fmt(z["base"]), _fmt(z["tuned"]), f"{z['z']:+.2f}", f"{z['p']:.3f}"]
                for task, z in report["unpaired"].items()]
        out.append(("For reference: lm-eval's unpaired comparison", ["task", "base", "tuned", "z", "p"], rows,
                    "lm-eval's scripts/model_comparator.py: a z-test on the two aggregate scores and their standard "
                    "errors, as if the two runs had scored unrelated examples. The tables above pair each example "
                    "with itself, so only the examples that flipped count."))
    if len(report["curve"]) > 1:
        names = list(report["curve"][0]["tasks"]) + list(report["curve"][0]["targets"])
        kinds = list(report["curve"][-1]["kl"])
        rows = [[str(p["step"]), *(_fmt({**p["tasks"], **p["targets"]}.get(n)) for n in names),
                 *(f"{p['kl'].get(k, 0.0):.4f}" for k in kinds)] for p in report["curve"]]
        out.append(("Learning vs forgetting during training", ["step", *names, *(f"KL {k}" for k in kinds)], rows,
                    "Step 0 is the base model."))
    return out


def _forgotten(report: dict) -> list[tuple[str, list[dict]]]:
    return [(name, c["forgotten"]) for name, c in report["tasks"].items() if c.get("forgotten")]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in r) + " |"
                              for r in rows])


def _footer(report: dict) -> list[tuple[str, str]]:
    p = report["provenance"]
    versions = ", ".join(f"{k} {v}" for k, v in p["versions"].items() if v)
    logs = p.get("lm_eval")  # `finetune compare` of two lm-eval runs: what was compared, not a run's final/
    if logs is None:
        made = [("final/", report["final"]["why"]), ("seed", "-" if p["seed"] is None else str(p["seed"]))]
    else:
        made = [(side, f"{logs[side]['model']} ({logs[side]['results']}, lm-eval {logs[side]['lm_eval_version']})")
                for side in ("base", "tuned")]
        if logs["not_compared"]:
            made.append(("not compared", "; ".join(logs["not_compared"]) + " (not 0 or 1 per example)"))
    if p.get("evaluation"):  # reports written before it was recorded have none
        made.append(("evaluation", p["evaluation"]))
    return [("run", report.get("method", UNNAMED)["label"]), *made, ("versions", versions), ("git", p["git"] or "-"),
            ("date", p["date"])]


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else "..." + text[-limit:]


def render_markdown(report: dict) -> str:
    parts = ["# Forgetting report", "", f"**{report['verdict']['text']}**", ""]
    for title, header, rows, note in _sections(report):
        parts += [f"## {title}", "", markdown_table(header, rows), ""] + ([note, ""] if note else [])
    forgotten = _forgotten(report)
    if forgotten:
        parts += ["## What was forgotten", "", f"Up to {FORGOTTEN_SHOWN} examples per original task that the base "
                  "got right and the tuned model gets wrong, in the order of the task.", ""]
        for name, examples in forgotten:
            parts += [f"### {name}", "", markdown_table(
                ["prompt", "expected", "base answered", "tuned answered"],
                [[_one_line(e["prompt"]), _one_line(e["expected"], 60), _one_line(e["base"], 60),
                  _one_line(e["tuned"], 60)] for e in examples]), ""]
    parts += ["## How to read this", ""] + [f"- **{k}**: {v}" for k, v in HOW_TO_READ] + [""]
    parts += ["## Provenance", ""] + [f"- **{k}**: {v}" for k, v in _footer(report)] + [""]
    return "\n".join(parts)


def png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def figure(width: float, height: float):
    # A Figure on the Agg canvas directly: no pyplot, so no global backend state and nothing opens a window.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


ORIGINAL_COLOR, TARGET_COLOR, BUDGET_COLOR = "#1f77b4", "#2ca02c", "#d62728"


def _task_plot(report: dict) -> str:
    """Left: each task's delta with its interval, against the budget (shaded: over budget). Right: each task's base
    and tuned score, with its chance level."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = [(name, c, "original") for name, c in report["tasks"].items()] + \
           [(name, c, "target") for name, c in report["targets"].items()]
    fig = figure(10, 1.4 + 0.55 * len(rows))
    deltas, scores = fig.subplots(1, 2, sharey=True, width_ratios=[3, 2])
    ys = list(range(len(rows)))[::-1]
    max_drop = report["verdict"]["max_drop"]
    deltas.axvspan(-1.05, -max_drop, color=BUDGET_COLOR, alpha=0.08, lw=0)
    deltas.axvline(-max_drop, color=BUDGET_COLOR, lw=1, ls="--")
    deltas.axvline(0, color="#555", lw=0.8)
    for y, (name, c, kind) in zip(ys, rows):
        color = ORIGINAL_COLOR if kind == "original" else TARGET_COLOR
        deltas.errorbar(c["delta"], y, xerr=[[c["delta"] - c["ci95"][0]], [c["ci95"][1] - c["delta"]]], fmt="o",
                        color=color, capsize=4)
        scores.plot([c["base"]], [y], "o", color="#9e9e9e")
        scores.plot([c["tuned"]], [y], "D", color=color)
        scores.annotate("", xy=(c["tuned"], y), xytext=(c["base"], y),
                        arrowprops={"arrowstyle": "->", "color": color, "lw": 1})
        if c.get("chance") is not None:
            scores.plot([c["chance"]] * 2, [y - 0.3, y + 0.3], color="#ff7f0e", lw=2)
    lows = [c["ci95"][0] for _, c, _ in rows] + [-max_drop]
    highs = [c["ci95"][1] for _, c, _ in rows] + [0.0]
    pad = 0.05 * (max(highs) - min(lows) or 1)
    deltas.set_xlim(max(-1.05, min(lows) - pad), min(1.05, max(highs) + pad))
    deltas.set_yticks(ys, [f"{name}\n({kind})" for name, _, kind in rows])
    deltas.set_title("change: tuned - base, with 95% interval")
    deltas.set_xlabel("delta")
    below = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.16 - 0.25 / len(rows)), "fontsize": "small",
             "frameon": False}
    deltas.legend(handles=[Patch(color=BUDGET_COLOR, alpha=0.15, label=f"over budget (a drop above {max_drop:g})")],
                  **below)
    scores.set_xlim(-0.02, 1.02)
    scores.set_title("score")
    scores.set_xlabel("base -> tuned")
    scores.set_ylim(-0.6, len(rows) - 0.4)
    scores.legend(handles=[Line2D([], [], marker="o", ls="", color="#9e9e9e", label="base"),
                           Line2D([], [], marker="D", ls="", color=ORIGINAL_COLOR, label="tuned"),
                           Line2D([], [], color="#ff7f0e", lw=2, label="chance")], ncol=3, **below)
    return png(fig)


def _curve_plot(report: dict) -> str:
    curve = report["curve"]
    fig = figure(10, 3.4)
    scores, kl = fig.subplots(1, 2)
    steps = [p["step"] for p in curve]
    for kind, style in (("tasks", "-"), ("targets", "--")):
        for name in curve[0][kind]:
            scores.plot(steps, [p[kind][name] for p in curve], style, marker="o",
                        label=f"{name} ({'original' if kind == 'tasks' else 'target'})")
    scores.set_xlabel("step (optimizer updates)")
    scores.set_ylabel("score")
    scores.set_title("learning vs forgetting")
    scores.legend(fontsize="small")
    for kind in curve[-1]["kl"]:
        kl.plot(steps, [p["kl"].get(kind, 0.0) for p in curve], marker="o", label=kind)
    kl.set_xlabel("step (optimizer updates)")
    kl.set_ylabel("KL(base ‖ tuned) per token")
    kl.set_title("drift from the base")
    kl.legend(fontsize="small")
    return png(fig)


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(text: str) -> str:
    # Numbers align right, so digits line up down a column; words read from the left.
    numeric = text[:1].isdigit() or text[:2].lstrip("+-")[:1].isdigit() or text == "-"
    return f"<td>{html.escape(text)}</td>" if numeric else f"<td class='text'>{html.escape(text)}</td>"


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222;line-height:1.4}"
         "table{border-collapse:collapse;margin:1em 0;font-size:0.92em}"
         "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}"
         "td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}"
         ".verdict{font-size:1.15em;font-weight:bold;padding:0.6em 0.8em;border-left:6px solid #888}"
         ".PASS{border-color:#2ca02c;background:#eef8ee}.FAIL{border-color:#d62728;background:#fbeeee}"
         ".INCONCLUSIVE{border-color:#ff7f0e;background:#fff5e8}img{max-width:100%}"
         "table.examples td{text-align:left;max-width:420px}td.text{text-align:left}")


def html_page(title: str, body: list[str]) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(body)}</body></html>")


def render_html(report: dict) -> str:
    v = report["verdict"]
    body = [f"<p class='verdict {html.escape(v['status'])}'>{html.escape(v['text'])}</p>"]
    if report["tasks"] or report["targets"]:
        body.append(f"<img alt='change per task with its interval, against the budget' src='{_task_plot(report)}'>")
    for title, header, rows, note in _sections(report):
        body += [f"<h2>{html.escape(title)}</h2>", html_table(header, rows)] + \
                ([f"<p>{html.escape(note)}</p>"] if note else [])
    if len(report["curve"]) > 1:
        body.append(f"<img alt='scores and drift over training steps' src='{_curve_plot(report)}'>")
    forgotten = _forgotten(report)
    if forgotten:
        body.append(f"<h2>What was forgotten</h2><p>Up to {FORGOTTEN_SHOWN} examples per original task that the "
                    "base got right and the tuned model gets wrong.</p>")
        for name, examples in forgotten:
            rows = [[_one_line(e["prompt"], 300), e["expected"], e["base"], e["tuned"]] for e in examples]
            body.append(f"<h3>{html.escape(name)}</h3>" + html_table(
                ["prompt", "expected", "base answered", "tuned answered"], rows).replace("<table>",
                                                                                       "<table class='examples'>"))
    body += ["<h2>How to read this</h2><ul>"] + [f"<li><b>{k}</b>: {html.escape(v)}</li>" for k, v in HOW_TO_READ]
    body += ["</ul><h2>Provenance</h2><ul>"] + [f"<li><b>{k}</b>: {html.escape(v)}</li>" for k, v in _footer(report)]
    return html_page("Forgetting report", body + ["</ul>"])


def write_report(out_dir: Path, report: dict) -> None:
    """report.json, report.md and report.html in `out_dir` (created if needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(report), encoding="utf-8")
