"""The comparison of runs (`finetune report RUN...`, sweeps, the interpolation curve): each run's summary from its
report.json, the differences between runs with their intervals, the recommended run, and the learning-forgetting
plane. No torch here: comparing reports is quick.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from ..errors import UserError
from .forgetting import PASS, mean_interval, pareto_front, run_difference
from .forecast import cut_short
from .report import BUDGET_COLOR, figure, headline_drift, html_page, html_table, markdown_table, png


def _mean_of(records: dict) -> tuple[float | None, list[float] | None]:
    if not records:
        return None, None
    return mean_interval([(c["delta"], c["ci95"]) for c in records.values()])


def _tuned_examples(records: dict) -> dict[str, dict[str, float]]:
    return {name: {k: pair[1] for k, pair in c.get("examples", {}).items()} for name, c in records.items()}


def _run_summary(run: Path) -> dict:
    path = run / "forgetting" / "report.json"
    if not path.is_file():
        raise UserError(f"{run} has no forgetting report ({path}); make one with `finetune eval`.")
    report = json.loads(path.read_text(encoding="utf-8"))
    if "status" not in report["verdict"]:
        raise UserError(f"{path} was written by an older finetune, without the per-example record comparisons "
                        "need; measure the run again with `finetune eval`.")
    change, change_ci = _mean_of(report["tasks"])
    gain, gain_ci = _mean_of(report["targets"])
    targets = list(report["targets"].values())
    drift = headline_drift(report["drift"])
    return {"run": str(run), "name": run.name, **report["method"], "status": report["verdict"]["status"],
            "within_budget": report["verdict"]["within_budget"], "max_drop": report["verdict"]["max_drop"],
            "largest_drop": report["verdict"]["largest_drop"],
            "target_base": sum(c["base"] for c in targets) / len(targets) if targets else None,
            "target_tuned": sum(c["tuned"] for c in targets) / len(targets) if targets else None,
            "drop": None if change is None else -change,
            "drop_ci": None if change_ci is None else [-change_ci[1], -change_ci[0]],
            "gain": gain, "gain_ci": gain_ci,
            "kl": drift["kl"] if drift else None, "kl_ci": drift["ci95"] if drift else None,
            "leak": (report.get("leak") or {}).get("all"),
            "drift": {kind: {"kl": d["kl"], "ci95": d["ci95"]} for kind, d in report["drift"].items()},
            "pruned": (report.get("forecast") or {}).get("pruned"),
            "stopped": (report.get("forecast") or {}).get("stopped"),
            "_originals": _tuned_examples(report["tasks"]), "_targets": _tuned_examples(report["targets"])}


def _difference(a: dict, b: dict, kind: str) -> dict | None:
    """a minus b on the same examples of the original (`_originals`) or target (`_targets`) tasks."""
    return run_difference(a[kind], b[kind])


def _told_apart(d: dict | None) -> bool:
    return d is not None and (d["ci95"][0] > 0 or d["ci95"][1] < 0)


def part_trained(r: dict) -> dict | None:
    """Where a run's forecast ended it (pruned by its sweep, or stopped by `eval.on_over_budget: stop`): it was
    measured there, part-trained, so its gain and drop are not its recipe's."""
    return cut_short(r)


def _candidate(r: dict) -> bool:
    """A run that may be recommended: it passes, and was not measured part-trained."""
    return r["status"] == PASS and not part_trained(r)


def recommended(runs: list[dict]) -> tuple[int | None, list[str]]:
    """(index of the recommended run or None, statements that qualify it). Only a run whose verdict is PASS can
    be recommended, and not one its forecast ended (measured part-trained): of those, the one that gained most on the
    target tasks, and the statement names every other passing run the paired test cannot tell apart from it."""
    passing = [i for i, r in enumerate(runs) if _candidate(r)]
    if not passing:
        return None, ["No run passes its forgetting budget (eval.max_drop): none is recommended."]
    best = max(passing, key=lambda i: (runs[i]["gain"] or 0.0, -(runs[i]["drop"] or 0.0)))
    tied = [runs[i]["name"] for i in passing if i != best and
            not _told_apart(_difference(runs[best], runs[i], "_targets"))]
    notes = [f"{runs[best]['name']} passes the budget and gained most on the target tasks."]
    if tied:
        notes.append(f"On the target tasks it cannot be told apart from {', '.join(tied)} (paired 95% interval of "
                     "the difference holds 0): those pass too, and any of them would do.")
    return best, notes


def method_comparison(runs: list[dict]) -> list[dict]:
    """For every pair of run families (e.g. LoRA and full, over learning rates): the two runs nearest in target
    gain, one from each, and how much less the first forgot on the same examples, with its paired interval."""
    runs = [r for r in runs if not part_trained(r)]  # their gain is not the method's
    families = sorted({r["family"] for r in runs if r["gain"] is not None and r["drop"] is not None})
    out = []
    for i, fa in enumerate(families):
        for fb in families[i + 1:]:
            pairs = [(a, b) for a in runs if a["family"] == fa and a["gain"] is not None
                     for b in runs if b["family"] == fb and b["gain"] is not None]
            if not pairs:
                continue
            a, b = min(pairs, key=lambda p: abs(p[0]["gain"] - p[1]["gain"]))
            diff = _difference(a, b, "_originals")  # tuned a - tuned b: positive = a kept more
            if diff is None:
                continue
            # Matched only when the two gains' intervals overlap; otherwise the difference mixes how much each
            # learned with how much each forgot, and the text says so.
            matched = not (a["gain_ci"] and b["gain_ci"] and (a["gain_ci"][1] < b["gain_ci"][0]
                                                               or b["gain_ci"][1] < a["gain_ci"][0]))
            at = "At similar new-task gain" if matched else "Not matched in new-task gain (their intervals do not overlap)"
            if _told_apart(diff):
                better, worse = (a, b) if diff["mean"] > 0 else (b, a)
                text = (f"{at} ({a['name']}: {a['gain']:+.3f}, {b['name']}: {b['gain']:+.3f}), "
                        f"{better['family']} ({better['name']}) forgot {abs(diff['mean']):.3f} less than "
                        f"{worse['family']} ({worse['name']}) on the original tasks (paired 95% CI of the difference "
                        f"[{abs(diff['ci95'][0] if diff['mean'] > 0 else diff['ci95'][1]):.3f}, "
                        f"{abs(diff['ci95'][1] if diff['mean'] > 0 else diff['ci95'][0]):.3f}]).")
            else:
                text = (f"{at} ({a['name']}: {a['gain']:+.3f}, {b['name']}: {b['gain']:+.3f}), "
                        f"{fa} and {fb} cannot be told apart on the original tasks: {a['name']} minus {b['name']} "
                        f"is {diff['mean']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}].")
            out.append({"families": [fa, fb], "runs": [a["run"], b["run"]], "original_difference": diff,
                        "gain_gap": a["gain"] - b["gain"], "matched": matched, "text": text})
    return out


def best_per_family(runs: list[dict]) -> dict[str, str | None]:
    """Per family, the passing run that gained most (None where no run of it passes)."""
    out = {}
    for family in sorted({r["family"] for r in runs}):
        passing = [r for r in runs if r["family"] == family and _candidate(r)]
        out[family] = max(passing, key=lambda r: r["gain"] or 0.0)["name"] if passing else None
    return out


def status_text(r: dict) -> str:
    """A run's verdict as the tables show it: a run its forecast ended says where it was measured."""
    if not part_trained(r):
        return r["status"]
    return f"{cut_text(r)} (measured there: {r['status']})"


def cut_text(r: dict) -> str:
    return f"{'pruned' if r['pruned'] else 'stopped'} at update {part_trained(r)['step']}"


def _pm(x: float | None, ci: list[float] | None) -> str:
    return "-" if x is None else f"{x:+.3f}" + ("" if ci is None else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]")


def summary_table(result: dict) -> str:
    """The few numbers a terminal should show: what each run learned, what it cost, and whether it fits."""
    header = ["run", "method", "seed", "new task: before -> after", "original tasks: mean change [95% CI]",
              "KL drift [95% CI]", "verdict"]
    rows = []
    for r in result["runs"]:
        learned = "-" if r["target_base"] is None else f"{r['target_base']:.3f} -> {r['target_tuned']:.3f}"
        change = "-" if r["drop"] is None else _pm(-r["drop"], [-r["drop_ci"][1], -r["drop_ci"][0]])
        kl = "-" if r["kl"] is None else f"{r['kl']:.3f} [{r['kl_ci'][0]:.3f}, {r['kl_ci'][1]:.3f}]"
        rows.append([r["name"], r["label"], "-" if r["seed"] is None else str(r["seed"]), learned, change, kl,
                     status_text(r)])
    return markdown_table(header, rows)


def _distinct_names(runs: list[dict]) -> None:
    """When two runs' folders share a name (two sweeps' `lr=1e-4`), every run is named by its path from the folder
    that holds them all (`demo-full-sweep/lr=1e-4`), so none is left ambiguous."""
    paths = [Path(r["run"]).absolute() for r in runs]
    if len({p.name for p in paths}) == len(paths):
        return
    common = Path(os.path.commonpath([p.parent for p in paths]))
    for r, path in zip(runs, paths):
        r["name"] = str(path.relative_to(common))


def compare_runs(run_dirs: list[Path], out_dir: Path) -> dict:
    """`finetune report RUN [RUN...]`: one table over runs and the learning-forgetting plane (x: mean drop on the
    original tasks, y: mean gain on the target tasks, as in Biderman et al. 2024, "LoRA Learns Less and Forgets
    Less"), the best passing run per method family, methods compared at similar gain, and the recommended run,
    written as compare.{json,md,html} in `out_dir`."""
    runs = [_run_summary(Path(r)) for r in run_dirs]
    _distinct_names(runs)
    placed = [i for i, r in enumerate(runs) if r["drop"] is not None and r["gain"] is not None]
    finished = [i for i in placed if not part_trained(runs[i])]
    front = {finished[i] for i in pareto_front([(runs[j]["drop"], runs[j]["gain"]) for j in finished])}
    pick, notes = recommended(runs)
    for i, r in enumerate(runs):
        r["pareto"], r["recommended"] = i in front, i == pick
    comparisons = method_comparison(runs)
    best = best_per_family(runs)
    header = ["run", "method", "seed", "largest drop", "mean drop [95% CI]", "mean target gain [95% CI]",
              "KL drift [95% CI]", "answer leak [95% CI]", "verdict", "Pareto front", "recommended"]
    rows = [[r["name"], r["label"], "-" if r["seed"] is None else str(r["seed"]),
             "-" if r["largest_drop"] is None else f"{r['largest_drop']['drop']:+.3f} ({r['largest_drop']['task']})",
             _pm(r["drop"], r["drop_ci"]), _pm(r["gain"], r["gain_ci"]),
             "-" if r["kl"] is None else f"{r['kl']:.3f} [{r['kl_ci'][0]:.3f}, {r['kl_ci'][1]:.3f}]",
             "-" if r["leak"] is None else f"{r['leak']['tuned']:.3f} [{r['leak']['ci95'][0]:.3f}, "
                                           f"{r['leak']['ci95'][1]:.3f}]",
             status_text(r), "yes" if r["pareto"] else "", "yes" if r["recommended"] else ""] for r in runs]
    family_rows = [[family, name or "none passes the budget"] for family, name in best.items()]
    how = ("Drop and gain are means over tasks of the paired deltas, with intervals that combine the tasks' "
           "intervals as independent (MOVER). The verdict is each run's own (PASS / FAIL / INCONCLUSIVE against its "
           "eval.max_drop). A run is on the Pareto front when no other run has both a smaller or equal drop and a "
           "larger or equal gain, by point estimates: neighbours on the front whose intervals overlap may not truly "
           "differ. Methods are compared on the same examples (paired), between the runs of two families nearest "
           "in target gain. KL is on the base's chat replies where the model has a chat template, else on text. "
           "Answer leak: the share of replies to original-task prompts that begin with an answer of the new task "
           "(report.md of each run has it per task). A run its sweep pruned (`finetune sweep --prune`) or its "
           "recipe stopped (`eval.on_over_budget: stop`) because its forecast was FAIL beyond doubt was measured "
           "where it stopped: its point on the plane is hollow, and it is neither on the Pareto front nor "
           "recommended.")
    for r in runs:
        del r["_originals"], r["_targets"]
    result = {"runs": runs, "recommended": None if pick is None else runs[pick]["run"], "notes": notes,
              "best_per_family": best, "method_comparison": comparisons, "how_to_read": how}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    md = ["# Learning vs forgetting across runs", "", markdown_table(header, rows), "", *notes, "",
          "## Best run within budget, per method", "", markdown_table(["method", "best passing run"], family_rows),
          ""]
    if comparisons:
        md += ["## Methods at the nearest new-task gain", ""] + [f"- {c['text']}" for c in comparisons] + [""]
    md += ["## How to read this", "", how, ""]
    (out_dir / "compare.md").write_text("\n".join(md), encoding="utf-8")
    body = [f"<p class='verdict'>{html.escape(' '.join(notes))}</p>", html_table(header, rows)]
    if placed:
        body.append(f"<img alt='learning-forgetting plane' src='{_plane_plot([runs[i] for i in placed])}'>")
    body += ["<h2>Best run within budget, per method</h2>", html_table(["method", "best passing run"], family_rows)]
    if comparisons:
        body += ["<h2>Methods at the nearest new-task gain</h2><ul>"] + \
                [f"<li>{html.escape(c['text'])}</li>" for c in comparisons] + ["</ul>"]
    body += ["<h2>How to read this</h2>", f"<p>{html.escape(how)}</p>"]
    (out_dir / "compare.html").write_text(html_page("Learning vs forgetting across runs", body), encoding="utf-8")
    return result


# ---------------------------------------------------------------- the plane


def _point_label(r: dict) -> str:
    """A point's tag on its family's curve: its learning rate, and its seed where several seeds share the rate."""
    return (r["tag"] or r["name"]) + (f" (seed {r['seed']})" if r.get("_seeds", 1) > 1 else "") + \
        (f", {cut_text(r)}" if part_trained(r) else "")


def _plane_plot(runs: list[dict]) -> str:
    """Left: the learning-forgetting plane, one line per method family through its runs in order of learning rate,
    95% intervals both ways, the budget and the Pareto front. Right: each run's drift with its interval."""
    from matplotlib import colormaps

    fig = figure(12, 5)
    plane, drift = fig.subplots(1, 2, width_ratios=[3, 2])
    families = sorted({r["family"] for r in runs})
    colors = colormaps["tab10"]
    max_drop = min(r["max_drop"] for r in runs)
    for k, family in enumerate(families):
        members = sorted((r for r in runs if r["family"] == family), key=lambda r: (r["order"] or 0, r["seed"] or 0))
        color = colors(k % 10)
        line = [r for r in members if not part_trained(r)]  # the curve joins finished runs only
        plane.plot([r["drop"] for r in line], [r["gain"] for r in line], "-", color=color, alpha=0.5)
        for r in members:
            r["_seeds"] = sum(m["order"] == r["order"] for m in members)
            plane.errorbar(r["drop"], r["gain"],
                           xerr=[[r["drop"] - r["drop_ci"][0]], [r["drop_ci"][1] - r["drop"]]],
                           yerr=[[r["gain"] - r["gain_ci"][0]], [r["gain_ci"][1] - r["gain"]]] if r["gain_ci"]
                           else None, fmt="o", color=color, capsize=2, ms=5, mfc="none" if part_trained(r) else color,
                           label=family if r is members[0] else None)
            plane.annotate(_point_label(r), (r["drop"], r["gain"]), textcoords="offset points", xytext=(4, 4),
                           fontsize=8, color=color)
    lows = [r["drop_ci"][0] for r in runs] + [0.0]
    highs = [r["drop_ci"][1] for r in runs] + [max_drop]
    pad = 0.05 * (max(highs) - min(lows) or 1)
    plane.set_xlim(min(lows) - pad, max(highs) + pad)
    plane.axvspan(max_drop, max(highs) + pad, color=BUDGET_COLOR, alpha=0.07, lw=0)
    plane.axvline(max_drop, color=BUDGET_COLOR, ls="--", lw=1, label=f"budget: drop {max_drop:g}")
    plane.axvline(0, color="#555", lw=0.8)
    front = sorted((r["drop"], r["gain"]) for r in runs if r["pareto"])
    plane.plot([p[0] for p in front], [p[1] for p in front], ":", color="#333", lw=1.5, label="Pareto front")
    plane.set_xlabel("forgetting: mean drop on original tasks (95% CI); right of the dashed line is over budget")
    plane.set_ylabel("learning: mean gain on target tasks (95% CI)")
    plane.set_title("learning vs forgetting (points: learning rate)")
    plane.legend(fontsize="small", loc="best")
    with_kl = [r for r in runs if r["kl"] is not None]
    for i, r in enumerate(with_kl):
        color = colors(families.index(r["family"]) % 10)
        drift.errorbar(max(r["kl"], 1e-6), i, xerr=[[r["kl"] - r["kl_ci"][0]], [r["kl_ci"][1] - r["kl"]]], fmt="o",
                       color=color, capsize=2)
    drift.set_yticks(range(len(with_kl)), [f"{r['name']}" for r in with_kl], fontsize=8)
    smallest = min((r["kl_ci"][0] for r in with_kl), default=0.0)
    if smallest > 0:
        drift.set_xscale("log")
        # Labelled at 1-3-10 steps in plain numbers: left to itself, matplotlib labels the minor ticks of a range
        # under two decades in scientific notation, and the labels run into each other.
        from matplotlib.ticker import NullFormatter

        largest = max(r["kl_ci"][1] for r in with_kl)
        ticks = [m * 10.0 ** e for e in range(-4, 4) for m in (1, 3) if smallest / 3 <= m * 10.0 ** e <= largest * 3]
        drift.set_xticks(ticks, [f"{t:g}" for t in ticks])
        drift.xaxis.set_minor_formatter(NullFormatter())
    else:  # a run that did not move at all has KL 0, which a log axis cannot show
        drift.set_xscale("symlog", linthresh=min((r["kl"] for r in with_kl if r["kl"] > 0), default=0.01))
        drift.set_xlim(left=0)
    drift.set_xlabel("drift: KL(base ‖ tuned) per token (95% CI)")
    drift.set_title("how far predictions moved")
    return png(fig)
