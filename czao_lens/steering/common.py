"""What every steering method shares: the error classes, steering sites, A/B texts, contrastive
activation reads, and the ``load`` that turns artifact errors into steering errors.

Everything here sits below :mod:`vectors`, :mod:`evaluate`, :mod:`cast`, :mod:`lqr`, :mod:`scaling`
and :mod:`sae`, so none of them needs to import another one for a helper.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence, TypeVar

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from czao_lens import sites
from czao_lens.artifacts import Artifact, check_model
from czao_lens.errors import ArtifactError, CzaoLensError
from czao_lens.prompts import format_prompt, text_ids
from czao_lens.steering.data import ABItem
from czao_lens.store import ActivationStore

HOOK_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
STORE_BYTES = 256 * 2**20  # a store made for one call holds at most this much


class SteeringError(CzaoLensError, ValueError):
    """A steering method got bad inputs (no pairs, a zero difference, a mismatched model, ...)."""


class SteeringArtifactError(SteeringError, ArtifactError):
    """A saved steering object that cannot be used: missing, malformed, or made for another model.

    It is both a :class:`SteeringError` and an :class:`~czao_lens.errors.ArtifactError`, so either
    handler catches it.
    """


# ----------------------------------------------------------------------------- sites


def hook_name(layer: int, hook: str) -> str:
    """A steering site: ``hook`` must be one of ``HOOK_KINDS``."""
    if hook not in HOOK_KINDS:
        raise SteeringError(f"hook must be one of {HOOK_KINDS}, got {hook!r}")
    return sites.hook_name(layer, hook)


def check_layers(model: HookedTransformer, layers: Sequence[int]) -> list[int]:
    """The steering layers, sorted and deduplicated; raises :class:`SteeringError` when out of range."""
    return sorted(set(sites.check_layers(model.cfg.n_layers, layers, error=SteeringError)))


def store_for(model: HookedTransformer, store: ActivationStore | None) -> ActivationStore:
    """``store`` if given, else a fresh store for this call (nothing is kept on the model object)."""
    return store if store is not None else ActivationStore(model, max_bytes=STORE_BYTES)


def meta_model_info(meta: dict, d_model: int) -> dict[str, Any]:
    """The ``model`` block of cfg.json from a fitted object's metadata (the keys it has)."""
    info = {"name": meta.get("model_name"), "fingerprint": meta.get("fingerprint"), "d_model": d_model,
            "n_layers": meta.get("n_layers")}
    return {k: v for k, v in info.items() if v is not None}


def fit_meta(model: HookedTransformer, method: str, **extra) -> dict:
    """The metadata every fitted object records about its model and method."""
    from czao_lens.models import model_fingerprint

    return {"method": method, "model_name": model.cfg.model_name, "fingerprint": model_fingerprint(model),
            "d_model": model.cfg.d_model, "n_layers": model.cfg.n_layers, **extra}


# ----------------------------------------------------------------------------- saving

A = TypeVar("A", bound="SteeringArtifact")


class SteeringArtifact(Artifact):
    """:class:`~czao_lens.artifacts.Artifact` whose ``load`` raises :class:`SteeringArtifactError`
    and, given a model, also checks the object's own fit (layers, widths) with ``check_model``."""

    WHAT: ClassVar[str] = "steering object"

    def check_model(self, model: HookedTransformer) -> None:
        """Raise :class:`SteeringError` if this object cannot act on ``model``."""

    def check_compatible(self, model: HookedTransformer, *, strict_fingerprint: bool = True) -> None:
        """Raise if this object was made for another model (d_model, layer count, fingerprint)."""
        try:
            check_model(self.saved_model_info(), model, self.WHAT, strict_fingerprint=strict_fingerprint)
        except ArtifactError as exc:
            raise SteeringArtifactError(str(exc)) from None
        self.check_model(model)

    @classmethod
    def load(cls: type[A], path: str | Path, model: HookedTransformer | None = None, *,
             strict_fingerprint: bool = True) -> A:
        """Load a saved object (a folder: cfg.json + tensors.safetensors); with ``model``, refuse one
        made for another model."""
        path = Path(path)
        if not path.exists():
            raise SteeringArtifactError(f"no {cls.WHAT} file at {path}")
        try:
            obj = super().load(path, model, strict_fingerprint=strict_fingerprint)
        except SteeringError:
            raise
        except ArtifactError as exc:
            raise SteeringArtifactError(str(exc)) from None
        if model is not None:
            obj.check_model(model)
        return obj


# ----------------------------------------------------------------------------- A/B texts


def option_texts(item: ABItem) -> dict[str, str]:
    """The answer texts of an A/B question, by letter (``(A) ...`` lines of its ``Choices:`` block)."""
    out = {}
    for m in re.finditer(r"^\s*\(([A-Z])\)\s*(.+?)\s*$", item.question.split("Choices:")[-1], flags=re.M):
        out[m.group(1)] = m.group(2)
    if item.matching not in out or item.not_matching not in out:
        raise SteeringError(f"cannot find the options {item.matching}/{item.not_matching} in: {item.question[-200:]!r}")
    return out


def ab_prefix(model: HookedTransformer, question: str, *, chat: bool = True, system_prompt: str | None = None) -> str:
    """The text before the answer letter: the (chat-formatted) question plus the assistant's "("."""
    return format_prompt(model, question, chat=chat, system_prompt=system_prompt) + "("


def ab_pair_texts(model: HookedTransformer, items: Sequence[ABItem], *, chat: bool = True) -> tuple[list[str], list[str]]:
    """(positive, negative) texts per item, each ending in the answer letter."""
    if not items:
        raise SteeringError("no A/B pairs given")
    pos, neg = [], []
    for it in items:
        pre = ab_prefix(model, it.question, chat=chat)
        pos.append(pre + it.matching)
        neg.append(pre + it.not_matching)
    return pos, neg


def answer_pair_texts(model: HookedTransformer, items: Sequence[ABItem], *, chat: bool = True,
                      max_answer_tokens: int = 24, system_prompt: str | None = None) -> tuple[list[str], list[str], list[int], list[int]]:
    """(positive, negative) texts: the bare question (no choices) answered with the matching / other
    option's text, plus each text's prefix length in tokens (where the answer starts)."""
    if not items:
        raise SteeringError("no A/B pairs given")
    tok = model.tokenizer
    pos, neg, pre_p, pre_n = [], [], [], []
    for it in items:
        opts = option_texts(it)
        prefix = format_prompt(model, it.stem(), chat=chat, system_prompt=system_prompt)
        n_pre = len(text_ids(model, prefix))  # with the BOS every forward prepends (Gemma)
        for letter, texts, pres in ((it.matching, pos, pre_p), (it.not_matching, neg, pre_n)):
            ans = tok(opts[letter], add_special_tokens=False)["input_ids"][:max_answer_tokens]
            texts.append(prefix + tok.decode(ans))
            pres.append(n_pre)
    return pos, neg, pre_p, pre_n


# ----------------------------------------------------------------------------- contrastive activations


@dataclass
class Pooled:
    """Pooled activations of the positive and the negative examples, ``{layer: [n, d]}`` each.

    ``paired``: row i of ``pos`` and of ``neg`` answer the same question (CAA's A/B pairs), so the
    mean difference is the mean of per-pair differences; unpaired samples (the bench's labelled
    continuations) take the difference of the two means.
    """

    pos: dict[int, Tensor]
    neg: dict[int, Tensor]
    paired: bool

    def mean_difference(self, layer: int) -> Tensor:
        P, N = self.pos[layer], self.neg[layer]
        return (P - N).mean(0) if self.paired else P.mean(0) - N.mean(0)


def contrastive_activations(
    model: HookedTransformer,
    pos_texts: Sequence[str],
    neg_texts: Sequence[str],
    layers: Sequence[int],
    *,
    hook: str = "resid_pre",
    position: int = -1,
    store: ActivationStore | None = None,
    paired: bool = True,
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Activations at one position of each text: ``({layer: [n_pos, d]}, {layer: [n_neg, d]})``."""
    if not pos_texts or not neg_texts:
        raise SteeringError("contrastive activations need at least one positive and one negative text")
    if paired and len(pos_texts) != len(neg_texts):
        raise SteeringError(f"paired texts differ in number: {len(pos_texts)} positive vs {len(neg_texts)} negative")
    layers = check_layers(model, layers)
    store = store_for(model, store)
    names = [hook_name(l, hook) for l in layers]
    p = store.last_token(list(pos_texts), names, position=position)
    n = store.last_token(list(neg_texts), names, position=position)
    return {l: p[h].float() for l, h in zip(layers, names)}, {l: n[h].float() for l, h in zip(layers, names)}


def span_means(
    model: HookedTransformer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    starts: Sequence[int],
    layers: Sequence[int],
    *,
    hook: str = "resid_pre",
    store: ActivationStore | None = None,
) -> dict[int, Tensor]:
    """Per prompt (text or token ids), the mean activation from token ``starts[i]`` on: ``{layer: [n, d]}``."""
    store = store_for(model, store)
    names = [hook_name(l, hook) for l in layers]
    acts = store.get(prompts, names)
    return {l: torch.stack([a[h][n:].float().mean(0) for a, n in zip(acts, starts)]) for l, h in zip(layers, names)}


def item_activations(
    model: HookedTransformer,
    items: Sequence[ABItem],
    layers: Sequence[int],
    *,
    hook: str = "resid_pre",
    readout: str = "letter",
    chat: bool = True,
    store: ActivationStore | None = None,
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Per-item activations of the behaviour-matching and the other answer, ``({layer: [n, d]}, ...)``.

    ``readout="letter"`` (CAA): the answer-letter token after the chat-formatted question with its
    choices. ``readout="answer"``: the bare question answered with the option's *text*, averaged over
    the answer tokens (for models that do not map behaviour to A/B letters).
    """
    if readout == "letter":
        pos, neg = ab_pair_texts(model, items, chat=chat)
        return contrastive_activations(model, pos, neg, layers, hook=hook, store=store)
    if readout != "answer":
        raise SteeringError(f"readout must be 'letter' or 'answer', got {readout!r}")
    layers = check_layers(model, layers)
    pos, neg, pre_p, pre_n = answer_pair_texts(model, items, chat=chat)
    store = store_for(model, store)  # one store for both halves: the same call reads both
    return (span_means(model, pos, pre_p, layers, hook=hook, store=store),
            span_means(model, neg, pre_n, layers, hook=hook, store=store))


def nonzero(direction: Tensor, layer: int, what: str, ref: Tensor | None = None) -> Tensor:
    """``direction``, or a :class:`SteeringError` if it is not finite or (numerically) zero."""
    scale = float(ref.norm(dim=-1).mean()) if ref is not None else 1.0
    if not torch.isfinite(direction).all():
        raise SteeringError(f"{what} at layer {layer} is not finite")
    if float(direction.norm()) <= 1e-6 * max(scale, 1e-12):
        raise SteeringError(
            f"{what} at layer {layer} is (numerically) zero: the positive and negative activations do not differ there"
        )
    return direction
