"""Steering methods: contrastive vectors (CAA / ActAdd / PCA), SAE features, CAST, activation
scaling and A-LQR, plus their shared data loading and evaluation.

Every fitted object implements :class:`czao_lens.perturb.Intervention` and saves in the one
artifact layout; :mod:`czao_lens.steering.registry` lists the methods (``steering_methods()``).
"""

from czao_lens.steering.common import SteeringArtifactError, SteeringError
from czao_lens.steering.data import ABItem, SteeringDataError, load_ab, load_truthfulqa
from czao_lens.steering.registry import (
    FitInput,
    SteeringMethod,
    fit_method,
    get_method,
    method_names,
    register_method,
    steering_methods,
)
from czao_lens.steering.vectors import SteeringVector, actadd_vector, caa_vector, compose, pca_vector

__all__ = [
    "ABItem", "FitInput", "SteeringArtifactError", "SteeringDataError", "SteeringError", "SteeringMethod",
    "SteeringVector", "actadd_vector", "caa_vector", "compose", "fit_method", "get_method", "load_ab",
    "load_truthfulqa", "method_names", "pca_vector", "register_method", "steering_methods",
]
