"""The constraint interface, the evaluation context, composition and the safety-checked entry point.

A constraint C(y, x, D) is scored by a *violation* V >= 0 that is 0 exactly when C holds. CZAO scores
many candidate perturbations at once, so every violation is a vector with one entry per candidate:

* token-level constraints read next-token log-probabilities ``[n, vocab]``;
* sequence-level constraints read candidate texts (``n`` strings: generated text plus lookahead).

Nothing here loads an evaluator; the built-ins load theirs lazily on first use.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from czao_lens.errors import CzaoLensError

Level = Literal["token", "sequence"]

#: A violation at or below this counts as satisfied. Evaluators work in float32, where a hinge such as
#: ``log p - log t`` can come out at +1e-7 for a constraint that holds exactly at the boundary.
SAT_TOL = 1e-6


class ConstraintError(CzaoLensError, ValueError):
    """Bad constraint input or a misbehaving constraint; the message names the constraint and the fix."""


@dataclass
class Context:
    """Everything a constraint may look at besides the candidates themselves.

    ``generated`` is the text produced so far (shared by all candidates); the candidate texts passed to
    ``violation_texts`` already include it. ``tokenizer`` is the model's Hugging Face tokenizer (needed by
    token-level constraints and ``MaxLength(max_tokens=...)``). ``document`` is the D of C(y, x, D).
    """

    prompt: str = ""
    generated: str = ""
    tokenizer: Any = None
    document: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Constraint:
    """Base class of all constraints. Subclasses override one scoring method and ``check_text``.

    * token level: override ``violation_logits`` and ``check_text``;
    * sequence level: override ``violation_texts`` (``check_text`` then defaults to ``V(text) == 0``).

    Built-ins are dataclasses; their init fields are their JSON parameters (see ``to_dict``).
    """

    type_name: ClassVar[str] = ""  # set by @register; the "type" of the JSON spec
    level: ClassVar[Level] = "sequence"

    # ------------------------------------------------------------------ scoring (override these)

    def violation_logits(
        self, logprobs: Float[Tensor, "n vocab"], context: Context | None = None
    ) -> Float[Tensor, "n"]:
        """Violation of each candidate from its next-token log-probabilities (token level only)."""
        raise ConstraintError(
            f"{self.describe()} is sequence-level: it needs candidate texts, not logits. "
            "Call violation(texts=...) or violation_texts(texts, context)."
        )

    def violation_texts(self, texts: Sequence[str], context: Context | None = None) -> Float[Tensor, "n"]:
        """Violation of each candidate text (generated text so far plus lookahead).

        Token-level constraints fall back to a 0/1 violation from ``check_text``, so that a text-only
        caller (e.g. final scoring, or a mixed composite given only texts) can still use them.
        """
        if self.level == "token":
            ctx = context or Context()
            return torch.tensor([0.0 if self.check_text(t, ctx) else 1.0 for t in texts])
        raise NotImplementedError(f"{type(self).__name__} must implement violation_texts")

    def check_text(self, text: str, context: Context | None = None) -> bool:
        """Final verdict on a full generated text."""
        if self.level == "token":
            raise NotImplementedError(f"{type(self).__name__} (token level) must implement check_text")
        return bool(checked_violation(self, texts=[text], context=context)[0] <= SAT_TOL)

    # ------------------------------------------------------------------ derived

    def violation(
        self,
        logprobs: Float[Tensor, "n vocab"] | None = None,
        texts: Sequence[str] | None = None,
        context: Context | None = None,
    ) -> Float[Tensor, "n"]:
        """Dispatch on what is available: logits for token level (texts as fallback), texts otherwise."""
        ctx = context or Context()
        if self.level == "token" and logprobs is not None:
            return self.violation_logits(logprobs, ctx)
        if texts is not None:
            return self.violation_texts(texts, ctx)
        need = "logprobs (or texts)" if self.level == "token" else "texts"
        raise ConstraintError(f"{self.describe()} is {self.level}-level and needs {need}; none were given.")

    def satisfied(
        self,
        logprobs: Float[Tensor, "n vocab"] | None = None,
        texts: Sequence[str] | None = None,
        context: Context | None = None,
    ) -> Bool[Tensor, "n"]:
        """Per candidate: ``V <= SAT_TOL`` (a 1e-6 tolerance absorbs float32 rounding at the boundary)."""
        return checked_violation(self, logprobs=logprobs, texts=texts, context=context) <= SAT_TOL

    def params(self) -> dict[str, Any]:
        """The constructor arguments as JSON values (dataclass init fields by default)."""
        if not dataclasses.is_dataclass(self):
            raise NotImplementedError(f"{type(self).__name__} is not a dataclass: override params()")
        out = {}
        for f in dataclasses.fields(self):
            if f.init and not f.name.startswith("_"):
                v = getattr(self, f.name)
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON spec that ``constraint_from_spec`` turns back into an equal constraint."""
        if not self.type_name:
            raise ConstraintError(
                f"{type(self).__name__} has no spec type: decorate the class with @register('name')."
            )
        return {"type": self.type_name, **self.params()}

    def describe(self) -> str:
        """A one-line human description (used in error messages and reports)."""
        try:
            args = ", ".join(f"{k}={_short(v)}" for k, v in self.params().items())
        except NotImplementedError:
            args = ""
        return f"{self.type_name or type(self).__name__}({args})"

    def __repr__(self) -> str:
        return self.describe()

    # ------------------------------------------------------------------ operators

    def __and__(self, other: Constraint) -> And:
        _require_constraint(other, "&")
        return And(*_flatten(self, And), *_flatten(other, And))

    def __or__(self, other: Constraint) -> Or:
        _require_constraint(other, "|")
        return Or(*_flatten(self, Or), *_flatten(other, Or))

    def __mul__(self, weight: float) -> Weighted:
        if isinstance(self, Weighted):
            return Weighted(self.constraint, self.weight * _check_weight(weight))
        return Weighted(self, weight)

    __rmul__ = __mul__


# ---------------------------------------------------------------------- composition


class _Composite(Constraint):
    """Shared parts of And / Or: level, texts and mixed dispatch."""

    parts: tuple[Constraint, ...]
    _word = ""
    _key = ""

    def __init__(self, *parts: Constraint):
        if len(parts) == 1 and isinstance(parts[0], (list, tuple)):
            parts = tuple(parts[0])
        if not parts:
            raise ConstraintError(f"{type(self).__name__} needs at least one constraint.")
        for p in parts:
            _require_constraint(p, type(self).__name__)
        self.parts = tuple(parts)

    @property
    def level(self) -> Level:  # type: ignore[override]
        return "sequence" if any(p.level == "sequence" for p in self.parts) else "token"

    def _combine(self, vs: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def _parts_violation(self, logprobs, texts, context) -> Tensor:
        vs = [checked_violation(p, logprobs=logprobs, texts=texts, context=context) for p in self.parts]
        device = vs[0].device
        return self._combine([v.to(device=device, dtype=torch.float32) for v in vs])

    def violation(self, logprobs=None, texts=None, context=None) -> Float[Tensor, "n"]:
        """Each part with what it needs: token parts take the logits (texts if no logits are given),
        sequence parts take the texts. A mixed composite therefore needs both."""
        if self.level == "sequence" and texts is None:
            raise ConstraintError(
                f"{self.describe()} contains sequence-level parts: pass texts=... (and logprobs=... for "
                "its token-level parts)."
            )
        return self._parts_violation(logprobs, texts, context or Context())

    def violation_logits(self, logprobs, context=None) -> Float[Tensor, "n"]:
        if self.level == "sequence":
            raise ConstraintError(
                f"{self.describe()} mixes token- and sequence-level parts: call "
                "violation(logprobs=..., texts=..., context=...) so every part gets what it needs."
            )
        return self._parts_violation(logprobs, None, context or Context())

    def violation_texts(self, texts, context=None) -> Float[Tensor, "n"]:
        return self._parts_violation(None, texts, context or Context())

    def to_dict(self) -> dict[str, Any]:
        return {self._key: [p.to_dict() for p in self.parts]}

    def describe(self) -> str:
        return "(" + f" {self._word} ".join(p.describe() for p in self.parts) + ")"


class And(_Composite):
    """All parts must hold: V = sum of the parts' (weighted) violations; 0 iff every part is 0."""

    _word, _key = "AND", "all"

    def _combine(self, vs):
        return torch.stack(vs).sum(0)

    def check_text(self, text, context=None) -> bool:
        return all(p.check_text(text, context) for p in self.parts)


class Or(_Composite):
    """At least one part must hold: V = min of the parts' (weighted) violations."""

    _word, _key = "OR", "any"

    def _combine(self, vs):
        return torch.stack(vs).amin(0)

    def check_text(self, text, context=None) -> bool:
        return any(p.check_text(text, context) for p in self.parts)


class Weighted(Constraint):
    """A constraint whose violation is scaled by ``weight`` (> 0; it matters inside And / Or)."""

    def __init__(self, constraint: Constraint, weight: float):
        _require_constraint(constraint, "Weighted")
        self.constraint = constraint
        self.weight = _check_weight(weight)

    @property
    def level(self) -> Level:  # type: ignore[override]
        return self.constraint.level

    def violation(self, logprobs=None, texts=None, context=None) -> Float[Tensor, "n"]:
        return self.weight * checked_violation(self.constraint, logprobs=logprobs, texts=texts, context=context)

    def violation_logits(self, logprobs, context=None) -> Float[Tensor, "n"]:
        return self.weight * self.constraint.violation_logits(logprobs, context)

    def violation_texts(self, texts, context=None) -> Float[Tensor, "n"]:
        return self.weight * checked_violation(self.constraint, texts=texts, context=context)

    def check_text(self, text, context=None) -> bool:
        return self.constraint.check_text(text, context)

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "constraint": self.constraint.to_dict()}

    def describe(self) -> str:
        return f"{self.weight:g}*{self.constraint.describe()}"


def banned_token_ids(constraint: Constraint, tokenizer: Any, generated: str = "") -> Tensor | None:
    """Token ids that no satisfying continuation of the text ``generated`` may take next, or ``None``
    when the constraint bans none for sure: a token constraint's own list (``banned_ids(tokenizer,
    generated)``), the union over an And's parts, a Weighted's inner list. An Or bans nothing for sure
    (another part may hold instead)."""
    if isinstance(constraint, Weighted):
        return banned_token_ids(constraint.constraint, tokenizer, generated)
    if isinstance(constraint, And):
        found = [b for b in (banned_token_ids(p, tokenizer, generated) for p in constraint.parts) if b is not None]
        return torch.unique(torch.cat(found)) if found else None
    banned = getattr(constraint, "banned_ids", None)
    return banned(tokenizer, generated) if callable(banned) else None


def split_conjunction(constraint: Constraint) -> tuple[Constraint, tuple[Constraint, ...]] | None:
    """``(sequence part, token parts)`` of an And with exactly one sequence-level part, else ``None``.

    Such a conjunction can be scored by the sequence part's value probe plus the token parts' exact
    violations from the candidates' logits (CZAO and probe-guided decoding do so)."""
    if not isinstance(constraint, And):
        return None
    seq = [p for p in constraint.parts if p.level == "sequence"]
    if len(seq) != 1:
        return None
    return seq[0], tuple(p for p in constraint.parts if p.level == "token")


# ---------------------------------------------------------------------- checked entry point


def checked_violation(
    constraint: Constraint,
    logprobs: Float[Tensor, "n vocab"] | None = None,
    texts: Sequence[str] | None = None,
    context: Context | None = None,
) -> Float[Tensor, "n"]:
    """Score candidates and verify the result, so that a broken (e.g. user-written) constraint fails loudly.

    Checks the inputs (shape, NaN, text types) and the output: a float tensor of shape ``[n]`` with no NaN
    and no value below ``-SAT_TOL``. Tiny negatives within the tolerance are clamped to 0.
    """
    _require_constraint(constraint, "checked_violation")
    n = None
    if logprobs is not None:
        validate_logprobs(logprobs, constraint)
        n = logprobs.shape[0]
    if texts is not None:
        texts = validate_texts(texts, constraint)
        if n is not None and len(texts) != n:
            raise ConstraintError(
                f"{constraint.describe()}: {n} rows of logprobs but {len(texts)} texts; they must describe "
                "the same candidates."
            )
        n = len(texts)
    v = constraint.violation(logprobs=logprobs, texts=texts, context=context or Context())
    if not isinstance(v, Tensor):
        try:
            v = torch.as_tensor(v, dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise ConstraintError(f"{constraint.describe()} returned {type(v).__name__}, not a tensor.") from exc
    v = v.to(torch.float32)
    if n is not None and tuple(v.shape) != (n,):
        raise ConstraintError(
            f"{constraint.describe()} returned a violation of shape {tuple(v.shape)}; expected ({n},), "
            "one value per candidate."
        )
    if torch.isnan(v).any():
        raise ConstraintError(f"{constraint.describe()} returned NaN violations: {v.tolist()[:8]}")
    if (v < -SAT_TOL).any():
        raise ConstraintError(
            f"{constraint.describe()} returned negative violations (min {v.min().item():.3g}); a violation "
            "must be >= 0 and 0 exactly when the constraint holds."
        )
    return v.clamp_min(0.0)


def validate_logprobs(logprobs: Any, constraint: Constraint | None = None) -> Float[Tensor, "n vocab"]:
    """Reject what would silently give wrong violations: wrong rank, non-float, NaN or +inf entries."""
    who = f"{constraint.describe()}: " if constraint is not None else ""
    if not isinstance(logprobs, Tensor):
        raise ConstraintError(f"{who}logprobs must be a torch.Tensor, got {type(logprobs).__name__}.")
    if logprobs.ndim != 2:
        hint = " (for one candidate use logprobs.unsqueeze(0))" if logprobs.ndim == 1 else ""
        raise ConstraintError(
            f"{who}logprobs must have shape [n_candidates, vocab], got {tuple(logprobs.shape)}{hint}."
        )
    if not torch.is_floating_point(logprobs):
        raise ConstraintError(f"{who}logprobs must be floating point, got {logprobs.dtype}.")
    if torch.isnan(logprobs).any():
        raise ConstraintError(f"{who}logprobs contain NaN (a diverged forward pass?).")
    if torch.isposinf(logprobs).any():
        raise ConstraintError(f"{who}logprobs contain +inf.")
    return logprobs


def validate_texts(texts: Any, constraint: Constraint | None = None) -> list[str]:
    """Texts must be a list (or tuple) of str; a bare string is a common mistake and is refused."""
    who = f"{constraint.describe()}: " if constraint is not None else ""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise ConstraintError(f"{who}texts must be a list of strings (one per candidate), got {type(texts).__name__}.")
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise ConstraintError(f"{who}every text must be a str, got {bad[0]}.")
    return list(texts)


# ---------------------------------------------------------------------- small shared validators


def check_range(owner: str, name: str, value: Any, lo: float, hi: float, *, lo_open=False, hi_open=False) -> float:
    """Return ``value`` as float if it lies in the interval, else raise ConstraintError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConstraintError(f"{owner}: {name} must be a finite number, got {value!r}.")
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConstraintError(f"{owner}: {name} must lie in {interval}, got {value}.")
    return float(value)


def clean_words(owner: str, words: Any) -> tuple[str, ...]:
    """A non-empty list of non-blank strings, stripped; a bare string is refused (it is not a list)."""
    if isinstance(words, str) or not isinstance(words, (list, tuple)):
        raise ConstraintError(f"{owner}: words must be a list of strings, got {type(words).__name__}.")
    if not words:
        raise ConstraintError(f"{owner}: the word list is empty.")
    out = []
    for w in words:
        if not isinstance(w, str) or not w.strip():
            raise ConstraintError(f"{owner}: every word must be a non-empty string, got {w!r}.")
        out.append(w.strip())
    return tuple(dict.fromkeys(out))


def _check_weight(weight: Any) -> float:
    return check_range("Weighted", "weight", weight, 0.0, math.inf, lo_open=True, hi_open=True)


def _require_constraint(obj: Any, where: str) -> None:
    if not isinstance(obj, Constraint):
        raise ConstraintError(f"{where} expects a Constraint, got {type(obj).__name__}.")


def _flatten(c: Constraint, kind: type) -> tuple[Constraint, ...]:
    return c.parts if type(c) is kind else (c,)  # type: ignore[attr-defined]


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."
