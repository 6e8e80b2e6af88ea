"""Activation scaling: learn a few multiplicative scalars on existing activations.

Each *site* is a hook point whose activation is multiplied by a learned scalar ``alpha`` (start 1):
a block's ``hook_attn_out`` / ``hook_mlp_out`` / residual, or one attention head's output written
``blocks.{l}.attn.hook_z[h]``. The scalars are fitted by gradient descent on

    effectiveness  -log p(target letter)           (two-way softmax at the A/B answer position)
  + w_kl * faithfulness  KL(unsteered || scaled)   (first response token of neutral prompts)
  + w_l1 * sum |alpha - 1|                         (keep the intervention small and sparse)

``direction=+1`` pushes toward the behaviour-matching answer, ``-1`` away from it. Only the
blocks from the first site on are re-run at each step: their input is read once from the
activation store (so the model's weights get no gradients and the cost per step is a partial
forward/backward).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from czao_lens.artifacts import register_artifact, save_artifact
from czao_lens.perturb import Intervention, PerturbationHandle, attach_hooks, check_hook_name, hook_layer
from czao_lens.prompts import PositionSpec, TokenLayout, check_positions, format_prompt
from czao_lens.sites import hook_name, resid_hook
from czao_lens.steering.common import SteeringArtifact, SteeringError, ab_prefix, fit_meta, meta_model_info, store_for
from czao_lens.steering.data import NEUTRAL_PROMPTS, ABItem
from czao_lens.steering.evaluate import letter_token_ids
from czao_lens.store import ActivationStore

_HEAD_RE = re.compile(r"^(.*attn\.hook_(?:z|result))\[(\d+)\]$")


def _parse_site(model: HookedTransformer, site: str) -> tuple[str, int | None]:
    m = _HEAD_RE.match(site)
    name, head = (m.group(1), int(m.group(2))) if m else (site, None)
    check_hook_name(model, name)
    if head is not None and not 0 <= head < model.cfg.n_heads:
        raise SteeringError(f"head {head} in site {site!r} is out of range (0..{model.cfg.n_heads - 1})")
    return name, head


@register_artifact("activation_scaling")
@dataclass
class ActivationScaling(Intervention, SteeringArtifact):
    """Multiply the activation at each site by ``alpha[i]`` at the selected positions."""

    sites: list[str] = field()  # field(): without it the dataclass would take Artifact.sites() as a default
    alpha: Tensor = field()
    positions: PositionSpec = "all"
    meta: dict = field(default_factory=dict)

    WHAT = "activation scaling"

    def __post_init__(self) -> None:
        if not isinstance(self.sites, list) or not all(isinstance(x, str) for x in self.sites):
            raise SteeringError(f"activation scaling sites must be a list of hook names, got {self.sites!r}")
        if not isinstance(self.alpha, Tensor) or not self.alpha.is_floating_point() or self.alpha.ndim != 1:
            raise SteeringError("activation scaling factors must be a 1-D floating-point tensor (one per site)")
        self.positions = check_positions(self.positions)

    def check_model(self, model: HookedTransformer) -> None:
        """Raise if a site does not exist in ``model``."""
        for site in self.sites:
            _parse_site(model, site)

    def _hooks(self, model: HookedTransformer, layout: TokenLayout | None, alpha: Tensor) -> list[tuple[str, Callable]]:
        if len(self.sites) != alpha.numel():
            raise SteeringError(f"{len(self.sites)} sites but {alpha.numel()} scalars")
        if not torch.isfinite(alpha).all():
            raise SteeringError(f"activation scaling factors must be finite, got {alpha.tolist()} (NaN or inf)")
        out = []
        for i, site in enumerate(self.sites):
            name, head = _parse_site(model, site)

            def fn(act: Tensor, hook, i=i, head=head) -> Tensor:
                b, n = act.shape[:2]
                lay = layout if layout is not None else TokenLayout.unpadded(b, n)
                m = lay.mask(self.positions, n).to(act.device)
                if m.shape[0] != b:
                    m = m.repeat_interleave(b // m.shape[0], 0)
                m = m.to(act.dtype)
                factor = 1 + m * (alpha[i].to(act.dtype) - 1)  # [b, n]
                if head is None:
                    return act * factor.reshape(b, n, *([1] * (act.ndim - 2)))
                scale = torch.ones(b, n, act.shape[2], dtype=act.dtype, device=act.device)
                scale = scale.index_copy(2, torch.tensor([head], device=act.device), factor[..., None])
                return act * scale[..., None]

            out.append((name, fn))
        return out

    def attach(self, model: HookedTransformer, layout: TokenLayout | None = None) -> PerturbationHandle:
        """Add the scaling hooks; ``apply`` is the context-manager form."""
        return attach_hooks(model, self._hooks(model, layout, self.alpha.detach()))

    # ------------------------------------------------------------------ the artifact layout

    def to_dict(self) -> dict[str, Any]:
        pos = self.positions if isinstance(self.positions, str) else [int(p) for p in self.positions]
        return {"sites": list(self.sites), "positions": pos, "meta": self.meta}

    def tensors(self) -> dict[str, Tensor]:
        return {"alpha": self.alpha.detach()}

    @classmethod
    def from_dict(cls, params: dict[str, Any], tensors: dict[str, Tensor]) -> "ActivationScaling":
        alpha = tensors["alpha"]
        if alpha.numel() != len(params["sites"]):
            raise SteeringError(f"{len(params['sites'])} sites but {alpha.numel()} scalars")
        return cls(list(params["sites"]), alpha, params.get("positions", "all"), dict(params.get("meta", {})))

    def saved_model_info(self) -> dict[str, Any]:
        return meta_model_info(self.meta, self.meta.get("d_model"))

    def save(self, path: str | Path) -> Path:
        """Save in the artifact layout (overridden because the ``sites`` field hides ``Artifact.sites()``)."""
        hooks = list(dict.fromkeys(_HEAD_RE.sub(r"\1", s) for s in self.sites))
        return save_artifact(path, self.ARTIFACT_TYPE, self.to_dict(), self.tensors(), model=self.saved_model_info(),
                             sites=hooks)



def layer_sites(layers: Sequence[int], kinds: Sequence[str] = ("attn_out", "mlp_out")) -> list[str]:
    """``blocks.{l}.hook_{kind}`` for every layer and kind."""
    return [hook_name(l, k) for l in layers for k in kinds]


def _stack_left(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    width = max(r.shape[0] for r in rows)
    x = torch.zeros(len(rows), width, rows[0].shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, width - r.shape[0]:] = r
        mask[i, width - r.shape[0]:] = 1
    return x, mask


def fit_scaling(
    model: HookedTransformer,
    items: Sequence[ABItem],
    sites: Sequence[str],
    *,
    direction: int = 1,
    neutral: Sequence[str] = NEUTRAL_PROMPTS,
    steps: int = 20,
    lr: float = 0.05,
    w_kl: float = 1.0,
    w_l1: float = 0.01,
    chat: bool = True,
    positions: PositionSpec = "all",
    store: ActivationStore | None = None,
) -> tuple[ActivationScaling, list[dict]]:
    """Fit one scalar per site (see the module docstring); returns the scaling and the loss history."""
    if not items:
        raise SteeringError("activation scaling needs at least one A/B item")
    if direction not in (1, -1):
        raise SteeringError("direction must be +1 (toward the behaviour) or -1 (away from it)")
    if not sites:
        raise SteeringError("no sites to scale")
    parsed = [_parse_site(model, s) for s in sites]
    l0 = min(hook_layer(model, n) for n, _ in parsed)
    if l0 >= model.cfg.n_layers:
        raise SteeringError("sites must be inside the blocks")
    store = store_for(model, store)
    start = resid_hook(l0)
    ab_texts = [ab_prefix(model, it.question, chat=chat) for it in items]
    nt_texts = [format_prompt(model, p, chat=chat) for p in neutral]
    ab_x, ab_mask = _stack_left([a[start].float() for a in store.get(ab_texts, start)])
    nt_x, nt_mask = (_stack_left([a[start].float() for a in store.get(nt_texts, start)]) if nt_texts else (None, None))
    ids = letter_token_ids(model, sorted({it.matching for it in items} | {it.not_matching for it in items}))
    want = torch.tensor([ids[it.matching if direction > 0 else it.not_matching] for it in items])
    other = torch.tensor([ids[it.not_matching if direction > 0 else it.matching] for it in items])

    def run(x: Tensor, mask: Tensor, alpha: Tensor | None) -> Tensor:
        lay = TokenLayout(prompt_lens=mask.sum(1), pad=(mask.shape[1] - mask.sum(1)))
        scaler = ActivationScaling(list(sites), alpha if alpha is not None else torch.ones(len(sites)), positions)
        hooks = scaler._hooks(model, lay, alpha) if alpha is not None else []
        with model.hooks(fwd_hooks=hooks):
            resid = model(x, start_at_layer=l0, stop_at_layer=model.cfg.n_layers, attention_mask=mask)
        return model.unembed(model.ln_final(resid[:, -1:]))[:, -1]

    with torch.no_grad():
        ref = torch.log_softmax(run(nt_x, nt_mask, None), -1) if nt_x is not None else None
    alpha = torch.ones(len(sites), requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=lr)
    history = []
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for step in range(steps):
            opt.zero_grad()
            logits = run(ab_x, ab_mask, alpha)
            rows = torch.arange(len(items))
            two = torch.stack([logits[rows, want], logits[rows, other]], -1)
            eff = -torch.log_softmax(two, -1)[:, 0].mean()
            kl = torch.zeros(())
            if ref is not None and w_kl > 0:
                lq = torch.log_softmax(run(nt_x, nt_mask, alpha), -1)
                kl = (ref.exp() * (ref - lq)).sum(-1).mean()
            l1 = (alpha - 1).abs().sum()
            loss = eff + w_kl * kl + w_l1 * l1
            loss.backward()
            opt.step()
            history.append({"step": step, "loss": float(loss.detach()), "effectiveness": float(eff.detach()),
                            "kl": float(kl.detach()), "l1": float(l1.detach()),
                            "p_target": float(torch.softmax(two.detach(), -1)[:, 0].mean())})
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    meta = fit_meta(model, "scaling", direction=direction, steps=steps, lr=lr, w_kl=w_kl, w_l1=w_l1, n_items=len(items))
    return ActivationScaling(list(sites), alpha.detach().clone(), positions, meta), history
