"""Study 9: do CAST conditions transfer across formats, or do they detect the data set?

Today's recipe (the bench's): the condition separates refusal-type question stems (CAA ``refusal``)
from TruthfulQA questions. Both its in-distribution precision and recall would look just as good if
it had learned "CAA-authored question" against "TruthfulQA question". So the condition is also
tested on

- the same refusal questions in another format: with their A/B ``Choices:`` block (should fire);
- the same refusal questions wrapped as a task request, a format no recipe is fitted on (should fire);
- same-format questions of other categories: stems of CAA behaviours that no recipe saw (should not
  fire);
- RealToxicityPrompts threat prefixes: other source and format, harmful content but not requests
  (reported, not scored).

Two other recipes: a same-format contrast (refusal stems against stems of other CAA behaviours plus
TruthfulQA: format alone cannot separate its sides), and a two-format one (stems and A/B questions on
both sides), which is then tested on the task-request format it never saw.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from czao_lens.bench.tasks import load_task
from czao_lens.paths import default_data_dir
from czao_lens.prompts import resolve_chat
from czao_lens.steering.cast import fit_condition
from czao_lens.steering.data import load_ab, load_truthfulqa, split_items
from czao_lens.studies.common import StudyResult, StudySettings

COLUMNS = ("model", "recipe", "set", "n", "fire_rate", "should_fire")
QUESTION = "Does a CAST condition fitted on one data set's prompts fire on the same category in another format, and stay off same-format prompts of other categories?"
SEEN = ("coordinate-other-ais", "corrigible-neutral-HHH", "hallucination")  # the fixed recipe's other side
UNSEEN = ("myopic-reward", "sycophancy")  # held out of both recipes
# A format no recipe is fitted on.
TASK_FORMAT = "Here is a task from a user. Complete it carefully.\n\nTask: {}\n\nYour response:"
FULL = {"n": 32}
QUICK = {"n": 4}


def prompt_sets(n: int, data, seed: int) -> dict[str, list[str]]:
    """Every prompt set of the study, fit and test halves kept apart."""
    data = data or default_data_dir()
    refusal_fit, refusal_test = split_items(load_ab("refusal", "fit", data_dir=data), 0.5, seed)
    tqa_fit, tqa_test = split_items(load_truthfulqa(data_dir=data), 0.5, seed)
    seen = [it for b in SEEN for it in load_ab(b, "fit", n=n, seed=seed, data_dir=data)][: 2 * n]
    return {
        "fit:refusal": [it.stem() for it in refusal_fit[:n]],
        "fit:refusal with A/B choices": [it.question for it in refusal_fit[:n]],
        "fit:truthfulqa": [it.stem() for it in tqa_fit[:n]],
        "fit:other CAA behaviours": [it.stem() for it in seen],
        "fit:other CAA with A/B choices": [it.question for it in seen],
        "test:refusal stems": [it.stem() for it in refusal_test[:n]],
        "test:refusal with A/B choices": [it.question for it in refusal_test[:n]],
        "test:refusal as a task request": [TASK_FORMAT.format(it.stem()) for it in refusal_test[:n]],
        "test:truthfulqa": [it.stem() for it in tqa_test[:n]],
        "test:unseen CAA behaviours": [it.stem() for b in UNSEEN for it in load_ab(b, "test", n=n // 2, seed=seed, data_dir=data)],
        "test:RTP threat prefixes": load_task("concept", data, n_fit=n, n_test=1, seed=seed).fit[:n],
    }


SHOULD_FIRE = {"test:refusal stems": True, "test:refusal with A/B choices": True, "test:refusal as a task request": True,
               "test:truthfulqa": False,
               "test:unseen CAA behaviours": False, "test:RTP threat prefixes": None}


def run(settings: StudySettings) -> StudyResult:
    """Both recipes on every model: the fire rate on every test set."""
    sizes, timer, data = settings.start(FULL, QUICK)
    sets = prompt_sets(sizes["n"], data, settings.seed)
    rows: list[dict[str, Any]] = []
    for name, model in settings.loaded():
        chat = resolve_chat(model, None)
        layer = settings.layer_for(model)
        recipes = {
            "today (refusal vs TruthfulQA)": fit_condition(model, sets["fit:refusal"], sets["fit:truthfulqa"], layer, chat=chat),
            "same-format contrast (refusal vs other CAA + TruthfulQA)": fit_condition(
                model, sets["fit:refusal"], sets["fit:other CAA behaviours"] + sets["fit:truthfulqa"], layer, chat=chat),
            "two formats (stems and A/B on both sides)": fit_condition(
                model, sets["fit:refusal"] + sets["fit:refusal with A/B choices"],
                sets["fit:other CAA behaviours"] + sets["fit:other CAA with A/B choices"] + sets["fit:truthfulqa"], layer, chat=chat),
        }
        for recipe, cond in recipes.items():
            for key, should in SHOULD_FIRE.items():
                fired = cond.fires(model, sets[key], chat=chat)
                rows.append({"model": name, "recipe": recipe, "set": key.split(":", 1)[1], "n": len(sets[key]),
                             "fire_rate": float(fired.float().mean()), "should_fire": should, "layer": layer})
    stats = recipe_stats(rows)
    return StudyResult("cast_transfer", QUESTION, rows, stats, answer(stats), settings.to_dict(), timer(), figure(rows), columns=COLUMNS)


def recipe_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model and recipe: in-distribution balanced accuracy (refusal stems vs TruthfulQA), and the
    same under each shift (format: A/B refusal vs TruthfulQA; category: refusal stems vs unseen CAA)."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys((r["model"], r["recipe"]) for r in rows):
        rate = {r["set"]: r["fire_rate"] for r in rows if (r["model"], r["recipe"]) == key}
        out[f"{key[0]}/{key[1]}"] = {
            "in_distribution": 0.5 * (rate["refusal stems"] + 1 - rate["truthfulqa"]),
            "format_shift": 0.5 * (rate["refusal with A/B choices"] + 1 - rate["truthfulqa"]),
            "unseen_format": 0.5 * (rate["refusal as a task request"] + 1 - rate["truthfulqa"]),
            "category_shift": 0.5 * (rate["refusal stems"] + 1 - rate["unseen CAA behaviours"]),
            "fires_on_rtp_threats": rate["RTP threat prefixes"],
        }
    return out


def answer(stats: dict[str, Any]) -> str:
    parts = [f"{k}: balanced accuracy in distribution {s['in_distribution']:.2f}, with A/B choices {s['format_shift']:.2f}, "
             f"as a task request (no recipe saw it) {s['unseen_format']:.2f}, against unseen same-format categories "
             f"{s['category_shift']:.2f}" for k, s in stats.items()]
    return "; ".join(parts) + "."


def figure(rows: list[dict[str, Any]]) -> go.Figure:
    """Fire rate per test set, one bar group per (model, recipe); sets that should fire are marked."""
    fig = go.Figure()
    sets = list(dict.fromkeys(r["set"] for r in rows))
    labels = [f"{s}<br>({'should fire' if SHOULD_FIRE['test:' + s] else 'should not' if SHOULD_FIRE['test:' + s] is False else 'reported'})"
              for s in sets]
    for key in dict.fromkeys((r["model"], r["recipe"]) for r in rows):
        mine = {r["set"]: r["fire_rate"] for r in rows if (r["model"], r["recipe"]) == key}
        fig.add_trace(go.Bar(x=labels, y=[mine[s] for s in sets], name=f"{key[0]}: {key[1]}"))
    fig.update_layout(barmode="group", height=480, width=1200, yaxis=dict(range=[0, 1.05], title="share of prompts the condition fires on"),
                      title="CAST condition transfer")
    return fig

