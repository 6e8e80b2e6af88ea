"""Study 1: how many sequential steps CZAO needs, and what it pays, against the rank r of its subspace
and the number of layers |R| it perturbs, per constraint type.

|R| takes the top 1, 2 or 3 layers of a causal-tracing ranking (``layers.json`` from ``czao-lens
trace``; without one, the study traces a few refusal items itself). CZAO runs with its defaults
otherwise (value probes where they exist, the seed line, screening, the budget, repair), as a user
would, over the same prompts at every setting; and at one layer without the seed line, to see what
the raw SPSA search needs.
"""

from __future__ import annotations

import statistics
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from czao_lens.czao import CZAOConfig, generate_czao
from czao_lens.diagnostics.tracing import load_caa, load_layers, rank_layers, trace_item
from czao_lens.plots import series_color
from czao_lens.prompts import resolve_chat
from czao_lens.studies.common import SUITE_TYPES, StudyError, StudyResult, StudySettings, constraint_suite

COLUMNS = ("model", "type", "rank", "n_layers", "seed_line", "mean_steps", "max_steps", "optimized_share", "row_passes_per_token", "satisfaction", "unreachable_share")
QUESTION = "How many sequential steps (and passes per token) does CZAO need as the rank r and the number of layers |R| grow, per constraint type?"
FULL = {"ranks": (4, 8, 16, 32, 64), "n_layers": (1, 2, 3), "prompts": 4, "max_new_tokens": 16, "n_trace": 4, "types": SUITE_TYPES}
QUICK = {"ranks": (4, 16), "n_layers": (1, 2), "prompts": 1, "max_new_tokens": 3, "n_trace": 1,
         "types": ("banned words", "sentiment")}


def traced_layers(model, settings: StudySettings, n_trace: int, data) -> list[int]:
    """Best-first layers: from ``settings.layers_json`` when given, else a small refusal trace."""
    if settings.layers_json is not None:
        return load_layers(settings.layers_json)
    items = [trace_item(model, it, chat=resolve_chat(model, None)) for it in load_caa(data, "refusal", split="generate", limit=n_trace)]
    return rank_layers(model, items, n_samples=2, seed=settings.seed, progress=False).top(model.cfg.n_layers)


def run(settings: StudySettings) -> StudyResult:
    """Every (type, rank, |R|) on every model: steps, passes, satisfaction."""
    sizes, timer, data = settings.start(FULL, QUICK)
    rows: list[dict[str, Any]] = []
    used_layers: dict[str, list[int]] = {}
    for name, model in settings.loaded():
        best = traced_layers(model, settings, sizes["n_trace"], data)
        if max(sizes["n_layers"]) > len(best):
            raise StudyError(f"n_layers up to {max(sizes['n_layers'])} but only {len(best)} ranked layers on {name}")
        used_layers[name] = best[:max(sizes["n_layers"])]
        suite = constraint_suite(model, data, sizes["prompts"], settings.seed)
        types = sizes["types"]
        # The defaults over the whole grid; then, at one layer, without the seed line (the raw SPSA search).
        grid = [(t, r, k, True) for t in types for r in sizes["ranks"] for k in sizes["n_layers"]]
        grid += [(t, r, 1, False) for t in types for r in sizes["ranks"]] if not settings.quick else []
        for ctype, rank, k, seeded in tqdm(grid, desc=f"steps {name}"):
            cfg = CZAOConfig(layers=tuple(sorted(best[:k])), rank=rank, seed_direction=seeded, seed=settings.seed)
            results = [generate_czao(model, p, c, cfg, max_new_tokens=sizes["max_new_tokens"], seed=settings.seed)[0]
                       for p, c in suite[ctype]]
            steps = [rec.steps for res in results for rec in res.records if rec.optimized]
            summ = [res.summary() for res in results]
            rows.append({
                "model": name, "type": ctype, "rank": rank, "n_layers": k, "seed_line": seeded, "layers": list(cfg.layers), "prompts": len(results),
                "optimized_share": sum(len([r for r in res.records if r.optimized]) for res in results)
                / max(sum(len(res.records) for res in results), 1),
                "median_steps": statistics.median(steps) if steps else 0.0, "mean_steps": statistics.fmean(steps) if steps else 0.0,
                "max_steps": max(steps, default=0),
                "passes_per_token": statistics.fmean(s["passes_per_token"] for s in summ),
                "row_passes_per_token": statistics.fmean(s["row_passes_per_token"] for s in summ),
                "satisfaction": statistics.fmean(float(res.satisfied) for res in results),
                "unreachable_share": statistics.fmean(float(res.unreachable) for res in results),
            })
    stats = {"layers": used_layers, **summary_stats(rows)}
    return StudyResult("steps", QUESTION, rows, stats, answer(stats), settings.to_dict(), timer(), figure(rows), columns=COLUMNS)


def summary_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model and type: the range of mean steps and of row passes over the grid, and the setting
    with the highest satisfaction at the lowest row passes."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys((r["model"], r["type"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["type"]) == key and r["seed_line"]]
        raw = [r for r in rows if (r["model"], r["type"]) == key and not r["seed_line"]]
        best = max(mine, key=lambda r: (r["satisfaction"], -r["row_passes_per_token"]))
        out[f"{key[0]}/{key[1]}"] = {
            "mean_steps_range": [min(r["mean_steps"] for r in mine), max(r["mean_steps"] for r in mine)],
            "row_passes_range": [min(r["row_passes_per_token"] for r in mine), max(r["row_passes_per_token"] for r in mine)],
            "satisfaction_range": [min(r["satisfaction"] for r in mine), max(r["satisfaction"] for r in mine)],
            "best": {k: best[k] for k in ("rank", "n_layers", "satisfaction", "row_passes_per_token", "mean_steps")},
            "without_seed_line": {r["rank"]: {k: r[k] for k in ("mean_steps", "row_passes_per_token", "satisfaction")} for r in raw},
        }
    return out


def answer(stats: dict[str, Any]) -> str:
    cases = {k: v for k, v in stats.items() if "/" in k}
    hi = max((v["mean_steps_range"][1] for v in cases.values()), default=0.0)
    parts = [f"{k}: best r={v['best']['rank']}, |R|={v['best']['n_layers']} (satisfaction {v['best']['satisfaction']:.2f} at "
             f"{v['best']['row_passes_per_token']:.1f} row passes/token)" for k, v in cases.items()]
    return (f"CZAO needs at most {hi:.1f} sequential steps per optimised token on average at any setting measured. "
            + "; ".join(parts) + ".")


def figure(rows: list[dict[str, Any]]) -> go.Figure:
    """Per model and type: mean steps (top) and row passes per token (bottom) against rank, one line per |R|."""
    cases = list(dict.fromkeys((r["model"], r["type"]) for r in rows))
    fig = make_subplots(rows=2, cols=len(cases), subplot_titles=[f"{m}<br>{t}" for m, t in cases], shared_xaxes=True,
                        vertical_spacing=0.08)
    for c, (m, t) in enumerate(cases, start=1):
        for i, k in enumerate(sorted({r["n_layers"] for r in rows})):
            mine = sorted((r for r in rows if (r["model"], r["type"]) == (m, t) and r["n_layers"] == k and r["seed_line"]),
                          key=lambda r: r["rank"])
            text = [f"satisfaction {r['satisfaction']:.2f}" for r in mine]
            for row_i, key in ((1, "mean_steps"), (2, "row_passes_per_token")):
                fig.add_trace(go.Scatter(x=[r["rank"] for r in mine], y=[r[key] for r in mine], mode="lines+markers",
                                         name=f"|R|={k}", legendgroup=str(k), showlegend=c == 1 and row_i == 1, text=text,
                                         line=dict(color=series_color(i))),
                              row=row_i, col=c)
        raw = sorted((r for r in rows if (r["model"], r["type"]) == (m, t) and not r["seed_line"]), key=lambda r: r["rank"])
        for row_i, key in ((1, "mean_steps"), (2, "row_passes_per_token")):
            fig.add_trace(go.Scatter(x=[r["rank"] for r in raw], y=[r[key] for r in raw], mode="lines+markers",
                                     line=dict(dash="dot", color="gray"), name="|R|=1, no seed line", legendgroup="raw",
                                     showlegend=c == 1 and row_i == 1), row=row_i, col=c)
        fig.update_xaxes(title_text="rank r", row=2, col=c)
    ranks = sorted({r["rank"] for r in rows})  # every panel: a log axis ticked at the ranks measured
    fig.update_xaxes(type="log", tickvals=ranks, ticktext=[str(r) for r in ranks])
    fig.update_yaxes(title_text="mean steps / optimised token", row=1, col=1)
    fig.update_yaxes(title_text="row passes / token", row=2, col=1)
    fig.update_layout(height=650, width=max(700, 300 * len(cases)), title="CZAO's steps and cost vs rank and |R|")
    return fig
