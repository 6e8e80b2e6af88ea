"""Diagnostics that choose where to intervene: causal tracing, activation patching, Lyapunov
sensitivity and SAE feature selection. Each returns a dataclass with ``to_dict``/``save``; figures
live in :mod:`czao_lens.plots`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from czao_lens import sites
from czao_lens.errors import DiagnosticError  # noqa: F401  (re-exported: diagnostics' error type)


def write_json(obj: Any, path: str | Path) -> Path:
    """Write JSON (creating the folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    return path


def check_layers(n_layers: int, layers, what: str = "layer") -> list[int]:
    """Validate a list of layer indices against the model depth (``None``: all); raises :class:`DiagnosticError`."""
    return sites.check_layers(n_layers, layers, what, DiagnosticError)
