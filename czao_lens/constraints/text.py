"""Sequence-level constraints backed by small offline evaluators (lexicons, a linear model, regexes).

Each evaluator is imported on first use through an ``lru_cache``'d loader, so importing this module
costs nothing. Candidate texts are whole outputs so far (generated text plus lookahead).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from czao_lens.constraints.base import Constraint, ConstraintError, check_range, clean_words
from czao_lens.constraints.registry import register


@lru_cache(maxsize=1)
def load_vader() -> Any:
    """VADER's SentimentIntensityAnalyzer (lexicon ships in the vaderSentiment wheel)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:
        raise ConstraintError("Sentiment needs vaderSentiment: pip install 'czao-lens[eval]'") from exc
    return SentimentIntensityAnalyzer()


@lru_cache(maxsize=1)
def load_profanity() -> Any:
    """alt-profanity-check's ``predict_prob`` (a linear SVM on a bag of words, calibrated)."""
    try:
        from profanity_check import predict_prob
    except ImportError as exc:
        raise ConstraintError("NoProfanity needs alt-profanity-check: pip install 'czao-lens[eval]'") from exc
    return predict_prob


@lru_cache(maxsize=1)
def load_langid() -> Any:
    """py3langid's identifier with normalised probabilities (a softmax over all its languages)."""
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError as exc:
        raise ConstraintError("Language needs py3langid: pip install 'czao-lens[eval]'") from exc
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


@register("sentiment")
@dataclass(eq=False, repr=False)
class Sentiment(Constraint):
    """VADER compound sentiment (in [-1, 1]) must lie in [min_compound, max_compound].

    With neither bound given, ``min_compound = 0.0`` (not negative). V is the hinge distance to the
    violated bound: max(0, min - c) + max(0, c - max). VADER is a lexicon with rules for negation,
    intensifiers and punctuation; it scores the words, not the meaning (sarcasm passes as positive).
    An empty text scores 0.
    """

    min_compound: float | None = None
    max_compound: float | None = None

    def __post_init__(self) -> None:
        if self.min_compound is None and self.max_compound is None:
            self.min_compound = 0.0
        for name in ("min_compound", "max_compound"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, check_range("Sentiment", name, v, -1.0, 1.0))
        if self.min_compound is not None and self.max_compound is not None and self.min_compound > self.max_compound:
            raise ConstraintError(f"Sentiment: min_compound {self.min_compound} > max_compound {self.max_compound}.")

    def compound(self, texts: Sequence[str]) -> Float[Tensor, "n"]:
        """VADER compound score of each text."""
        vader = load_vader()
        return torch.tensor([vader.polarity_scores(t)["compound"] for t in texts], dtype=torch.float32)

    def violation_texts(self, texts, context=None) -> Float[Tensor, "n"]:
        c = self.compound(texts)
        v = torch.zeros_like(c)
        if self.min_compound is not None:
            v += (self.min_compound - c).clamp_min(0)
        if self.max_compound is not None:
            v += (c - self.max_compound).clamp_min(0)
        return v


@register("no_profanity")
@dataclass(eq=False, repr=False)
class NoProfanity(Constraint):
    """alt-profanity-check's probability that the text is profane/offensive must be <= ``max_prob``.

    V = max(0, p - max_prob). The model is a linear classifier on word n-grams trained on offensive
    comments: it catches swearing and slurs, not politely worded hostility. One strong swear word in a
    long text still moves p a lot.
    """

    max_prob: float = 0.5

    def __post_init__(self) -> None:
        self.max_prob = check_range("NoProfanity", "max_prob", self.max_prob, 0.0, 1.0, hi_open=True)

    def probability(self, texts: Sequence[str]) -> Float[Tensor, "n"]:
        """Profanity probability of each text (one vectorised call)."""
        if not texts:
            return torch.zeros(0)
        return torch.as_tensor(load_profanity()(list(texts)), dtype=torch.float32)

    def violation_texts(self, texts, context=None) -> Float[Tensor, "n"]:
        return (self.probability(texts) - self.max_prob).clamp_min(0)


@register("include_keywords")
@dataclass(eq=False, repr=False)
class IncludeKeywords(Constraint):
    """The output must contain at least ``ceil(min_fraction * k)`` of the k keywords (whole words).

    V = max(0, required - present) / k; with the default ``min_fraction=1.0`` that is the fraction of
    keywords still missing. A partial text cannot contain everything yet, so during generation V is a
    progress measure (it falls as keywords appear) and is meaningful on the final text or a long
    lookahead. Give it a small weight, or check it only at the end, if early steps should not be pushed.
    """

    words: tuple[str, ...]
    min_fraction: float = 1.0
    case_insensitive: bool = True

    def __post_init__(self) -> None:
        self.words = clean_words("IncludeKeywords", self.words)
        self.min_fraction = check_range("IncludeKeywords", "min_fraction", self.min_fraction, 0.0, 1.0, lo_open=True)
        flags = re.IGNORECASE if self.case_insensitive else 0
        self._patterns = [re.compile(rf"(?<!\w){re.escape(w)}(?!\w)", flags) for w in self.words]
        # Round before ceil so 2/3 * 3 does not become 3.0000000000000004 -> 4.
        self._required = math.ceil(round(self.min_fraction * len(self.words), 9))

    def present(self, texts: Sequence[str]) -> Float[Tensor, "n"]:
        """How many keywords each text contains."""
        return torch.tensor([sum(p.search(t) is not None for p in self._patterns) for t in texts], dtype=torch.float32)

    def violation_texts(self, texts, context=None) -> Float[Tensor, "n"]:
        return (self._required - self.present(texts)).clamp_min(0) / len(self.words)


@register("language")
@dataclass(eq=False, repr=False)
class Language(Constraint):
    """py3langid's normalised probability of language ``code`` must be >= ``min_prob``.

    V = max(0, min_prob - p(code)). Texts shorter than ``min_chars`` (stripped) get V = 0: a few
    characters carry no reliable language evidence, and the first tokens of any answer would otherwise
    be pushed around. py3langid is a naive Bayes model over byte n-grams; code-switching, names and code
    snippets lower p.
    """

    code: str = "en"
    min_prob: float = 0.5
    min_chars: int = 10

    def __post_init__(self) -> None:
        self.min_prob = check_range("Language", "min_prob", self.min_prob, 0.0, 1.0, lo_open=True)
        if isinstance(self.min_chars, bool) or not isinstance(self.min_chars, int) or self.min_chars < 0:
            raise ConstraintError(f"Language: min_chars must be an int >= 0, got {self.min_chars!r}.")
        labels = load_langid().labels  # a 0.5 s load, paid at construction so a typo fails early
        if self.code not in labels:
            raise ConstraintError(f"Language: unknown language code {self.code!r}; known: {', '.join(sorted(labels))}.")

    def probability(self, texts: Sequence[str]) -> Float[Tensor, "n"]:
        """p(code | text) for each text."""
        ident = load_langid()
        return torch.tensor([dict(ident.rank(t)).get(self.code, 0.0) for t in texts], dtype=torch.float32)

    def violation_texts(self, texts, context=None) -> Float[Tensor, "n"]:
        v = (self.min_prob - self.probability(texts)).clamp_min(0)
        short = torch.tensor([len(t.strip()) < self.min_chars for t in texts], dtype=torch.bool)
        return v.masked_fill(short, 0.0)


@register("regex")
@dataclass(eq=False, repr=False)
class Regex(Constraint):
    """The output must (``must_match=True``) or must not match ``pattern`` (``re.search``).

    V is 0/1. Covers format rules: ``^\\d+$``, a JSON-looking ``^\\{.*\\}$`` with flags "s", a required
    "Answer:" line with flags "m". ``flags`` is a string of i (ignore case), m (multiline), s (dotall),
    x (verbose). A 0/1 violation gives the optimizer no gradient of degree, only pass/fail.
    """

    pattern: str
    must_match: bool = True
    flags: str = ""

    def __post_init__(self) -> None:
        table = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}
        if not isinstance(self.flags, str) or set(self.flags) - set(table):
            raise ConstraintError(f"Regex: flags must be a string of {sorted(table)}, got {self.flags!r}.")
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConstraintError("Regex: pattern must be a non-empty string.")
        flags = 0
        for ch in self.flags:
            flags |= table[ch]
        try:
            self._re = re.compile(self.pattern, flags)
        except re.error as exc:
            raise ConstraintError(f"Regex: invalid pattern {self.pattern!r}: {exc}") from exc

    def violation_texts(self, texts, context=None) -> Float[Tensor, "n"]:
        return torch.tensor([float((self._re.search(t) is not None) != self.must_match) for t in texts])


@register("max_length")
@dataclass(eq=False, repr=False)
class MaxLength(Constraint):
    """The output must be at most ``max_chars`` characters and/or ``max_tokens`` tokens.

    V = relative excess, e.g. (chars - max_chars) / max_chars, summed over the given limits. Tokens are
    counted with ``context.tokenizer`` (no special tokens).
    """

    max_chars: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_chars is None and self.max_tokens is None:
            raise ConstraintError("MaxLength: give max_chars and/or max_tokens.")
        for name in ("max_chars", "max_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConstraintError(f"MaxLength: {name} must be a positive int, got {v!r}.")

    def violation_texts(self, texts, context=None) -> Float[Tensor, "n"]:
        v = torch.zeros(len(texts))
        if self.max_chars is not None:
            chars = torch.tensor([len(t) for t in texts], dtype=torch.float32)
            v += (chars - self.max_chars).clamp_min(0) / self.max_chars
        if self.max_tokens is not None:
            tok = context.tokenizer if context is not None else None
            if tok is None:
                raise ConstraintError(f"{self.describe()} counts tokens and needs context.tokenizer.")
            n = torch.tensor([len(tok.encode(t, add_special_tokens=False)) for t in texts], dtype=torch.float32)
            v += (n - self.max_tokens).clamp_min(0) / self.max_tokens
        return v
