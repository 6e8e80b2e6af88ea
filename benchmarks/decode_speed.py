"""Greedy decode speed: HF ``generate`` vs stock TransformerLens vs the czao-lens runtime.

All three run the same embedded model (``--model``, default SmolLM2-135M-Instruct; fp32, CPU) on the
same prompt token ids (BOS included where the model needs it) in one process, 64 new tokens,
after a warm-up. Rounds are interleaved (HF, stock, czao, HF, ...) so that load from other
processes on a shared machine hits all three alike; the median round is reported. Torch thread
settings are left at their defaults.

The last line is ``decode_ratio_vs_hf=<czao-lens tok/s / HF tok/s>``.

    python benchmarks/decode_speed.py [--model gemma-3-270m] [--rounds 3] [--new-tokens 64] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import statistics
import time
import warnings
from typing import Callable

import torch

warnings.filterwarnings("ignore")


def load_hf(name: str = "smollm2-135m-instruct"):
    """The reference: transformers' own model dequantised from the embedded GGUF to fp32 (cached)."""
    from czao_lens.models import load_hf_reference

    return load_hf_reference(name)


def hf_decoder(hf, ids: torch.Tensor, n: int, pad: int) -> Callable[[], list[int]]:
    """Greedy ``generate``; EOS is disabled so that every decoder produces exactly n tokens."""
    hf.generation_config.eos_token_id = None  # generate() falls back to the model's config otherwise
    gc = copy.deepcopy(hf.generation_config)
    gc.eos_token_id = None
    gc.do_sample = False
    gc.max_new_tokens = n
    gc.pad_token_id = pad

    def run() -> list[int]:
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        return out[0, ids.shape[1]:].tolist()

    return run


def kv_loop_decoder(model, ids: torch.Tensor, n: int) -> Callable[[], list[int]]:
    """A plain greedy loop of n one-token forwards on a TransformerLensKeyValueCache.

    The mask is passed explicitly: without it TL would treat a generated pad/EOS id as padding.
    """
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    def run() -> list[int]:
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
        out: list[int] = []
        nxt, mask = ids, torch.ones_like(ids)
        with torch.no_grad():
            for _ in range(n):
                logits = model(nxt, past_kv_cache=cache, attention_mask=mask)
                mask = torch.ones_like(nxt[:, :1])
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                out.append(int(nxt))
        return out

    return run


def czao_decoder(model, prompt: str, ids: torch.Tensor, n: int) -> tuple[str, Callable[[], list[int]]]:
    """``czao_lens.generate.generate`` when it exists, else the plain KV-cache loop."""
    try:
        from czao_lens.generate import generate
    except ImportError:
        return "a greedy KV-cache loop", kv_loop_decoder(model, ids, n)
    extra = {"stop_at_eos": False} if "stop_at_eos" in inspect.signature(generate).parameters else {}

    def run() -> list[int]:
        res = generate(model, prompt, max_new_tokens=n, greedy=True, **extra)
        return list(res.new_tokens[0])

    return "czao_lens.generate.generate", run


def one_token_ms(forward: Callable[[], object], reps: int = 16) -> float:
    """Median wall time of one call, in milliseconds."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        forward()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="an embedded model name")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", default="The capital of France is")
    args = ap.parse_args()

    from czao_lens.models import EMBEDDED, load_model
    from czao_lens.runtime import accelerate, fast_path_report

    if args.model not in EMBEDDED:
        raise SystemExit(f"--model must be an embedded model: {', '.join(EMBEDDED)}")
    t0 = time.perf_counter()
    stock = load_model(args.model, fast=False, progress=True)
    fast = accelerate(copy.deepcopy(stock))
    hf = load_hf(args.model)
    print(f"model: {args.model}; czao-lens runtime: {fast_path_report(fast)}")
    print(f"loaded the three models in {time.perf_counter() - t0:.1f} s; torch threads: {torch.get_num_threads()}")

    tok = stock.tokenizer
    ids = stock.to_tokens(args.prompt)  # the same ids for every decoder
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n = args.new_tokens
    czao_how, czao_run = czao_decoder(fast, args.prompt, ids, n)
    runners: dict[str, Callable[[], list[int]]] = {
        "HF generate": hf_decoder(hf, ids, n, pad),
        "TL stock": kv_loop_decoder(stock, ids, n),
        "czao-lens": czao_run,
    }

    outputs: dict[str, list[int]] = {}
    for name, run in runners.items():  # warm-up (allocator, thread pools, lazily built caches)
        outputs[name] = run()
    rates: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(args.rounds):
        order = list(runners)[r % 3:] + list(runners)[: r % 3]  # rotate who goes first
        for name in order:
            t = time.perf_counter()
            toks = runners[name]()
            rates[name].append(len(toks) / (time.perf_counter() - t))
            outputs[name] = toks

    # One-token KV-cached forward latency at the prompt's end (HF vs czao-lens vs stock).
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    def tl_step(model):
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
        with torch.no_grad():
            model(ids[:, :-1], past_kv_cache=cache)
            cache.freeze()  # every timed call sees the same prefix
        last = ids[:, -1:]
        one = torch.ones_like(last)
        return lambda: model(last, past_kv_cache=cache, attention_mask=one)

    with torch.no_grad():
        pkv = hf(ids[:, :-1], use_cache=True).past_key_values

    def hf_step():
        with torch.no_grad():
            hf(ids[:, -1:], past_key_values=pkv, use_cache=True)
            pkv.crop(-1)  # drop the new position again (transformers 5: negative = remove)

    with torch.no_grad():
        step_ms = {"HF generate": one_token_ms(hf_step), "TL stock": one_token_ms(tl_step(stock), 6),
                   "czao-lens": one_token_ms(tl_step(fast))}

    med = {k: statistics.median(v) for k, v in rates.items()}
    print()
    print(f"prompt: {args.prompt!r} ({ids.shape[1]} tokens), {n} new tokens (EOS off), greedy, {args.rounds} rounds")
    print("tok/s = new tokens / wall time of the whole call (prefill included)")
    print(f"czao-lens decodes with {czao_how}; TL stock with a greedy KV-cache loop")
    print(f"{'decoder':<14} {'tok/s (median)':>15} {'rounds':>24} {'1-token fwd ms':>15}")
    for name in runners:
        rounds = ", ".join(f"{x:.1f}" for x in rates[name])
        print(f"{name:<14} {med[name]:>15.2f} {rounds:>24} {step_ms[name]:>15.1f}")
    print(f"speed-up of czao-lens over TL stock: {med['czao-lens'] / med['TL stock']:.2f}x")

    ref, ours = outputs["HF generate"], outputs["czao-lens"]
    same = 0
    while same < min(len(ref), len(ours)) and ref[same] == ours[same]:
        same += 1
    agree = ref == ours
    print(f"greedy tokens of czao-lens and HF agree: {agree} ({same}/{len(ref)} leading tokens equal)")
    print(f"greedy tokens of czao-lens and TL stock agree: {ours == outputs['TL stock']}")
    print(f"czao-lens text: {tok.decode(ours)!r}")
    print(f"decode_ratio_vs_hf={med['czao-lens'] / med['HF generate']:.4f}")


if __name__ == "__main__":
    main()
