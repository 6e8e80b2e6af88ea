"""Names of intervention sites, defined once: hook names from a layer and a kind, and the layer check.

Hook names come from TransformerLens' ``get_act_name`` so they match the model's ``hook_dict``;
it is imported on first use so the command line can check layers before torch loads.
"""

from __future__ import annotations

import re
from typing import Iterable

from czao_lens.errors import LayerError

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


def hook_name(layer: int, kind: str = "resid_pre") -> str:
    """The hook point of ``kind`` in block ``layer``: ``hook_name(12, "resid_post")`` is
    ``"blocks.12.hook_resid_post"``; ``"z"``, ``"k"``, ``"v"`` give the attention hooks."""
    from transformer_lens.utils import get_act_name

    return get_act_name(kind.removeprefix("hook_"), int(layer))


def resid_hook(layer: int, kind: str = "pre") -> str:
    """Name of the residual-stream hook entering (``pre``), inside (``mid``) or leaving (``post``) a block."""
    return hook_name(layer, f"resid_{kind}")


def layer_of(hook: str) -> int | None:
    """The block index in a hook name, or ``None`` for hooks outside the blocks (embeddings, final norm)."""
    m = _LAYER_RE.match(hook)
    return int(m.group(1)) if m else None


def check_layers(
    n_layers: int,
    layers: Iterable[int] | None,
    what: str = "layer",
    error: type[Exception] = LayerError,
) -> list[int]:
    """Validate layer indices against the model depth (``None`` means every layer).

    ``error`` lets a module raise its own error class (all derive from ``CzaoLensError``).
    """
    out = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    if not out:
        raise error(f"no {what}s selected")
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise error(f"{what} {bad[0]} is out of range; the model has {n_layers} layers (0..{n_layers - 1})")
    return out
