"""Steering with SAE features.

Two ways to push chosen SAE features ``f`` with coefficients ``c_f``:

* **Plain addition** (:func:`feature_vector`): add ``sum_f c_f * W_dec[f]`` to the activation, as a
  :class:`~czao_lens.steering.vectors.SteeringVector`. The SAE is not run at inference time; the
  edit is the same whatever the current activation is.
* **Splicing** (:class:`SAESplice`): run the SAE at the hook, ``z = encode(x)``, edit the latent code
  (``mode="add"``: ``z_f += c_f``; ``mode="clamp"``: ``z_f = c_f``), and replace the activation by
  ``decode(z') + (x - decode(z))``. Keeping the error term ``x - decode(z)`` means nothing but the
  edit changes. For a linear decoder, ``add`` mode equals plain addition exactly (``decode`` is
  affine), so its value lies in ``clamp``: the edit ``(c_f - z_f) W_dec[f]`` depends on how active the
  feature already is (zero when it is already at the target, larger when it is off), and it costs an
  encode/decode per steered position.

The SAE is any SAELens-style object with ``W_dec [d_sae, d_in]``, ``encode`` and ``decode``; its hook
comes from ``sae.cfg.metadata.hook_name`` unless given. A ``FeatureBasis`` (``indices``,
``directions``, ``hook_name``) from the diagnostics can be used through :func:`basis_vector`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from czao_lens.perturb import Intervention, PerturbationHandle, attach_hooks
from czao_lens.prompts import PositionSpec, TokenLayout
from czao_lens.sites import layer_of
from czao_lens.steering.common import HOOK_KINDS, SteeringError, hook_name
from czao_lens.steering.vectors import SteeringVector


def sae_hook_name(sae: Any, hook: str | None = None) -> str:
    if hook:
        return hook
    md = getattr(getattr(sae, "cfg", None), "metadata", None)
    name = getattr(md, "hook_name", None) if md is not None else None
    if not name:
        raise SteeringError("the SAE does not say which hook it reads (cfg.metadata.hook_name); pass hook=...")
    return name


def _split_hook(name: str) -> tuple[int, str]:
    """(layer, kind) of a hook a steering vector can act on, e.g. ``blocks.3.hook_resid_pre`` -> (3, "resid_pre")."""
    layer = layer_of(name)
    kind = name.rsplit(".hook_", 1)[-1] if layer is not None else ""
    if kind not in HOOK_KINDS or hook_name(layer, kind) != name:
        raise SteeringError(f"SAE feature steering as a vector needs a residual/attn_out/mlp_out hook, got {name!r}; use SAESplice")
    return layer, kind


def _check_features(features: Sequence[int], coeffs: Sequence[float] | float, d_sae: int) -> tuple[list[int], list[float]]:
    features = [int(f) for f in features]
    if not features:
        raise SteeringError("no SAE features chosen")
    bad = [f for f in features if not 0 <= f < d_sae]
    if bad:
        raise SteeringError(f"features {bad} are out of range; the SAE has {d_sae} latents")
    coeffs = [float(coeffs)] * len(features) if isinstance(coeffs, (int, float)) else [float(c) for c in coeffs]
    if len(coeffs) != len(features):
        raise SteeringError(f"{len(features)} features but {len(coeffs)} coefficients")
    if not all(math.isfinite(c) for c in coeffs):
        raise SteeringError(f"SAE feature coefficients must be finite, got {coeffs} (NaN or inf)")
    return features, coeffs


def feature_vector(sae: Any, features: Sequence[int], coeffs: Sequence[float] | float = 1.0, *, hook: str | None = None) -> SteeringVector:
    """Plain addition of ``sum_f c_f W_dec[f]`` at the SAE's hook, as a steering vector."""
    W = sae.W_dec.detach().float()
    features, coeffs = _check_features(features, coeffs, W.shape[0])
    layer, kind = _split_hook(sae_hook_name(sae, hook))
    d = sum(c * W[f] for f, c in zip(features, coeffs))
    if float(d.norm()) == 0:
        raise SteeringError("the chosen features' decoder directions sum to zero")
    return SteeringVector({layer: d}, kind, {"method": "sae", "features": features, "coeffs": coeffs, "d_in": W.shape[1]})


def basis_vector(basis: Any, coeffs: Sequence[float] | float = 1.0) -> SteeringVector:
    """A steering vector from a FeatureBasis-like object (``indices``, ``directions [k, d]``, ``hook_name``)."""
    dirs = torch.as_tensor(basis.directions).float()
    idx = list(range(dirs.shape[0]))
    _, coeffs = _check_features(idx, coeffs, dirs.shape[0])
    layer, kind = _split_hook(basis.hook_name)
    d = sum(c * dirs[i] for i, c in zip(idx, coeffs))
    return SteeringVector({layer: d}, kind, {"method": "sae-basis", "features": [int(i) for i in getattr(basis, "indices", idx)], "coeffs": coeffs})


@dataclass
class SAESplice(Intervention):
    """Replace the activation by the SAE reconstruction with edited latents, plus the SAE's error term."""

    sae: Any
    features: Sequence[int]
    coeffs: Sequence[float] | float = 1.0
    mode: Literal["add", "clamp"] = "add"
    positions: PositionSpec = "all"
    hook: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("add", "clamp"):
            raise SteeringError(f"mode must be 'add' or 'clamp', got {self.mode!r}")
        self.features, self.coeffs = _check_features(self.features, self.coeffs, self.sae.W_dec.shape[0])

    def edit(self, act: Tensor) -> Tensor:
        """The spliced activation for ``act [..., d_in]`` (every position)."""
        z = self.sae.encode(act)
        err = act - self.sae.decode(z)
        z2 = z.clone()
        idx = torch.tensor(self.features, device=z.device)
        c = torch.tensor(self.coeffs, dtype=z.dtype, device=z.device)
        z2[..., idx] = z2[..., idx] + c if self.mode == "add" else c.expand_as(z2[..., idx])
        return self.sae.decode(z2) + err

    def attach(self, model: HookedTransformer, layout: TokenLayout | None = None) -> PerturbationHandle:
        """Add the splicing hook at the SAE's hook point; ``apply`` is the context-manager form."""
        name = sae_hook_name(self.sae, self.hook)
        d_in = self.sae.W_dec.shape[1]

        def hook(act: Tensor, hook) -> Tensor:
            if act.shape[-1] != d_in:
                raise SteeringError(f"SAE reads width {d_in} but {name} has width {act.shape[-1]}")
            b, n = act.shape[:2]
            lay = layout if layout is not None else TokenLayout.unpadded(b, n)
            m = lay.mask(self.positions, n).to(act.device)
            if m.shape[0] != b:
                m = m.repeat_interleave(b // m.shape[0], 0)
            if not m.any():
                return act
            out = act.clone()
            out[m] = self.edit(act[m].float()).to(act.dtype)
            return out

        return attach_hooks(model, [(name, hook)])


def make_sae(d_in: int, d_sae: int, hook_name: str, *, W_dec: Tensor | None = None, seed: int = 0, threshold_bias: float = 0.0):
    """A small SAELens ``StandardSAE`` (ReLU) with given or random unit-norm decoder rows; tied encoder.

    Meant for tests and demos when no trained SAE is at hand.
    """
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu", apply_b_dec_to_input=False,
                            metadata=SAEMetadata(hook_name=hook_name))
    sae = StandardSAE(cfg)
    g = torch.Generator().manual_seed(seed)
    W = W_dec if W_dec is not None else torch.randn(d_sae, d_in, generator=g)
    W = W / W.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
        sae.b_enc.fill_(threshold_bias)
        sae.b_dec.zero_()
    sae.eval()
    return sae
