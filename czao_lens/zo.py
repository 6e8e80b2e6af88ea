"""Zeroth-order estimators: gradients of a black-box loss from forward evaluations only.

The loss is evaluated on candidate batches (one batched forward each), so every estimator here is
split in two halves: ``*_candidates`` proposes points, the matching update reads their losses.
z is small (|R| x r coefficients), so many directions per step fit in one batch.

Central-difference SPSA (MeZO-style): g = mean_i (L(z + mu u_i) - L(z - mu u_i)) / (2 mu) * u_i.
HiZOO-style diagonal curvature from the same evaluations plus L(z): with Gaussian u,
c_i = (L(z + mu u_i) + L(z - mu u_i) - 2 L(z)) / mu^2 ~ u_i^T H u_i, and
E[c u_j^2] = tr(H) + 2 H_jj, so h_j = (mean_i c_i u_ij^2 - mean_i c_i) / 2, used as a preconditioner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from czao_lens.errors import CzaoLensError


class ZOError(CzaoLensError, ValueError):
    """Bad settings of a zeroth-order estimator."""


@dataclass
class SPSAProbe:
    """The 2N probe points around z and the directions that made them."""

    points: Float[Tensor, "two_n dim"]
    directions: Float[Tensor, "n dim"]
    mu: float


def spsa_candidates(z: Float[Tensor, "dim"], n_dirs: int, mu: float, generator: torch.Generator) -> SPSAProbe:
    """Gaussian directions u_i and the points z + mu u_i, z - mu u_i (interleaved: +, -, +, -).

    Gaussian rather than Rademacher: with u_j^2 = 1 always, curvature would be unidentifiable per
    coordinate."""
    if n_dirs < 1 or not mu > 0:
        raise ZOError(f"SPSA needs n_dirs >= 1 and mu > 0, got n_dirs={n_dirs}, mu={mu}")
    u = torch.randn(n_dirs, z.shape[-1], generator=generator)
    pts = torch.stack([z + mu * u, z - mu * u], 1).reshape(2 * n_dirs, -1)
    return SPSAProbe(pts, u, mu)


def spsa_gradient(probe: SPSAProbe, losses: Float[Tensor, "two_n"]) -> Float[Tensor, "dim"]:
    """Central-difference SPSA gradient estimate averaged over the probe directions."""
    lp, lm = losses.reshape(-1, 2).unbind(-1)
    coef = (lp - lm) / (2 * probe.mu)
    return (coef[:, None] * probe.directions).mean(0)


def diagonal_curvature(probe: SPSAProbe, losses: Float[Tensor, "two_n"], l0: float, floor: float = 1e-3) -> Float[Tensor, "dim"]:
    """HiZOO-style diagonal Hessian estimate from the same probes and L(z), floored to stay positive."""
    lp, lm = losses.reshape(-1, 2).unbind(-1)
    c = (lp + lm - 2 * l0) / probe.mu**2
    h = 0.5 * ((c[:, None] * probe.directions.pow(2)).mean(0) - c.mean())
    return h.clamp_min(floor)


def line_search_candidates(
    z: Float[Tensor, "dim"], direction: Float[Tensor, "dim"], radii: Float[Tensor, "m"]
) -> Float[Tensor, "m dim"]:
    """Points z - rho_j * direction/|direction| for trial radii rho_j (all evaluated in one batch)."""
    n = direction.norm()
    if not torch.isfinite(n) or n == 0:
        return z[None].expand(len(radii), -1).clone()
    return z[None] - radii[:, None] * (direction / n)[None]
