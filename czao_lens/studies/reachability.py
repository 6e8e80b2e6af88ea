"""Study 4: reachability. How is the margin rho distributed per constraint type, can unreachability be
predicted before generating, and is it a property of the prompt, the layer or the budget?

Per prompt of the constraint suite (banned words and the bench's sentiment, profanity and concept
tasks on fit prompts): rho(C, x), the smallest |z| that satisfies C at the first generated token
(:func:`~czao_lens.czao.reachability_margin`), at the main layer with two radius budgets b_max and at a second layer with the tight one. The label
"unreachable" at the main layer and the tight budget is predicted out of fold from the prompt's
last-token residual (a logistic regression) and scored directly by the prompt's finite-time
Lyapunov exponent from that layer on.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from czao_lens.czao import CZAOConfig, reachability_margin
from czao_lens.diagnostics.lyapunov import lyapunov_spectrum
from czao_lens.probes import auroc
from czao_lens.sites import resid_hook
from czao_lens.store import ActivationStore
from czao_lens.studies.common import SUITE_TYPES, StudyResult, StudySettings, constraint_suite, cv_logistic_auroc

QUESTION = ("How is the reachability margin distributed per constraint type, can unreachability be predicted from the "
            "prompt's activations or Lyapunov sensitivity, and is it a property of the prompt, the layer or the budget?")
FULL = {"prompts": 8, "budgets": (1.0, 3.0), "iters": 4, "types": SUITE_TYPES}
QUICK = {"prompts": 1, "budgets": (1.0,), "iters": 2, "types": ("banned words",)}


def run(settings: StudySettings) -> StudyResult:
    """Margins per (prompt, layer, budget) on every model, the predictors' AUROC and the label's
    stability across layers and budgets."""
    sizes, timer, data = settings.start(FULL, QUICK)
    rows: list[dict[str, Any]] = []
    stats: dict[str, Any] = {}
    for name, model in settings.loaded():
        L = model.cfg.n_layers
        main = settings.layer_for(model)
        layers = (main, max(1, main // 2))
        suite = constraint_suite(model, data, sizes["prompts"], settings.seed)
        items = [(t, p, c) for t in sizes["types"] for p, c in suite[t]]
        lyap = []
        for ctype, prompt, c in tqdm(items, desc=f"reachability {name}"):
            row: dict[str, Any] = {"model": name, "type": ctype, "prompt": prompt}
            tight, loose = sizes["budgets"][0], sizes["budgets"][-1]
            for l, b in dict.fromkeys([(main, tight), (main, loose), (layers[1], tight)]):
                r = reachability_margin(model, prompt, c, CZAOConfig(layers=(l,), seed=settings.seed), b_max=b,
                                        iters=sizes["iters"])
                row[f"rho@{l}/{b:g}"] = r["rho"]
            lyap.append(float(lyapunov_spectrum(model, [prompt], l0=main, k=1, seed=settings.seed).summary["lambda_0"]))
            row["lyapunov_ahead"] = lyap[-1]
            rows.append(row)
        # The prompts' last-token residuals at the main layer, through the activation store in one pass.
        feats = ActivationStore(model).last_token([p for _, p, _ in items], resid_hook(main))[resid_hook(main)].float()
        stats[name] = model_stats([r for r in rows if r["model"] == name], layers, sizes["budgets"], feats,
                                  torch.tensor(lyap), settings.seed)
    return StudyResult("reachability", QUESTION, rows, stats, answer(stats), settings.to_dict(), timer(), figure(rows, stats))


def model_stats(rows: list[dict[str, Any]], layers: tuple[int, int], budgets: tuple[float, ...], feats: torch.Tensor,
                lyap: torch.Tensor, seed: int) -> dict[str, Any]:
    main, other = layers
    tight, loose = budgets[0], budgets[-1]
    label = torch.tensor([not math.isfinite(r[f"rho@{main}/{tight:g}"]) for r in rows], dtype=torch.float32)

    def flips(a: str, b: str) -> float:
        return statistics.fmean(math.isfinite(r[a]) != math.isfinite(r[b]) for r in rows)

    per_type = {}
    for t in dict.fromkeys(r["type"] for r in rows):
        rho = [r[f"rho@{main}/{loose:g}"] for r in rows if r["type"] == t]
        fin = [v for v in rho if math.isfinite(v)]
        per_type[t] = {"n": len(rho), "unreachable_share": 1 - len(fin) / len(rho),
                       "rho_zero_share": sum(v == 0 for v in fin) / len(rho),
                       "rho_median_finite": statistics.median(fin) if fin else None}
    return {
        "layers": list(layers), "budgets": list(budgets), "per_type": per_type,
        "unreachable_share_tight": float(label.mean()),
        "label_flips_across_layers": flips(f"rho@{main}/{tight:g}", f"rho@{other}/{tight:g}"),
        "label_flips_across_budgets": flips(f"rho@{main}/{tight:g}", f"rho@{main}/{loose:g}"),
        "auroc_activation_probe": cv_logistic_auroc(feats, label, seed=seed),
        "auroc_lyapunov": auroc(lyap, label),
    }


def answer(stats: dict[str, Any]) -> str:
    parts = []
    for name, s in stats.items():
        parts.append(f"{name}: unreachable at the tight budget {s['unreachable_share_tight']:.2f}; the label changes with the "
                     f"layer on {s['label_flips_across_layers']:.2f} of prompts and with the budget on "
                     f"{s['label_flips_across_budgets']:.2f}; AUROC from activations {s['auroc_activation_probe']:.2f}, "
                     f"from Lyapunov {s['auroc_lyapunov']:.2f}")
    return "; ".join(parts) + "."


def figure(rows: list[dict[str, Any]], stats: dict[str, Any]) -> go.Figure:
    """Per model: the margin's distribution per constraint type at the main layer and loose budget
    (unreachable prompts drawn at the top, above b_max)."""
    models = list(stats)
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=models)
    for c, name in enumerate(models, start=1):
        s = stats[name]
        key = f"rho@{s['layers'][0]}/{s['budgets'][-1]:g}"
        top = s["budgets"][-1] * 1.1
        for t in s["per_type"]:
            ys = [r[key] if math.isfinite(r[key]) else top for r in rows if r["model"] == name and r["type"] == t]
            fig.add_trace(go.Box(y=ys, name=t, boxpoints="all", jitter=0.4, pointpos=0, showlegend=False), row=1, col=c)
        fig.add_hline(y=top, line_dash="dot", annotation_text="unreachable", row=1, col=c)
        fig.update_yaxes(title_text="rho (|z| at the first token)", row=1, col=c)
    fig.update_layout(height=450, width=max(700, 600 * len(models)), title="Reachability margin per constraint type")
    return fig
