"""Contrastive steering vectors: CAA, ActAdd and PCA, saved in the one artifact layout, with llama.cpp GGUF export.

A :class:`SteeringVector` is a small dataclass: one direction per layer at one kind of hook
(``resid_pre`` by default), the positions it acts on, and metadata. It implements the
:class:`czao_lens.perturb.Intervention` protocol: ``attach(model, layout)`` / ``apply(model, layout)``
add it at its own scale (``vec * 2.0`` is the same vector twice as strong) as
:class:`czao_lens.perturb.Perturbation`\ s, so positions stay correct during KV-cached generation.

* **CAA** (Rimsky et al.): the mean over A/B pairs of activation(prompt + "(" + matching letter) minus
  activation(prompt + "(" + other letter), read at the answer-letter token (the last token).
* **ActAdd**: the same difference for a single prompt pair.
* **PCA**: the first principal component of the paired differences (uncentred by default, so the
  shared shift stays in; ``center=True`` for the textbook centred PCA), its sign aligned with the mean difference and its norm set to the norm of the mean difference
  projected on it, so multipliers are comparable with CAA.

All activations are read through :class:`czao_lens.store.ActivationStore` (pass ``store=`` to share
one between calls; otherwise each call makes its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from czao_lens.artifacts import register_artifact
from czao_lens.perturb import Intervention, Perturbation, PerturbationHandle, attach
from czao_lens.prompts import PositionSpec, TokenLayout, check_positions
from czao_lens.steering.common import (  # noqa: F401  (re-exported: the historical home of these names)
    HOOK_KINDS,
    Pooled,
    SteeringArtifact,
    SteeringArtifactError,
    SteeringError,
    ab_pair_texts,
    ab_prefix,
    answer_pair_texts,
    check_layers,
    contrastive_activations,
    fit_meta,
    hook_name,
    item_activations,
    meta_model_info,
    nonzero,
)
from czao_lens.steering.data import ABItem, items_hash, texts_hash
from czao_lens.store import ActivationStore


# ----------------------------------------------------------------------------- the dataclass


@register_artifact("steering_vector")
@dataclass
class SteeringVector(Intervention, SteeringArtifact):
    """One direction per layer at ``blocks.{layer}.hook_{hook}``, added at ``positions``; ``vec * k`` scales it."""

    directions: dict[int, Tensor]
    hook: str = "resid_pre"
    meta: dict = field(default_factory=dict)
    positions: PositionSpec = "all"

    WHAT = "steering vector"

    def __post_init__(self) -> None:
        if self.hook not in HOOK_KINDS:
            raise SteeringError(f"hook must be one of {HOOK_KINDS}, got {self.hook!r}")
        if not self.directions:
            raise SteeringError("a steering vector needs at least one layer")
        self.directions = {int(k): v.detach().float().reshape(-1) for k, v in self.directions.items()}
        widths = {v.shape[0] for v in self.directions.values()}
        if len(widths) != 1:
            raise SteeringError(f"directions have different widths {sorted(widths)}")
        self.positions = check_positions(self.positions)

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    @property
    def d_model(self) -> int:
        return next(iter(self.directions.values())).shape[0]

    def check_model(self, model: HookedTransformer) -> None:
        """Raise if the vector's width or layers do not fit ``model``."""
        if self.d_model != model.cfg.d_model:
            raise SteeringError(f"steering vector has width {self.d_model}, the model has d_model {model.cfg.d_model}")
        check_layers(model, self.layers)
        for l, d in sorted(self.directions.items()):  # wrappers (CAST) add the direction themselves: check here
            if not torch.isfinite(d).all():
                raise SteeringError(f"steering vector direction at layer {l} contains NaN or inf")

    def to_perturbations(self, scale: float = 1.0, positions: PositionSpec | None = None) -> list[Perturbation]:
        """One :class:`Perturbation` per layer (``scale`` times the direction; default positions: the vector's)."""
        pos = self.positions if positions is None else positions
        return [Perturbation(hook_name(l, self.hook), d, pos, float(scale)) for l, d in sorted(self.directions.items())]

    def attach(self, model: HookedTransformer, layout: TokenLayout | None = None) -> PerturbationHandle:
        """Add the hooks and return a handle (``handle.remove()`` or ``with handle:``); ``apply`` is the
        context-manager form."""
        self.check_model(model)
        return attach(model, self.to_perturbations(), layout)

    def with_positions(self, positions: PositionSpec) -> "SteeringVector":
        """The same vector acting on other positions (``"all"``, ``"prompt"``, ``"last_prompt"``, ``"generated"``, indices)."""
        return SteeringVector(dict(self.directions), self.hook, dict(self.meta), positions)

    def __add__(self, other: "SteeringVector") -> "SteeringVector":
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if other.hook != self.hook:
            raise SteeringError(f"cannot add vectors at different hooks ({self.hook} vs {other.hook}); apply both instead")
        if other.d_model != self.d_model:
            raise SteeringError(f"cannot add vectors of widths {self.d_model} and {other.d_model}")
        if other.positions != self.positions:
            raise SteeringError(f"cannot add vectors acting on different positions ({self.positions} vs {other.positions}); apply both instead")
        dirs = {l: d.clone() for l, d in self.directions.items()}
        for l, d in other.directions.items():
            dirs[l] = dirs[l] + d if l in dirs else d.clone()
        meta = {**self.meta, "method": "sum", "parts": [self.meta.get("method"), other.meta.get("method")]}
        return SteeringVector(dirs, self.hook, meta, self.positions)

    def __mul__(self, k: float) -> "SteeringVector":
        return SteeringVector({l: d * float(k) for l, d in self.directions.items()}, self.hook, dict(self.meta), self.positions)

    __rmul__ = __mul__

    def normalized(self) -> "SteeringVector":
        return SteeringVector({l: d / d.norm().clamp_min(1e-12) for l, d in self.directions.items()}, self.hook,
                              dict(self.meta), self.positions)

    # ------------------------------------------------------------------ the artifact layout

    def to_dict(self) -> dict[str, Any]:
        pos = self.positions if isinstance(self.positions, str) else [int(p) for p in self.positions]
        return {"hook": self.hook, "layers": self.layers, "positions": pos, "meta": self.meta}

    def tensors(self) -> dict[str, Tensor]:
        return {f"layer.{l}": d for l, d in self.directions.items()}

    @classmethod
    def from_dict(cls, params: dict[str, Any], tensors: dict[str, Tensor]) -> "SteeringVector":
        dirs = {int(k.split(".", 1)[1]): t for k, t in tensors.items() if k.startswith("layer.")}
        if sorted(dirs) != sorted(int(l) for l in params["layers"]):
            raise SteeringArtifactError(f"saved layers {params['layers']} do not match the tensors {sorted(dirs)}")
        return cls(dirs, params["hook"], dict(params.get("meta", {})), params.get("positions", "all"))

    def saved_model_info(self) -> dict[str, Any]:
        return meta_model_info(self.meta, self.d_model)

    def sites(self) -> list[str]:
        return [hook_name(l, self.hook) for l in self.layers]

    # ------------------------------------------------------------------ llama.cpp control vectors

    def to_gguf(self, path: str | Path, *, model_hint: str | None = None, n_layers: int | None = None) -> Path:
        """Write a llama.cpp control vector (arch ``controlvector``).

        llama.cpp adds tensor ``direction.k`` to the output of its block ``k`` (0-based; ``k = 0`` is
        rejected), i.e. to TL's ``blocks.k.hook_resid_post`` = ``blocks.(k+1).hook_resid_pre``. A
        ``resid_pre`` vector at TL layer ``l`` is therefore written as ``direction.(l-1)``.
        """
        import gguf
        import numpy as np

        out = {}
        for l, d in self.directions.items():
            k = _gguf_index(l, self.hook)
            out[k] = out.get(k, 0) + d.numpy().astype(np.float32)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        w = gguf.GGUFWriter(str(path), "controlvector")
        w.add_string("controlvector.model_hint", model_hint or str(self.meta.get("model_name", "unknown")))
        w.add_uint32("controlvector.layer_count", int(n_layers or self.meta.get("n_layers") or max(out) + 1))
        for k in sorted(out):
            w.add_tensor(f"direction.{k}", out[k])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    @classmethod
    def from_gguf(cls, path: str | Path, *, hook: str = "resid_post", model: HookedTransformer | None = None) -> "SteeringVector":
        """Read a llama.cpp control vector back (``direction.k`` -> ``blocks.k`` resid_post, or resid_pre k+1)."""
        import gguf

        path = Path(path)
        if not path.exists():
            raise SteeringError(f"no GGUF control vector at {path}")
        try:  # a numpy memmap reader: nothing in the file is executed or unpickled
            r = gguf.GGUFReader(str(path))
            arch = _gguf_str(r, "general.architecture")
        except Exception as exc:  # gguf raises ValueError, KeyError, struct errors... on a malformed file
            raise SteeringError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        if arch != "controlvector":
            raise SteeringError(f"{path} is a GGUF of architecture {arch!r}, not a control vector")
        dirs: dict[int, Tensor] = {}
        for t in r.tensors:
            if not t.name.startswith("direction."):
                continue
            try:
                k = int(t.name.split(".", 1)[1])
            except ValueError:
                raise SteeringError(f"{path}: tensor {t.name!r} is not named direction.<layer>") from None
            if k < 1:
                raise SteeringError(f"{path}: direction.{k} is not a valid llama.cpp layer index (they start at 1)")
            l = k if hook == "resid_post" else k + 1 if hook == "resid_pre" else None
            if l is None:
                raise SteeringError("GGUF control vectors live on the residual stream: use hook resid_post or resid_pre")
            try:
                dirs[l] = torch.tensor(t.data.copy()).float().reshape(-1)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise SteeringError(f"{path}: tensor {t.name!r} is not a float vector ({exc})") from None
            if not torch.isfinite(dirs[l]).all():
                raise SteeringError(f"{path}: tensor {t.name!r} contains NaN or inf")
        if not dirs:
            raise SteeringError(f"{path} holds no direction.* tensors")
        try:
            hint = _gguf_str(r, "controlvector.model_hint")
        except (UnicodeDecodeError, IndexError, ValueError):
            hint = None  # an unreadable hint is only metadata
        meta = {"method": "gguf", "model_hint": hint, "source": str(path)}
        vec = cls(dirs, hook, meta)
        if model is not None:
            vec.check_model(model)
        return vec


def _gguf_index(layer: int, hook: str) -> int:
    if hook == "resid_post":
        k = layer
    elif hook == "resid_pre":
        k = layer - 1
    else:
        raise SteeringError(f"llama.cpp control vectors act on the residual stream; a {hook} vector cannot be exported")
    if k < 1:
        raise SteeringError(
            f"TL {hook} layer {layer} would be llama.cpp direction.{k}; llama.cpp cannot steer the embeddings or block 0's output"
        )
    return k


def _gguf_str(reader, key: str) -> str | None:
    f = reader.fields.get(key)
    if f is None:
        return None
    return bytes(f.parts[f.data[0]]).decode()


def _meta(model: HookedTransformer, method: str, layers: Sequence[int], hook: str, data_hash: str, **extra) -> dict:
    return fit_meta(model, method, layers=list(layers), hook=hook, data_hash=data_hash, **extra)


def vector_from_pooled(model: HookedTransformer, acts: Pooled, layers: Sequence[int], hook: str, method: str,
                       data_hash: str, **extra) -> SteeringVector:
    """The mean-difference vector of pooled activations (CAA's rule for any way of pooling)."""
    dirs = {l: nonzero(acts.mean_difference(l), l, f"the {method.upper()} mean difference", acts.pos[l]) for l in layers}
    return SteeringVector(dirs, hook, _meta(model, method, layers, hook, data_hash, **extra))


def pca_from_pooled(model: HookedTransformer, acts: Pooled, layers: Sequence[int], hook: str, data_hash: str, *,
                    center: bool = False, **extra) -> SteeringVector:
    """First principal component of paired differences, sign-aligned with (and scaled to) the mean difference."""
    if not acts.paired:
        raise SteeringError("PCA needs paired examples (row i of the positives and negatives from the same question)")
    dirs, explained = {}, {}
    for l in layers:
        diff = acts.pos[l] - acts.neg[l]
        mean = nonzero(diff.mean(0), l, "the mean paired difference", acts.pos[l])
        # Uncentred by default: the mean direction is the signal, so keep it in.
        _, s, vh = torch.linalg.svd(diff - diff.mean(0) if center else diff, full_matrices=False)
        pc = vh[0]
        if float(pc @ mean) < 0:
            pc = -pc
        dirs[l] = pc * float(pc @ mean)
        explained[l] = float(s[0] ** 2 / (s**2).sum())
    return SteeringVector(dirs, hook, _meta(model, "pca", layers, hook, data_hash, center=center, **extra,
                                            explained_variance=explained))


# ----------------------------------------------------------------------------- methods


def caa_vector(
    model: HookedTransformer,
    items: Sequence[ABItem],
    layers: Sequence[int],
    *,
    hook: str = "resid_pre",
    chat: bool = True,
    readout: str = "letter",
    store: ActivationStore | None = None,
) -> SteeringVector:
    """Contrastive activation addition: mean over pairs of (matching - non-matching) at the answer letter
    (``readout="answer"``: averaged over the tokens of the answer text instead, see :func:`item_activations`)."""
    if not items:
        raise SteeringError("CAA needs at least one A/B pair; got none")
    layers = check_layers(model, layers)
    P, N = item_activations(model, items, layers, hook=hook, readout=readout, chat=chat, store=store)
    return vector_from_pooled(model, Pooled(P, N, paired=True), layers, hook, "caa", items_hash(items),
                              n_pairs=len(items), chat=chat, readout=readout)


def actadd_vector(
    model: HookedTransformer,
    positive: str,
    negative: str,
    layers: Sequence[int],
    *,
    hook: str = "resid_pre",
    position: int = -1,
    store: ActivationStore | None = None,
) -> SteeringVector:
    """ActAdd: activation(positive) - activation(negative) at one token (default: the last)."""
    layers = check_layers(model, layers)
    P, N = contrastive_activations(model, [positive], [negative], layers, hook=hook, position=position, store=store)
    dirs = {l: nonzero(P[l][0] - N[l][0], l, "the ActAdd difference", P[l]) for l in layers}
    return SteeringVector(dirs, hook, _meta(model, "actadd", layers, hook, texts_hash([positive, negative]), position=position))


def pca_vector(
    model: HookedTransformer,
    items: Sequence[ABItem],
    layers: Sequence[int],
    *,
    hook: str = "resid_pre",
    chat: bool = True,
    center: bool = False,
    readout: str = "letter",
    store: ActivationStore | None = None,
) -> SteeringVector:
    """First principal component of the paired differences, sign-aligned with (and scaled to) the mean difference."""
    if len(items) < 2:
        raise SteeringError(f"PCA needs at least two A/B pairs; got {len(items)}")
    layers = check_layers(model, layers)
    P, N = item_activations(model, items, layers, hook=hook, readout=readout, chat=chat, store=store)
    return pca_from_pooled(model, Pooled(P, N, paired=True), layers, hook, items_hash(items), center=center,
                           n_pairs=len(items), chat=chat, readout=readout)


def compose(*vectors: SteeringVector, multipliers: Sequence[float] | None = None,
            positions: PositionSpec | None = None) -> list[Perturbation]:
    """Perturbations for applying several vectors at once (different hooks allowed); ``positions``
    overrides the vectors' own."""
    if not vectors:
        raise SteeringError("compose() needs at least one vector")
    multipliers = list(multipliers) if multipliers is not None else [1.0] * len(vectors)
    if len(multipliers) != len(vectors):
        raise SteeringError("one multiplier per vector")
    out: list[Perturbation] = []
    for v, m in zip(vectors, multipliers):
        out += v.to_perturbations(m, positions)
    return out
