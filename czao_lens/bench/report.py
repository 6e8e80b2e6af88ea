"""The benchmark report: a markdown table per task and a self-contained HTML page with plotly charts."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from czao_lens.bench.methods import METHODS
from czao_lens.bench.tasks import BenchError


PALETTE = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880")


def fmt(x: Any, nd: int = 2) -> str:
    """A number for a table: floats to ``nd`` places, "-" for missing or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _ci(v: float, ci: list[float]) -> str:
    return f"{fmt(v)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def setting_label(s: dict) -> str:
    """The setting a method's sweep chose (or best-of-n's n, or prompting's system prompt), as text."""
    st = s.get("setting") or {}
    if "setting" in st:
        return str(st["setting"])
    if "n" in st:
        return f"n={st['n']}" if isinstance(st["n"], int) else f"n={fmt(s.get('passes_per_token'), 1)} (mean, matched to CZAO)"
    return "system prompt" if "instruction" in st else "-"


def task_rows(t: dict) -> tuple[list[str], list[list[str]]]:
    """Header and cell rows of one task's table (rendered as markdown and as HTML)."""
    gen = t["kind"] == "generate"
    if gen:
        head = ["method", "satisfaction [95% CI]", "Δ vs unsteered [95% CI]", "2nd-eval agree", "gaming",
                "ppl (x unsteered, same decoding)", "KL/token", "distinct-2", "passes/token", "wall ratio", "setting", "CZAO"]
    else:
        head = ["method", "p>0.5 rate [95% CI]", "mean p(text) [95% CI]", "Δ rate vs unsteered [95% CI]", "p(letter)",
                "2nd-eval agree", "gaming", "KL neutral", "wall ratio", "setting"]
    rows: list[list[str]] = []
    for m, s in t["methods"].items():
        if "failed" in s:
            rows.append([m, f"failed: {s['failed'][:120]}"])
            continue
        err = f" ({s['errors']} errors)" if s["errors"] else ""
        delta = _ci(s["delta_vs_unsteered"], s["delta_ci"]) if m != "unsteered" else "-"
        if gen:
            cz = (f"unreachable {fmt(s['unreachable_share'])}, steps median {s['median_steps']} / max {s['max_steps']}"
                  if m in ("czao", "czao-sae") else "")
            row = [m + err, _ci(s["satisfaction"], s["ci"]), delta, fmt(s["second_agreement"]), fmt(s["gaming"]),
                   f"{fmt(s['ppl'], 1)} ({fmt(s.get('ppl_ratio_same_decoding', s.get('ppl_ratio')))})", fmt(s["kl"], 3), fmt(s["distinct2"]),
                   fmt(s["passes_per_token"]), fmt(s["wall_ratio"]), setting_label(s), cz]
        else:
            row = [m + err, _ci(s["satisfaction"], s["ci"]), _ci(s["p_text"], s["p_text_ci"]), delta, fmt(s["p_letter"]),
                   fmt(s["second_agreement"]), fmt(s["gaming"]), fmt(s["kl"], 3), fmt(s["wall_ratio"]), setting_label(s)]
        rows.append(row)
    rows += [[m, f"n/a: {why}"] for m, why in t.get("not_applicable", {}).items()]
    return head, [r + [""] * (len(head) - len(r)) for r in rows]


def task_table(name: str, t: dict) -> str:
    """Markdown table of one task."""
    head, rows = task_rows(t)
    line = lambda r: "| " + " | ".join(r) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "---|" * len(head), *map(line, rows)])


def run_minutes(run: dict) -> float:
    """Minutes the run's items took, summed over every invocation (a resumed run that only merged
    finished tasks still reports their time); older summaries have only the last invocation's."""
    return run.get("item_seconds", run["seconds"]) / 60


def markdown(summary: dict) -> str:
    run = summary["run"]
    parts = [f"# czao-lens bench: {run['model']}",
             f"Started {run['started']}, {run['seconds'] / 60:.1f} min ({run_minutes(run):.1f} min of items over "
             f"every invocation), {run['threads']} threads; "
             f"n_fit={run['n_fit']}, n_test={run['n_test']}, max_new_tokens={run['settings']['max_new_tokens']}, "
             f"seed={run['settings']['seed']}."]
    for name, t in summary["tasks"].items():
        parts += [f"## {name}", f"{t['description']}. Data: `{t['source']}` ({t['n_fit']} fit / {t['n_test']} test). "
                  f"Second evaluator: {t['second_evaluator']}.", task_table(name, t)]
    return "\n\n".join(parts) + "\n"


def trilemma_figure(summary: dict) -> go.Figure:
    """The "steering trilemma", measured: satisfaction (y) against fluency cost (x: perplexity ratio to
    unsteered for generation, KL on neutral prompts for A/B tasks), marker area growing with compute
    (passes per token), one panel per task, one colour per method."""
    names = list(summary["tasks"])
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.07, vertical_spacing=0.16)
    colors = dict(zip(METHODS, PALETTE))
    shown: set[str] = set()
    for k, name in enumerate(names):
        t = summary["tasks"][name]
        gen = t["kind"] == "generate"
        r, c = k // cols + 1, k % cols + 1
        for m, s in t["methods"].items():
            # A method whose every item failed has NaN figures: no point to draw (plotly refuses a NaN size).
            if "failed" in s or not math.isfinite(s.get("passes_per_token", math.nan)):
                continue
            x = s.get("ppl_ratio", math.nan) if gen else s["kl"]
            size = 9 + 7 * math.log2(max(s["passes_per_token"], 1.0))
            fig.add_trace(go.Scatter(
                x=[x], y=[s["satisfaction"]], mode="markers", name=m, legendgroup=m, showlegend=m not in shown,
                marker=dict(size=size, color=colors.get(m), line=dict(width=1, color="black")),
                error_y=dict(type="data", symmetric=False, array=[s["ci"][1] - s["satisfaction"]],
                             arrayminus=[s["satisfaction"] - s["ci"][0]], thickness=1, color=colors.get(m)),
                hovertemplate=(f"{m}<br>satisfaction %{{y:.2f}}<br>{'ppl ratio' if gen else 'KL neutral'} %{{x:.2f}}"
                               f"<br>passes/token {s['passes_per_token']:.2f}<br>wall ratio {s['wall_ratio']:.2f}<extra></extra>"),
            ), row=r, col=c)
            shown.add(m)
        fig.update_xaxes(title_text="perplexity / unsteered's" if gen else "KL on neutral prompts (nats)", row=r, col=c)
        fig.update_yaxes(range=[-0.05, 1.1], title_text="satisfaction" if c == 1 else None, row=r, col=c)
    fig.update_layout(height=400 * rows, width=1250, legend_title_text="method",
                      title="Satisfaction vs fluency cost; marker area grows with passes/token (95% bootstrap CI)")
    return fig


def satisfaction_figure(summary: dict) -> go.Figure:
    fig = go.Figure()
    methods = list(dict.fromkeys(m for t in summary["tasks"].values() for m, s in t["methods"].items() if "failed" not in s))
    for m in methods:
        xs, ys, lo, hi = [], [], [], []
        for name, t in summary["tasks"].items():
            s = t["methods"].get(m)
            if s and "failed" not in s:
                xs.append(name)
                ys.append(s["satisfaction"])
                lo.append(s["satisfaction"] - s["ci"][0])
                hi.append(s["ci"][1] - s["satisfaction"])
        fig.add_trace(go.Bar(name=m, x=xs, y=ys, marker_color=dict(zip(METHODS, PALETTE)).get(m),
                             error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo)))
    fig.update_layout(barmode="group", title="Constraint satisfaction per task and method (95% bootstrap CI)",
                      yaxis_title="satisfaction", height=450, width=1200)
    return fig


def _html_table(t: dict) -> str:
    head, rows = task_rows(t)
    th = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    tb = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{tb}</table>"


def write_report(summary: dict, out: Path) -> tuple[Path, Path]:
    """Write report.md and a self-contained report.html (plotly.js inlined once)."""
    md = markdown(summary)
    (out / "report.md").write_text(md)
    figs = [trilemma_figure(summary), satisfaction_figure(summary)]
    body = [f"<h1>{html.escape(md.splitlines()[0][2:])}</h1>", f"<p>{html.escape(md.split(chr(10) * 2)[1])}</p>"]
    body += [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs)]
    for name, t in summary["tasks"].items():
        body += [f"<h2>{html.escape(name)}</h2>", f"<p>{html.escape(t['description'])}; second evaluator: "
                 f"{html.escape(t['second_evaluator'])}</p>", _html_table(t)]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}th{background:#f3f3f3}")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>czao-lens bench</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
    (out / "report.html").write_text(page)
    return out / "report.md", out / "report.html"


def read_summaries(folders: list[Path]) -> tuple[dict[str, dict[str, dict]], dict[str, list[str]]]:
    """``{model: {task: task summary}}`` from bench ``--out`` folders, and per model one line per folder.

    Folders are grouped by the model their summary names and merged in the order given: a task
    measured in two folders of one model takes every method of the later folder except its unsteered
    reference (a rerun of one arm after a fix replaces that arm), and only when both runs scored the
    same items (``n_test`` and seed); otherwise the merge is refused."""
    if not folders:
        raise BenchError("no bench folders given: pass the --out folder(s) of `czao-lens bench`")
    runs: dict[str, dict[str, dict]] = {}
    lines: dict[str, list[str]] = {}
    items: dict[tuple[str, str], tuple] = {}
    for folder in map(Path, folders):
        path = folder / "summary.json"
        if not path.is_file():
            raise BenchError(f"no bench summary at {path}: run `czao-lens bench --out {folder}` first")
        try:
            summary = json.loads(path.read_text())
            run, tasks = summary["run"], summary["tasks"]
            model, key = run["model"], (run["n_test"], run["settings"]["seed"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BenchError(f"{path} is not a bench summary ({exc!r})") from None
        lines.setdefault(model, []).append(
            f"`{folder}`: {', '.join(tasks)}; started {run['started']}, {run_minutes(run):.1f} min, "
            f"n_fit={run['n_fit']}, n_test={run['n_test']}")
        for task, t in tasks.items():
            have = runs.setdefault(model, {}).get(task)
            if have is None:
                runs[model][task] = {**t, "methods": dict(t["methods"])}
                items[model, task] = key
                continue
            if items[model, task] != key:
                raise BenchError(f"task {task} of {model} in {folder} scored other items (n_test, seed = {key}) "
                                 f"than an earlier folder ({items[model, task]}): they cannot be merged")
            have["methods"].update({m: v for m, v in t["methods"].items() if m != "unsteered"})
    return runs, lines
