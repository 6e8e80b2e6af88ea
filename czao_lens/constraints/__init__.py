"""Declarative constraints C(y, x, D) for CZAO: vectorised violation scores V >= 0, 0 iff satisfied.

    from czao_lens.constraints import AvoidTokens, Sentiment, Context, load_constraint

    c = AvoidTokens(["blue"]) & Sentiment(min_compound=0.0)        # And: V = sum
    v = c.violation(logprobs=lp, texts=candidates, context=Context(tokenizer=tok))
    c2 = load_constraint('{"any": [{"type": "language", "code": "en"}, {"type": "regex", "pattern": "^OK"}]}')

See docs/constraints.md. Importing this package loads no evaluator; each loads on first use.
"""

from czao_lens.constraints.base import (
    SAT_TOL,
    And,
    Constraint,
    ConstraintError,
    Context,
    Or,
    Weighted,
    banned_token_ids,
    checked_violation,
    split_conjunction,
    validate_logprobs,
    validate_texts,
)
from czao_lens.constraints.registry import constraint_from_spec, known_types, load_constraint, register
from czao_lens.constraints.semantic import AvoidConcept, ConsistentWithDocument, load_minilm, split_sentences
from czao_lens.constraints.text import IncludeKeywords, Language, MaxLength, NoProfanity, Regex, Sentiment
from czao_lens.constraints.token_level import AvoidTokens, Confident

__all__ = [
    "SAT_TOL",
    "And",
    "AvoidConcept",
    "AvoidTokens",
    "Confident",
    "ConsistentWithDocument",
    "Constraint",
    "ConstraintError",
    "Context",
    "IncludeKeywords",
    "Language",
    "MaxLength",
    "NoProfanity",
    "Or",
    "Regex",
    "Sentiment",
    "Weighted",
    "banned_token_ids",
    "checked_violation",
    "constraint_from_spec",
    "known_types",
    "load_constraint",
    "load_minilm",
    "register",
    "split_conjunction",
    "split_sentences",
    "validate_logprobs",
    "validate_texts",
]
