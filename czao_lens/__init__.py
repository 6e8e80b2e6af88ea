"""czao-lens: inference-time steering and the diagnostics that choose where to steer."""

from czao_lens.errors import CzaoLensError
from czao_lens.models import DEFAULT_MODEL, ModelLoadError, load_model

__all__ = ["CzaoLensError", "DEFAULT_MODEL", "ModelLoadError", "load_model"]
__version__ = "0.1.0"
