"""CAST: conditional activation steering (steer only when the prompt matches a condition).

* The *condition* is a direction at one layer: the mean last-prompt-token activation of prompts that
  should trigger minus that of prompts that should not (read through the activation store).
* The *score* of a prompt is the cosine between its last-prompt-token activation, centred on the
  midpoint of the two class means, and that direction. The threshold is chosen on the fitting
  prompts (the midpoint that maximises balanced accuracy).
* :class:`CAST` adds hooks: at the condition layer it scores the last prompt token of every row and
  sets a per-row flag; at the steering layers it adds the steering vector, only on flagged rows, to
  the last prompt token and every generated token. The decision is taken once per prompt, on the
  prompt alone, so generated text does not switch steering on or off.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from czao_lens.artifacts import register_artifact
from czao_lens.perturb import Intervention, PerturbationHandle, attach_hooks
from czao_lens.prompts import TokenLayout, format_prompt
from czao_lens.steering.common import (
    SteeringArtifact,
    SteeringError,
    check_layers,
    contrastive_activations,
    hook_name,
    store_for,
)
from czao_lens.steering.data import texts_hash
from czao_lens.steering.vectors import SteeringVector
from czao_lens.store import ActivationStore


@dataclass
class Condition:
    """``fires(x) = cos(x - center, direction) >= threshold`` at ``blocks.{layer}.hook_{hook}``, last prompt token."""

    layer: int
    direction: Tensor
    center: Tensor
    threshold: float
    hook: str = "resid_pre"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        d, c = self.direction, self.center
        if not (isinstance(d, Tensor) and isinstance(c, Tensor) and d.is_floating_point() and c.is_floating_point()):
            raise SteeringError("a CAST condition's direction and center must be floating-point tensors")
        if d.ndim != 1 or c.shape != d.shape:
            raise SteeringError(f"a CAST condition needs direction and center of one shape [d], got {tuple(d.shape)} and {tuple(c.shape)}")
        if not (torch.isfinite(d).all() and torch.isfinite(c).all() and math.isfinite(self.threshold)):
            raise SteeringError("a CAST condition's direction, center and threshold must be finite")

    def score_acts(self, acts: Tensor) -> Tensor:
        x = acts.float() - self.center.to(acts.device)
        return torch.nn.functional.cosine_similarity(x, self.direction.to(acts.device)[None].expand_as(x), dim=-1)

    def scores(self, model: HookedTransformer, prompts: Sequence[str], *, chat: bool = True,
               store: ActivationStore | None = None) -> Tensor:
        texts = [format_prompt(model, p, chat=chat) for p in prompts]
        store = store_for(model, store)
        h = hook_name(self.layer, self.hook)
        return self.score_acts(store.last_token(texts, h)[h])

    def fires(self, model: HookedTransformer, prompts: Sequence[str], **kw) -> Tensor:
        return self.scores(model, prompts, **kw) >= self.threshold


def _best_threshold(pos: Tensor, neg: Tensor) -> float:
    vals = torch.cat([pos, neg]).sort().values
    cands = torch.cat([vals[:1] - 1e-3, (vals[1:] + vals[:-1]) / 2, vals[-1:] + 1e-3])
    best, best_t = -1.0, float(cands[0])
    for t in cands.tolist():
        bal = 0.5 * (float((pos >= t).float().mean()) + float((neg < t).float().mean()))
        if bal > best:
            best, best_t = bal, t
    return best_t


def fit_condition(
    model: HookedTransformer,
    trigger: Sequence[str],
    other: Sequence[str],
    layer: int,
    *,
    hook: str = "resid_pre",
    chat: bool = True,
    store: ActivationStore | None = None,
) -> Condition:
    """Condition direction (contrastive mean at the last prompt token) and a balanced-accuracy threshold."""
    if not trigger or not other:
        raise SteeringError("a CAST condition needs prompts that should trigger and prompts that should not")
    (layer,) = check_layers(model, [layer])
    tt = [format_prompt(model, p, chat=chat) for p in trigger]
    ot = [format_prompt(model, p, chat=chat) for p in other]
    P, N = contrastive_activations(model, tt, ot, [layer], hook=hook, store=store, paired=False)
    mp, mn = P[layer].mean(0), N[layer].mean(0)
    d = mp - mn
    if float(d.norm()) <= 1e-6 * float(P[layer].norm(dim=-1).mean()):
        raise SteeringError(f"the condition's mean difference at layer {layer} is zero: the two prompt sets look the same")
    cond = Condition(layer, d / d.norm(), (mp + mn) / 2, 0.0, hook,
                     {"n_trigger": len(trigger), "n_other": len(other), "data_hash": texts_hash(list(trigger) + ["\x00"] + list(other)), "chat": chat})
    cond.threshold = _best_threshold(cond.score_acts(P[layer]), cond.score_acts(N[layer]))
    return cond


def precision_recall(fired: Tensor, should: Tensor) -> dict:
    """Precision, recall, F1 and accuracy of boolean decisions against the truth."""
    fired, should = fired.bool(), should.bool()
    tp = int((fired & should).sum())
    fp = int((fired & ~should).sum())
    fn = int((~fired & should).sum())
    tn = int((~fired & ~should).sum())
    prec = tp / (tp + fp) if tp + fp else float("nan")
    rec = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * prec * rec / (prec + rec) if tp else 0.0
    return {"precision": prec, "recall": rec, "f1": f1, "accuracy": (tp + tn) / max(1, len(fired)),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def evaluate_condition(model: HookedTransformer, cond: Condition, trigger: Sequence[str], other: Sequence[str], **kw) -> dict:
    fired = torch.cat([cond.fires(model, trigger, **kw), cond.fires(model, other, **kw)])
    truth = torch.cat([torch.ones(len(trigger), dtype=torch.bool), torch.zeros(len(other), dtype=torch.bool)])
    return precision_recall(fired, truth)


@register_artifact("cast")
@dataclass
class CAST(Intervention, SteeringArtifact):
    """Steer with ``vector * multiplier`` only on prompts where ``condition`` fires."""

    condition: Condition
    vector: SteeringVector
    multiplier: float = 1.0

    WHAT = "CAST condition and vector"

    def check_model(self, model: HookedTransformer) -> None:
        """Raise if the vector does not fit ``model`` or the condition is read after the steering layers."""
        self.vector.check_model(model)
        check_layers(model, [self.condition.layer])
        if self.condition.direction.shape[0] != model.cfg.d_model:
            raise SteeringError(f"CAST condition has width {self.condition.direction.shape[0]}, the model has d_model {model.cfg.d_model}")
        if not math.isfinite(self.multiplier):
            raise SteeringError(f"CAST multiplier must be finite, got {self.multiplier} (NaN or inf)")
        c = self.condition
        if min(self.vector.layers) < c.layer or (min(self.vector.layers) == c.layer and self.vector.hook != c.hook and self.vector.hook == "resid_pre"):
            raise SteeringError(
                f"CAST steers at layers {self.vector.layers} but decides at layer {c.layer}: the condition must be read at or before the steering layers"
            )

    def attach(self, model: HookedTransformer, layout: TokenLayout | None = None, *, decisions: list | None = None) -> PerturbationHandle:
        """Add the hooks; with ``decisions`` (a list), each forward's per-row decisions are appended to it."""
        self.check_model(model)
        c = self.condition
        flags: dict[str, Tensor] = {}

        def mask(act: Tensor, kind: str) -> Tensor:
            b, n = act.shape[:2]
            lay = layout if layout is not None else TokenLayout.unpadded(b, n)
            m = lay.mask("last_prompt", n) if kind == "last" else (lay.mask("last_prompt", n) | lay.mask("generated", n))
            return m.to(act.device)

        def decide(act: Tensor, hook) -> None:
            m = mask(act, "last")
            if m.any():
                rows = m.any(1)
                x = act[m]  # the last prompt token of each row that has it in this forward
                fired = c.score_acts(x) >= c.threshold
                f = flags.get("fired", torch.zeros(act.shape[0], dtype=torch.bool, device=act.device)).clone()
                f[rows] = fired
                flags["fired"] = f
                if decisions is not None:
                    decisions.append(f.clone())

        def steer_fn(delta: Tensor) -> Callable:
            def steer(act: Tensor, hook) -> Tensor:
                f = flags.get("fired")
                if f is None or not f.any():
                    return act
                m = mask(act, "steer") & f[:, None]
                return act + m[..., None].to(act.dtype) * (self.multiplier * delta).to(act.dtype)

            return steer

        hooks = [(hook_name(c.layer, c.hook), decide)]
        hooks += [(hook_name(l, self.vector.hook), steer_fn(d)) for l, d in sorted(self.vector.directions.items())]
        return attach_hooks(model, hooks)

    # ------------------------------------------------------------------ the artifact layout

    def to_dict(self) -> dict[str, Any]:
        c = self.condition
        return {"multiplier": float(self.multiplier), "vector": self.vector.to_dict(),
                "condition": {"layer": c.layer, "hook": c.hook, "threshold": float(c.threshold), "meta": c.meta}}

    def tensors(self) -> dict[str, Tensor]:
        out = {f"vector.{k}": t for k, t in self.vector.tensors().items()}
        out["condition.direction"] = self.condition.direction
        out["condition.center"] = self.condition.center
        return out

    @classmethod
    def from_dict(cls, params: dict[str, Any], tensors: dict[str, Tensor]) -> "CAST":
        vec = SteeringVector.from_dict(params["vector"], {k.removeprefix("vector."): t for k, t in tensors.items()
                                                          if k.startswith("vector.")})
        c = params["condition"]
        cond = Condition(int(c["layer"]), tensors["condition.direction"], tensors["condition.center"], float(c["threshold"]),
                         c.get("hook", "resid_pre"), dict(c.get("meta", {})))
        return cls(cond, vec, float(params.get("multiplier", 1.0)))

    def saved_model_info(self) -> dict[str, Any]:
        return self.vector.saved_model_info()

    def sites(self) -> list[str]:
        return [hook_name(self.condition.layer, self.condition.hook), *self.vector.sites()]
