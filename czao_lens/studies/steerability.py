"""Study 7: steerability and anti-steerability of CAA on the CAA behaviours.

Tan et al. 2024 found CAA anti-steerable on a large share of inputs (the steered shift has the wrong
sign), depending on the data set; Braun et al. 2025 found that the consistency of the training
activation differences (their cosine to the mean difference) predicts how steerable a behaviour is.
Here, per model and behaviour: a CAA vector from the fit split (answer-text readout, the bench's
layer), the test items' p(behaviour-matching answer text) at multipliers -m, 0, +m, and

- ``steerability``: the mean per-item swing ``(p(+m) - p(-m)) / 2``;
- ``anti_share``: the share of items whose swing is negative (steering moves them the wrong way);
- ``consistency``: the mean cosine of the per-pair training differences to their mean.
"""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from czao_lens.prompts import resolve_chat
from czao_lens.steering.common import Pooled, item_activations
from czao_lens.steering.data import items_hash, load_ab
from czao_lens.steering.evaluate import answer_text_probability
from czao_lens.steering.vectors import vector_from_pooled
from czao_lens.studies.common import StudyResult, StudySettings, spearman_ci

COLUMNS = ("model", "behaviour", "consistency", "p_unsteered", "p_up", "p_down", "steerability", "anti_share")
QUESTION = ("Is CAA anti-steerable on part of the inputs (Tan et al. 2024), and does the consistency of the "
            "training differences predict per-behaviour steerability (Braun et al. 2025)?")
BEHAVIOURS = ("coordinate-other-ais", "corrigible-neutral-HHH", "hallucination", "myopic-reward", "refusal", "sycophancy")
FULL = {"n_fit": 24, "n_test": 40, "multiplier": 2.0, "behaviours": BEHAVIOURS}
QUICK = {"n_fit": 4, "n_test": 4, "multiplier": 2.0, "behaviours": BEHAVIOURS[-2:]}


def behaviour_row(model, behaviour: str, *, layer: int, n_fit: int, n_test: int, multiplier: float, chat: bool,
                  seed: int, data) -> tuple[dict[str, Any], list[float]]:
    """One behaviour's figures and its per-item swings."""
    fit = load_ab(behaviour, "fit", n=n_fit, seed=seed, balanced=True, data_dir=data)
    test = load_ab(behaviour, "test", n=n_test, seed=seed, data_dir=data)
    pos, neg = item_activations(model, fit, [layer], hook="resid_pre", readout="answer", chat=chat)
    diffs = pos[layer] - neg[layer]
    mean = diffs.mean(0)
    consistency = float(torch.nn.functional.cosine_similarity(diffs, mean[None], dim=-1).mean())
    vec = vector_from_pooled(model, Pooled(pos, neg, paired=True), [layer], "resid_pre", "caa", items_hash(fit))
    p0 = answer_text_probability(model, test, None, chat=chat)
    up = answer_text_probability(model, test, vec * multiplier, chat=chat)
    down = answer_text_probability(model, test, vec * -multiplier, chat=chat)
    swing = ((up - down) / 2).tolist()
    row = {"behaviour": behaviour, "n_fit": len(fit), "n_test": len(test), "consistency": consistency,
           "p_unsteered": float(p0.mean()), "p_up": float(up.mean()), "p_down": float(down.mean()),
           "steerability": float(sum(swing) / len(swing)), "anti_share": sum(s < 0 for s in swing) / len(swing),
           "vector_norm": float(mean.norm())}
    return row, swing


def run(settings: StudySettings) -> StudyResult:
    """Every behaviour on every model of ``settings``; Spearman's rho of consistency against
    steerability per model and pooled, with bootstrap intervals."""
    sizes, timer, data = settings.start(FULL, QUICK)
    behaviours = sizes["behaviours"]
    rows: list[dict[str, Any]] = []
    swings: dict[tuple[str, str], list[float]] = {}
    for name, model in settings.loaded():
        layer = settings.layer_for(model)
        chat = resolve_chat(model, None)
        for b in tqdm(behaviours, desc=f"steerability {name}"):
            row, swing = behaviour_row(model, b, layer=layer, n_fit=sizes["n_fit"], n_test=sizes["n_test"],
                                       multiplier=sizes["multiplier"], chat=chat, seed=settings.seed, data=data)
            rows.append({"model": name, "layer": layer, **row, "swings": swing})
            swings[(name, b)] = swing
    stats: dict[str, Any] = {"multiplier": sizes["multiplier"]}
    for name in settings.models + ["pooled"]:
        mine = [r for r in rows if name == "pooled" or r["model"] == name]
        stats[name] = {
            "consistency_vs_steerability": spearman_ci([r["consistency"] for r in mine], [r["steerability"] for r in mine],
                                                       seed=settings.seed),
            "anti_share_mean": sum(r["anti_share"] for r in mine) / len(mine),
            "anti_share_range": [min(r["anti_share"] for r in mine), max(r["anti_share"] for r in mine)],
        }
    return StudyResult("steerability", QUESTION, rows, stats, answer(rows, stats, settings.models), settings.to_dict(),
                       timer(), figure(rows, swings, stats), columns=COLUMNS)


def answer(rows: list[dict[str, Any]], stats: dict[str, Any], models: list[str]) -> str:
    """Two sentences from the figures."""
    parts = []
    for name in models:
        s = stats[name]
        lo, hi = s["anti_share_range"]
        parts.append(f"{name}: {s['anti_share_mean']:.0%} of test items anti-steerable on average ({lo:.0%}-{hi:.0%} by behaviour)")
    rho = stats["pooled"]["consistency_vs_steerability"]
    verdict = ("predicts" if math.isfinite(rho["ci"][0]) and rho["ci"][0] > 0 else "does not reliably predict")
    return ("; ".join(parts) + ". Training-difference consistency " + verdict + " steerability across behaviours "
            f"(Spearman rho {rho['rho']:.2f}, 95% CI [{rho['ci'][0]:.2f}, {rho['ci'][1]:.2f}], n={rho['n']}).")


def figure(rows: list[dict[str, Any]], swings: dict[tuple[str, str], list[float]], stats: dict[str, Any]) -> go.Figure:
    """Left: per-item swings per behaviour and model (below zero = anti-steerable). Right: consistency
    against steerability, one point per behaviour and model."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("per-item swing (p(+m) - p(-m)) / 2", "consistency vs steerability"),
                        column_widths=[0.6, 0.4])
    for (name, b), sw in swings.items():
        fig.add_trace(go.Box(y=sw, name=f"{b}<br>{name}", boxpoints="all", jitter=0.4, pointpos=0,
                             marker=dict(size=4), showlegend=False), row=1, col=1)
    fig.add_hline(y=0, line_dash="dot", row=1, col=1)
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        fig.add_trace(go.Scatter(x=[r["consistency"] for r in mine], y=[r["steerability"] for r in mine], mode="markers+text",
                                 text=[r["behaviour"] for r in mine], textposition="top center", name=name,
                                 marker=dict(size=10)), row=1, col=2)
    fig.update_xaxes(title_text="mean cosine of training differences to their mean", row=1, col=2)
    fig.update_yaxes(title_text="swing in p(matching answer)", row=1, col=1)
    fig.update_yaxes(title_text="steerability (mean swing)", row=1, col=2)
    rho = stats["pooled"]["consistency_vs_steerability"]
    fig.update_layout(height=520, width=1300, title=f"CAA steerability (multiplier ±{stats['multiplier']}); "
                      f"pooled Spearman rho {rho['rho']:.2f}")
    return fig
