"""Subspaces: where CZAO may perturb. Layers R and a d x r basis A_l per layer.

delta_l = s_l * A_l z_l at ``blocks.l.hook_resid_pre``, where ``s_l`` is a scale taken from the
prompt's own activations (the median residual norm per position, position 0 excluded because it
is an attention sink with a norm 100x the rest). ``z`` is therefore measured in units of "one
typical residual vector", which keeps step sizes meaningful across layers and models.

Bases: activation-informed (top principal directions of the prompt at l), SAE decoder directions,
contrastive steering directions, random orthonormal (a control), and concatenations of these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from czao_lens.errors import CzaoLensError
from czao_lens.sites import check_layers, resid_hook
from czao_lens.store import ActivationStore

Prompt = str | Sequence[int]  # text, or token ids as the store and generation encode them


class SubspaceError(CzaoLensError, ValueError):
    """A subspace does not fit the model: empty R, rank above d, a layer out of range."""


@dataclass
class Subspace:
    """Bases ``A_l`` (orthonormal columns) and scales ``s_l`` for the layers in R."""

    bases: dict[int, Float[Tensor, "d r"]]
    scales: dict[int, float]
    kind: str = "custom"

    def __post_init__(self) -> None:
        if not self.bases:
            raise SubspaceError("the layer set R is empty: give at least one layer")
        for l, A in self.bases.items():
            if A.ndim != 2 or A.shape[1] == 0:
                raise SubspaceError(f"basis at layer {l} must be [d, r] with r >= 1, got {tuple(A.shape)}")
            if not torch.isfinite(A).all():
                raise SubspaceError(f"basis at layer {l} contains NaN or inf")
            if l not in self.scales or not (self.scales[l] > 0):
                raise SubspaceError(f"layer {l} needs a positive scale")

    @property
    def layers(self) -> list[int]:
        """The layers in R, ascending."""
        return sorted(self.bases)

    @property
    def dim(self) -> int:
        """Total number of coefficients: sum of ranks over R."""
        return sum(A.shape[1] for A in self.bases.values())

    @property
    def start_layer(self) -> int:
        """min R: the generation loop splits each forward here."""
        return self.layers[0]

    def hooks(self) -> list[str]:
        """The hook points the deltas are added at (``resid_pre`` of each layer in R)."""
        return [resid_hook(l) for l in self.layers]

    def deltas(self, z: Float[Tensor, "*n dim"]) -> dict[str, Float[Tensor, "*n d"]]:
        """Map coefficients to residual deltas per hook: delta_l = s_l A_l z_l."""
        if z.shape[-1] != self.dim:
            raise SubspaceError(f"z has {z.shape[-1]} coefficients; the subspace has {self.dim}")
        out, i = {}, 0
        for l in self.layers:
            A = self.bases[l]
            r = A.shape[1]
            out[resid_hook(l)] = self.scales[l] * (z[..., i : i + r] @ A.T)
            i += r
        return out

    def delta_norm(self, z: Float[Tensor, "*n dim"]) -> Float[Tensor, "*n"]:
        """|delta| summed over layers, in raw residual units (A has orthonormal columns)."""
        sq, i = torch.zeros(z.shape[:-1]), 0
        for l in self.layers:
            r = self.bases[l].shape[1]
            sq = sq + (self.scales[l] ** 2) * z[..., i : i + r].pow(2).sum(-1)
            i += r
        return sq.sqrt()


def _check_layers(model: HookedTransformer, layers: Sequence[int], rank: int) -> list[int]:
    layers = check_layers(model.cfg.n_layers, layers, "layer in R", SubspaceError)
    if rank < 1:
        raise SubspaceError("rank r must be at least 1")
    if rank > model.cfg.d_model:
        raise SubspaceError(f"rank r={rank} is larger than d_model={model.cfg.d_model}")
    return sorted(set(layers))


def orthonormal(cols: Float[Tensor, "d k"], rank: int, generator: torch.Generator) -> Float[Tensor, "d r"]:
    """Orthonormalise ``cols`` (dropping dependent ones) and top up with random directions to ``rank``."""
    d = cols.shape[0]
    kept = torch.zeros(d, 0)
    if cols.shape[1]:
        q, r = torch.linalg.qr(cols.float())
        ok = r.diagonal().abs() > 1e-6 * r.diagonal().abs().max().clamp_min(1e-12)
        kept = q[:, ok][:, :rank]
    if kept.shape[1] < rank:
        extra = torch.randn(d, rank - kept.shape[1], generator=generator)
        extra = extra - kept @ (kept.T @ extra)  # orthogonal to what we have
        kept = torch.cat([kept, torch.linalg.qr(extra)[0]], 1)
        kept = torch.linalg.qr(kept)[0]  # clean up round-off
    return kept[:, :rank]


def prompt_scales(store: ActivationStore, prompt: Prompt, layers: Sequence[int], *, chat: bool = False) -> dict[int, float]:
    """Median residual norm per position at each layer, attention-sink position 0 excluded."""
    return _scales(_resid(store, prompt, layers, chat), layers)


def _resid(store: ActivationStore, prompt: Prompt, layers: Sequence[int], chat: bool) -> dict[str, Tensor]:
    """The prompt's residuals entering each layer, ``{hook: [pos, d]}``, through the store."""
    return store.get([prompt if isinstance(prompt, str) else list(prompt)], [resid_hook(l) for l in layers], chat=chat)[0]


def _scales(acts: dict[str, Tensor], layers: Sequence[int]) -> dict[int, float]:
    out = {}
    for l in layers:
        x = acts[resid_hook(l)].float()
        x = x[1:] if x.shape[0] > 1 else x
        out[l] = float(x.norm(dim=-1).median())
    return out


def activation_basis(
    store: ActivationStore,
    prompt: Prompt,
    layers: Sequence[int],
    rank: int = 16,
    *,
    chat: bool = False,
    seed: int = 0,
) -> Subspace:
    """Top-``rank`` principal directions of the prompt's own activations at each layer.

    A prompt of T tokens gives at most T-1 directions (position 0 excluded), so short prompts are
    topped up with seeded random orthonormal directions.
    """
    layers = _check_layers(store.model, layers, rank)
    acts = _resid(store, prompt, layers, chat)
    gen = torch.Generator().manual_seed(seed)
    bases = {}
    for l in layers:
        x = acts[resid_hook(l)].float()
        x = x[1:] if x.shape[0] > 1 else x
        x = x - x.mean(0, keepdim=True) if x.shape[0] > 2 else x
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        cols = vh[s > 1e-6 * s.max().clamp_min(1e-12)].T
        bases[l] = orthonormal(cols, rank, gen)
    return Subspace(bases, _scales(acts, layers), kind="activation")


def random_basis(
    store: ActivationStore, prompt: Prompt, layers: Sequence[int], rank: int = 16, *, chat: bool = False, seed: int = 0
) -> Subspace:
    """Seeded random orthonormal bases: the control condition."""
    layers = _check_layers(store.model, layers, rank)
    gen = torch.Generator().manual_seed(seed)
    d = store.model.cfg.d_model
    bases = {l: orthonormal(torch.zeros(d, 0), rank, gen) for l in layers}
    return Subspace(bases, prompt_scales(store, prompt, layers, chat=chat), kind="random")


def direction_basis(
    store: ActivationStore,
    prompt: Prompt,
    directions: Mapping[int, Float[Tensor, "k d"]],
    rank: int | None = None,
    *,
    chat: bool = False,
    seed: int = 0,
    kind: str = "contrastive",
) -> Subspace:
    """Bases spanned by given directions per layer: contrastive vectors or SAE decoder rows.

    ``rank`` above the number of directions tops up with random ones; ``None`` keeps exactly them.
    """
    d = store.model.cfg.d_model
    layers = _check_layers(store.model, list(directions), rank or 1)
    gen = torch.Generator().manual_seed(seed)
    bases = {}
    for l in layers:
        v = directions[l]
        if v.shape[-1] != d:
            raise SubspaceError(f"directions at layer {l} have width {v.shape[-1]}; d_model is {d}")
        v = v.reshape(-1, d).float()
        if not torch.isfinite(v).all() or v.norm() == 0:
            raise SubspaceError(f"directions at layer {l} are zero or non-finite")
        bases[l] = orthonormal(v.T, rank or v.shape[0], gen)
    return Subspace(bases, prompt_scales(store, prompt, layers, chat=chat), kind=kind)


def combine(*subspaces: Subspace, rank: int | None = None, seed: int = 0) -> Subspace:
    """Concatenate bases of several subspaces per layer and re-orthonormalise (e.g. SAE + activation)."""
    if not subspaces:
        raise SubspaceError("nothing to combine")
    gen = torch.Generator().manual_seed(seed)
    layers = sorted({l for s in subspaces for l in s.layers})
    bases, scales = {}, {}
    for l in layers:
        cols = torch.cat([s.bases[l] for s in subspaces if l in s.bases], 1)
        r = min(rank or cols.shape[1], cols.shape[0])
        bases[l] = orthonormal(cols, r, gen)
        scales[l] = next(s.scales[l] for s in subspaces if l in s.scales)
    return Subspace(bases, scales, kind="+".join(s.kind for s in subspaces))


__all__ = [
    "Subspace",
    "SubspaceError",
    "activation_basis",
    "combine",
    "direction_basis",
    "orthonormal",
    "prompt_scales",
    "random_basis",
]
