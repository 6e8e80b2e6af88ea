"""Token-level constraints: scored from the next-token distribution of every candidate at once.

Both built-ins renormalise what they are given (``x - logsumexp(x)``), so raw logits work as well as
log-probabilities, and a candidate batch costs two reductions over the vocabulary.
"""

from __future__ import annotations

import math
import re
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from czao_lens.constraints.base import (
    Constraint,
    ConstraintError,
    Context,
    Level,
    check_range,
    clean_words,
    validate_logprobs,
)
from czao_lens.constraints.registry import register

# Each token's decoded text, casefolded text, and whether it continues a word (no leading space), per
# tokenizer: a memo shared by every AvoidTokens (Gemma's 262k texts are ~18 MB), gone with the tokenizer.
_VOCAB: "weakref.WeakKeyDictionary[Any, dict[str, list]]" = weakref.WeakKeyDictionary()
_WORD_MARKS = ("\u2581", "\u0120")  # SentencePiece's "▁" and byte-level BPE's "Ġ": the piece starts a word


def vocab_texts(tokenizer: Any, kind: str = "decoded") -> list:
    """Per token id: ``"decoded"`` text, ``"folded"`` (casefolded) text, or ``"continues"`` (True when
    the token does not start a new word: no leading whitespace in its text nor a word mark on its raw
    piece; some tokenizers, Llama's among them, drop the leading space when one token is decoded alone)."""
    try:
        memo = _VOCAB.setdefault(tokenizer, {})
    except TypeError:  # not weakly referenceable: computed, not shared
        memo = {}
    if kind not in memo:
        if kind == "decoded":
            memo[kind] = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        elif kind == "folded":
            memo[kind] = [t.casefold() for t in vocab_texts(tokenizer)]
        else:
            to_pieces = getattr(tokenizer, "convert_ids_to_tokens", None)
            pieces = to_pieces(list(range(len(tokenizer)))) if to_pieces else [None] * len(tokenizer)
            memo[kind] = [not (t[:1].isspace() or str(p or "").startswith(_WORD_MARKS))
                          for t, p in zip(vocab_texts(tokenizer), pieces)]
    return memo[kind]


@register("avoid_tokens")
@dataclass(eq=False, repr=False)
class AvoidTokens(Constraint):
    """Keep the probability of starting any banned word below ``threshold``.

    Banned ids, found once per tokenizer:

    * every variant of each word (as given, lower, Capitalised, UPPER; each with and without a leading
      space) that is a single token;
    * with ``prefix_match``: every vocabulary token whose decoded text, leading whitespace removed,
      starts with the word (" blueberry", "Bluetooth" for "blue"). This over-blocks on purpose (the
      text check only flags the whole word); set it off for very short words ("a").
    * with ``ban_first_subtoken``, only for a word that no single token can start (none of the above
      found anything): the first token of its as-given / lower / Capitalised forms ("cerulean" ->
      " cer"), if that piece has at least 3 characters. This is the only way to stop such a word at
      the next step, and it also blocks other words that share that first piece. Multi-word phrases
      are better served by ``Regex``.
    * given the text generated so far (``context.generated``): when it ends in a word's proper prefix
      (a word-start such as "Rac" or "R" + "ac"), every token that would complete the word from there
      ("ist", "ists"). Forms that tokenise into pieces ("Racist" -> "Rac" + "ist" on Gemma, "R" + "ac"
      + "ist" on SmolLM2) are otherwise unblockable when another form is one token.

    V = max(0, log P(banned) - log(threshold)) per candidate. A log hinge, not P(banned) itself: a
    probability-sized violation is outweighed by CZAO's KL penalty and the search never moves, while
    the log hinge moved it in one step (FIELD-NOTES 3b). The default threshold 0.05 means "at most
    about one sampled step in twenty starts a banned word"; lower it for stricter sampling.

    ``check_text``: a case-(in)sensitive whole-word search of the decoded text.
    """

    words: tuple[str, ...]
    threshold: float = 0.05
    case_insensitive: bool = True
    prefix_match: bool = True
    ban_first_subtoken: bool = True
    level: ClassVar[Level] = "token"
    _ids: dict[int, tuple[Any, Tensor]] = field(default_factory=dict, init=False, repr=False)
    _done: dict[tuple, tuple[Any, Tensor]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.words = clean_words("AvoidTokens", self.words)
        self.threshold = check_range("AvoidTokens", "threshold", self.threshold, 0.0, 1.0, lo_open=True, hi_open=True)
        flags = re.IGNORECASE if self.case_insensitive else 0
        # Lookarounds instead of \b so words that start or end with punctuation ("c++") still match.
        self._pattern = re.compile("|".join(rf"(?<!\w){re.escape(w)}(?!\w)" for w in self.words), flags)

    def banned_ids(self, tokenizer: Any, generated: str = "") -> Int[Tensor, "k"]:
        """The sorted token ids banned after the text ``generated``: the word starts (computed once per
        tokenizer, then cached) and, when ``generated`` ends inside a word, the tokens completing it."""
        if tokenizer is None:
            raise ConstraintError(f"{self.describe()} needs context.tokenizer (the model's tokenizer).")
        hit = self._ids.get(id(tokenizer))
        static = hit[1] if hit is not None and hit[0] is tokenizer else self._word_start_ids(tokenizer)
        done = self._completing_ids(tokenizer, generated)
        return static if done is None else torch.unique(torch.cat([static, done]))

    def _completing_ids(self, tokenizer: Any, generated: str) -> Tensor | None:
        """Tokens that finish a banned word begun at the end of ``generated`` (None: no word begun)."""
        tail = re.search(r"\w+$", generated)
        if tail is None:
            return None
        fold = str.casefold if self.case_insensitive else str
        begun = fold(tail.group())
        rests = tuple(fold(w)[len(begun):] for w in self.words if len(begun) < len(w) and fold(w).startswith(begun))
        if not rests:
            return None
        key = (id(tokenizer), *rests)
        hit = self._done.get(key)
        if hit is None or hit[0] is not tokenizer:
            texts = vocab_texts(tokenizer, "folded" if self.case_insensitive else "decoded")
            ids = [i for i, (s, cont) in enumerate(zip(texts, vocab_texts(tokenizer, "continues")))
                   if cont and s.startswith(rests)]
            hit = (tokenizer, torch.tensor(ids, dtype=torch.long))
            self._done[key] = hit
        return hit[1]

    def _word_start_ids(self, tokenizer: Any) -> Tensor:
        ids: set[int] = set()
        decoded = vocab_texts(tokenizer) if self.prefix_match else None
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        for word in self.words:
            found = self._ids_for_word(word, tokenizer, decoded)
            found -= special
            if not found:
                raise ConstraintError(
                    f"AvoidTokens: the word {word!r} maps to no bannable token with this tokenizer "
                    "(it tokenises to nothing, or to several tokens while ban_first_subtoken is off or the "
                    "first piece is under 3 characters). "
                    "Use a sequence-level Regex constraint for it."
                )
            ids |= found
        out = torch.tensor(sorted(ids), dtype=torch.long)
        self._ids[id(tokenizer)] = (tokenizer, out)
        return out

    def _ids_for_word(self, word: str, tokenizer: Any, decoded: list[str] | None) -> set[int]:
        cased = {word}
        if self.case_insensitive:
            cased |= {word.lower(), word.capitalize()}
        variants = cased | ({word.upper(), word.title()} if self.case_insensitive else set())
        variants |= {" " + v for v in variants}
        found: set[int] = set()
        for v in variants:
            toks = tokenizer.encode(v, add_special_tokens=False)
            if len(toks) == 1:
                found.add(int(toks[0]))
        if decoded is not None:
            key = word.casefold() if self.case_insensitive else word
            for i, s in enumerate(decoded):
                s = s.lstrip()
                if s and (s.casefold() if self.case_insensitive else s).startswith(key):
                    found.add(i)
        if not found and self.ban_first_subtoken:
            # Only when the word cannot be blocked otherwise, not for UPPER forms, and only pieces of
            # >= 3 characters: tiny first pieces ("Cerulean" -> "C") would block far too much.
            for v in cased | {" " + v for v in cased}:
                toks = tokenizer.encode(v, add_special_tokens=False)
                if toks and len(tokenizer.decode([toks[0]]).strip()) >= min(3, len(word)):
                    found.add(int(toks[0]))
        return found

    def banned_log_mass(
        self, logprobs: Float[Tensor, "n vocab"], context: Context | None = None
    ) -> Float[Tensor, "n"]:
        """log P(next token is banned) for each candidate (works on logits too: renormalised)."""
        ctx = context or Context()
        lp = validate_logprobs(logprobs, self).float()
        ids = self.banned_ids(ctx.tokenizer, ctx.generated)
        _check_vocab(lp.shape[-1], ctx.tokenizer, ids, self)
        ids = ids.to(lp.device)
        return torch.logsumexp(lp[:, ids], dim=-1) - torch.logsumexp(lp, dim=-1)

    def violation_logits(self, logprobs, context=None) -> Float[Tensor, "n"]:
        return (self.banned_log_mass(logprobs, context) - math.log(self.threshold)).clamp_min(0.0)

    def check_text(self, text: str, context: Context | None = None) -> bool:
        return self._pattern.search(text) is None


@register("confident")
@dataclass(eq=False, repr=False)
class Confident(Constraint):
    """The model must be confident in its next token: max_token p(token) >= ``tau``.

    V = max(0, log tau - max log p). This is a "truthfulness as internal confidence" proxy: it measures
    how peaked the model's next-token distribution is, not whether what it says is true. A model can be
    confidently wrong, and a correct answer can have several equally good phrasings (low max p).

    ``check_text`` cannot judge confidence from text. It uses the log-probabilities of the tokens that
    were actually chosen, if the generator records them in ``context.extra["chosen_logprobs"]`` (the
    text passes when every one is >= log tau). Without them the verdict is vacuously True (with a warning).
    """

    tau: float = 0.5
    level: ClassVar[Level] = "token"

    def __post_init__(self) -> None:
        self.tau = check_range("Confident", "tau", self.tau, 0.0, 1.0, lo_open=True)

    def violation_logits(self, logprobs, context=None) -> Float[Tensor, "n"]:
        lp = validate_logprobs(logprobs, self).float()
        max_lp = lp.amax(dim=-1) - torch.logsumexp(lp, dim=-1)
        return (math.log(self.tau) - max_lp).clamp_min(0.0)

    def check_text(self, text: str, context: Context | None = None) -> bool:
        chosen = (context.extra.get("chosen_logprobs") if context is not None else None)
        if chosen is None:
            warnings.warn(
                "Confident.check_text: no context.extra['chosen_logprobs']; a text carries no confidence "
                "information, so the verdict is vacuously True.",
                stacklevel=2,
            )
            return True
        chosen = torch.as_tensor(chosen, dtype=torch.float32)
        return bool((chosen >= math.log(self.tau) - 1e-6).all())


def _check_vocab(vocab: int, tokenizer: Any, ids: Tensor, who: Constraint) -> None:
    """Catch logits and tokenizer from different models.

    Models pad their vocabulary (to multiples of 64 or 128, sometimes by a few hundred), so the logits
    may be somewhat wider than the tokenizer; narrower than its base vocabulary, or more than 5% + 1024
    wider, means they do not belong together.
    """
    base = int(getattr(tokenizer, "vocab_size", 0) or 0)
    full = len(tokenizer)
    if vocab < base or vocab > full + max(1024, full // 20) or (ids.numel() and int(ids.max()) >= vocab):
        raise ConstraintError(
            f"{who.describe()}: logprobs have vocab size {vocab}, but the tokenizer has {full} tokens "
            f"(base {base}). Are the logits and the tokenizer from the same model?"
        )
