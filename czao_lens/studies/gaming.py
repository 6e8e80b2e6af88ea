"""Study 5: does CZAO game its evaluator as the optimisation pressure grows?

On the bench's three generation tasks (fit prompts), CZAO at four pressure levels (steps K, KL bound
eps, rank; the budget lifted at the top two) and the unsteered model. Per level: the share of texts
the primary evaluator (CZAO's own constraint) accepts, and the "gaming" share: accepted by the
primary, rejected by the task's independent second evaluator. Distinct-2 says whether the text
degenerates on the way.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from czao_lens.bench.metrics import distinct_n
from czao_lens.bench.tasks import load_task
from czao_lens.czao import CZAOConfig, generate_czao
from czao_lens.generate import generate
from czao_lens.plots import series_color
from czao_lens.studies.common import StudyResult, StudySettings

COLUMNS = ("model", "task", "level", "n", "accepted", "gaming", "second_rejects_accepted", "distinct2")
QUESTION = "Does the share of outputs that the primary evaluator accepts but the second one rejects grow with optimisation pressure (K, eps, rank)?"
LEVELS: dict[str, dict[str, Any]] = {
    "light": {"max_steps": 2, "kl_eps": 0.5, "rank": 4},
    "default": {},
    "strong": {"max_steps": 20, "kl_eps": 4.0, "rank": 64, "budget": None},
    "extreme": {"max_steps": 40, "kl_eps": 8.0, "rank": 64, "budget": None, "relax_max_eps": 16.0, "repair": 8},
}
FULL = {"tasks": ("sentiment", "profanity", "concept"), "prompts": 12, "max_new_tokens": 24, "levels": tuple(LEVELS)}
QUICK = {"tasks": ("sentiment",), "prompts": 1, "max_new_tokens": 3, "levels": ("light", "strong")}


def run(settings: StudySettings) -> StudyResult:
    """Every (task, level) on every model: acceptance, gaming and distinct-2."""
    sizes, timer, data = settings.start(FULL, QUICK)
    rows: list[dict[str, Any]] = []
    for name, model in settings.loaded():
        lay = settings.layer_for(model)
        for tname in sizes["tasks"]:
            task = load_task(tname, data, n_fit=max(sizes["prompts"], 8), n_test=1, seed=settings.seed)
            prompts = task.fit[: sizes["prompts"]]
            texts = {"unsteered": generate(model, prompts, max_new_tokens=sizes["max_new_tokens"], seed=settings.seed).texts}
            for level in tqdm(sizes["levels"], desc=f"gaming {name} {tname}"):
                cfg = replace(CZAOConfig(layers=(lay,), seed=settings.seed), **LEVELS[level])
                res = generate_czao(model, prompts, task.constraint, cfg, max_new_tokens=sizes["max_new_tokens"], seed=settings.seed)
                texts[level] = [r.text for r in res]
            for level, tx in texts.items():
                primary = [bool(task.constraint.check_text(t)) for t in tx]
                second = [bool(task.second(t)) for t in tx]
                rows.append({"model": name, "task": tname, "level": level, "n": len(tx),
                             "accepted": statistics.fmean(primary),
                             "gaming": statistics.fmean(p and not s for p, s in zip(primary, second)),
                             "second_rejects_accepted": (sum(p and not s for p, s in zip(primary, second)) / max(sum(primary), 1)),
                             "distinct2": distinct_n(tx, 2), "texts": tx})
    stats = {f"{r['model']}/{r['task']}/{r['level']}": {k: r[k] for k in ("accepted", "gaming", "distinct2")} for r in rows}
    return StudyResult("gaming", QUESTION, rows, stats, answer(rows), settings.to_dict(), timer(), figure(rows), columns=COLUMNS)


def answer(rows: list[dict[str, Any]]) -> str:
    parts = []
    for key in dict.fromkeys((r["model"], r["task"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["task"]) == key]
        parts.append(f"{key[0]}/{key[1]}: " + ", ".join(f"{r['level']} {r['accepted']:.2f}/{r['gaming']:.2f}" for r in mine))
    return "Accepted / gamed share by pressure level: " + "; ".join(parts) + "."


def figure(rows: list[dict[str, Any]]) -> go.Figure:
    """Per model and task: accepted and gamed shares and distinct-2 across levels."""
    cases = list(dict.fromkeys((r["model"], r["task"]) for r in rows))
    fig = make_subplots(rows=1, cols=len(cases), subplot_titles=[f"{m}<br>{t}" for m, t in cases])
    for c, key in enumerate(cases, start=1):
        mine = [r for r in rows if (r["model"], r["task"]) == key]
        x = [r["level"] for r in mine]
        for i, (k, dash) in enumerate((("accepted", None), ("gaming", "dash"), ("distinct2", "dot"))):
            fig.add_trace(go.Scatter(x=x, y=[r[k] for r in mine], mode="lines+markers", name=k, legendgroup=k,
                                     showlegend=c == 1, line=dict(dash=dash, color=series_color(i))), row=1, col=c)
        fig.update_yaxes(range=[-0.05, 1.05], row=1, col=c)
    fig.update_layout(height=420, width=max(700, 330 * len(cases)), title="Evaluator gaming vs optimisation pressure")
    return fig
