"""Study 3: landscape roughness against Lyapunov sensitivity, layer by layer, and whether either
predicts the steps CZAO needs at that layer.

Per model, on a few prompts, with a constraint that is active at the first generated token (ban the
word the unsteered model would say next, so every layer has the same job):

- ``roughness``: the mean gradient norm of CZAO's objective over a 2-D grid of the subspace at layer
  l (:func:`~czao_lens.diagnostics.landscape.loss_landscape`);
- ``lyapunov_local``: the top log-stretch of block l (:func:`~czao_lens.diagnostics.lyapunov.lyapunov_spectrum`),
  and ``lyapunov_ahead``: its mean from block l to the last one (the finite-time exponent of what a
  perturbation at l goes through);
- ``steps`` and ``z_norm``: the SPSA steps CZAO takes at layer l alone to satisfy the constraint (no
  seed line, no budget: the raw search), and how far (|z|, in typical residual norms) it had to go.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from czao_lens.constraints import AvoidTokens
from czao_lens.czao import CZAOConfig, generate_czao
from czao_lens.diagnostics.landscape import loss_landscape
from czao_lens.diagnostics.lyapunov import lyapunov_spectrum
from czao_lens.plots import series_color
from czao_lens.studies.common import StudyError, StudyResult, StudySettings, confident_word_prompts, spearman_ci, word_pool

COLUMNS = ("model", "layer", "roughness", "lyapunov_local", "lyapunov_ahead", "steps", "z_norm", "satisfied")
QUESTION = ("Does landscape roughness track Lyapunov sensitivity across layers, and does either predict "
            "the steps CZAO needs at a layer?")
FULL = {"prompts": 4, "grid": 9, "layer_step": 2}
QUICK = {"prompts": 1, "grid": 3, "layer_step": None}


def model_rows(model, name: str, *, prompts: list[tuple[str, str]], layers: list[int], grid: int, seed: int) -> list[dict[str, Any]]:
    """One row per layer: roughness, Lyapunov figures and CZAO's steps, averaged over the prompts."""
    L = model.cfg.n_layers
    lyap = lyapunov_spectrum(model, [p for p, _ in prompts], k=2, seed=seed)
    local = lyap.curves["log_r_0"]
    ahead = [sum(local[l:]) / (L - l) for l in range(L)]
    cfg = CZAOConfig(seed_direction=False, budget=None, repair=0, value_probe=False, fallback="flag", seed=seed)
    rows = []
    for l in tqdm(layers, desc=f"sensitivity {name}"):
        rough, steps, z, ok = [], [], [], []
        for prompt, word in prompts:
            c = AvoidTokens(words=(word,))
            land = loss_landscape(model, prompt, c, [l], config=replace(cfg, layers=(l,)), n=grid, chat=False)
            rough.append(land.roughness[l]["mean_grad_norm"])
            r = generate_czao(model, prompt, c, replace(cfg, layers=(l,)), max_new_tokens=1, probe=None)[0]
            steps.append(r.records[0].steps)
            z.append(r.records[0].z_norm)
            ok.append(bool(r.records[0].satisfied))
        rows.append({"model": name, "layer": l, "roughness": sum(rough) / len(rough), "lyapunov_local": local[l],
                     "lyapunov_ahead": ahead[l], "steps": sum(steps) / len(steps), "z_norm": sum(z) / len(z), "satisfied": sum(ok) / len(ok)})
    return rows


def run(settings: StudySettings) -> StudyResult:
    """Every model of ``settings``: per-layer rows and Spearman's rho of each pair, with bootstrap CIs."""
    sizes, timer, data = settings.start(FULL, QUICK)
    pool = word_pool(data, settings.seed)
    rows: list[dict[str, Any]] = []
    used: dict[str, list[tuple[str, str]]] = {}
    for name, model in settings.loaded():
        L = model.cfg.n_layers
        layers = ([1, L - 1] if sizes["layer_step"] is None else list(range(1, L, sizes["layer_step"])))
        used[name] = confident_word_prompts(model, pool, sizes["prompts"])
        if not used[name]:
            raise StudyError(f"{name}: no prompt of the sentiment pool has a confident next word to ban")
        rows += model_rows(model, name, prompts=used[name], layers=layers, grid=sizes["grid"], seed=settings.seed)
    stats: dict[str, Any] = {"prompt_words": {m: [w for _, w in ps] for m, ps in used.items()}}
    pairs = [("roughness", "lyapunov_local"), ("roughness", "lyapunov_ahead"), ("roughness", "steps"),
             ("lyapunov_local", "steps"), ("lyapunov_ahead", "steps"), ("roughness", "z_norm"), ("lyapunov_ahead", "z_norm")]
    for name in settings.models:
        mine = [r for r in rows if r["model"] == name]
        stats[name] = {f"{a}_vs_{b}": spearman_ci([r[a] for r in mine], [r[b] for r in mine], seed=settings.seed)
                       for a, b in pairs}
    return StudyResult("sensitivity", QUESTION, rows, stats, answer(stats, settings.models), settings.to_dict(),
                       timer(), figure(rows), columns=COLUMNS)


def answer(stats: dict[str, Any], models: list[str]) -> str:
    def say(r: dict) -> str:
        lo, hi = r["ci"]
        sig = math.isfinite(lo) and (lo > 0 or hi < 0)
        return f"rho {r['rho']:.2f} [{lo:.2f}, {hi:.2f}]{'' if sig else ', interval spans 0'}"

    first = "; ".join(f"{m}: roughness vs local Lyapunov {say(stats[m]['roughness_vs_lyapunov_local'])}" for m in models)
    second = "; ".join(f"{m}: |z| CZAO needs vs roughness {say(stats[m]['roughness_vs_z_norm'])}, vs Lyapunov ahead "
                       f"{say(stats[m]['lyapunov_ahead_vs_z_norm'])}; steps vs roughness {say(stats[m]['roughness_vs_steps'])}"
                       for m in models)
    return f"{first}. {second}."


def figure(rows: list[dict[str, Any]]) -> go.Figure:
    """Per model, the four per-layer curves, each scaled to [0, 1] so they share an axis."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=models)
    keys = ("roughness", "lyapunov_local", "lyapunov_ahead", "steps", "z_norm")
    for c, name in enumerate(models, start=1):
        mine = [r for r in rows if r["model"] == name]
        for i, k in enumerate(keys):
            v = torch.tensor([r[k] for r in mine], dtype=torch.float64)
            span = float(v.max() - v.min())
            scaled = ((v - v.min()) / span).tolist() if span > 0 else [0.5] * len(mine)
            fig.add_trace(go.Scatter(x=[r["layer"] for r in mine], y=scaled, mode="lines+markers", name=k, legendgroup=k,
                                     showlegend=c == 1, customdata=[r[k] for r in mine], line=dict(color=series_color(i)),
                                     hovertemplate=k + " %{customdata:.3f}<extra></extra>"), row=1, col=c)
        fig.update_xaxes(title_text="layer", row=1, col=c)
    fig.update_yaxes(title_text="scaled to [0, 1] per curve", row=1, col=1)
    fig.update_layout(height=450, width=650 * len(models), title="Per layer: landscape roughness, Lyapunov sensitivity, CZAO steps")
    return fig
