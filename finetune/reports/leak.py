"""The leak of the new task's answers into the old tasks' replies: how often a model's reply to an original-task
prompt begins with one of the target tasks' answers (the demo's tuned model answers "Reply with only the word yes"
with `vund`, a Zorblax bin). It names the mechanism of the forgetting seen so far in one number, from the
generations the evaluation already made: nothing is generated for it. No torch here.
"""

from __future__ import annotations

import math
import re

from .forgetting import z_value
from .records import TaskScore

WORD = re.compile(r"[^\W_]+")


def first_word(text: str) -> str:
    """The first word of a reply, lower-cased, without punctuation ("" for none)."""
    match = WORD.search(str(text).lower())
    return match.group(0) if match else ""


def wilson(k: int, n: int, level: float = 0.95) -> list[float]:
    """Wilson's score interval for a proportion k/n: inside [0, 1], with a width even at 0 of n."""
    z = z_value(level)
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def target_answers(targets: dict[str, TaskScore]) -> set[str]:
    """The first words of the target tasks' right answers (the replies the new skill teaches)."""
    return {w for score in targets.values() for answer in score.expected.values() if (w := first_word(answer))}


def _leaked(score: TaskScore, answers: set[str]) -> tuple[int, int]:
    """(replies that begin with a target answer, replies) over the generation examples of one original task; an
    example whose own right answer is that word does not count (it is no leak to answer it)."""
    keys = [k for k in score.examples if k in score.answers]
    hits = sum(first_word(score.answers[k]) in answers and first_word(score.expected.get(k, "")) not in answers
               for k in keys)
    return hits, len(keys)


def answer_leak(base: dict[str, TaskScore], tuned: dict[str, TaskScore], targets: dict[str, TaskScore]) -> dict | None:
    """The leak into each original generation task (multiple-choice tasks pick among their own options and cannot
    leak), base and tuned on the same prompts, the tuned share with its 95% interval; None without target answers
    or original generation tasks."""
    answers = target_answers(targets)
    generated = {spec: s for spec, s in tuned.items() if s.chance is None and s.answers}
    if not answers or not generated:
        return None
    tasks, total = {}, [0, 0, 0]
    for spec, score in generated.items():
        (hits, n), (before, _) = _leaked(score, answers), _leaked(base[spec], answers)
        tasks[score.task] = {"base": before / n, "tuned": hits / n, "ci95": wilson(hits, n), "replies": n,
                             "leaked": hits}
        total = [total[0] + hits, total[1] + before, total[2] + n]
    hits, before, n = total
    return {"answers": sorted(answers), "tasks": tasks,
            "all": {"base": before / n, "tuned": hits / n, "ci95": wilson(hits, n), "replies": n, "leaked": hits}}
