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

from czao_lens.errors import CzaoLensError

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


def format_prompt(model: HookedTransformer, prompt: str, *, chat: bool, system_prompt: str | None = None) -> str:
    """Return the text the model sees: the chat template applied when ``chat`` is set."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError("empty prompt: every prompt needs at least one non-space character")
    if not chat:
        return prompt
    tok = model.tokenizer
    if getattr(tok, "chat_template", None) is None:
        raise PromptError(f"{model.cfg.model_name} has no chat template; call with chat=False")
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
    # A chat template already holds its special tokens; otherwise BOS follows the model's default.
    add_bos = bool(model.cfg.default_prepend_bos) and tok.bos_token_id is not None
    rows: list[list[int]] = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if add_bos and (not ids or ids[0] != tok.bos_token_id):
            ids = [tok.bos_token_id] + ids
        rows.append(ids)
    return pad_left(rows, pad_id=pad_token_id(model))


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
