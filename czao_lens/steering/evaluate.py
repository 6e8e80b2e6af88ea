"""Measuring steering: A/B answer probabilities and a fluency cost, reusable by benchmarks.

An *intervention* is any :class:`czao_lens.perturb.Intervention` (a steering vector, CAST, A-LQR,
activation scaling, an SAE splice): the evaluators call ``intervention.apply(model, layout)`` around
each forward pass, with the :class:`~czao_lens.prompts.TokenLayout` of the (left-padded) batch, so
position-aware steering (``"prompt"``, ``"last_prompt"``, CAST, A-LQR) sees the right tokens::

    ab_probability(model, items, vec * 2.0)

``None`` means the unsteered model.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from czao_lens.generate import generate_tokens
from czao_lens.perturb import Intervention
from czao_lens.prompts import EncodedPrompts, TokenLayout, encode_prompts, format_prompt, text_ids
from czao_lens.steering.common import SteeringError, ab_prefix, answer_pair_texts, option_texts  # noqa: F401
from czao_lens.steering.data import NEUTRAL_PROMPTS, ABItem


def steered(model: HookedTransformer, intervention: Intervention | None, layout: TokenLayout) -> ContextManager:
    """``intervention.apply(model, layout)``, or a no-op for the unsteered model."""
    return intervention.apply(model, layout) if intervention is not None else nullcontext()


def letter_token_ids(model: HookedTransformer, letters: Sequence[str] = ("A", "B")) -> dict[str, int]:
    """Token id of each answer letter as it follows "(" (the evaluation's answer position)."""
    tok = model.tokenizer
    base = tok("(", add_special_tokens=False)["input_ids"]
    out = {}
    for L in letters:
        ids = tok("(" + L, add_special_tokens=False)["input_ids"]
        if ids[: len(base)] != base or len(ids) != len(base) + 1:
            raise SteeringError(f"the tokenizer does not split '({L}' into '(' + a single letter token")
        out[L] = ids[-1]
    return out


def _batches(n: int, lengths: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(n), key=lambda i: lengths[i])  # similar lengths together: little padding
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def last_logits(
    model: HookedTransformer,
    texts: Sequence[str],
    intervention: Intervention | None = None,
    *,
    batch_size: int = 8,
) -> Tensor:
    """Next-token logits after each text (already formatted), ``[n, vocab]``, optionally steered."""
    tok = model.tokenizer
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    out: list[Tensor | None] = [None] * len(texts)
    for idx in _batches(len(texts), lengths, batch_size):
        enc = encode_prompts(model, [texts[i] for i in idx], chat=False)
        with steered(model, intervention, enc.layout()):
            # Unembed only the last position: the full-vocabulary unembedding of every token is waste.
            resid = model(enc.tokens, attention_mask=enc.attention_mask, stop_at_layer=model.cfg.n_layers)
            logits = model.unembed(model.ln_final(resid[:, -1:]))[:, -1].float()
        for j, i in enumerate(idx):
            out[i] = logits[j]
    return torch.stack(out)  # type: ignore[arg-type]


def ab_probability(
    model: HookedTransformer,
    items: Sequence[ABItem],
    intervention: Intervention | None = None,
    *,
    chat: bool = True,
    batch_size: int = 8,
    system_prompt: str | None = None,
) -> Tensor:
    """p(matching letter) / (p(A) + p(B)) at the answer position of each item, ``[n]``.

    The prompt is the chat-formatted question followed by the assistant's "(", so the next token is
    the answer letter.
    """
    if not items:
        raise SteeringError("ab_probability needs at least one item")
    ids = letter_token_ids(model, sorted({it.matching for it in items} | {it.not_matching for it in items}))
    texts = [ab_prefix(model, it.question, chat=chat, system_prompt=system_prompt) for it in items]
    logits = last_logits(model, texts, intervention, batch_size=batch_size)
    m = torch.tensor([ids[it.matching] for it in items])
    n = torch.tensor([ids[it.not_matching] for it in items])
    rows = torch.arange(len(items))
    two = torch.stack([logits[rows, m], logits[rows, n]], -1)
    return torch.softmax(two, -1)[:, 0]


@torch.no_grad()
def fluency_kl(
    model: HookedTransformer,
    intervention: Intervention | None,
    prompts: Sequence[str] = NEUTRAL_PROMPTS,
    *,
    chat: bool = True,
    batch_size: int = 8,
    reference: Tensor | None = None,
) -> float:
    """Mean KL(unsteered || steered) of the first response token's distribution on neutral prompts (nats)."""
    texts = [format_prompt(model, p, chat=chat) for p in prompts]
    ref = reference if reference is not None else last_logits(model, texts, None, batch_size=batch_size)
    if intervention is None:
        return 0.0
    got = last_logits(model, texts, intervention, batch_size=batch_size)
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@dataclass
class SweepRow:
    value: float
    p_match: float
    p_match_sem: float
    kl: float

    def to_dict(self) -> dict:
        return {"value": self.value, "p_match": self.p_match, "p_match_sem": self.p_match_sem, "kl": self.kl}


def sweep(
    model: HookedTransformer,
    items: Sequence[ABItem],
    make: Callable[[float], Intervention | None],
    values: Sequence[float],
    *,
    neutral: Sequence[str] = NEUTRAL_PROMPTS,
    chat: bool = True,
) -> list[SweepRow]:
    """p(matching) (mean and standard error over items) and fluency KL for each strength value;
    ``make(v)`` is the intervention at strength ``v`` (e.g. ``lambda g: vec * g``, or a registry
    method's ``lambda g: method.at(obj, g)``)."""
    texts = None
    ref = None
    rows = []
    for v in values:
        iv = make(v)
        p = ab_probability(model, items, iv, chat=chat)
        if neutral:
            if ref is None:
                texts = [format_prompt(model, q, chat=chat) for q in neutral]
                ref = last_logits(model, texts, None)
            kl = fluency_kl(model, iv, neutral, chat=chat, reference=ref)
        else:
            kl = float("nan")
        sem = float(p.std() / len(p) ** 0.5) if len(p) > 1 else 0.0
        rows.append(SweepRow(float(v), float(p.mean()), sem, kl))
    return rows


def is_monotonic(values: Sequence[float], increasing: bool = True, tol: float = 0.0) -> bool:
    pairs = zip(values, values[1:])
    return all((b - a) >= -tol for a, b in pairs) if increasing else all((a - b) >= -tol for a, b in pairs)


def generate_steered(
    model: HookedTransformer,
    prompts: str | Sequence[str],
    intervention: Intervention | None,
    *,
    chat: bool = True,
    **kw,
):
    """:func:`czao_lens.generate.generate` with an intervention that needs the live token layout.

    The intervention's hooks share the generation loop's :class:`TokenLayout` object (the loop
    advances its KV offset), so position-aware steering (A-LQR, CAST, SAE splicing) sees exactly
    which prompt or generated token each new position is.
    """
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    enc = encode_prompts(model, prompt_list, chat=chat)
    layout = enc.layout()

    class _Shared(EncodedPrompts):
        def layout(self) -> TokenLayout:  # the loop mutates this very object
            return layout

    shared = _Shared(enc.tokens, enc.attention_mask, enc.prompt_lens)
    with steered(model, intervention, layout):
        return generate_tokens(model, shared, prompt_list, config={"chat": chat}, **kw)


@torch.no_grad()
def answer_text_probability(
    model: HookedTransformer,
    items: Sequence[ABItem],
    intervention: Intervention | None = None,
    *,
    chat: bool = True,
    max_answer_tokens: int = 24,
    batch_size: int = 8,
    system_prompt: str | None = None,
) -> Tensor:
    """Content-based variant of :func:`ab_probability`: the model answers the bare question (no choices)
    and we compare the mean per-token log-likelihood of the matching answer text with the other one,
    normalised over the two: ``sigmoid(mean_logp(matching) - mean_logp(other))``, ``[n]``.

    Small models often ignore A/B letters; this reads whether steering moves what the model would say.
    """
    tok = model.tokenizer
    pos, neg, pre_p, pre_n = answer_pair_texts(model, items, chat=chat, max_answer_tokens=max_answer_tokens,
                                              system_prompt=system_prompt)
    texts, spans = [], []
    for a, b, na, nb in zip(pos, neg, pre_p, pre_n):
        texts += [a, b]
        # counted on the ids the forward sees (BOS included), as the prefix lengths are
        spans += [(na, len(text_ids(model, a)) - na), (nb, len(text_ids(model, b)) - nb)]
    scores = torch.zeros(len(texts))
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    for idx in _batches(len(texts), lengths, batch_size):
        enc = encode_prompts(model, [texts[i] for i in idx], chat=False)
        # The question is the "prompt", the answer tokens count as "generated" (what the model would say).
        layout = TokenLayout(prompt_lens=torch.tensor([spans[i][0] for i in idx]), pad=enc.pad)
        with steered(model, intervention, layout):
            resid = model(enc.tokens, attention_mask=enc.attention_mask, stop_at_layer=model.cfg.n_layers)
        for j, i in enumerate(idx):
            n_pre, n_ans = spans[i]
            pad = int(enc.pad[j])
            pos = torch.arange(pad + n_pre - 1, pad + n_pre - 1 + n_ans)
            tgt = enc.tokens[j, pos + 1]
            # Unembed only the answer positions: a question's full-vocabulary rows are waste (262k wide on Gemma).
            lp = model.unembed(model.ln_final(resid[j : j + 1, pos]))[0].float().log_softmax(-1)
            scores[i] = lp[torch.arange(n_ans), tgt].mean()
    s = scores.reshape(-1, 2)
    return torch.sigmoid(s[:, 0] - s[:, 1])
