"""Seed directions: a known good direction that CZAO's zero-order search tries first.

A steering vector proposes, the search corrects. Before any SPSA step, CZAO tries a line along
the constraint's own direction at each layer of R; when a point on it is feasible the token costs
one small candidate batch instead of a full SPSA step, and when none is, the search starts from the
best point of the line. Where the directions come from:

- a value probe's contrastive direction (satisfying minus violating rollouts, per layer;
  :func:`czao_lens.probes.contrastive_directions`), for sequence-level constraints;
- away from the banned tokens' unembedding directions (centred on the mean unembedding, so that
  the shift lowers those logits rather than all of them), for constraints with banned tokens;
- any per-layer vectors the caller gives, e.g. a CAA steering vector.

The seed enters the subspace as each layer's first basis column, so the search can also move along
it and away from it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from czao_lens.constraints import Constraint, banned_token_ids
from czao_lens.probes import ValueProbe
from czao_lens.subspace import Subspace, SubspaceError, orthonormal

Directions = Mapping[int, Float[Tensor, "d"]]


def seed_directions(
    model: HookedTransformer, constraint: Constraint, probe: ValueProbe | None, layers: Sequence[int]
) -> dict[int, Float[Tensor, "d"]] | None:
    """The known good direction per layer of R for this constraint, or ``None`` when there is none."""
    if probe is not None and probe.directions is not None:
        return {l: probe.directions[l].float() for l in layers}
    ids = banned_token_ids(constraint, model.tokenizer)
    if ids is not None and len(ids):
        w_u = model.W_U.detach().float()  # [d, vocab]
        u = w_u.mean(1) - w_u[:, ids].mean(1)
        return {l: u for l in layers}
    return None


def seeded(
    subspace: Subspace, directions: Directions, *, seed: int = 0
) -> tuple[Subspace, Float[Tensor, "dim"]]:
    """The subspace with each layer's seed direction as its first basis column (the old columns,
    made orthogonal to it, follow), and the unit vector ``e`` in z along the seeds.

    ``z = r * e`` moves every layer of R along its seed by ``r / sqrt(|R|)`` typical residual norms."""
    missing = [l for l in subspace.layers if l not in directions]
    if missing:
        raise SubspaceError(f"no seed direction for layer(s) {missing} of R")
    gen = torch.Generator().manual_seed(seed)
    bases = {}
    for l in subspace.layers:
        A, u = subspace.bases[l], directions[l].float().reshape(-1)
        if u.shape[0] != A.shape[0] or not torch.isfinite(u).all() or float(u.norm()) == 0.0:
            raise SubspaceError(f"the seed direction at layer {l} must be a finite non-zero vector of width {A.shape[0]}")
        u = u / u.norm()
        rest = orthonormal(A - u[:, None] * (u @ A)[None], A.shape[1], gen)
        rest = rest - u[:, None] * (u @ rest)[None]  # orthonormal() may top up with random columns
        bases[l] = torch.cat([u[:, None], torch.linalg.qr(rest)[0]], 1)
    out = Subspace(bases, dict(subspace.scales), kind=f"seeded+{subspace.kind}")
    e, i = torch.zeros(out.dim), 0
    for l in out.layers:
        e[i] = 1.0
        i += bases[l].shape[1]
    return out, e / e.norm()


__all__ = ["Directions", "seed_directions", "seeded"]
