"""Probe-guided decoding: output-space guidance with the same value probe CZAO uses (FUDGE-style).

At each token, the top-``k`` next tokens of the unsteered model are fed one position further in one
batched forward (stopping right after the probe's block), the value probe reads each one's
activation, and the next token is chosen by

    log p(token | prefix) + strength * log(1 - p_violation(prefix + token))

restricted to those ``k`` tokens (Yang & Klein 2021, with a probe of the finished text's
violation in place of FUDGE's attribute classifier). It is the reference that tells whether CZAO's
activation perturbation buys anything over re-ranking tokens with the same knowledge, at a compute
cost counted in the same row passes (each of the ``k`` candidate rows weighs the share of layers
it runs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from czao_lens.constraints import Constraint, Context, banned_token_ids
from czao_lens.errors import CzaoLensError
from czao_lens.generate import DecodeStep, check_sampling, generate_tokens
from czao_lens.probes import ValueProbe, probe_for
from czao_lens.prompts import encode_prompts


class GuidanceError(CzaoLensError, ValueError):
    """Probe-guided decoding cannot run: no probe for the constraint, or bad settings."""


@dataclass
class GuidedResult:
    """One prompt's probe-guided text, its verdict by the real evaluator, and its cost."""

    prompt: str
    text: str
    tokens: list[int]
    satisfied: bool
    row_passes: list[float]  # per generated token, one unsteered decode step = 1
    p_violation: list[float]  # the probe's prediction for the chosen token, per generated token
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    step_logprobs: Tensor | None = None  # [n_new, vocab]: the guided distribution (-inf outside the top k)

    def summary(self) -> dict[str, Any]:
        n = max(len(self.row_passes), 1)
        return {"tokens": len(self.tokens), "satisfied": self.satisfied, "seconds": self.seconds,
                "row_passes_per_token": sum(self.row_passes) / n,
                "mean_p_violation": sum(self.p_violation) / max(len(self.p_violation), 1)}


class ProbeGuide:
    """The controller: re-rank the top-``k`` next tokens by the value probe (no residual change)."""

    def __init__(self, model: HookedTransformer, probe: ValueProbe, *, top_k: int = 8, strength: float = 1.0,
                 avoid: Constraint | None = None) -> None:
        if top_k < 1 or top_k > model.cfg.d_vocab:
            raise GuidanceError(f"top_k must be in 1..{model.cfg.d_vocab}, got {top_k}")
        if not (strength >= 0 and strength < float("inf")):
            raise GuidanceError(f"strength must be a finite number >= 0, got {strength}")
        self.probe, self.top_k, self.strength = probe, top_k, strength
        self.tokenizer = model.tokenizer
        # Its banned tokens are never taken (a conjunction's token-level parts); None when it bans none.
        self.avoid = avoid if avoid is not None and banned_token_ids(avoid, self.tokenizer) is not None else None
        self.start_layer = model.cfg.n_layers  # nothing to perturb: the loop runs its plain forward
        self.read_hooks: Sequence[str] = ()
        self.p_chosen: list[Tensor] = []  # [batch] per step: p_violation of each row's best-ranked token

    def __call__(self, step: DecodeStep) -> None:
        lp = step.logits.float().log_softmax(-1)
        for b in range(lp.shape[0]) if self.avoid is not None else ():  # per row: its own text so far
            banned = banned_token_ids(self.avoid, self.tokenizer, step.text_so_far(b))
            if banned is not None:
                lp[b, banned] = float("-inf")
        top = lp.topk(self.top_k, dim=-1)
        p = self.probe.predict(step.next_token_activations(top.indices, self.probe.hook))  # [batch, k]
        score = top.values + self.strength * (1 - p).clamp_min(1e-6).log()
        # logits + bias = score + a per-row constant on the top k, -inf elsewhere.
        bias = torch.full_like(step.logits, float("-inf"))
        bias.scatter_(-1, top.indices, (score - top.values).to(bias.dtype))
        step.logit_bias = bias
        self.p_chosen.append(p.gather(-1, score.argmax(-1, keepdim=True))[:, 0])
        return None


def generate_guided(
    model: HookedTransformer,
    prompts: str | Sequence[str],
    constraint: Constraint,
    *,
    probe: ValueProbe | Literal["auto"] = "auto",
    top_k: int = 8,
    strength: float = 1.0,
    max_new_tokens: int = 32,
    chat: bool = False,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    document: str | None = None,
    progress: bool = False,
    keep_logprobs: bool = False,
) -> list[GuidedResult]:
    """Probe-guided generation for all prompts in one batch, each text checked by the real evaluator."""
    check_sampling(max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p)
    value = probe_for(model, constraint, probe)
    if value is None:
        raise GuidanceError(f"no value probe for {constraint.describe()} on this model: train one with "
                            "`czao-lens probe train --constraint SPEC` (token-level constraints need none: use CZAO)")
    guide = ProbeGuide(model, value, top_k=top_k, strength=strength, avoid=constraint)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    enc = encode_prompts(model, prompts, chat=chat)
    t0 = time.perf_counter()
    gen = generate_tokens(model, enc, prompts, max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
                          top_p=top_p, seed=seed, controller=guide, progress=progress, keep_logprobs=keep_logprobs,
                          config={"chat": chat, "system_prompt": None})
    seconds = time.perf_counter() - t0
    cfg = {"top_k": top_k, "strength": strength, "probe_hook": value.hook, "max_new_tokens": max_new_tokens,
           "greedy": greedy, "seed": seed}
    out = []
    for b, (prompt, text) in enumerate(zip(prompts, gen.texts)):
        n = len(gen.new_tokens[b])
        ok = bool(constraint.check_text(text, Context(prompt=prompt, generated=text, tokenizer=model.tokenizer,
                                                      document=document)))
        out.append(GuidedResult(prompt, text, gen.new_tokens[b], ok, [c["row_passes"] for c in gen.cost[:n]],
                                [float(p[b]) for p in guide.p_chosen[:n]], seconds / len(prompts), cfg,
                                gen.step_logprobs[b] if keep_logprobs else None))
    return out


__all__ = ["GuidanceError", "GuidedResult", "ProbeGuide", "generate_guided"]
