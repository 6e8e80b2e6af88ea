"""Loss landscapes of CZAO's objective per layer: where steering is easy and where it is chaotic.

For one prompt and one constraint, at the first generated token, evaluate
L(z) = V + lambda |z|^2 + beta max(0, KL - eps) on a 2-D grid spanned by the first two basis
directions of each layer (each layer alone, so panels are comparable), as batched candidate
passes. Also a 1-D slice along the perturbation CZAO finds at that layer. Roughness per layer is the
mean gradient norm of the grid and its total variation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from czao_lens.constraints import Constraint
from czao_lens.czao import CZAOConfig, CZAOController, build_subspace
from czao_lens.diagnostics import DiagnosticError, check_layers
from czao_lens.generate import DecodeStep, generate_tokens
from czao_lens.prompts import encode_prompts
from czao_lens.store import ActivationStore

COMPONENTS = ("loss", "violation", "kl")


@dataclass
class Landscape:
    """Grids ``{layer: {component: [n, n]}}`` over coefficients (a, b) of basis directions 1 and 2."""

    prompt: str
    constraint: str
    axis: list[float]
    grids: dict[int, dict[str, np.ndarray]]
    slice_t: list[float]
    slices: dict[int, dict[str, list[float]]]  # along CZAO's z* at that layer (empty if none found)
    z_star_norm: dict[int, float | None]
    roughness: dict[int, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt, "constraint": self.constraint, "axis": self.axis,
            "slice_t": self.slice_t, "slices": {str(k): v for k, v in self.slices.items()},
            "z_star_norm": {str(k): v for k, v in self.z_star_norm.items()},
            "roughness": {str(k): v for k, v in self.roughness.items()},
        }

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Write landscape.json, the raw grids as landscape.safetensors and landscape.html."""
        from safetensors.torch import save_file

        from czao_lens.plots import landscape_figure, save_figure

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"layer{l}.{c}": torch.from_numpy(np.ascontiguousarray(g[c], dtype=np.float32))
                   for l, g in self.grids.items() for c in COMPONENTS}
        tensors["axis"] = torch.tensor(self.axis, dtype=torch.float32)
        save_file(tensors, str(folder / "landscape.safetensors"))
        (folder / "landscape.json").write_text(json.dumps(self.to_dict(), indent=1))
        html = save_figure(landscape_figure(self), folder / "landscape.html")
        return {"json": folder / "landscape.json", "grids": folder / "landscape.safetensors", "html": html}


def roughness(grid: np.ndarray, spacing: float) -> dict[str, float]:
    """Mean gradient norm and total variation (per unit area) of a 2-D grid."""
    gy, gx = np.gradient(grid, spacing)
    tv = (np.abs(np.diff(grid, axis=0)).sum() + np.abs(np.diff(grid, axis=1)).sum()) / grid.size
    return {"mean_grad_norm": float(np.sqrt(gx**2 + gy**2).mean()), "total_variation": float(tv)}


class _GridProbe:
    """Controller that evaluates the grid and the slice at the first token, then steps aside."""

    def __init__(self, ctl: CZAOController, axis: Tensor, t: Tensor, batch: int):
        self.ctl, self.axis, self.t, self.batch = ctl, axis, t, batch
        self.start_layer, self.read_hooks = ctl.start_layer, ()
        self.grid: dict[str, np.ndarray] = {}
        self.slice: dict[str, list[float]] = {}
        self.z_star_norm: float | None = None

    def _score(self, step: DecodeStep, Z: Tensor) -> dict[str, Tensor]:
        """Loss, violation and KL of every row of Z, in candidate batches of ``self.batch``."""
        out = {c: [] for c in COMPONENTS}
        for s in range(0, Z.shape[0], self.batch):
            ev = self.ctl.score(step, Z[s : s + self.batch])
            out["loss"].append(ev.loss)
            out["violation"].append(ev.v)
            out["kl"].append(ev.kl)
        return {c: torch.cat(v) for c, v in out.items()}

    def __call__(self, step: DecodeStep):
        dim, n = self.ctl.subspace.dim, len(self.axis)
        a, b = torch.meshgrid(self.axis, self.axis, indexing="ij")
        Z = torch.zeros(n * n, dim)
        Z[:, 0], Z[:, 1] = a.reshape(-1), b.reshape(-1)
        scores = self._score(step, Z)
        self.grid = {c: v.reshape(n, n).numpy() for c, v in scores.items()}
        best = self.ctl.search(step)
        if best.feasible:
            self.z_star_norm = float(best.z.norm())
            along = self._score(step, self.t[:, None] * best.z[None])
            self.slice = {c: v.tolist() for c, v in along.items()}
        return None


def loss_landscape(
    model: HookedTransformer,
    prompt: str,
    constraint: Constraint,
    layers: Sequence[int],
    *,
    config: CZAOConfig | None = None,
    extent: float = 1.0,
    n: int = 21,
    chat: bool = False,
    batch: int = 128,
    store: ActivationStore | None = None,
    progress: bool = False,
) -> Landscape:
    """Evaluate CZAO's objective on an n x n grid in [-extent, extent]^2 per layer, plus a slice."""
    if n < 3:
        raise DiagnosticError("the grid needs n >= 3 points per axis")
    if not extent > 0:
        raise DiagnosticError("extent must be positive")
    layers = check_layers(model.cfg.n_layers, layers)
    config = config or CZAOConfig()
    store = store or ActivationStore(model)
    axis = torch.linspace(-extent, extent, n)
    t = torch.linspace(0, 1.5, 16)
    enc = encode_prompts(model, prompt, chat=chat)  # once: the store and the loop share the tokens
    ids = enc.tokens[0].tolist()
    grids, slices, norms, rough = {}, {}, {}, {}
    from tqdm.auto import tqdm

    for l in tqdm(layers, desc="landscape", disable=not progress):
        cfg = replace(config, layers=(l,), rank=max(config.rank, 2))
        sub = build_subspace(model, ids, cfg, store=store)
        probe = _GridProbe(CZAOController(model, constraint, sub, cfg, prompt_text=prompt), axis, t, batch)
        generate_tokens(model, enc, [prompt], max_new_tokens=1, controller=probe, config={"chat": chat})
        grids[l], slices[l], norms[l] = probe.grid, probe.slice, probe.z_star_norm
        rough[l] = roughness(probe.grid["loss"], float(axis[1] - axis[0]))
    return Landscape(prompt, constraint.describe(), axis.tolist(), grids, t.tolist(), slices, norms, rough)
