"""Study 6: do constraints conflict? Pairs of constraints alone and together.

For each pair (A, B) and prompt: CZAO with A alone, with B alone and with A & B (one constraint, V
summed), each text checked against both parts. Feasibility of the conjunction is read where both
parts were met alone: of the prompts where CZAO met A with A alone and B with B alone, the share where
CZAO with A & B met both; the row passes say what the conjunction costs.
"""

from __future__ import annotations

import statistics
from typing import Any

import plotly.graph_objects as go
from tqdm.auto import tqdm

from czao_lens.bench.tasks import load_task
from czao_lens.constraints import AvoidConcept, AvoidTokens, ConsistentWithDocument, NoProfanity, Sentiment
from czao_lens.czao import CZAOConfig, generate_czao
from czao_lens.generate import generate
from czao_lens.studies.common import StudyError, StudyResult, StudySettings, confident_word_prompts, word_pool

QUESTION = "How often is a conjunction of two constraints feasible when each part is, and at what cost?"
FULL = {"prompts": 8, "max_new_tokens": 20, "pairs": ("sentiment+avoid word", "no profanity+on document", "no violence+positive")}
QUICK = {"prompts": 1, "max_new_tokens": 3, "pairs": ("sentiment+avoid word",)}
CONCEPT = "violence, attacking, hurting or killing someone with weapons"


def pair_items(model, name: str, n: int, data, seed: int) -> list[tuple[str, Any, Any]]:
    """(prompt, A, B) for one pair."""
    if name == "sentiment+avoid word":
        return [(p, Sentiment(min_compound=0.0), AvoidTokens([w])) for p, w in confident_word_prompts(model, word_pool(data, seed), n)]
    if name == "no profanity+on document":
        # D is the prompt itself: continue without profanity while staying on what the prompt talks about.
        prompts = load_task("profanity", data, n_fit=max(n, 8), n_test=1, seed=seed).fit[:n]
        return [(p, NoProfanity(max_prob=0.5), ConsistentWithDocument(document=p, min_support=0.3, check_lexical=False)) for p in prompts]
    if name == "no violence+positive":
        prompts = load_task("concept", data, n_fit=max(n, 8), n_test=1, seed=seed).fit[:n]
        return [(p, AvoidConcept(CONCEPT, threshold=0.3), Sentiment(min_compound=0.0)) for p in prompts]
    raise StudyError(f"unknown pair {name!r}")


def run(settings: StudySettings) -> StudyResult:
    """Every pair on every model: A, B and A & B per prompt, and unsteered text for reference."""
    sizes, timer, data = settings.start(FULL, QUICK)
    rows: list[dict[str, Any]] = []
    for name, model in settings.loaded():
        cfg = CZAOConfig(layers=(settings.layer_for(model),), seed=settings.seed)
        for pair in sizes["pairs"]:
            for prompt, a, b in tqdm(pair_items(model, pair, sizes["prompts"], data, settings.seed), desc=f"conjunction {name} {pair}"):
                def ok(text: str) -> tuple[bool, bool]:
                    return bool(a.check_text(text)), bool(b.check_text(text))

                base = generate(model, prompt, max_new_tokens=sizes["max_new_tokens"], seed=settings.seed).texts[0]
                row: dict[str, Any] = {"model": name, "pair": pair, "prompt": prompt, "a": a.describe(), "b": b.describe()}
                row["unsteered"] = dict(zip(("a", "b"), ok(base)), text=base)
                runs = {"A": a, "B": b, "A&B": a & b}
                for label, c in runs.items():
                    r = generate_czao(model, prompt, c, cfg, max_new_tokens=sizes["max_new_tokens"], seed=settings.seed)[0]
                    sa, sb = ok(r.text)
                    row[label] = {"a": sa, "b": sb, "row_passes_per_token": r.summary()["row_passes_per_token"], "text": r.text}
                rows.append(row)
    stats = pair_stats(rows)
    return StudyResult("conjunction", QUESTION, rows, stats, answer(stats), settings.to_dict(), timer(), figure(stats))


def pair_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in dict.fromkeys((r["model"], r["pair"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["pair"]) == key]
        each = [r for r in mine if r["A"]["a"] and r["B"]["b"]]
        out[f"{key[0]}/{key[1]}"] = {
            "n": len(mine),
            "unsteered_both": statistics.fmean(r["unsteered"]["a"] and r["unsteered"]["b"] for r in mine),
            "a_alone": statistics.fmean(r["A"]["a"] for r in mine),
            "b_alone": statistics.fmean(r["B"]["b"] for r in mine),
            "both_under_a_alone": statistics.fmean(r["A"]["a"] and r["A"]["b"] for r in mine),
            "both_under_conjunction": statistics.fmean(r["A&B"]["a"] and r["A&B"]["b"] for r in mine),
            "each_feasible": len(each),
            "conjunction_feasible_given_each": (statistics.fmean(r["A&B"]["a"] and r["A&B"]["b"] for r in each) if each else None),
            "row_passes": {k: statistics.fmean(r[k]["row_passes_per_token"] for r in mine) for k in ("A", "B", "A&B")},
        }
    return out


def answer(stats: dict[str, Any]) -> str:
    parts = []
    for k, s in stats.items():
        given = s["conjunction_feasible_given_each"]
        parts.append(f"{k}: both met {s['both_under_conjunction']:.2f} under A & B (unsteered {s['unsteered_both']:.2f}); "
                     f"where each part was met alone ({s['each_feasible']}/{s['n']}), the conjunction was met in "
                     f"{'n/a' if given is None else f'{given:.2f}'}, at {s['row_passes']['A&B']:.1f} row passes/token "
                     f"(A {s['row_passes']['A']:.1f}, B {s['row_passes']['B']:.1f})")
    return "; ".join(parts) + "."


def figure(stats: dict[str, Any]) -> go.Figure:
    """Per (model, pair): the share of prompts meeting both parts, unsteered, under A alone, under B's
    and A's runs separately, and under A & B."""
    keys = list(stats)
    fig = go.Figure()
    for label, k in (("unsteered, both", "unsteered_both"), ("A alone meets A", "a_alone"), ("B alone meets B", "b_alone"),
                     ("A & B meets both", "both_under_conjunction")):
        fig.add_trace(go.Bar(x=keys, y=[stats[x][k] for x in keys], name=label))
    fig.update_layout(barmode="group", height=450, width=max(700, 260 * len(keys)), yaxis=dict(range=[0, 1.05]),
                      title="Constraints alone and together (share of prompts)")
    return fig
