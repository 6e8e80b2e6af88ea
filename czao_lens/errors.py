"""The root of every error czao-lens raises on bad input or an impossible request.

``except czao_lens.CzaoLensError`` catches them all. Each module's error class also keeps its
builtin base (``ValueError`` or ``RuntimeError``) as a second base, so older handlers still work.
"""

from __future__ import annotations


class CzaoLensError(Exception):
    """Any error raised by czao-lens about its inputs, files or models (not an internal bug)."""


class LayerError(CzaoLensError, ValueError):
    """A layer index the model does not have."""


class ArtifactError(CzaoLensError, ValueError):
    """A saved object that cannot be read: missing, malformed, of another type, or for another model."""


class DiagnosticError(CzaoLensError, ValueError):
    """Bad input to a diagnostic or an SAE: empty prompt set, multi-token answer, unknown hook, bad layer..."""


class ArgumentError(CzaoLensError, ValueError):
    """An argument out of its range (a token count, a prompt, a rank...), caught before any model loads."""


def no_chat_template(name: str) -> str:
    """The one-line refusal of chat formatting on a model without a chat template (said the same way
    before the model loads, from its cached tokenizer files, and after)."""
    return f"{name} has no chat template (a base model): use --no-chat / chat=False, or leave the chat option on auto"
