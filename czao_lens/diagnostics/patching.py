"""Activation patching on clean / corrupted prompt pairs, through ``transformer_lens.patching``.

One generic routine (TL's ``generic_activation_patch``) plus TL's tiny setters does the work; this
module picks the setter per component, feeds the clean activations from the
:class:`~czao_lens.store.ActivationStore`, restricts the index grid to the requested layers, and
normalises the metric: 0 = corrupted run, 1 = clean run.

Components (``kinds``):

* ``resid_pre``, ``attn_out``, ``mlp_out``: per layer x position;
* ``z``: per layer x position x query head (``hook_z`` is per query head, also under GQA);
* ``z_all``: per layer x query head, all positions at once;
* ``k``/``v``: per layer x **key/value** head, all positions. Under grouped-query attention
  (SmolLM2: 9 query heads share 3 KV heads) ``hook_k``/``hook_v`` have ``n_key_value_heads`` heads;
  indexing them with query-head numbers is the GQA pitfall (TransformerLens issue 980), so their
  grid uses ``n_key_value_heads``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens import patching as tlp

from czao_lens.sites import hook_name
from czao_lens.diagnostics import DiagnosticError, check_layers, write_json
from czao_lens.diagnostics.tracing import Target
from czao_lens.store import ActivationStore

# kind -> (TL activation name, index axes, setter)
KINDS: dict[str, tuple[str, tuple[str, ...], Any]] = {
    "resid_pre": ("resid_pre", ("layer", "pos"), tlp.layer_pos_patch_setter),
    "attn_out": ("attn_out", ("layer", "pos"), tlp.layer_pos_patch_setter),
    "mlp_out": ("mlp_out", ("layer", "pos"), tlp.layer_pos_patch_setter),
    "z": ("z", ("layer", "pos", "head"), tlp.layer_pos_head_vector_patch_setter),
    "z_all": ("z", ("layer", "head"), tlp.layer_head_vector_patch_setter),
    "k": ("k", ("layer", "head"), tlp.layer_head_vector_patch_setter),
    "v": ("v", ("layer", "head"), tlp.layer_head_vector_patch_setter),
}


@dataclass
class PatchingResult:
    """``effects[kind]``: normalised metric per index (axes in ``axes[kind]``); 1 = fully clean."""

    clean_tokens: list[str]
    corrupted_tokens: list[str]
    metric: str
    clean: float
    corrupted: float
    layers: list[int]
    effects: dict[str, Tensor]
    axes: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def layer_scores(self, kind: str = "resid_pre") -> Float[Tensor, "layer"]:
        """Max over the other axes, per layer (a quick 'where does it matter' summary)."""
        e = self.effects[kind]
        return e.reshape(e.shape[0], -1).max(1).values

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean_tokens": self.clean_tokens, "corrupted_tokens": self.corrupted_tokens, "metric": self.metric,
            "clean": self.clean, "corrupted": self.corrupted, "layers": self.layers,
            "axes": {k: list(v) for k, v in self.axes.items()},
            "effects": {k: v.tolist() for k, v in self.effects.items()},
        }

    def save(self, path: str | Path) -> Path:
        return write_json(self.to_dict(), path)


def _n_heads(model: HookedTransformer, act: str) -> int:
    if act in ("k", "v") and model.cfg.n_key_value_heads is not None:
        return model.cfg.n_key_value_heads
    return model.cfg.n_heads


@torch.no_grad()
def activation_patching(
    model: HookedTransformer,
    clean: str | Sequence[int],
    corrupted: str | Sequence[int],
    target: Target,
    *,
    kinds: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
    layers: Sequence[int] | None = None,
    store: ActivationStore | None = None,
) -> PatchingResult:
    """Patch clean activations into the corrupted run, one component index at a time.

    ``clean``/``corrupted`` are texts (or token ids) of the same token length. Clean activations are
    read through the store; each patch is one TL ``run_with_hooks`` on the corrupted tokens.
    """
    cfg = model.cfg
    for k in kinds:
        if k not in KINDS:
            raise DiagnosticError(f"unknown patching kind {k!r}; use one of {list(KINDS)}")
    if not kinds:
        raise DiagnosticError("no patching kinds selected")
    layer_list = check_layers(cfg.n_layers, layers)
    store = store if store is not None else ActivationStore(model)
    c_ids, x_ids = store.tokenize([clean]) [0], store.tokenize([corrupted])[0]
    if len(c_ids) != len(x_ids):
        raise DiagnosticError(
            f"clean and corrupted prompts must have the same number of tokens ({len(c_ids)} vs {len(x_ids)})"
        )
    T = len(c_ids)
    names = sorted({hook_name(l, KINDS[k][0]) for k in kinds for l in layer_list})
    acts = store.get([c_ids], names + ["ln_final.hook_normalized"])[0]
    clean_cache = {n: acts[n][None] for n in names}
    clean_val = float(target(model.unembed(acts["ln_final.hook_normalized"][None, -1:])[:, 0])[0])
    toks = torch.tensor([x_ids], device=cfg.device or "cpu")
    corr_val = float(target(model(toks, attention_mask=torch.ones_like(toks))[:, -1])[0])
    denom = clean_val - corr_val
    if abs(denom) < 1e-8:
        raise DiagnosticError("clean and corrupted prompts give the same metric; nothing to patch")

    def metric(logits: Tensor) -> Tensor:
        return (target(logits[:, -1]) - corr_val) / denom

    effects, axes = {}, {}
    for k in kinds:
        act, ax, setter = KINDS[k]
        ranges = {"layer": layer_list, "pos": list(range(T)), "head": list(range(_n_heads(model, act)))}
        shape = [len(ranges[a]) for a in ax]
        grid = torch.cartesian_prod(*[torch.tensor(ranges[a]) for a in ax]).reshape(-1, len(ax))
        index_df = pd.DataFrame(grid.tolist(), columns=list(ax))
        flat = tlp.generic_activation_patch(model, toks, clean_cache, metric, setter, act, index_df=index_df)
        effects[k] = flat.detach().cpu().reshape(shape)
        axes[k] = ax
    tok = model.tokenizer
    return PatchingResult(
        clean_tokens=[tok.decode([t]) for t in c_ids], corrupted_tokens=[tok.decode([t]) for t in x_ids],
        metric=target.name, clean=clean_val, corrupted=corr_val, layers=layer_list, effects=effects, axes=axes,
    )
