"""Benchmark metrics: fluency under the unsteered model, KL to it, diversity, bootstrap intervals."""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from czao_lens.prompts import encode_prompts


@torch.no_grad()
def unsteered_logprobs(model: HookedTransformer, prompt: str, new_tokens: Sequence[int]) -> Float[Tensor, "n_new vocab"]:
    """The unsteered model's next-token log-probs at each generated position, teacher-forced on the
    raw prompt plus the generated tokens (one forward, no hooks)."""
    enc = encode_prompts(model, prompt, chat=False)
    toks = torch.cat([enc.tokens, torch.tensor([list(new_tokens)], dtype=torch.long)], 1)
    n_prompt, n_new = enc.tokens.shape[1], len(new_tokens)
    logits = model(toks)[0, n_prompt - 1 : n_prompt - 1 + n_new]
    return logits.float().log_softmax(-1)


def fluency(base_lp: Float[Tensor, "n vocab"], new_tokens: Sequence[int],
            steered_lp: Float[Tensor, "n vocab"] | None) -> dict[str, float]:
    """Perplexity of the generated tokens under the unsteered model, and the mean / max
    KL(steered || unsteered) over the generated positions (0 when ``steered_lp`` is None)."""
    n = len(new_tokens)
    if n == 0:
        return {"ppl": float("nan"), "kl": 0.0, "kl_max": 0.0, "kl_steered": 0.0}
    tgt = torch.tensor(list(new_tokens))
    nll = -base_lp[torch.arange(n), tgt].mean()
    if steered_lp is None:
        return {"ppl": float(nll.exp()), "kl": 0.0, "kl_max": 0.0, "kl_steered": 0.0}
    if steered_lp.shape != base_lp.shape:
        raise ValueError(f"steered log-probs {tuple(steered_lp.shape)} do not match the unsteered {tuple(base_lp.shape)}")
    p = steered_lp.exp()  # masked tokens (guided decoding, CZAO's mask fallback) carry 0 * -inf: count them as 0
    kl = torch.where(p > 0, p * (steered_lp - base_lp), torch.zeros_like(p)).sum(-1).clamp_min(0)
    moved = kl[kl > 1e-4]
    return {"ppl": float(nll.exp()), "kl": float(kl.mean()), "kl_max": float(kl.max()),
            "kl_steered": float(moved.mean()) if len(moved) else 0.0}


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n over a set of outputs: unique word n-grams / all word n-grams (NaN when there are none)."""
    grams = [tuple(w[i : i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def bootstrap_ci(values: Sequence[float], *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (over prompts)."""
    vals = [float(v) for v in values]
    if not vals:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(vals)
    means = sorted(sum(vals[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return means[int(alpha / 2 * n_boot)], means[min(n_boot - 1, int((1 - alpha / 2) * n_boot))]


def paired_diff_ci(a: Sequence[float], b: Sequence[float], **kw) -> tuple[float, float, float]:
    """Mean of a - b over paired prompts, with its bootstrap interval."""
    if len(a) != len(b):
        raise ValueError("paired samples must have the same length")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    lo, hi = bootstrap_ci(d, **kw)
    return mean(d), lo, hi
