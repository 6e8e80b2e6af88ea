"""The cross-model table of docs/benchmarks.md, from bench output folders.

    python benchmarks/cross_model_table.py --bench runs/bench_smol_choice --bench runs/bench_smol_gen \
        --bench runs/bench_gemma_full --bench runs/bench_gemma_gen

Folders are merged by :func:`czao_lens.bench.report.read_summaries` (per model, in the order given;
a later folder's arms replace an earlier one's, its unsteered reference aside). Per task, one row per method: satisfaction with its 95% interval on
each model, the paired difference to unsteered, the fluency cost (perplexity ratio with the same
decoding and KL per token for generation tasks; p(answer text) and KL on neutral prompts for choice
tasks), the compute (row passes per token) and the chosen setting. Prints markdown; the last lines
are ``name=value`` counts of the methods that keep their sign of effect on both models.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from czao_lens.bench.report import fmt as f, read_summaries, setting_label as setting  # noqa: E402

SHORT = {"smollm2-135m-instruct": "SmolLM2", "gemma-3-270m": "Gemma"}


def cost(kind: str, s: dict) -> str:
    if kind == "generate":
        return f"ppl x{f(s.get('ppl_ratio_same_decoding', s.get('ppl_ratio')))}, KL {f(s.get('kl'), 3)}"
    return f"p(text) {f(s.get('p_text'))}, KL {f(s.get('kl'), 3)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=Path, action="append", required=True, help="a bench --out folder; repeat")
    args = ap.parse_args()
    runs, lines = read_summaries(args.bench)
    models = list(runs)
    names = [SHORT.get(m, m) for m in models]
    tasks = list(dict.fromkeys(t for m in models for t in runs[m]))
    same_sign = differ = 0
    for task in tasks:
        have = [m for m in models if task in runs[m]]
        kind = runs[have[0]][task]["kind"]
        print(f"### {task}\n")
        head = ["method"] + [f"{SHORT.get(m, m)} satisfaction [95% CI]" for m in have] + \
               [f"Δ vs unsteered {' / '.join(SHORT.get(m, m) for m in have)}"] + \
               [f"{SHORT.get(m, m)} fluency cost" for m in have] + \
               [f"row passes/token {' / '.join(SHORT.get(m, m) for m in have)}", "setting " + " / ".join(SHORT.get(m, m) for m in have)]
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        methods = list(dict.fromkeys(k for m in have for k in runs[m][task]["methods"]))
        for meth in methods:
            cells, deltas = [meth], []
            ss = [runs[m][task]["methods"].get(meth, {"failed": "not run"}) for m in have]
            for s in ss:
                cells.append(f"failed: {s['failed'][:50]}" if "failed" in s else
                             f"{f(s['satisfaction'])} [{f(s['ci'][0])}, {f(s['ci'][1])}]")
                deltas.append(None if "failed" in s else s.get("delta_vs_unsteered", 0.0))
            cells.append(" / ".join("-" if d is None else f"{d:+.2f}" for d in deltas))
            cells += ["-" if "failed" in s else cost(kind, s) for s in ss]
            cells.append(" / ".join("-" if "failed" in s else f(s.get("row_passes_per_token", s.get("passes_per_token")), 1) for s in ss))
            cells.append(" / ".join("-" if "failed" in s else setting(s) for s in ss))
            print("| " + " | ".join(cells) + " |")
            if meth != "unsteered" and len(deltas) == 2 and None not in deltas and min(abs(d) for d in deltas) >= 0.05:
                same_sign += (deltas[0] > 0) == (deltas[1] > 0)
                differ += (deltas[0] > 0) != (deltas[1] > 0)
        print()
    for m, n in zip(models, names):
        for line in lines[m]:
            print(f"- {n}: {line}")
    print(f"\nsign_agrees={same_sign}\nsign_differs={differ}")


if __name__ == "__main__":
    main()
