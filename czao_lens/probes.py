"""Value probes: from one position's activations, the chance that the *finished* continuation violates
a sequence-level constraint (a FUDGE-style value, not the score of the prefix so far).

A probe is trained once per (model, constraint, hook) from rollouts of the unsteered model and of
randomly perturbed runs on a prompt corpus, each labelled by the constraint's real evaluator on the
completed text; every generated position of a rollout is one example with its rollout's label. It is
a logistic regression on standardised activations, saved in the package's one layout
(:mod:`czao_lens.artifacts`) and found again by :func:`probe_path` / :func:`find_probe`.

CZAO uses it two ways: screening (a token is optimised only when the base forward's predicted
violation crosses the calibrated ``threshold``) and scoring candidates from the activations their
batched forward already computes, with no lookahead rollout and no evaluator call per candidate.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from czao_lens.artifacts import Artifact, check_model, model_info, register_artifact
from czao_lens.constraints import Constraint, Context, split_conjunction
from czao_lens.errors import CzaoLensError
from czao_lens.generate import DecodeStep, generate
from czao_lens.paths import cache_root
from czao_lens.perturb import Perturbation
from czao_lens.prompts import encode_prompts
from czao_lens.sites import check_layers, resid_hook
from czao_lens.store import ActivationStore

RECIPE_VERSION = 1


class ProbeError(CzaoLensError, ValueError):
    """A probe that cannot be trained or used: token-level constraint, no examples, wrong constraint or model."""


def default_probe_hook(model: HookedTransformer) -> str:
    """The residual leaving the last block: every candidate forward computes it anyway."""
    return resid_hook(model.cfg.n_layers - 1, "post")


def spec_key(spec: dict[str, Any]) -> str:
    """A stable id of a constraint spec (type and parameters)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


@register_artifact("value_probe")
@dataclass
class ValueProbe(Artifact):
    """p(violation of the finished text | activation at ``hook``), a calibrated logistic regression."""

    hook: str
    constraint: dict[str, Any]  # the spec it was trained for
    weight: Float[Tensor, "d"]
    bias: float
    mean: Float[Tensor, "d"]
    std: Float[Tensor, "d"]
    threshold: float  # screening: optimise only at or above this predicted violation
    model: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # Per layer, the residual (resid_pre) of satisfying rollouts minus that of violating ones: a
    # contrastive steering direction that seeds CZAO's search (:mod:`czao_lens.seeds`).
    directions: Float[Tensor, "n_layers d"] | None = None

    def __post_init__(self) -> None:
        d = self.weight.shape[-1]
        if self.weight.ndim != 1 or self.mean.shape != (d,) or self.std.shape != (d,):
            raise ProbeError(f"probe tensors disagree: weight {tuple(self.weight.shape)}, mean {tuple(self.mean.shape)}, std {tuple(self.std.shape)}")
        if self.directions is not None and (self.directions.ndim != 2 or self.directions.shape[1] != d
                                            or not torch.isfinite(self.directions).all()):
            raise ProbeError(f"probe directions must be finite [n_layers, {d}], got {tuple(self.directions.shape)}")
        if not (math.isfinite(self.bias) and 0.0 <= self.threshold <= 1.0):
            raise ProbeError(f"probe bias must be finite and threshold in [0, 1], got {self.bias}, {self.threshold}")

    def logit(self, acts: Float[Tensor, "*n d"]) -> Float[Tensor, "*n"]:
        x = (acts.float() - self.mean) / self.std
        return x @ self.weight + self.bias

    def predict(self, acts: Float[Tensor, "*n d"]) -> Float[Tensor, "*n"]:
        """Predicted probability that the finished text violates the constraint."""
        return torch.sigmoid(self.logit(acts))

    def check(self, model: HookedTransformer, constraint: Constraint) -> None:
        """Refuse use with another model or another constraint spec."""
        check_model(self.model, model, "value probe")
        if spec_key(self.constraint) != spec_key(constraint.to_dict()):
            raise ProbeError(f"this probe was trained for {self.constraint}, not {constraint.to_dict()}")

    # -- the one save layout
    def to_dict(self) -> dict[str, Any]:
        return {"hook": self.hook, "constraint": self.constraint, "bias": self.bias, "threshold": self.threshold,
                "metrics": self.metrics, "recipe_version": RECIPE_VERSION}

    def tensors(self) -> dict[str, Tensor]:
        extra = {} if self.directions is None else {"directions": self.directions}
        return {"weight": self.weight, "mean": self.mean, "std": self.std, **extra}

    def saved_model_info(self) -> dict[str, Any]:
        return self.model

    def sites(self) -> list[str]:
        return [self.hook]

    def restore_saved(self, model: dict[str, Any], sites: list[str]) -> None:
        self.model = dict(model)

    @classmethod
    def from_dict(cls, params: dict[str, Any], tensors: dict[str, Tensor]) -> "ValueProbe":
        missing = {"weight", "mean", "std"} - set(tensors)
        if missing:
            raise ProbeError(f"probe file lacks tensors {sorted(missing)}")
        return cls(str(params["hook"]), dict(params["constraint"]), tensors["weight"].float(), float(params["bias"]),
                   tensors["mean"].float(), tensors["std"].float(), float(params["threshold"]),
                   metrics=dict(params.get("metrics", {})),
                   directions=tensors["directions"].float() if "directions" in tensors else None)


# ----------------------------------------------------------------------------- training data


@dataclass
class Rollouts:
    """Activations at every generated position of rollouts, with each position's rollout and prompt.

    Rollouts do not depend on the constraint: collect once, then :meth:`labelled` per constraint.
    """

    acts: Float[Tensor, "n d"]
    labels: Float[Tensor, "n"] | None  # 1 = the finished text violates; None until labelled
    group: list[int]  # prompt index of each position (held-out splits go by prompt)
    texts: list[dict[str, Any]] = field(default_factory=list)  # one row per rollout: prompt, kind, text
    row: list[int] = field(default_factory=list)  # rollout index of each position

    def labelled(self, constraint: Constraint, tokenizer: Any = None) -> "Rollouts":
        """Label every rollout by the constraint's real evaluator on its finished text."""
        if constraint.level != "sequence":
            raise ProbeError(f"{constraint.describe()} is token-level: CZAO scores it exactly from logits, no probe needed")
        verdict = []
        texts = []
        for r in self.texts:
            ok = bool(constraint.check_text(r["text"], Context(prompt=r["prompt"], generated=r["text"], tokenizer=tokenizer)))
            verdict.append(0.0 if ok else 1.0)
            texts.append({**r, "violates": not ok})
        labels = torch.tensor([verdict[i] for i in self.row]) if self.row else torch.zeros(0)
        return Rollouts(self.acts, labels, self.group, texts, self.row)


class _Recorder:
    """A controller that keeps the probe hook's current-position activation and makes the rows in
    ``greedy_rows`` pick their argmax while the others sample (one batch mixes both)."""

    def __init__(self, model: HookedTransformer, hook: str, greedy_rows: Tensor) -> None:
        self.start_layer = model.cfg.n_layers
        self.read_hooks = [hook]
        self.hook = hook
        self.greedy_rows = greedy_rows
        self.acts: list[Tensor] = []
        self.live: list[Tensor] = []

    def __call__(self, step: DecodeStep):
        self.acts.append(step.activations[self.hook].float().clone())
        self.live.append(~step.finished.clone())
        bias = torch.zeros_like(step.logits)
        top = step.logits.argmax(-1)
        rows = self.greedy_rows.nonzero().squeeze(-1)
        bias[rows, top[rows]] = 1e4  # nucleus sampling then keeps only the argmax
        step.logit_bias = bias
        return None


def collect_rollouts(
    model: HookedTransformer,
    prompts: Sequence[str],
    *,
    hook: str | None = None,
    samples: int = 4,
    max_new_tokens: int = 24,
    perturb_layers: Sequence[int] = (12,),
    perturb_scale: float = 0.5,
    chat: bool = False,
    seed: int = 0,
    store: ActivationStore | None = None,
    progress: bool = True,
) -> Rollouts:
    """Per prompt, in one batch: a greedy unsteered rollout, ``samples`` nucleus samples, and
    ``samples`` greedy runs with a random residual perturbation (norm ``perturb_scale`` x U(0.25, 1.25)
    x the prompt's typical residual norm) at a random layer of ``perturb_layers``, so the probe sees
    perturbed activations too. Unlabelled: call :meth:`Rollouts.labelled` per constraint."""
    if not prompts:
        raise ProbeError("no prompts to train a probe on")
    if samples < 1 or max_new_tokens < 1:
        raise ProbeError(f"samples and max_new_tokens must be >= 1, got {samples} and {max_new_tokens}")
    hook = hook or default_probe_hook(model)
    check_layers(model.cfg.n_layers, perturb_layers, "perturbation layer", ProbeError)
    store = store or ActivationStore(model)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    d = model.cfg.d_model
    acts, group, rows, row_of = [], [], [], []
    for i, prompt in enumerate(tqdm(prompts, desc="probe rollouts", disable=not progress)):
        layer = rng.choice(list(perturb_layers))
        h = resid_hook(layer)
        x = store.get([prompt], [h], chat=chat)[0][h][1:].float()  # position 0 is an attention sink
        scale = float(x.norm(dim=-1).median()) if len(x) else 1.0
        u = torch.randn(samples, d, generator=gen)
        u = u / u.norm(dim=-1, keepdim=True) * perturb_scale * scale * torch.rand(samples, 1, generator=gen).add(0.25)
        # One batch per prompt: row 0 greedy and unperturbed, then unperturbed nucleus samples, then
        # greedy rows under their perturbation.
        delta = torch.cat([torch.zeros(samples + 1, d), u])
        kinds = ["greedy"] + ["sampled"] * samples + ["perturbed"] * samples
        rec = _Recorder(model, hook, torch.tensor([k != "sampled" for k in kinds]))
        g = generate(model, [prompt] * len(kinds), max_new_tokens=max_new_tokens, seed=seed + i, chat=chat,
                     greedy=False, temperature=1.0, top_p=0.9, controller=rec,
                     perturbations=[Perturbation(h, delta, positions="generated")])
        for r, text in enumerate(g.texts):
            steps = [a[r] for a, live in zip(rec.acts, rec.live) if bool(live[r])][: max(len(g.new_tokens[r]), 1)]
            acts.extend(steps)
            group.extend([i] * len(steps))
            row_of.extend([len(rows)] * len(steps))
            rows.append({"prompt": prompt, "kind": kinds[r], "text": text})
    if not acts:
        raise ProbeError("the rollouts produced no positions to learn from")
    return Rollouts(torch.stack(acts), None, group, rows, row_of)


def corpus_prompts(data_dir: str | Path, exclude: Sequence[str] = (), limit: int | None = None, seed: int = 0) -> list[str]:
    """Training prompts from the data folder's RealToxicityPrompts prefixes (every ``rtp/rtp_*.txt``),
    shuffled with ``seed``, without ``exclude`` (pass the evaluation items: a probe never sees them)."""
    folder = Path(data_dir) / "rtp"
    files = sorted(folder.glob("rtp_*.txt")) if folder.is_dir() else []
    if not files:
        raise ProbeError(f"no prompt corpus: {folder} has no rtp_*.txt files (pass --data or --prompts)")
    drop = {e.strip() for e in exclude}
    seen: set[str] = set()
    out = []
    for f in files:
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if line and line not in drop and line not in seen:
                seen.add(line)
                out.append(line)
    random.Random(seed).shuffle(out)
    return out[:limit] if limit is not None else out


# ----------------------------------------------------------------------------- fitting and metrics


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve (rank statistic; ties count half)."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def calibration(p: Tensor, labels: Tensor, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error and the reliability table (mean prediction vs rate per bin)."""
    edges = torch.linspace(0, 1, bins + 1)
    table, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (p >= lo) & ((p < hi) if hi < 1 else (p <= hi))
        if m.any():
            conf, rate = float(p[m].mean()), float(labels[m].mean())
            ece += float(m.float().mean()) * abs(conf - rate)
            table.append({"bin": [float(lo), float(hi)], "n": int(m.sum()), "mean_p": conf, "rate": rate})
    return {"ece": ece, "brier": float(((p - labels) ** 2).mean()), "table": table}


def _logistic(x: Tensor, y: Tensor, l2: float, iters: int = 200) -> tuple[Tensor, float]:
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    pos = float(y.mean())
    # Balance the classes so a rare violation still shapes the boundary.
    weights = torch.where(y > 0.5, 0.5 / max(pos, 1e-6), 0.5 / max(1 - pos, 1e-6))
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = x @ w + b
        loss = (weights * torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")).mean()
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), float(b.detach())


def _platt(z: Tensor, y: Tensor) -> tuple[float, float]:
    """Recalibrate class-balanced logits to the real base rate: p = sigmoid(a z + c)."""
    a = torch.ones((), requires_grad=True)
    c = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([a, c], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a * z + c, y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(a.detach()), float(c.detach())


L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _folds(groups: Sequence[int], k: int, seed: int) -> Tensor:
    """A fold index per example; all examples of one prompt share a fold."""
    uniq = sorted(set(groups))
    random.Random(seed).shuffle(uniq)
    fold_of = {g: i % k for i, g in enumerate(uniq)}
    return torch.tensor([fold_of[g] for g in groups])


def _standardised_fit(x: Tensor, y: Tensor, train: Tensor, l2: float) -> tuple[Tensor, float, Tensor, Tensor]:
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-4)
    w, b = _logistic((x[train] - mean) / std, y[train], l2)
    return w, b, mean, std


def fit_probe(
    model: HookedTransformer,
    constraint: Constraint,
    data: Rollouts,
    *,
    hook: str | None = None,
    l2: float | None = None,
    recall: float = 0.95,
    folds: int = 4,
    seed: int = 0,
) -> ValueProbe:
    """Fit a calibrated logistic probe and measure it out of fold.

    Examples of one prompt are strongly correlated, so folds go by prompt. ``l2=None`` picks the
    regularisation from :data:`L2_GRID` by out-of-fold AUROC; Platt scaling on the out-of-fold
    logits calibrates it. The reported AUROC, calibration, screening threshold (the one that keeps
    ``recall`` of the violating positions) and miss rate are all out of fold: on prompts the fit
    did not see."""
    hook = hook or default_probe_hook(model)
    if data.labels is None:
        raise ProbeError("the rollouts are not labelled: call rollouts.labelled(constraint) first")
    y = data.labels.float()
    if y.min() == y.max():
        raise ProbeError(f"every rollout {'violates' if y[0] > 0.5 else 'satisfies'} {constraint.describe()}: "
                         "nothing to separate (use other prompts or a larger perturbation)")
    n_prompts = len(set(data.group))
    if n_prompts < 2:
        raise ProbeError("a probe needs rollouts of at least two prompts (folds go by prompt)")
    k = max(2, min(folds, n_prompts))
    fold = _folds(data.group, k, seed)
    x = data.acts.float()
    cv = []
    for lam in (L2_GRID if l2 is None else (l2,)):
        z = torch.zeros(len(y))
        for f in range(k):
            te = fold == f
            w, b, mean, std = _standardised_fit(x, y, ~te, lam)
            z[te] = ((x[te] - mean) / std) @ w + b
        cv.append((auroc(z, y), lam, z))
    best_auc, lam, z_oof = max(cv, key=lambda r: (r[0] if math.isfinite(r[0]) else -1.0, r[1]))
    a, c = _platt(z_oof, y)
    p = torch.sigmoid(a * z_oof + c)
    w, b, mean, std = _standardised_fit(x, y, torch.ones(len(y), dtype=torch.bool), lam)
    w, b = w * a, b * a + c
    viol = p[y > 0.5].sort().values
    threshold = float(viol[int(math.floor((1 - recall) * len(viol)))]) if len(viol) else 0.5
    flagged = p >= threshold
    p_train = torch.sigmoid(((x - mean) / std) @ w + b)
    metrics = {
        "auroc_heldout": best_auc, "auroc_train": auroc(p_train, y), "l2": lam,
        "l2_grid": {f"{r[1]:g}": r[0] for r in cv}, "calibration": calibration(p, y), "threshold": threshold,
        "screen_miss_rate": float((~flagged & (y > 0.5)).float().sum() / max(int((y > 0.5).sum()), 1)),
        "screen_share_optimised": float(flagged.float().mean()),
        "at_0.5": {"miss_rate": float(((p < 0.5) & (y > 0.5)).float().sum() / max(int((y > 0.5).sum()), 1)),
                   "share_optimised": float((p >= 0.5).float().mean())},
        "positions": int(len(y)), "violation_rate": float(y.mean()), "prompts": n_prompts, "folds": k,
        "evaluated_on": "out-of-fold (by prompt)", "rollouts": len(data.texts), "recall_target": recall,
    }
    return ValueProbe(hook, constraint.to_dict(), w, b, mean, std, threshold, model=model_info(model), metrics=metrics)


@torch.no_grad()
def rollout_residuals(
    model: HookedTransformer, data: Rollouts, *, chat: bool = False, progress: bool = True
) -> Float[Tensor, "rollouts n_layers d"]:
    """Per rollout, the mean ``resid_pre`` of every layer over its generated positions, on the
    unperturbed model (one forward per rollout; an empty rollout gives zeros). Constraint-free, so
    several constraints' directions can share it."""
    n, d = model.cfg.n_layers, model.cfg.d_model
    hooks = [resid_hook(l) for l in range(n)]
    out = torch.zeros(len(data.texts), n, d)
    for i, r in enumerate(tqdm(data.texts, desc="rollout residuals", disable=not progress)):
        new = model.tokenizer(r["text"], add_special_tokens=False)["input_ids"]
        if not new:
            continue
        enc = encode_prompts(model, r["prompt"], chat=chat)
        toks = torch.cat([enc.tokens[:, enc.tokens.shape[1] - int(enc.prompt_lens[0]):], torch.tensor([new])], 1)
        _, cache = model.run_with_cache(toks, names_filter=lambda name: name in hooks)
        out[i] = torch.stack([cache[h][0, -len(new):].float().mean(0) for h in hooks])
    return out


def contrastive_directions(
    model: HookedTransformer, data: Rollouts, *, residuals: Tensor | None = None, chat: bool = False,
    progress: bool = True,
) -> Float[Tensor, "n_layers d"]:
    """Per layer, the mean residual of satisfying rollouts minus that of violating ones (each rollout
    weighs the same): the constraint's own steering direction, from the labelled rollouts the probe
    was fitted on (``residuals`` from :func:`rollout_residuals`, computed here when not given)."""
    if not data.texts or "violates" not in data.texts[0]:
        raise ProbeError("the rollouts are not labelled: call rollouts.labelled(constraint) first")
    ok = torch.tensor([not r["violates"] and bool(r["text"]) for r in data.texts])
    bad = torch.tensor([r["violates"] and bool(r["text"]) for r in data.texts])
    if not ok.any() or not bad.any():
        raise ProbeError("contrastive directions need both satisfying and violating rollouts")
    res = rollout_residuals(model, data, chat=chat, progress=progress) if residuals is None else residuals
    if res.shape[0] != len(data.texts):
        raise ProbeError(f"{res.shape[0]} rollout residuals for {len(data.texts)} rollouts")
    return res[ok].mean(0) - res[bad].mean(0)


# ----------------------------------------------------------------------------- the probe cache


def probe_path(model: HookedTransformer, constraint: Constraint, hook: str | None = None) -> Path:
    """Where the probe of (model fingerprint, constraint spec, hook, recipe) is kept."""
    hook = hook or default_probe_hook(model)
    info = model_info(model)
    key = hashlib.sha256(f"{spec_key(constraint.to_dict())}|{hook}|{RECIPE_VERSION}".encode()).hexdigest()[:16]
    return cache_root() / "probes" / info["fingerprint"] / f"{constraint.to_dict().get('type', 'constraint')}-{key}"


def probed_part(constraint: Constraint) -> Constraint:
    """The constraint a value probe for ``constraint`` predicts: the constraint itself, or the one
    sequence-level part of a conjunction whose other parts are token-level (scored exactly)."""
    split = split_conjunction(constraint)
    return constraint if split is None else split[0]


def find_probe(model: HookedTransformer, constraint: Constraint, hook: str | None = None) -> ValueProbe | None:
    """The cached probe for this model and constraint (for a conjunction of one sequence-level part
    with token-level ones: that part's probe), or ``None`` (a broken cache entry counts as none)."""
    constraint = probed_part(constraint)
    if constraint.level != "sequence":
        return None
    path = probe_path(model, constraint, hook)
    if not (path / "cfg.json").exists():
        return None
    try:
        probe = ValueProbe.load(path, model)
        probe.check(model, constraint)
    except CzaoLensError:
        return None
    return probe


def probe_for(model: HookedTransformer, constraint: Constraint, probe: "ValueProbe | str | None") -> ValueProbe | None:
    """The probe to use for (model, constraint): ``"auto"`` finds the cached one, if any; an explicit
    probe is checked against both; ``None`` means none."""
    if probe is None:
        return None
    if isinstance(probe, str):
        if probe != "auto":
            raise ProbeError(f"probe must be a ValueProbe, 'auto' or None, got {probe!r}")
        return find_probe(model, constraint)
    if not isinstance(probe, ValueProbe):
        raise ProbeError(f"probe must be a ValueProbe, 'auto' or None, got {type(probe).__name__}")
    probe.check(model, probed_part(constraint))
    return probe


def train_probe(
    model: HookedTransformer,
    constraint: Constraint,
    prompts: "Sequence[str] | Rollouts",
    *,
    save: bool = True,
    residuals: Tensor | None = None,
    **kwargs: Any,
) -> tuple[ValueProbe, Rollouts]:
    """Collect rollouts (or reuse ``Rollouts`` collected for another constraint, with their
    :func:`rollout_residuals` so that no forward is repeated), label them, fit, and (by default)
    store the probe where :func:`find_probe` looks."""
    fit_kw = {k: kwargs.pop(k) for k in ("l2", "recall", "folds") if k in kwargs}
    if constraint.level != "sequence":  # before any rollout is collected
        raise ProbeError(f"{constraint.describe()} is token-level: CZAO scores it exactly from logits, no probe needed")
    rollouts = prompts if isinstance(prompts, Rollouts) else collect_rollouts(model, prompts, **kwargs)
    data = rollouts.labelled(constraint, model.tokenizer)
    probe = fit_probe(model, constraint, data, hook=kwargs.get("hook"), seed=kwargs.get("seed", 0), **fit_kw)
    probe.directions = contrastive_directions(model, data, residuals=residuals, chat=kwargs.get("chat", False),
                                              progress=kwargs.get("progress", True))
    if save:
        probe.save(probe_path(model, constraint, kwargs.get("hook")))
    return probe, data


__all__ = [
    "ProbeError", "Rollouts", "ValueProbe", "auroc", "calibration", "collect_rollouts", "contrastive_directions", "corpus_prompts", "rollout_residuals", "default_probe_hook",
    "find_probe", "fit_probe", "probe_for", "probe_path", "probed_part", "spec_key", "train_probe",
]
