"""Prompt encoding (chat template, BOS, left padding) and the token layout that hooks need.

During KV-cached generation a hook sees only the new positions of each forward, so "which token is
this" must come from outside the activation. ``TokenLayout`` carries that: left padding per row, the
prompt length per row, and how many columns the KV cache already holds.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Literal, Sequence, Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from czao_lens.errors import CzaoLensError, no_chat_template

PositionSpec = Union[Literal["all", "prompt", "generated", "last_prompt"], Sequence[int]]
NAMED_POSITIONS = ("all", "prompt", "generated", "last_prompt")
_MAX_POSITION = 1 << 31


def check_positions(positions: Any) -> PositionSpec:
    """A valid position spec (a name of ``NAMED_POSITIONS`` or a non-empty list of ints), or a PromptError
    naming the bad value: specs also come from saved files, so they are checked, not trusted."""
    if isinstance(positions, str):
        if positions not in NAMED_POSITIONS:
            raise PromptError(f"unknown position spec {positions!r}; use one of {NAMED_POSITIONS} or a list of ints")
        return positions
    try:
        out = [operator.index(p) for p in positions]
    except TypeError:
        raise PromptError(f"a position spec is one of {NAMED_POSITIONS} or a non-empty list of ints, got {positions!r}") from None
    if any(isinstance(p, bool) for p in positions):
        raise PromptError(f"positions must be ints, not booleans: {positions!r}")
    if not out:
        raise PromptError("an explicit position list must not be empty")
    if any(abs(p) >= _MAX_POSITION for p in out):
        raise PromptError(f"positions must be ints below 2^31 in size, got {max(out, key=abs)}")
    return out


class PromptError(CzaoLensError, ValueError):
    """A prompt is empty or cannot be encoded."""


@dataclass
class EncodedPrompts:
    """Left-padded token ids of a prompt batch, with the mask and real lengths."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    prompt_lens: Int[Tensor, "batch"]

    @property
    def pad(self) -> Int[Tensor, "batch"]:
        return self.tokens.shape[1] - self.prompt_lens

    def layout(self) -> "TokenLayout":
        return TokenLayout(prompt_lens=self.prompt_lens, pad=self.pad)


def has_chat_template(model: HookedTransformer) -> bool:
    """Whether the model's tokenizer ships a chat template (instruct models do; Gemma-3-270m's GGUF does not)."""
    return getattr(model.tokenizer, "chat_template", None) is not None


def resolve_chat(model: HookedTransformer, chat: bool | None) -> bool:
    """The chat policy: ``None`` (auto) formats with the chat template when the tokenizer has one and
    gives base models their raw text; ``True`` on a model without a template is refused."""
    if chat is None:
        return has_chat_template(model)
    if chat and not has_chat_template(model):
        raise PromptError(no_chat_template(model.cfg.model_name))
    return bool(chat)


def format_prompt(model: HookedTransformer, prompt: str, *, chat: bool, system_prompt: str | None = None) -> str:
    """Return the text the model sees: the chat template applied when ``chat`` is set. Without it a
    system prompt is plain text before the prompt (a base model reads an instruction as text)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError("empty prompt: every prompt needs at least one non-space character")
    if not chat:
        return f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
    tok = model.tokenizer
    if not has_chat_template(model):
        raise PromptError(no_chat_template(model.cfg.model_name))
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(
    model: HookedTransformer,
    prompts: str | Sequence[str],
    *,
    chat: bool = False,
    system_prompt: str | None = None,
) -> EncodedPrompts:
    """Tokenize prompts (BOS as the model's config says), left-padded into one batch."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise PromptError("no prompts given")
    tok = model.tokenizer
    if tok is None:
        raise PromptError("the model has no tokenizer; pass token ids instead")
    texts = [format_prompt(model, p, chat=chat, system_prompt=system_prompt) for p in prompts]
    return pad_left([text_ids(model, t) for t in texts], pad_id=pad_token_id(model))


def text_ids(model: HookedTransformer, text: str) -> list[int]:
    """The token ids of an already formatted text as every forward sees them: BOS first when the model's
    config prepends it (Gemma), unless the text already starts with it (a chat template's own BOS).
    Positions counted on the text (where an answer starts) must be counted on these ids."""
    tok = model.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if model.cfg.default_prepend_bos and tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    return ids


def pad_token_id(model: HookedTransformer) -> int:
    tok = model.tokenizer
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pid if pid is not None else 0)


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> EncodedPrompts:
    """Left-pad token id lists into one batch (generation appends on the right)."""
    if any(len(r) == 0 for r in rows):
        raise PromptError("a prompt encodes to zero tokens")
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    return EncodedPrompts(tokens, mask, torch.tensor([len(r) for r in rows], dtype=torch.long))


@dataclass
class TokenLayout:
    """Where the tokens of the current forward pass sit in each row.

    ``offset`` is the number of columns already in the KV cache; the generation loop advances it.
    Token index ``i`` of a row counts real tokens from 0 (padding excluded); prompt tokens are
    ``i < prompt_len`` and generated tokens are ``i >= prompt_len``.
    """

    prompt_lens: Int[Tensor, "batch"]
    pad: Int[Tensor, "batch"]
    offset: int = 0

    @classmethod
    def unpadded(cls, batch: int, seq_len: int) -> "TokenLayout":
        """The layout of a plain forward pass: every position is a prompt token."""
        return cls(torch.full((batch,), seq_len, dtype=torch.long), torch.zeros(batch, dtype=torch.long))

    def token_index(self, n_new: int) -> Int[Tensor, "batch n_new"]:
        cols = torch.arange(self.offset, self.offset + n_new)
        return cols[None, :] - self.pad[:, None]

    def mask(self, positions: PositionSpec, n_new: int) -> Bool[Tensor, "batch n_new"]:
        """Which of the ``n_new`` positions of this forward a position spec selects, per row."""
        idx = self.token_index(n_new)
        real = idx >= 0
        plen = self.prompt_lens[:, None]
        if isinstance(positions, str):
            if positions == "all":
                return real
            if positions == "prompt":
                return real & (idx < plen)
            if positions == "generated":
                return idx >= plen
            if positions == "last_prompt":
                return idx == plen - 1
            raise PromptError(f"unknown position spec {positions!r}; use one of {NAMED_POSITIONS} or a list of ints")
        wanted = torch.as_tensor(check_positions(positions), dtype=torch.long)
        # Negative explicit positions count from the end of the prompt, like Python indexing.
        wanted_rows = torch.where(wanted[None, :] < 0, plen + wanted[None, :], wanted[None, :])
        return real & (idx[:, :, None] == wanted_rows[:, None, :]).any(-1)
