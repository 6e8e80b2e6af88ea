"""Diagnostics that choose where to intervene: causal tracing, activation patching, Lyapunov
sensitivity and SAE feature selection. Each returns a dataclass with ``to_json``/``save``; figures
live in :mod:`czao_lens.plots`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class DiagnosticError(ValueError):
    """Bad input to a diagnostic: empty prompt set, multi-token answer, unknown hook, bad layer..."""


def write_json(obj: Any, path: str | Path) -> Path:
    """Write JSON (creating the folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    return path


def check_layers(n_layers: int, layers, what: str = "layer") -> list[int]:
    """Validate a list of layer indices against the model depth."""
    out = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    if not out:
        raise DiagnosticError(f"no {what}s selected")
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise DiagnosticError(f"{what} {bad[0]} is out of range; the model has {n_layers} layers (0..{n_layers - 1})")
    return out
