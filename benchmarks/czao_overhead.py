"""CZAO against unsteered generation on a constraint suite, measured side by side in one run.

Four constraint types, each on its own prompts (same prompts, same seed, same token budget for
both arms):

- banned words      AvoidTokens on prompts whose most likely continuation is the word (written here)
- sentiment         Sentiment(min_compound=0) on negative-leaning prompts (written here)
- profanity         NoProfanity on RealToxicityPrompts profanity prefixes (data dir)
- concept           AvoidConcept("violence ...") on RealToxicityPrompts threat prefixes (data dir)

Sequence-level constraints use the value probe in ``--probes DIR/<type>`` when there is one (train
them with ``--train-probes``, on RTP prefixes that exclude this suite's prompts and the bench's test
items); ``--no-probes`` measures the rollout-scored path. Best-of-n runs on the same prompts with n
matched per prompt to CZAO's row-weighted passes per token on that prompt.

Prints a table per type, then, as its last lines (name=value, every ratio measured in this run):
``czao_satisfaction`` (all prompts, unreachable ones included), ``czao_satisfaction_reachable``,
``czao_unreachable_share``, ``bestofn_satisfaction_matched``, ``unsteered_satisfaction``,
``czao_overhead`` (CZAO wall-clock per token over unsteered's), ``czao_row_passes_per_token``,
``czao_passes_per_token``, ``czao_p95_prompt_overhead``, ``czao_median_steps``, ``czao_ppl_ratio``
(perplexity under the unsteered model of CZAO's text over that of the unsteered text).

    python benchmarks/czao_overhead.py [--n 8] [--max-new-tokens 24] [--data ../shared/data] [--out runs/bench_czao]
        [--probes runs/probes | --no-probes] [--train-probes] [--budget 6] [--repair 0] [--repeats 2]

Per-prompt wall-clock is the fastest of ``--repeats`` runs of each arm (default 2): on a shared
machine the minimum is the least disturbed figure, and the 95th percentile over 32 prompts is the
second-largest ratio, which one disturbed run would otherwise set.
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
from czao_lens.bench.metrics import fluency, unsteered_logprobs  # noqa: E402
from czao_lens.czao import CZAOConfig, generate_czao  # noqa: E402
from czao_lens.generate import generate  # noqa: E402
from czao_lens.guided import generate_guided  # noqa: E402
from czao_lens.probes import ValueProbe, collect_rollouts, corpus_prompts, rollout_residuals, train_probe  # noqa: E402
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
    ap.add_argument("--probes", type=Path, default=Path("runs/probes"), help="folder with one value probe per type")
    ap.add_argument("--no-probes", action="store_true", help="score sequence-level candidates by rollouts")
    ap.add_argument("--train-probes", action="store_true", help="train missing probes first (about 15 min)")
    ap.add_argument("--probe-prompts", type=int, default=160)
    ap.add_argument("--types", default=None, help="comma-separated subset of: banned words,sentiment,profanity,concept")
    ap.add_argument("--accept", type=float, default=None, help="CZAOConfig.probe_accept (default: the config's)")
    ap.add_argument("--hold", action="store_true", help="CZAOConfig.hold: re-apply the last feasible z")
    ap.add_argument("--no-seed", action="store_true", help="no seed direction (SPSA from scratch), to measure what it buys")
    ap.add_argument("--guided-k", type=int, default=4, help="top-k of probe-guided decoding (the output-space reference)")
    ap.add_argument("--repair", type=int, default=None, help="CZAOConfig.repair: rows per verified-repair round (0: off)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="time unsteered and CZAO this many times per prompt and keep the fastest (the outputs must agree)")
    ap.add_argument("--budget", default=None,
                    help="CZAO's per-prompt budget in row passes per token, or 'none' (default: CZAOConfig's)")
    args = ap.parse_args()
    data = args.data or default_data_dir()
    model = load_model()
    store = ActivationStore(model)
    cfg = CZAOConfig(layers=tuple(args.layer or (12,)), seed=args.seed, seed_direction=not args.no_seed, hold=args.hold,
                     **({} if args.accept is None else {"probe_accept": args.accept}),
                     **({} if args.repair is None else {"repair": args.repair}),
                     **({} if args.budget is None else {"budget": None if args.budget == "none" else float(args.budget)}))
    generate(model, "warm up", max_new_tokens=4)
    probes = {} if args.no_probes else load_probes(model, data, args)

    rows, per_type = [], {}
    wanted = None if args.types is None else set(args.types.split(","))
    for kind, items in suite(data, args.n):
        if wanted is not None and kind not in wanted:
            continue
        for prompt, c in items:
            base, tb = timed(args.repeats, lambda: generate(model, prompt, max_new_tokens=args.max_new_tokens, seed=args.seed),
                             lambda r: r.new_tokens[0])
            res, tc = timed(args.repeats, lambda: generate_czao(model, prompt, c, cfg, max_new_tokens=args.max_new_tokens,
                                                                seed=args.seed, store=store, probe=probes.get(kind))[0],
                            lambda r: r.tokens)
            ok = lambda text: bool(c.check_text(text, Context(prompt=prompt, generated=text, tokenizer=model.tokenizer)))  # noqa: E731
            base_ok = ok(base.texts[0])
            summ = res.summary()
            # Best-of-n at CZAO's compute on this prompt: n nucleus samples in one batch, first accepted.
            n = int(min(16, max(1, round(summ["row_passes_per_token"]))))
            t0 = time.perf_counter()
            bon = generate(model, [prompt] * n, max_new_tokens=args.max_new_tokens, greedy=False, temperature=1.0,
                           top_p=0.9, seed=args.seed)
            t_bon = time.perf_counter() - t0
            bon_ok = any(ok(t) for t in bon.texts)
            guided = None
            if kind in probes:  # FUDGE-style re-ranking with the same probe, greedy like CZAO
                t0 = time.perf_counter()
                guided = generate_guided(model, prompt, c, probe=probes[kind], top_k=args.guided_k,
                                         max_new_tokens=args.max_new_tokens, seed=args.seed)[0]
                t_guided = time.perf_counter() - t0
            ppl = {k: fluency(unsteered_logprobs(model, prompt, toks), toks, None)["ppl"] if toks else float("nan")
                   for k, toks in (("unsteered", base.new_tokens[0]), ("czao", res.tokens))}
            opt = [r for r in res.records if r.optimized]
            rows.append({
                "type": kind, "prompt": prompt, "constraint": c.describe(),
                "unsteered": base.texts[0], "unsteered_ok": base_ok, "unsteered_s": tb, "unsteered_tokens": len(base.new_tokens[0]),
                "czao": res.text, "czao_ok": res.satisfied, "czao_s": tc, "czao_tokens": len(res.tokens),
                "unreachable": res.unreachable, "steps": [r.steps for r in opt], "kl": [r.kl for r in opt],
                "passes_per_token": summ["passes_per_token"], "row_passes_per_token": summ["row_passes_per_token"],
                "screened_tokens": summ["screened_tokens"], "over_budget_tokens": summ["over_budget_tokens"],
                "probe_overruled": summ["probe_overruled"], "tokens": summ["tokens"],
                "probe": kind in probes, "bestofn_n": n, "bestofn_ok": bon_ok, "bestofn_s": t_bon,
                "ppl_unsteered": ppl["unsteered"], "ppl_czao": ppl["czao"],
                "prompt_overhead": (tc / max(len(res.tokens), 1)) / (tb / max(len(base.new_tokens[0]), 1)),
                "seed_direction": cfg.seed_direction, "repair": res.repair,
                **({} if guided is None else {
                    "guided": guided.text, "guided_ok": guided.satisfied, "guided_s": t_guided,
                    "guided_tokens": len(guided.tokens), "guided_row_passes_per_token": guided.summary()["row_passes_per_token"]}),
            })
            print(f"[{kind}] {'ok ' if base_ok else 'BAD'} -> {'ok ' if res.satisfied else 'BAD'}"
                  f"{' (unreachable)' if res.unreachable else ''} {prompt[:40]!r} | {res.text[:60]!r}", flush=True)
        per_type[kind] = [r for r in rows if r["type"] == kind]

    def summarise(rs: list[dict]) -> dict:
        steps = [s for r in rs for s in r["steps"]]
        kls = [k for r in rs for k in r["kl"]]
        reach = [r for r in rs if not r["unreachable"]]
        gd = [r for r in rs if "guided_ok" in r]  # sequence-level prompts with a probe
        nan = float("nan")
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
            "row_passes_per_token": statistics.fmean(r["row_passes_per_token"] for r in rs),
            "bestofn_satisfaction": sum(r["bestofn_ok"] for r in rs) / len(rs),
            "probe_overruled_share": mean_of([float(r["probe_overruled"]) for r in rs if r.get("probe_overruled") is not None]),
            # Screening misses: tokens the probe let through unoptimised, in texts the evaluator rejects
            # (before repair: a text that went through repair was rejected).
            "screen_miss_rate": sum(r["screened_tokens"] for r in rs if r["probe"] and (not r["czao_ok"] or r.get("repair")))
            / max(sum(r["screened_tokens"] for r in rs if r["probe"]), 1),
            "share_tokens_optimised": sum(len(r["steps"]) for r in rs) / max(sum(r["czao_tokens"] for r in rs), 1),
            "guided_prompts": len(gd),
            "guided_satisfaction": sum(r["guided_ok"] for r in gd) / len(gd) if gd else nan,
            "czao_satisfaction_guided_prompts": sum(r["czao_ok"] for r in gd) / len(gd) if gd else nan,
            "guided_row_passes_per_token": statistics.fmean(r["guided_row_passes_per_token"] for r in gd) if gd else nan,
            "guided_wallclock_ratio": (sum(r["guided_s"] for r in gd) / max(sum(r["guided_tokens"] for r in gd), 1))
            / (sum(r["unsteered_s"] for r in gd) / max(sum(r["unsteered_tokens"] for r in gd), 1)) if gd else nan,
            "repair_share": sum(r.get("repair") is not None for r in rs) / len(rs),
            "repaired_share": sum(bool((r.get("repair") or {}).get("repaired")) for r in rs) / len(rs),
            "repair_masked_row_share": sum((r.get("repair") or {}).get("masked", 0) for r in rs)
            / max(sum((r.get("repair") or {}).get("candidates", 0) for r in rs), 1),
            "p95_prompt_overhead": quantile([r["prompt_overhead"] for r in rs], 0.95),
            # The same tail in row passes: what the wall-clock p95 measures, without the machine's noise.
            "p95_row_passes_per_token": quantile([r["row_passes_per_token"] for r in rs], 0.95),
            "ppl_ratio": statistics.fmean(r["ppl_czao"] for r in rs if r["ppl_czao"] == r["ppl_czao"])
            / statistics.fmean(r["ppl_unsteered"] for r in rs if r["ppl_unsteered"] == r["ppl_unsteered"]),
            "wallclock_ratio": (sum(r["czao_s"] for r in rs) / max(sum(r["czao_tokens"] for r in rs), 1))
            / (sum(r["unsteered_s"] for r in rs) / max(sum(r["unsteered_tokens"] for r in rs), 1)),
        }

    table = {k: summarise(v) for k, v in per_type.items()}
    table["all"] = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (args.out / "summary.json").write_text(json.dumps(table, indent=1))
    cols = ["prompts", "unsteered_satisfaction", "czao_satisfaction", "bestofn_satisfaction", "unreachable_share",
            "satisfaction_reachable", "mean_kl_optimized", "median_steps", "max_steps", "passes_per_token",
            "row_passes_per_token", "wallclock_ratio", "p95_prompt_overhead", "ppl_ratio", "guided_satisfaction",
            "czao_satisfaction_guided_prompts", "guided_row_passes_per_token", "guided_wallclock_ratio",
            "repair_share", "repaired_share"]
    print("\n| type | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for k, s in table.items():
        print(f"| {k} | " + " | ".join(f"{s[c]:.3g}" if isinstance(s[c], float) else str(s[c]) for c in cols) + " |")
    print(f"\nsaved {args.out / 'results.jsonl'} and {args.out / 'summary.json'}")
    a = table["all"]
    print(f"probes={','.join(sorted(probes)) or 'none'}")
    print(f"unsteered_satisfaction={a['unsteered_satisfaction']:.4f}")
    print(f"czao_satisfaction={a['czao_satisfaction']:.4f}")
    print(f"czao_satisfaction_reachable={a['satisfaction_reachable']:.4f}")
    print(f"czao_unreachable_share={a['unreachable_share']:.4f}")
    print(f"bestofn_satisfaction_matched={a['bestofn_satisfaction']:.4f}")
    print(f"czao_passes_per_token={a['passes_per_token']:.4f}")
    print(f"czao_row_passes_per_token={a['row_passes_per_token']:.4f}")
    print(f"czao_p95_prompt_overhead={a['p95_prompt_overhead']:.4f}")
    print(f"czao_p95_row_passes_per_token={a['p95_row_passes_per_token']:.4f}")
    print(f"czao_median_steps={a['median_steps']}")
    print(f"czao_ppl_ratio={a['ppl_ratio']:.4f}")
    print(f"czao_probe_overruled_share={a['probe_overruled_share']:.4f}")
    print(f"czao_screen_miss_rate={a['screen_miss_rate']:.4f}")
    print(f"czao_share_tokens_optimised={a['share_tokens_optimised']:.4f}")
    print(f"czao_repair_share={a['repair_share']:.4f}  (prompts whose finished text failed and went through repair)")
    print(f"czao_repaired_share={a['repaired_share']:.4f}  (prompts whose repaired text the evaluator accepted)")
    print(f"czao_repair_masked_row_share={a['repair_masked_row_share']:.4f}  (repair rows that needed the mask)")
    print(f"guided_satisfaction={a['guided_satisfaction']:.4f}  (probe-guided top-{args.guided_k}, on the {a['guided_prompts']} sequence-level prompts)")
    print(f"czao_satisfaction_guided_prompts={a['czao_satisfaction_guided_prompts']:.4f}")
    print(f"guided_row_passes_per_token={a['guided_row_passes_per_token']:.4f}")
    print(f"guided_overhead={a['guided_wallclock_ratio']:.4f}")
    print(f"czao_overhead={a['wallclock_ratio']:.4f}")


def timed(repeats: int, run, tokens) -> tuple:
    """Run ``repeats`` times; the result and the fastest wall-clock (the machine is shared: the minimum
    is the least disturbed run). Greedy runs are deterministic, so every repeat must give the same tokens."""
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        r = run()
        best = min(best, time.perf_counter() - t0)
        if out is not None and tokens(r) != tokens(out):
            sys.exit("error: two runs of the same greedy generation gave different tokens")
        out = r
    return out, best


def mean_of(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def quantile(xs: list[float], q: float) -> float:
    """The q-quantile by linear interpolation between order statistics."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def load_probes(model, data: Path, args) -> dict[str, ValueProbe]:
    """One value probe per sequence-level type from ``--probes``; with ``--train-probes``, train the
    missing ones on RTP prefixes that exclude this suite's prompts and the bench's test items."""
    from czao_lens.cli import bench_test_prompts

    items = suite(data, 16)
    out, missing = {}, []
    for kind, its in items:
        c = its[0][1]
        if c.level != "sequence":
            continue
        folder = args.probes / kind
        if (folder / "cfg.json").exists():
            out[kind] = ValueProbe.load(folder, model)
            out[kind].check(model, c)
        else:
            missing.append((kind, c))
    if missing and args.train_probes:
        exclude = [p for _, its in items for p, _ in its] + bench_test_prompts(data)
        prompts = corpus_prompts(data, exclude=exclude, limit=args.probe_prompts, seed=args.seed)
        rolls = collect_rollouts(model, prompts, samples=3, max_new_tokens=args.max_new_tokens,
                                 perturb_layers=tuple(args.layer or (12,)), seed=args.seed)
        res = rollout_residuals(model, rolls)  # shared by every constraint's contrastive direction
        for kind, c in missing:
            out[kind], _ = train_probe(model, c, rolls, save=False, residuals=res)
            out[kind].save(args.probes / kind)
    elif missing:
        print(f"no value probe for {', '.join(k for k, _ in missing)} in {args.probes}: rollout scoring "
              "(pass --train-probes to train them)", flush=True)
    for kind, p in out.items():
        m = p.metrics
        print(f"probe {kind}: out-of-fold AUROC {m.get('auroc_heldout', float('nan')):.3f}, threshold {p.threshold:.3g}, "
              f"screen optimises {m.get('screen_share_optimised', float('nan')):.0%}, miss rate {m.get('screen_miss_rate', float('nan')):.1%}", flush=True)
    return out


if __name__ == "__main__":
    main()
