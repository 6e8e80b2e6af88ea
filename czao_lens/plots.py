"""Plotly figures for diagnostics and results; :func:`save_figure` writes standalone HTML."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import plotly.graph_objects as go


#: One colour per series, fixed by the series' index, so a series keeps its colour in every panel.
SERIES_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def series_color(i: int) -> str:
    """The colour of series ``i`` (cycling)."""
    return SERIES_COLORS[i % len(SERIES_COLORS)]


def save_figure(fig: go.Figure, path: str | Path, *, png: bool = False) -> Path:
    """Write ``fig`` as standalone HTML (plotly.js inlined, works offline); PNG too when asked and
    kaleido is installed (it is not a dependency). Returns the HTML path."""
    path = Path(path)
    if path.suffix != ".html":
        path = path.with_suffix(".html")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    if png and importlib.util.find_spec("kaleido") is not None:
        try:
            fig.write_image(str(path.with_suffix(".png")))
        except Exception:  # kaleido present but unusable (no browser): HTML is enough
            pass
    return path


# ----------------------------------------------------------------------------- diagnostics


def heatmap_figure(
    values, *, x: Sequence, y: Sequence[str], title: str, xlabel: str = "layer", ylabel: str = "token",
    colorscale: str = "Purples", zmid: float | None = None,
) -> go.Figure:
    """A token x layer (or any row x column) heatmap; ``values`` is [len(y), len(x)]."""
    z = values.tolist() if hasattr(values, "tolist") else values
    labels = [f"{i}: {t!r}" for i, t in enumerate(y)]
    fig = go.Figure(go.Heatmap(z=z, x=list(x), y=labels, colorscale=colorscale, zmid=zmid,
                               colorbar=dict(title="effect")))
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title=ylabel, yaxis_autorange="reversed",
                      height=max(300, 22 * len(labels) + 150))
    return fig


def trace_heatmap(trace, kind: str) -> go.Figure:
    """Indirect effect of restoring one (token, layer) state (ROME-style causal-tracing heatmap)."""
    names = {"resid": "residual stream", "mlp": "MLP output (window)", "attn": "attention output (window)"}
    tokens = [trace.tokens[p] + (" *" if trace.span[0] <= p < trace.span[1] else "") for p in trace.positions]
    return heatmap_figure(
        trace.effects[kind], x=list(range(trace.n_layers)), y=tokens,
        title=f"Causal tracing, {names.get(kind, kind)}: {trace.metric} (clean {trace.clean:.3g}, corrupted {trace.corrupted:.3g}; * = corrupted)",
        colorscale={"resid": "Purples", "mlp": "Greens", "attn": "Reds"}.get(kind, "Viridis"),
    )


def layer_scores_figure(scores: dict[str, Sequence[float]], *, title: str, ylabel: str = "score") -> go.Figure:
    """One line per series over layers (ranked-layer scores, growth curves...)."""
    fig = go.Figure()
    for name, ys in scores.items():
        ys = list(ys.tolist() if hasattr(ys, "tolist") else ys)
        fig.add_trace(go.Scatter(x=list(range(len(ys))), y=ys, mode="lines+markers", name=name))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title=ylabel)
    return fig


# ----------------------------------------------------------------------------- CZAO


def landscape_figure(land) -> go.Figure:
    """CZAO loss landscape: one column per layer; rows for loss, violation and KL."""
    from plotly.subplots import make_subplots

    layers = sorted(land.grids)
    rows = ("loss", "violation", "kl")
    fig = make_subplots(rows=len(rows), cols=len(layers), shared_yaxes=True,
                        column_titles=[f"layer {l} (roughness {land.roughness[l]['mean_grad_norm']:.2g})" for l in layers],
                        row_titles=list(rows), horizontal_spacing=0.03, vertical_spacing=0.06)
    for j, l in enumerate(layers):
        for i, comp in enumerate(rows):
            fig.add_trace(go.Heatmap(z=land.grids[l][comp].T, x=land.axis, y=land.axis, coloraxis=f"coloraxis{i + 1}"),
                          row=i + 1, col=j + 1)
    for i, comp in enumerate(rows):
        y = 1 - (i + 0.5) / len(rows)
        fig.update_layout(**{f"coloraxis{i + 1}": dict(colorscale="Viridis", colorbar=dict(title=comp, y=y, len=0.3))})
    what = land.constraint if len(land.constraint) <= 50 else land.constraint[:47] + "..."
    fig.update_layout(title=f"CZAO objective around the unperturbed model: {what}, {land.prompt!r}",
                      height=260 * len(rows) + 120, width=max(500, 320 * len(layers) + 150))
    fig.update_xaxes(title_text="z1")
    fig.update_yaxes(title_text="z2", col=1)
    return fig


def czao_telemetry_figure(result) -> go.Figure:
    """Per-token CZAO telemetry: violation before/after, KL, steps and |delta| (red lines: unreachable)."""
    from plotly.subplots import make_subplots

    recs = result.records
    idx = [r.index for r in recs]
    fig = make_subplots(rows=4, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=("violation V before / after", "KL to unsteered (nats)",
                                        "optimisation steps", "|delta| (residual units)"))
    fig.add_trace(go.Bar(x=idx, y=[r.v_before for r in recs], name="V before"), row=1, col=1)
    fig.add_trace(go.Bar(x=idx, y=[r.v_after if r.optimized else r.v_before for r in recs], name="V after"), row=1, col=1)
    fig.add_trace(go.Scatter(x=idx, y=[r.kl for r in recs], mode="lines+markers", name="KL"), row=2, col=1)
    fig.add_trace(go.Bar(x=idx, y=[r.steps for r in recs], name="steps"), row=3, col=1)
    fig.add_trace(go.Scatter(x=idx, y=[r.delta_norm for r in recs], mode="markers", name="|delta|"), row=4, col=1)
    for r in recs:
        if r.unreachable:
            fig.add_vline(x=r.index, line_color="red", line_dash="dot")
    fig.update_layout(title=f"CZAO telemetry ({'satisfied' if result.satisfied else 'NOT satisfied'}; red = unreachable)",
                      height=800, xaxis4_title="generated token")
    return fig


# ----------------------------------------------------------------------------- SAE features


def feature_bars_figure(basis, *, title: str = "SAE features: mean activation (positive - negative)") -> go.Figure:
    """Bar chart of a ``FeatureBasis``: score per selected feature, firing frequency on hover."""
    labels = [f"f{i}" for i in basis.indices]
    fig = go.Figure(go.Bar(x=labels, y=basis.scores.tolist(), customdata=basis.freq.tolist(),
                           hovertemplate="%{x}: score %{y:.3f}, freq %{customdata:.3f}<extra></extra>"))
    fig.update_layout(title=f"{title} at {basis.hook_name}", xaxis_title="feature", yaxis_title="mean difference")
    return fig
