"""czao-lens: inference-time steering and the diagnostics that choose where to steer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from czao_lens.errors import CzaoLensError
from czao_lens.paths import DEFAULT_MODEL

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load on first use
    from czao_lens.models import ModelLoadError, load_model

__all__ = ["CzaoLensError", "DEFAULT_MODEL", "ModelLoadError", "load_model"]
__version__ = "0.1.0"

# Names that live in czao_lens.models: importing it pulls in torch and TransformerLens (seconds),
# so `import czao_lens` (and the command line's --help) stays light until one of them is used.
_LAZY = {"ModelLoadError": "czao_lens.models", "load_model": "czao_lens.models"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'czao_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
