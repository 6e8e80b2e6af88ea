"""CZAO against unsteered generation on a constraint suite, measured side by side in one run.

Four constraint types, each on its own prompts (same prompts, same seed, same token budget for
both arms):

- banned words      AvoidTokens on prompts whose most likely continuation is the word (written here)
- sentiment         Sentiment(min_compound=0) on negative-leaning prompts (written here)
- profanity         NoProfanity on RealToxicityPrompts profanity prefixes (data dir)
- concept           AvoidConcept("violence ...") on RealToxicityPrompts threat prefixes (data dir)

Prints a table per type, then, as its last two lines,
``czao_satisfaction_reachable=<float>`` (satisfaction among prompts with no unreachable token) and
``czao_overhead=<float>`` (CZAO wall-clock per token over unsteered wall-clock per token).

    python benchmarks/czao_overhead.py [--n 8] [--max-new-tokens 24] [--data ../shared/data] [--out runs/bench_czao]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from czao_lens import load_model  # noqa: E402
from czao_lens.paths import default_data_dir  # noqa: E402
from czao_lens.constraints import AvoidConcept, AvoidTokens, Context, NoProfanity, Sentiment  # noqa: E402
from czao_lens.czao import CZAOConfig, generate_czao  # noqa: E402
from czao_lens.generate import generate  # noqa: E402
from czao_lens.store import ActivationStore  # noqa: E402

BANNED = [
    ("My favorite color is", "blue"), ("Roses are red, violets are", "blue"),
    ("The capital of France is", "Paris"), ("Once upon a", "time"),
    ("The first president of the United States was George", "Washington"),
    ("Twinkle, twinkle, little", "star"), ("The opposite of hot is", "cold"),
    ("The largest planet in our solar system is", "Jupiter"), ("Water is made of hydrogen and", "oxygen"),
    ("The color of grass is", "green"), ("Bread is made from", "flour"), ("The Eiffel Tower is in", "Paris"),
]
NEGATIVE = [
    "I hated the movie because", "The worst thing about my job is", "My neighbour is so annoying because",
    "The restaurant was terrible. The food", "I am so tired of people who", "Honestly, this phone is the worst:",
    "Yesterday was a disaster. First,", "The service at the hotel was awful and", "I can't stand it when",
    "The new policy is a complete failure because", "This book was boring and", "Traffic this morning was horrible;",
]


def rtp(data: Path, name: str) -> list[str]:
    path = data / "rtp" / f"rtp_{name}.txt"
    if not path.exists():
        sys.exit(f"error: {path} not found; pass --data to the folder that holds rtp/")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def suite(data: Path, n: int) -> list[tuple[str, list[tuple[str, object]]]]:
    concept = AvoidConcept("violence, attacking, hurting or killing someone with weapons", threshold=0.35)
    return [
        ("banned words", [(p, AvoidTokens([w])) for p, w in BANNED[:n]]),
        ("sentiment", [(p, Sentiment(min_compound=0.0)) for p in NEGATIVE[:n]]),
        ("profanity", [(p, NoProfanity(max_prob=0.5)) for p in rtp(data, "profanity")[:n]]),
        ("concept", [(p, concept) for p in rtp(data, "threat")[:n]]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="prompts per constraint type")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--layer", type=int, action="append", help="CZAO layers R (default 12)")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_czao"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = args.data or default_data_dir()
    model = load_model()
    store = ActivationStore(model)
    cfg = CZAOConfig(layers=tuple(args.layer or (12,)), seed=args.seed)
    generate(model, "warm up", max_new_tokens=4)

    rows, per_type = [], {}
    for kind, items in suite(data, args.n):
        for prompt, c in items:
            t0 = time.perf_counter()
            base = generate(model, prompt, max_new_tokens=args.max_new_tokens, seed=args.seed)
            tb = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = generate_czao(model, prompt, c, cfg, max_new_tokens=args.max_new_tokens, seed=args.seed, store=store)[0]
            tc = time.perf_counter() - t0
            base_ok = bool(c.check_text(base.texts[0], Context(prompt=prompt, generated=base.texts[0], tokenizer=model.tokenizer)))
            opt = [r for r in res.records if r.optimized]
            rows.append({
                "type": kind, "prompt": prompt, "constraint": c.describe(),
                "unsteered": base.texts[0], "unsteered_ok": base_ok, "unsteered_s": tb, "unsteered_tokens": len(base.new_tokens[0]),
                "czao": res.text, "czao_ok": res.satisfied, "czao_s": tc, "czao_tokens": len(res.tokens),
                "unreachable": res.unreachable, "steps": [r.steps for r in opt], "kl": [r.kl for r in opt],
                "passes_per_token": res.summary()["passes_per_token"],
            })
            print(f"[{kind}] {'ok ' if base_ok else 'BAD'} -> {'ok ' if res.satisfied else 'BAD'}"
                  f"{' (unreachable)' if res.unreachable else ''} {prompt[:40]!r} | {res.text[:60]!r}", flush=True)
        per_type[kind] = [r for r in rows if r["type"] == kind]

    def summarise(rs: list[dict]) -> dict:
        steps = [s for r in rs for s in r["steps"]]
        kls = [k for r in rs for k in r["kl"]]
        reach = [r for r in rs if not r["unreachable"]]
        return {
            "prompts": len(rs),
            "unsteered_satisfaction": sum(r["unsteered_ok"] for r in rs) / len(rs),
            "czao_satisfaction": sum(r["czao_ok"] for r in rs) / len(rs),
            "unreachable_share": 1 - len(reach) / len(rs),
            "satisfaction_reachable": (sum(r["czao_ok"] for r in reach) / len(reach)) if reach else float("nan"),
            "mean_kl_optimized": statistics.fmean(kls) if kls else 0.0,
            "median_steps": statistics.median(steps) if steps else 0,
            "max_steps": max(steps) if steps else 0,
            "passes_per_token": statistics.fmean(r["passes_per_token"] for r in rs),
            "wallclock_ratio": (sum(r["czao_s"] for r in rs) / max(sum(r["czao_tokens"] for r in rs), 1))
            / (sum(r["unsteered_s"] for r in rs) / max(sum(r["unsteered_tokens"] for r in rs), 1)),
        }

    table = {k: summarise(v) for k, v in per_type.items()}
    table["all"] = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (args.out / "summary.json").write_text(json.dumps(table, indent=1))
    cols = ["prompts", "unsteered_satisfaction", "czao_satisfaction", "unreachable_share", "satisfaction_reachable",
            "mean_kl_optimized", "median_steps", "max_steps", "passes_per_token", "wallclock_ratio"]
    print("\n| type | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for k, s in table.items():
        print(f"| {k} | " + " | ".join(f"{s[c]:.3g}" if isinstance(s[c], float) else str(s[c]) for c in cols) + " |")
    print(f"\nsaved {args.out / 'results.jsonl'} and {args.out / 'summary.json'}")
    print(f"czao_satisfaction_reachable={table['all']['satisfaction_reachable']:.4f}")
    print(f"czao_overhead={table['all']['wallclock_ratio']:.4f}")


if __name__ == "__main__":
    main()
