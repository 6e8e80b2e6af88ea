"""Study 8: the steering trilemma as a Pareto front, per task and model, from bench outputs.

Three objectives per (task, method): satisfaction (up), fluency cost (down: perplexity over the
unsteered model's with the same decoding for generation tasks, KL on neutral prompts for choice
tasks) and compute (down: row passes per token where the bench recorded them, else passes per
token). A method is on the front when no other method of the same task and model is at least as
good on all three and better on one.
"""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from czao_lens.plots import series_color
from czao_lens.bench.report import read_summaries
from czao_lens.bench.tasks import BenchError
from czao_lens.studies.common import StudyError, StudyResult, StudySettings, Timer, pareto_front

COLUMNS = ("model", "task", "method", "satisfaction", "fluency_cost", "compute", "on_front")
QUESTION = "Which methods are on the satisfaction / fluency / compute Pareto front, per task, on both models?"


def objectives(task: dict, s: dict) -> tuple[float, float, float]:
    """(satisfaction, fluency cost, compute) of one method's summary."""
    gen = task["kind"] == "generate"
    cost = s.get("ppl_ratio_same_decoding", s.get("ppl_ratio")) if gen else s.get("kl")
    compute = s.get("row_passes_per_token", s.get("passes_per_token"))
    return tuple(math.nan if v is None else float(v) for v in (s.get("satisfaction"), cost, compute))  # type: ignore[return-value]


def run(settings: StudySettings) -> StudyResult:
    """The front of every (model, task) of the given bench folders."""
    timer = Timer()
    try:
        summaries, _ = read_summaries(settings.bench)
    except BenchError as exc:
        raise StudyError(f"the pareto study reads bench outputs: {exc}") from None
    rows: list[dict[str, Any]] = []
    for model, tasks in summaries.items():
        for task, t in tasks.items():
            methods = [(m, s) for m, s in t["methods"].items() if "failed" not in s]
            points = [objectives(t, s) for _, s in methods]
            front = pareto_front(points, maximise=(True, False, False))
            for (m, s), p, on in zip(methods, points, front):
                rows.append({"model": model, "task": task, "kind": t["kind"], "method": m, "satisfaction": p[0],
                             "ci": s.get("ci"), "fluency_cost": p[1], "compute": p[2], "on_front": on})
    stats = front_stats(rows)
    return StudyResult("pareto", QUESTION, rows, stats, answer(stats), settings.to_dict(), timer(), figure(rows), columns=COLUMNS)


def front_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task: the front on each model and the methods on it on every model."""
    stats: dict[str, Any] = {}
    models = list(dict.fromkeys(r["model"] for r in rows))
    for task in dict.fromkeys(r["task"] for r in rows):
        fronts = {m: sorted(r["method"] for r in rows if r["task"] == task and r["model"] == m and r["on_front"])
                  for m in models if any(r["task"] == task and r["model"] == m for r in rows)}
        both = sorted(set.intersection(*map(set, fronts.values()))) if fronts else []
        stats[task] = {"fronts": fronts, "on_every_front": both}
    return stats


def answer(stats: dict[str, Any]) -> str:
    """Two sentences from the fronts."""
    everywhere = {t: s["on_every_front"] for t, s in stats.items()}
    counts: dict[str, int] = {}
    for ms in everywhere.values():
        for m in ms:
            counts[m] = counts.get(m, 0) + 1
    common = ", ".join(f"{m} ({n} tasks)" for m, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"
    per_task = "; ".join(f"{t}: {', '.join(ms) or 'no method on every front'}" for t, ms in everywhere.items())
    return f"On the front of every model measured, per task: {per_task}. Counted over tasks: {common}."


def figure(rows: list[dict[str, Any]]) -> go.Figure:
    """One panel per task: satisfaction against fluency cost, marker area by compute, one symbol per
    model, front members filled and outlined, the rest hollow."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    cols = min(3, len(tasks)) or 1
    nrows = max(1, math.ceil(len(tasks) / cols))
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=tasks, horizontal_spacing=0.07, vertical_spacing=0.16)
    symbols = ["circle", "diamond", "square", "triangle-up"]
    for k, task in enumerate(tasks):
        r, c = k // cols + 1, k % cols + 1
        for i, model in enumerate(models):
            mine = [x for x in rows if x["task"] == task and x["model"] == model and math.isfinite(x["fluency_cost"])]
            if not mine:
                continue
            fig.add_trace(go.Scatter(
                x=[x["fluency_cost"] for x in mine], y=[x["satisfaction"] for x in mine], mode="markers+text",
                text=[x["method"] for x in mine], textposition="top center", textfont=dict(size=9),
                name=model, legendgroup=model, showlegend=k == 0,
                marker=dict(symbol=[symbols[i % 4] + ("" if x["on_front"] else "-open") for x in mine],
                            size=[9 + 6 * math.log2(max(x["compute"], 1.0)) if math.isfinite(x["compute"]) else 9 for x in mine],
                            color=series_color(i), line=dict(width=1.5, color=series_color(i))),
                hovertemplate="%{text}<br>satisfaction %{y:.2f}<br>fluency cost %{x:.2f}<extra>" + model + "</extra>",
            ), row=r, col=c)
        gen = any(x["kind"] == "generate" for x in rows if x["task"] == task)
        fig.update_xaxes(title_text="perplexity / unsteered's" if gen else "KL on neutral prompts", row=r, col=c)
        fig.update_yaxes(range=[-0.05, 1.12], title_text="satisfaction" if c == 1 else None, row=r, col=c)
    fig.update_layout(height=420 * nrows, width=1300, legend_title_text="model",
                      title="Pareto front per task: filled markers are on it (satisfaction up, fluency cost and compute down; area = compute)")
    return fig
