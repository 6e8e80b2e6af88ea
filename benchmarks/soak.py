"""Soak: memory and speed over long generations, plain and with CZAO (a benchmark, not a test).

Runs SmolLM2-135M-Instruct (fp32, CPU) for ``--plain-tokens`` greedy tokens of plain generation and
``--czao-tokens`` tokens of CZAO (AvoidTokens "blue", layer 12), end of sequence ignored, while a
thread samples the process's resident memory (RSS) every 0.2 s. Per-token times come from wrapping
the sampler the decode loop calls once per token.

Growth is measured from the end of warm-up (the first 10% of tokens) to the end, then the KV cache's
expected growth over the same tokens (bytes per cached token, measured on the model) is subtracted:
what is left is memory the run should not have kept. Lines per run (``plain_`` / ``czao_``):

    <run>_tokens, <run>_rss_start_mb, <run>_rss_growth_mb, <run>_kv_growth_mb, <run>_tok_s_first10, <run>_tok_s_last10
    soak_rss_growth_mb=<the larger growth after the KV cache is subtracted>

    python benchmarks/soak.py [--plain-tokens 4000] [--czao-tokens 1000]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import warnings

import torch

warnings.filterwarnings("ignore")
PAGE = os.sysconf("SC_PAGE_SIZE")
PROMPT = "Write a very long story about the colors of the sky, the sea and the flowers in every season."


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class Sampler(threading.Thread):
    """RSS every ``period`` seconds, with timestamps."""

    def __init__(self, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.period, self.samples, self.stop = period, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.perf_counter(), rss_mb()))
            self.stop.wait(self.period)


def kv_bytes_per_token(model) -> float:
    """Bytes the KV cache holds per cached token, measured (TL's cache layout, GQA or not)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device or "cpu", 1)
    with torch.no_grad():
        model(torch.arange(16)[None] + 100, past_kv_cache=cache, return_type=None)
    total = sum(e.past_keys.numel() * e.past_keys.element_size() + e.past_values.numel() * e.past_values.element_size()
                for e in cache.entries)
    return total / 16


def soak(name: str, run, n_tokens: int, per_token_kv: float) -> float:
    import czao_lens.generate as gen

    stamps: list[float] = []
    real = gen.sample_next

    def timed(*a, **k):
        out = real(*a, **k)
        stamps.append(time.perf_counter())
        return out

    gen.sample_next = timed
    sampler = Sampler()
    sampler.start()
    try:
        run(n_tokens)
    finally:
        sampler.stop.set()
        sampler.join()
        gen.sample_next = real
    n = len(stamps)
    k = max(2, n // 10)
    warm_t = stamps[k - 1]
    after = [r for t, r in sampler.samples if t >= warm_t]
    start_rss = after[0] if after else sampler.samples[-1][1]
    end_rss = sampler.samples[-1][1]
    growth = end_rss - start_rss
    kv = (n - k) * per_token_kv / 2**20
    first = (k - 1) / (stamps[k - 1] - stamps[0])
    last = (k - 1) / (stamps[-1] - stamps[-k])
    print(f"{name}_tokens={n}")
    print(f"{name}_rss_start_mb={start_rss:.1f}")
    print(f"{name}_rss_growth_mb={growth:.1f}")
    print(f"{name}_kv_growth_mb={kv:.1f}")
    print(f"{name}_rss_growth_minus_kv_mb={growth - kv:.1f}")
    print(f"{name}_tok_s_first10={first:.2f}")
    print(f"{name}_tok_s_last10={last:.2f}")
    print(f"{name}_rss_max_mb={max(r for _, r in sampler.samples):.1f}", flush=True)
    return growth - kv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plain-tokens", type=int, default=4000)
    ap.add_argument("--czao-tokens", type=int, default=1000)
    a = ap.parse_args()
    import czao_lens.generate as gen
    from czao_lens import load_model
    from czao_lens.constraints import AvoidTokens
    from czao_lens.czao import CZAOConfig, generate_czao

    torch.manual_seed(0)
    model = load_model(progress=False)
    per_tok = kv_bytes_per_token(model)
    print(f"load_average={os.getloadavg()[0]:.2f}")
    print(f"kv_bytes_per_token={per_tok:.0f}")
    real_stops = gen.stop_token_ids
    gen.stop_token_ids = lambda m: set()  # run the full length: the end-of-sequence token is ignored
    try:
        left = []
        if a.plain_tokens:
            left.append(soak("plain", lambda n: gen.generate(model, PROMPT, max_new_tokens=n, chat=True, stop_at_eos=False),
                             a.plain_tokens, per_tok))
        if a.czao_tokens:
            left.append(soak("czao", lambda n: generate_czao(model, PROMPT, AvoidTokens(["blue"]), CZAOConfig(layers=(12,)),
                                                             max_new_tokens=n, chat=True, probe=None),
                             a.czao_tokens, per_tok))
    finally:
        gen.stop_token_ids = real_stops
    print(f"soak_rss_growth_mb={max(left):.1f}")


if __name__ == "__main__":
    main()
