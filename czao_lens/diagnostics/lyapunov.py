"""Lyapunov sensitivity of the residual stream: how much a small push at one layer grows.

Three estimates, all at the last prompt position with the clean context fixed (a push at the last
position cannot reach earlier positions, so this is exactly the block's last-position map):

* :func:`fd_growth` - finite differences: add a small random delta at ``l0``, run one block at a
  time, log(|delta_{l+1}| / |delta_l|) per layer, renormalising the delta to a fixed relative size
  after every block; averaged over directions and prompts. The mean over layers estimates the
  maximal exponent (renormalised growth aligns with the most expanding direction).
* :func:`jacobian_top_singular` - the largest singular value of each block's last-position Jacobian
  by power iteration on J^T J with ``torch.func.jvp`` / ``torch.func.vjp``.
* :func:`lyapunov_spectrum` - top-k spectrum over a layer range by JVPs and repeated QR (Benettin).

Clean states come from the :class:`~czao_lens.store.ActivationStore`. Jacobians need autograd
through the model: load it with ``load_model(..., fast=False)`` if the runtime refuses
``torch.func`` transforms (the runtime falls back to stock TL for functorch-transformed inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from czao_lens.sites import resid_hook
from czao_lens.diagnostics import DiagnosticError, check_layers, write_json
from czao_lens.store import ActivationStore


@dataclass
class LyapunovResult:
    """Per-layer curves (index = block l: growth from resid_pre[l] to resid_pre[l+1])."""

    model: str
    layers: list[int]
    curves: dict[str, list[float]]  # name -> value per entry of `layers`
    summary: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "layers": self.layers, "curves": self.curves, "summary": self.summary,
                "meta": self.meta}

    def save(self, path: str | Path) -> Path:
        return write_json(self.to_dict(), path)


def _resid_hooks(model: HookedTransformer, layers: Sequence[int]) -> list[str]:
    L = model.cfg.n_layers
    names = [resid_hook(l) for l in layers]
    names += [resid_hook(l, "post") for l in layers if l == L - 1]
    return names


def _state_after(l: int, L: int) -> str:
    return resid_hook(l + 1) if l + 1 < L else resid_hook(l, "post")


def _block_last(model: HookedTransformer, l: int, context: Tensor, x: Tensor) -> Tensor:
    """Block l applied to ``context`` [pos, d] whose last row is replaced by each row of ``x`` [n, d]."""
    n = x.shape[0]
    resid = torch.cat([context[None, :-1].expand(n, -1, -1), x[:, None, :]], 1)
    out = model(resid, start_at_layer=l, stop_at_layer=l + 1,
                attention_mask=torch.ones(n, resid.shape[1], dtype=torch.long, device=resid.device))
    return out[:, -1]


def _prompt_ids(store: ActivationStore, prompts) -> list[list[int]]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise DiagnosticError("empty prompt set: Lyapunov growth needs at least one prompt")
    rows = store.tokenize(prompts)
    if any(len(r) < 2 for r in rows):
        raise DiagnosticError("every prompt needs at least two tokens (position 0 is the attention sink)")
    return rows


@torch.no_grad()
def fd_growth(
    model: HookedTransformer,
    prompts: str | Sequence[str],
    *,
    l0: int = 0,
    l1: int | None = None,
    n_dirs: int = 8,
    rel_eps: float = 1e-3,
    seed: int = 0,
    store: ActivationStore | None = None,
    progress: bool = False,
) -> LyapunovResult:
    """Finite-difference growth per block from ``l0`` to ``l1`` (exclusive), with renormalisation."""
    L = model.cfg.n_layers
    check_layers(L, [l0])
    l1 = L if l1 is None else l1
    layers = check_layers(L, list(range(l0, l1)))
    store = store if store is not None else ActivationStore(model)
    rows = _prompt_ids(store, prompts)
    acts = store.get(rows, _resid_hooks(model, range(L)))
    g = torch.Generator().manual_seed(seed)
    logs = torch.zeros(len(rows), n_dirs, len(layers))
    for i, a in enumerate(tqdm(acts, desc="FD growth", disable=not progress)):
        delta = torch.randn(n_dirs, model.cfg.d_model, generator=g)
        for j, l in enumerate(layers):
            ctx = a[resid_hook(l)]
            eps = rel_eps * ctx[-1].norm()
            delta = delta / delta.norm(dim=-1, keepdim=True) * eps
            out = _block_last(model, l, ctx, ctx[-1] + delta)
            delta = out - a[_state_after(l, L)][-1]
            logs[i, :, j] = torch.log(delta.norm(dim=-1) / eps)
    mean = logs.mean((0, 1))
    return LyapunovResult(
        model=model.cfg.model_name, layers=layers,
        curves={"fd_log_growth": mean.tolist(), "fd_log_growth_std": logs.std((0, 1)).tolist()},
        summary={"fd_max_exponent": float(mean.mean())},
        meta={"l0": l0, "n_dirs": n_dirs, "rel_eps": rel_eps, "seed": seed, "n_prompts": len(rows)},
    )


def _linear_maps(model, l, ctx):
    """JVP and VJP of block l's last-position map at the clean point."""
    x0 = ctx[-1].detach()

    def f(x):
        return _block_last(model, l, ctx.detach(), x[None])[0]

    def jvp(v):
        return torch.func.jvp(f, (x0,), (v,))[1]

    def vjp(u):
        return torch.func.vjp(f, x0)[1](u)[0]

    return jvp, vjp


def jacobian_top_singular(
    model: HookedTransformer,
    prompts: str | Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    n_iter: int = 12,
    seed: int = 0,
    store: ActivationStore | None = None,
    progress: bool = False,
) -> LyapunovResult:
    """Largest singular value of each block's last-position Jacobian (power iteration, JVP + VJP),
    plus a finite-difference check along the found top direction (``fd_along_top``)."""
    L = model.cfg.n_layers
    layer_list = check_layers(L, layers)
    store = store if store is not None else ActivationStore(model)
    rows = _prompt_ids(store, prompts)
    acts = store.get(rows, _resid_hooks(model, range(L)))
    g = torch.Generator().manual_seed(seed)
    sig = torch.zeros(len(rows), len(layer_list))
    fd = torch.zeros(len(rows), len(layer_list))
    for i, a in enumerate(acts):
        for j, l in enumerate(tqdm(layer_list, desc="power iteration", disable=not progress)):
            ctx = a[resid_hook(l)]
            jvp, vjp = _linear_maps(model, l, ctx)
            v = torch.randn(model.cfg.d_model, generator=g)
            v = v / v.norm()
            s = 0.0
            for _ in range(n_iter):
                u = jvp(v)
                s = float(u.detach().norm())
                w = vjp(u / max(s, 1e-30))
                v = (w / w.norm()).detach()
            sig[i, j] = float(jvp(v).detach().norm())
            with torch.no_grad():
                eps = 1e-3 * ctx[-1].norm()
                y = _block_last(model, l, ctx, torch.stack([ctx[-1] + eps * v, ctx[-1] - eps * v]))
                fd[i, j] = float((y[0] - y[1]).norm() / (2 * eps))
    return LyapunovResult(
        model=model.cfg.model_name, layers=layer_list,
        curves={"log_sigma_max": sig.log().mean(0).tolist(), "log_fd_along_top": fd.log().mean(0).tolist()},
        summary={"mean_log_sigma_max": float(sig.log().mean()),
                 "max_rel_diff_fd_vs_jvp": float(((fd - sig).abs() / sig).max())},
        meta={"n_iter": n_iter, "seed": seed, "n_prompts": len(rows)},
    )


def lyapunov_spectrum(
    model: HookedTransformer,
    prompts: str | Sequence[str],
    *,
    l0: int = 0,
    l1: int | None = None,
    k: int = 4,
    seed: int = 0,
    store: ActivationStore | None = None,
    progress: bool = False,
) -> LyapunovResult:
    """Top-k Lyapunov spectrum over blocks ``l0..l1-1`` by JVPs and QR (Benettin), per prompt then
    averaged. ``exponents`` are the mean log stretch per layer; curves hold log|R_ii| per layer."""
    L = model.cfg.n_layers
    check_layers(L, [l0])
    l1 = L if l1 is None else l1
    layers = check_layers(L, list(range(l0, l1)))
    if not 1 <= k <= model.cfg.d_model:
        raise DiagnosticError(f"k must be in 1..{model.cfg.d_model}, got {k}")
    store = store if store is not None else ActivationStore(model)
    rows = _prompt_ids(store, prompts)
    acts = store.get(rows, _resid_hooks(model, range(L)))
    g = torch.Generator().manual_seed(seed)
    logr = torch.zeros(len(rows), len(layers), k)
    for i, a in enumerate(acts):
        q, _ = torch.linalg.qr(torch.randn(model.cfg.d_model, k, generator=g))
        for j, l in enumerate(tqdm(layers, desc="Benettin QR", disable=not progress)):
            jvp, _ = _linear_maps(model, l, a[resid_hook(l)])
            w = torch.stack([jvp(q[:, c]).detach() for c in range(k)], 1)
            q, r = torch.linalg.qr(w)
            logr[i, j] = r.diagonal().abs().log()
    per_layer = logr.mean(0)
    exps = per_layer.mean(0)
    return LyapunovResult(
        model=model.cfg.model_name, layers=layers,
        curves={f"log_r_{c}": per_layer[:, c].tolist() for c in range(k)},
        summary={**{f"lambda_{c}": float(exps[c]) for c in range(k)}},
        meta={"k": k, "seed": seed, "n_prompts": len(rows)},
    )
