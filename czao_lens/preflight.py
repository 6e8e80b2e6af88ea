"""Checks of a command's arguments that need no weights, run before the model loads.

Loading a model costs seconds (tens on a busy machine); a bad token count, an empty prompt or a
layer the model does not have should fail at once. The model's depth and width come from its
converted cache's ``config.json`` (or a local Hugging Face folder's), read without torch; when
neither exists yet the layer checks wait for the loaded model, as before.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

from czao_lens.errors import ArgumentError, no_chat_template
from czao_lens.paths import cache_root
from czao_lens.sites import check_layers


def model_dims(name_or_path: str) -> dict[str, int] | None:
    """``{"n_layers", "d_model"}`` of a model without loading it, or ``None`` when unknown before loading."""
    name = str(name_or_path).strip()
    candidates = [(cache_root() / name / "config.json", ("n_layers", "d_model"))] if name and "/" not in name else []
    local = Path(name).expanduser()
    if name and local.is_dir():
        candidates.append((local / "config.json", ("num_hidden_layers", "hidden_size")))
    for path, (kl, kd) in candidates:
        try:
            cfg = json.loads(path.read_text())
            dims = {"n_layers": int(cfg[kl]), "d_model": int(cfg[kd])}
        except (OSError, ValueError, KeyError, TypeError):
            continue  # absent or unreadable: the loader rebuilds or reports it
        if dims["n_layers"] > 0 and dims["d_model"] > 0:
            return dims
    return None


def chat_template_known(name_or_path: str) -> bool | None:
    """Whether the model ships a chat template, read from its cached (or local Hugging Face) tokenizer
    files without loading it; ``None`` when there are none yet (the check then waits for the load)."""
    name = str(name_or_path).strip()
    folders = [cache_root() / name / "tokenizer"] if name and "/" not in name else []
    local = Path(name).expanduser()
    if name and local.is_dir():
        folders.append(local)
    for folder in folders:
        try:
            cfg = json.loads((folder / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            continue
        return (folder / "chat_template.jinja").is_file() or bool(isinstance(cfg, dict) and cfg.get("chat_template"))
    return None


def check_chat(model: str, chat: bool | None) -> None:
    """``--chat`` on a model known (before loading) to have no chat template is refused."""
    if chat and chat_template_known(model) is False:
        raise ArgumentError(no_chat_template(model))


def check_model_layers(model: str, layers: Iterable[int] | None, what: str = "--layer") -> None:
    """Refuse layer indices the model does not have, when its depth is known without loading it."""
    dims = model_dims(model)
    if dims is not None and layers is not None:
        check_layers(dims["n_layers"], list(layers), what, ArgumentError)


def check_rank(model: str, rank: int | None, what: str = "--rank") -> None:
    """A subspace rank must be >= 1 and at most d_model (when known before loading)."""
    if rank is None:
        return
    if rank < 1:
        raise ArgumentError(f"{what} must be >= 1, got {rank}")
    dims = model_dims(model)
    if dims is not None and rank > dims["d_model"]:
        raise ArgumentError(f"{what} {rank} exceeds the model's d_model ({dims['d_model']})")


def check_prompts(prompts: Iterable[str] | None, what: str = "--prompt") -> list[str]:
    """Every prompt must hold some text: an empty prompt has no position to read or steer."""
    out = list(prompts or [])
    for i, p in enumerate(out):
        if not isinstance(p, str) or not p.strip():
            raise ArgumentError(f"{what} number {i + 1} is empty ({p!r}); give some text")
    return out


def check_at_least(value: float | None, low: float, what: str) -> None:
    """An integer or float option that must be >= ``low`` (``None``: left to its default)."""
    if value is not None and not (value >= low):  # `not >=` also refuses NaN
        raise ArgumentError(f"{what} must be >= {low:g}, got {value}")


def check_finite(value: float | None, what: str) -> None:
    """A float option that must be a finite number."""
    if value is not None and not math.isfinite(value):
        raise ArgumentError(f"{what} must be a finite number, got {value}")


def check_in(value: float | None, low: float, high: float, what: str, *, low_open: bool = False) -> None:
    """A float option in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if value is None:
        return
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        raise ArgumentError(f"{what} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value}")
