"""Study 2: does causal tracing pick the layer that steers best?

Hase et al. 2023 found that where causal tracing localises a fact does not predict which layer edits
it best. Here, per model and CAA behaviour: the tracing score of every layer (restored fraction of
the effect on the answer letter, :func:`~czao_lens.diagnostics.tracing.rank_layers`, on fit items),
against the effect of CAA added at that layer alone (mean shift of p(behaviour-matching answer text)
on test items at a fixed multiple of the layer's own mean difference), with Spearman's rho over
layers and whether the top layers agree.
"""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from czao_lens.diagnostics.tracing import load_caa, rank_layers, trace_item
from czao_lens.prompts import resolve_chat
from czao_lens.steering.common import Pooled, item_activations
from czao_lens.steering.data import items_hash, load_ab
from czao_lens.steering.evaluate import answer_text_probability
from czao_lens.steering.vectors import vector_from_pooled
from czao_lens.studies.common import StudyResult, StudySettings, spearman_ci

COLUMNS = ("model", "behaviour", "layer", "trace_score", "caa_effect", "p_steered")
QUESTION = "Does the layer that causal tracing ranks first steer best (CAA at one layer at a time)? Compare Hase et al. 2023."
FULL = {"behaviours": ("refusal", "sycophancy"), "n_trace": 8, "n_samples": 3, "n_fit": 24, "n_test": 24,
        "multiplier": 2.0, "layer_step": 1}
QUICK = {"behaviours": ("refusal",), "n_trace": 1, "n_samples": 1, "n_fit": 4, "n_test": 4, "multiplier": 2.0,
         "layer_step": None}


def behaviour_rows(model, name: str, behaviour: str, sizes: dict, *, chat: bool, data, seed: int) -> list[dict[str, Any]]:
    """One row per layer: its tracing score and CAA's effect there."""
    L = model.cfg.n_layers
    layers = [1, L // 2, L - 1] if sizes["layer_step"] is None else list(range(0, L, sizes["layer_step"]))
    traced = [trace_item(model, it, chat=chat) for it in load_caa(data, behaviour, split="generate", limit=sizes["n_trace"])]
    scores = rank_layers(model, traced, n_samples=sizes["n_samples"], seed=seed, progress=False).scores["resid"].tolist()
    fit = load_ab(behaviour, "fit", n=sizes["n_fit"], seed=seed, balanced=True, data_dir=data)
    test = load_ab(behaviour, "test", n=sizes["n_test"], seed=seed, data_dir=data)
    pos, neg = item_activations(model, fit, layers, hook="resid_pre", readout="answer", chat=chat)
    pooled = Pooled(pos, neg, paired=True)
    p0 = answer_text_probability(model, test, None, chat=chat)
    rows = []
    for l in tqdm(layers, desc=f"CAA per layer, {name} {behaviour}"):
        vec = vector_from_pooled(model, pooled, [l], "resid_pre", "caa", items_hash(fit))
        p = answer_text_probability(model, test, vec * sizes["multiplier"], chat=chat)
        rows.append({"model": name, "behaviour": behaviour, "layer": l, "trace_score": scores[l],
                     "caa_effect": float((p - p0).mean()), "p_unsteered": float(p0.mean()), "p_steered": float(p.mean())})
    return rows


def run(settings: StudySettings) -> StudyResult:
    """Every behaviour on every model; per (model, behaviour), rho over layers and the top layers."""
    sizes, timer, data = settings.start(FULL, QUICK)
    rows: list[dict[str, Any]] = []
    for name, model in settings.loaded():
        chat = resolve_chat(model, None)
        for b in sizes["behaviours"]:
            rows += behaviour_rows(model, name, b, sizes, chat=chat, data=data, seed=settings.seed)
    stats: dict[str, Any] = {"multiplier": sizes["multiplier"]}
    for name in settings.models:
        for b in sizes["behaviours"]:
            mine = [r for r in rows if r["model"] == name and r["behaviour"] == b]
            top_trace = max(mine, key=lambda r: r["trace_score"])["layer"]
            top_caa = max(mine, key=lambda r: r["caa_effect"])["layer"]
            by_caa = sorted(mine, key=lambda r: -r["caa_effect"])
            stats[f"{name}/{b}"] = {
                "rho": spearman_ci([r["trace_score"] for r in mine], [r["caa_effect"] for r in mine], seed=settings.seed),
                "top_trace_layer": top_trace, "top_caa_layer": top_caa,
                "caa_rank_of_top_trace_layer": 1 + [r["layer"] for r in by_caa].index(top_trace),
                "n_layers": len(mine),
            }
    return StudyResult("localization", QUESTION, rows, stats, answer(stats), settings.to_dict(), timer(), figure(rows), columns=COLUMNS)


def answer(stats: dict[str, Any]) -> str:
    parts, agree = [], 0
    keys = [k for k in stats if "/" in k]
    for k in keys:
        s = stats[k]
        lo, hi = s["rho"]["ci"]
        parts.append(f"{k}: rho {s['rho']['rho']:.2f} [{lo:.2f}, {hi:.2f}], traced top layer {s['top_trace_layer']} "
                     f"ranks {s['caa_rank_of_top_trace_layer']} of {s['n_layers']} for CAA (best {s['top_caa_layer']})")
        lo_ok = math.isfinite(lo) and lo > 0
        agree += lo_ok
    verdict = (f"tracing scores predict CAA's per-layer effect in {agree} of {len(keys)} cases" if keys else "no cases")
    return "; ".join(parts) + f". So {verdict} (interval above 0)."


def figure(rows: list[dict[str, Any]]) -> go.Figure:
    """Per (model, behaviour): tracing score and CAA effect against layer, on two y-axes."""
    cases = list(dict.fromkeys((r["model"], r["behaviour"]) for r in rows))
    fig = make_subplots(rows=1, cols=len(cases), subplot_titles=[f"{m} / {b}" for m, b in cases],
                        specs=[[{"secondary_y": True}] * len(cases)])
    for c, (m, b) in enumerate(cases, start=1):
        mine = [r for r in rows if r["model"] == m and r["behaviour"] == b]
        x = [r["layer"] for r in mine]
        fig.add_trace(go.Scatter(x=x, y=[r["trace_score"] for r in mine], name="tracing score", legendgroup="t",
                                 showlegend=c == 1, line=dict(color="#1f77b4")), row=1, col=c, secondary_y=False)
        fig.add_trace(go.Scatter(x=x, y=[r["caa_effect"] for r in mine], name="CAA effect (Δ p)", legendgroup="c",
                                 showlegend=c == 1, line=dict(color="#d62728", dash="dash")), row=1, col=c, secondary_y=True)
        fig.update_xaxes(title_text="layer", row=1, col=c)
    fig.update_layout(height=430, width=480 * len(cases), title="Causal tracing score vs CAA effect per layer")
    return fig
