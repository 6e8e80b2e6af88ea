"""CZAO: constrained zeroth-order activation optimisation, one generated token at a time.

At each token: run the base forward; if the constraint already holds (or the screen says it will),
sample. Otherwise search coefficients z of a low-rank residual perturbation delta = s A z at the
layers R, minimising

    L(z) = V(y_z) + lambda |z|^2 + beta * max(0, KL(p_z || p) - eps)

with forward passes only: central-difference SPSA over many directions, evaluated as one batched
candidate forward from min(R) on the frozen prefix KV cache, then a batched line search. Stop as
soon as a candidate is feasible (V = 0 and KL <= eps). Warm start from the previous token's z, or
from a distilled linear predictor of z. When the budget runs out without a feasible point, the token
is reported unreachable (never as a success) and a fallback policy decides what to emit.

Amortised (sequence-level constraints with a trained value probe, :mod:`czao_lens.probes`): the
screen is the probe's predicted violation of the *finished* text at the current position, and each
candidate is scored from its own activations in the batched forward (no lookahead rollouts, no
evaluator call per candidate); the real evaluator checks the final text. A per-prompt budget in row
passes stops optimising once spent: later tokens that would need steering take the fallback and are
flagged (``over_budget``, ``unreachable``).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Generator, Literal, Mapping, Sequence, TypeVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import HookedTransformer

from czao_lens.artifacts import Artifact, model_info, register_artifact
from czao_lens.constraints import (
    SAT_TOL, Constraint, ConstraintError, Context, banned_token_ids, checked_violation, split_conjunction,
)
from czao_lens.errors import ArtifactError, CzaoLensError
from czao_lens.generate import DecodeStep, StepDeltas, check_sampling, generate_tokens, stop_token_ids
from czao_lens.probes import ValueProbe, probe_for
from czao_lens.prompts import EncodedPrompts, encode_prompts
from czao_lens.repair import RepairRecord, Trace, repair
from czao_lens.seeds import Directions, seed_directions, seeded
from czao_lens.sites import check_layers, resid_hook
from czao_lens.store import ActivationStore
from czao_lens.subspace import Subspace, SubspaceError, activation_basis, direction_basis, random_basis
from czao_lens.zo import diagonal_curvature, line_search_candidates, spsa_candidates, spsa_gradient

Fallback = Literal["auto", "flag", "relax", "mask"]


class CZAOError(CzaoLensError, RuntimeError):
    """CZAO could not run: a bad configuration, or a constraint that failed while scoring."""


@dataclass
class CZAOConfig:
    """Hyperparameters of CZAO. z is in units of a typical residual norm at each layer."""

    layers: tuple[int, ...] = (12,)
    rank: int = 16
    basis: Literal["activation", "random"] = "activation"
    max_steps: int = 10  # K: sequential optimisation steps per token
    patience: int = 3  # stop early after this many steps without improving the best loss
    n_dirs: int = 16  # SPSA directions per step, all in one batched forward
    mu: float = 0.05  # probe radius
    radii: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)  # line-search trial step lengths
    norm_penalty: float = 0.05  # lambda
    kl_eps: float = 1.5  # nats
    kl_beta: float = 2.0
    max_norm: float | None = None  # hard cap on |z| (search(norm_cap=...) overrides it per call)
    warm_start: bool = True
    curvature: bool = False  # HiZOO-style diagonal preconditioner
    lookahead: int = 3  # greedy rollout tokens per candidate for sequence-level constraints
    surrogate: bool = False  # score sequence-level candidates with a linear probe once it is trained
    surrogate_min_samples: int = 96  # rollout-scored candidates before the probe is fitted
    fallback: Fallback = "auto"  # auto: mask when the constraint bans tokens, else flag
    relax_max_eps: float = 6.0
    value_probe: bool = True  # sequence level: score candidates with a trained value probe when one exists
    screen: bool = True  # with a value probe: optimise a token only when its predicted violation is above probe_accept
    probe_accept: float | None = 0.5  # with a value probe: feasible when p(violation) <= this (None: the probe's recall threshold)
    budget: float | None = 5.0  # per prompt: stop optimising once row passes reach budget x max_new_tokens (None: no cap)
    seed_direction: bool = True  # try a line along the constraint's known good direction before SPSA (czao_lens.seeds)
    hold: bool = False  # keep applying the last feasible z on tokens that need no search, while its KL stays <= eps
    repair: int = 4  # sequence level: rows per verified-repair round when the finished text fails (0: off; czao_lens.repair)
    repair_rounds: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse settings CZAO cannot run with (model-dependent checks happen when the subspace is built)."""
        if not self.layers:
            raise SubspaceError("the layer set R is empty: give at least one layer")
        if not self.kl_eps > 0:
            raise CZAOError(
                "kl_eps must be > 0: a KL bound of 0 admits only the unperturbed model, so no constraint "
                "that does not already hold could ever be met"
            )
        if self.max_steps < 1 or self.n_dirs < 1 or self.patience < 1 or not self.mu > 0 or not self.radii:
            raise CZAOError("max_steps, n_dirs and patience must be >= 1, mu > 0, and radii non-empty")
        if self.fallback not in ("auto", "flag", "relax", "mask"):
            raise CZAOError(f"unknown fallback {self.fallback!r}; use auto, flag, relax or mask")
        if self.max_norm is not None and not self.max_norm >= 0:
            raise CZAOError("max_norm must be >= 0")
        if self.probe_accept is not None and not 0.0 <= self.probe_accept < 1.0:
            raise CZAOError(f"probe_accept must be in [0, 1) or None, got {self.probe_accept}")
        if self.repair < 0 or self.repair_rounds < 1:
            raise CZAOError(f"repair must be >= 0 and repair_rounds >= 1, got {self.repair} and {self.repair_rounds}")
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget >= 1.0):
            raise CZAOError(f"budget must be >= 1 (row passes per token, unsteered = 1) or None, got {self.budget}")


@dataclass
class TokenRecord:
    """Telemetry of one generated token."""

    index: int
    optimized: bool
    steps: int
    passes: float  # equivalent full forward passes used for this token
    candidates: int
    delta_norm: float  # |delta| in residual units, summed over R
    z_norm: float
    kl: float
    v_before: float
    v_after: float
    satisfied: bool
    unreachable: bool
    fallback: str | None = None
    row_passes: float = 0.0  # every forward weighted by its rows and the share of layers it ran
    p_violation: float | None = None  # the value probe's prediction at the unperturbed position
    over_budget: bool = False  # not optimised because the prompt's compute budget was spent
    held: bool = False  # not searched: the last feasible z was applied again (``hold``)


@dataclass
class DistillPairs:
    """Training data for a :class:`ZPredictor`: one row per token CZAO solved.

    ``x`` is the residual entering min R at that token divided by the layer's scale, ``z`` the
    feasible coefficients CZAO chose there."""

    x: Float[Tensor, "n d_model"]
    z: Float[Tensor, "n dim"]
    model: dict[str, Any] = field(default_factory=dict)  # artifacts.model_info of the model they came from
    hooks: list[str] = field(default_factory=list)  # where z writes (resid_pre of R); the first is also where x is read

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass
class CZAOResult:
    """A CZAO generation: text, per-token telemetry and a sequence verdict.

    ``pairs`` (for :func:`distill_predictor`) and ``probe`` (the learned surrogate of V, when one
    was fitted) are fitted-object material and stay out of :meth:`to_dict`, as do the log-probs."""

    prompt: str
    text: str
    tokens: list[int]
    records: list[TokenRecord]
    satisfied: bool  # the constraint's final check on the generated text
    unreachable: bool  # some optimised token had no feasible perturbation within budget and eps
    seconds: float
    config: dict[str, Any]
    constraint: str
    step_logprobs: Float[Tensor, "n_new vocab"] | None = field(default=None, repr=False)  # with keep_logprobs
    pairs: DistillPairs | None = field(default=None, repr=False)
    probe: "ViolationProbe | None" = field(default=None, repr=False)
    repair: dict[str, Any] | None = None  # RepairRecord.to_dict() when the text went through verified repair

    _NOT_JSON = ("step_logprobs", "pairs", "probe")

    def summary(self) -> dict[str, Any]:
        """Aggregate telemetry: optimised and unreachable tokens, steps, passes per token, KL, |delta|."""
        opt = [r for r in self.records if r.optimized]
        steps = [r.steps for r in opt]
        n = max(len(self.records), 1)
        rep = self.repair or {}
        return {
            "satisfied": self.satisfied,
            "unreachable": self.unreachable,
            "tokens": len(self.records),
            "optimized_tokens": len(opt),
            "unreachable_tokens": sum(r.unreachable for r in self.records),
            "median_steps": statistics.median(steps) if steps else 0,
            "max_steps": max(steps) if steps else 0,
            # Repair's forwards are batched over its rows: one pass per step, its rows in row passes.
            "passes_per_token": (sum(r.passes for r in self.records) + rep.get("row_passes", 0.0) / max(rep.get("candidates", 1), 1)) / n,
            "row_passes_per_token": (sum(r.row_passes for r in self.records) + rep.get("row_passes", 0.0)) / n,
            "repair_rounds": rep.get("rounds", 0),
            "repaired": bool(rep.get("repaired", False)),
            "screened_tokens": sum(r.p_violation is not None and not r.optimized and not r.over_budget for r in self.records),
            "over_budget_tokens": sum(r.over_budget for r in self.records),
            "held_tokens": sum(r.held for r in self.records),
            # With a value probe: it predicted the finished text would hold at the last token (screened,
            # or a feasible point found) and the real evaluator says it does not.
            "probe_overruled": self._probe_overruled(),
            "mean_kl_optimized": statistics.fmean([r.kl for r in opt]) if opt else 0.0,
            "max_delta_norm": max((r.delta_norm for r in opt), default=0.0),
            "seconds": self.seconds,
        }

    def _probe_overruled(self) -> bool | None:
        last = next((r for r in reversed(self.records) if r.p_violation is not None), None)
        if last is None:
            return None  # no value probe ran
        predicted_ok = (not last.optimized and not last.over_budget and last.v_before == 0) or (last.optimized and last.satisfied)
        # Repair runs only on a text the evaluator rejected: judge the probe on that text.
        return bool(predicted_ok and (self.repair is not None or not self.satisfied))

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: every field but the tensors, plus ``summary``."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in self._NOT_JSON}
        d["records"] = [asdict(r) for r in self.records]
        d["summary"] = self.summary()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CZAOResult":
        """Rebuild a result from :meth:`to_dict` (without log-probs, pairs or probe)."""
        try:
            kw = {f.name: d[f.name] for f in fields(cls) if f.name not in cls._NOT_JSON and f.name != "repair"}
            kw["repair"] = d.get("repair")
            kw["records"] = [TokenRecord(**r) for r in d["records"]]
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"not a CZAO result record: {exc!r}") from None
        return cls(**kw)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON (a result is an output, not a fitted object)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CZAOResult":
        """Read a result written by :meth:`save`."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"cannot read a CZAO result from {path}: {exc}") from None


# ----------------------------------------------------------------------------- distilled predictor


@register_artifact("ridge_map")
@dataclass
class RidgeMap(Artifact):
    """A ridge-regression linear map ``y = x W + b``, saved in the one artifact layout."""

    weight: Float[Tensor, "d k"]
    bias: Float[Tensor, "k"]
    alpha: float | None = None  # the ridge strength it was fitted with, relative to the mean feature variance
    model: dict[str, Any] = field(default_factory=dict, repr=False)  # artifacts.model_info, if known
    hooks: list[str] = field(default_factory=list)  # the sites it reads (and, for a ZPredictor, writes)

    @classmethod
    def fit(
        cls, X: Float[Tensor, "n d"], Y: Float[Tensor, "n k"], alpha: float = 0.01, *,
        model: dict[str, Any] | None = None, hooks: Sequence[str] = (),
    ):
        """Least squares with a ridge of ``alpha`` times the mean feature variance."""
        if X.shape[0] != Y.shape[0] or X.shape[0] == 0:
            raise CZAOError(f"{cls.__name__}.fit needs the same, non-zero number of inputs and targets")
        X, Y = X.float(), Y.float()
        xm, ym = X.mean(0), Y.mean(0)
        Xc, Yc = X - xm, Y - ym
        G = Xc.T @ Xc
        # alpha is relative to the mean feature variance, so it means the same at any input scale
        ridge = alpha * G.trace().clamp_min(1e-12) / X.shape[1]
        W = torch.linalg.solve(G + ridge * torch.eye(X.shape[1]), Xc.T @ Yc)
        return cls(W, ym - xm @ W, alpha=float(alpha), model=dict(model or {}), hooks=list(hooks))

    def predict(self, x: Float[Tensor, "*n d"]) -> Float[Tensor, "*n k"]:
        """Apply the map."""
        return x.float() @ self.weight + self.bias

    # -- the one save layout (czao_lens.artifacts)
    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "d_in": int(self.weight.shape[0]), "d_out": int(self.weight.shape[1]),
                "hooks": list(self.hooks)}

    def tensors(self) -> dict[str, Tensor]:
        return {"weight": self.weight, "bias": self.bias}

    def saved_model_info(self) -> dict[str, Any]:
        return self.model

    def sites(self) -> list[str]:
        return list(self.hooks)

    @classmethod
    def from_dict(cls, params: dict[str, Any], tensors: dict[str, Tensor]):
        W, b = tensors["weight"].float(), tensors["bias"].float()
        if W.ndim != 2 or b.shape != (W.shape[1],):
            raise ArtifactError(f"{cls.__name__}: weight {tuple(W.shape)} and bias {tuple(b.shape)} do not fit")
        want = (params.get("d_in"), params.get("d_out"))
        if want != (None, None) and tuple(W.shape) != want:
            raise ArtifactError(f"{cls.__name__}: cfg.json says {list(want)}, the weight is {list(W.shape)}")
        alpha = params.get("alpha")
        return cls(W, b, alpha=None if alpha is None else float(alpha), hooks=[str(h) for h in params.get("hooks", [])])


@register_artifact("z_predictor")
@dataclass
class ZPredictor(RidgeMap):
    """Distilled warm start: the current residual at min R (divided by its scale) -> optimised z.

    Fitted on (residual, z*) pairs from earlier CZAO runs (:func:`distill_predictor`), so that the
    first candidate batch often already holds a feasible point."""


@register_artifact("violation_probe")
@dataclass
class ViolationProbe(RidgeMap):
    """Learned surrogate of a sequence-level V: final-layer residual of a candidate -> V.

    Trained online on candidates scored by real lookahead rollouts; once fitted it scores candidates
    without rollouts. A candidate it calls feasible is always re-checked with a real rollout."""


# ----------------------------------------------------------------------------- the optimiser


@dataclass
class Scores:
    """Scores of a candidate batch under CZAO's objective, one entry per candidate."""

    loss: Float[Tensor, "n"]
    v: Float[Tensor, "n"]
    kl: Float[Tensor, "n"]
    logits: Float[Tensor, "n vocab"]
    feasible: Bool[Tensor, "n"]
    surrogate: bool = False  # V came from the learned probe, not from the constraint's evaluator


@dataclass
class _Best:
    """The best candidate so far; feasible ones rank above infeasible ones."""

    z: Tensor
    v: float
    kl: float
    feasible: bool
    logits: Tensor
    key: float
    surrogate: bool = False


@dataclass
class SearchResult:
    """What :meth:`CZAOController.search` found at one token."""

    z: Float[Tensor, "dim"]  # the best coefficients (within the norm cap)
    feasible: bool  # V = 0 and KL <= eps
    v: float
    kl: float
    steps: int


@dataclass(frozen=True)
class _Limits:
    """The bounds of one search: the KL bound ``eps`` and the cap on |z| (``None``: no cap)."""

    eps: float
    cap: float | None


T = TypeVar("T")


@dataclass(frozen=True)
class CandidateBatch:
    """What a search asks the loop to run: candidate coefficients (already capped) and how to score them."""

    Z: Float[Tensor, "n dim"]
    lookahead: int = 0  # greedy rollout tokens per candidate (sequence level, no probe)
    capture: str | None = None  # a hook whose activation per candidate comes back (probe scoring)


# The reply to a CandidateBatch: logits [n, vocab], rollout tokens [n, lookahead] or None, captured [n, *w] or None.
Reply = tuple[Tensor, Tensor | None, Tensor | None]
# A search is a generator: it yields candidate batches, receives their replies, and returns its result.
Search = Generator[CandidateBatch, Reply, T]


def run_candidates(
    step: DecodeStep, subspaces: Sequence[Subspace], batches: Sequence[CandidateBatch], rows: Sequence[int] | None = None
) -> list[Reply]:
    """One batched forward for the candidate batches of several rows (``rows`` of ``step``, default
    all), each through its own subspace; they must agree on size, lookahead and capture."""
    first = batches[0]
    if any((b.Z.shape[0], b.lookahead, b.capture) != (first.Z.shape[0], first.lookahead, first.capture) for b in batches):
        raise CZAOError("candidate batches run together must have the same size, lookahead and capture")
    per_row = [sub.deltas(b.Z) for sub, b in zip(subspaces, batches)]
    deltas = {h: torch.stack([d[h] for d in per_row]) for h in per_row[0]}
    idx = None if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
    logits, rollout = step.evaluate(deltas, lookahead=first.lookahead, capture=first.capture, rows=idx)
    return [(logits[i], None if rollout is None else rollout[i], step.captured[i] if first.capture else None)
            for i in range(len(batches))]


class CZAOController:
    """The per-token controller that the generation loop calls (batch size 1).

    Besides the loop's ``__call__``, probes built on CZAO's objective use :meth:`screen`,
    :meth:`score` and :meth:`search`; :meth:`pairs` hands over the distillation data."""

    def __init__(
        self,
        model: HookedTransformer,
        constraint: Constraint,
        subspace: Subspace,
        config: CZAOConfig,
        *,
        prompt_text: str = "",
        document: str | None = None,
        predictor: ZPredictor | None = None,
        value: ValueProbe | None = None,
        max_new_tokens: int | None = None,
        seed_z: Float[Tensor, "dim"] | None = None,
    ) -> None:
        self.model, self.constraint, self.subspace, self.cfg = model, constraint, subspace, config
        self.start_layer = subspace.start_layer
        # A value probe scores sequence-level candidates from their own activations (no rollouts).
        self.value = value if (value is not None and config.value_probe and constraint.level == "sequence") else None
        self.read_hooks: Sequence[str] = (self.value.hook,) if self.value is not None else ()
        self.spent = 0.0  # row passes so far on this prompt
        self.cap = config.budget * max_new_tokens if (config.budget is not None and max_new_tokens) else math.inf
        self.context = Context(prompt=prompt_text, tokenizer=model.tokenizer, document=document)
        self.predictor = predictor
        self.records: list[TokenRecord] = []
        self._pair_x: list[Tensor] = []  # (resid, z*) of every solved token, for distilling a predictor
        self._pair_z: list[Tensor] = []
        self.z_prev = torch.zeros(subspace.dim)
        self.held: Tensor | None = None  # with cfg.hold: the z applied again on tokens that need no search
        self.gen = torch.Generator().manual_seed(config.seed)
        self.probe: ViolationProbe | None = None
        self._probe_x: list[Tensor] = []
        self._probe_y: list[Tensor] = []
        self.probe_hook = resid_hook(model.cfg.n_layers - 1, "post")
        # A conjunction's token parts are scored exactly beside its sequence part's probe.
        split = split_conjunction(constraint) if self.value is not None else None
        self.exact_parts: tuple[Constraint, ...] = split[1] if split is not None else ()
        self.banned = banned_token_ids(constraint, model.tokenizer)
        if config.fallback == "mask" and constraint.level == "token" and self.banned is None:
            raise CZAOError("fallback='mask' needs a constraint with banned tokens (e.g. AvoidTokens)")
        auto = "mask" if self.banned is not None else "flag"
        self.fallback: str = auto if config.fallback == "auto" else config.fallback
        if seed_z is not None and seed_z.shape != (subspace.dim,):
            raise CZAOError(f"seed_z has shape {tuple(seed_z.shape)}; the subspace has {subspace.dim} coefficients")
        self.seed_z = seed_z

    # -- public probes of the objective

    def screen(self, step: DecodeStep) -> float:
        """V of the unperturbed next token (for sequence level: the text so far plus the greedy token)."""
        self._sync(step)
        return self._screen(step, _base_logprobs(step))

    def score(self, step: DecodeStep, Z: Float[Tensor, "n dim"]) -> Scores:
        """Score candidate coefficients at this token with the configured eps and norm cap."""
        self._sync(step)
        return self._run(step, self._evaluate(step, Z, _base_logprobs(step), self._limits()))

    def search(self, step: DecodeStep, *, norm_cap: float | None = None) -> SearchResult:
        """A fresh constrained search at this token, as the loop would run it but repeatable.

        It starts cold (z = 0, or the predictor's guess) with the generator reseeded from
        ``cfg.seed``, so calls with different caps are comparable; ``norm_cap`` bounds |z| (default
        ``cfg.max_norm``). Telemetry, the warm start and the distillation pairs are left alone."""
        self.gen.manual_seed(self.cfg.seed)
        self._sync(step)
        lim = _Limits(self.cfg.kl_eps, self.cfg.max_norm if norm_cap is None else norm_cap)
        best, steps = self._run(step, self._optimize(step, _base_logprobs(step), self._start(step, warm=False), lim))
        return SearchResult(best.z, best.feasible, best.v, best.kl, steps)

    def pairs(self) -> DistillPairs:
        """The (scaled residual, z*) pairs of the tokens solved so far."""
        x = torch.stack(self._pair_x) if self._pair_x else torch.zeros(0, self.model.cfg.d_model)
        z = torch.stack(self._pair_z) if self._pair_z else torch.zeros(0, self.subspace.dim)
        return DistillPairs(x, z, model=model_info(self.model), hooks=self.subspace.hooks())

    # -- scoring

    def _limits(self) -> _Limits:
        return _Limits(self.cfg.kl_eps, self.cfg.max_norm)

    def _sync(self, step: DecodeStep) -> None:
        """Give the constraint the text so far (a banned word begun in pieces is then finished by no token)."""
        self.context = replace(self.context, generated=step.text_so_far())

    def _texts(self, step: DecodeStep, first: Tensor, rollout: Tensor | None) -> list[str]:
        """Candidate texts: what was generated so far plus each candidate's next token(s)."""
        tok = self.model.tokenizer
        so_far = step.new_tokens[0].tolist()
        rows = rollout if rollout is not None else first[:, None]
        return [tok.decode(so_far + r.tolist(), skip_special_tokens=True) for r in rows]

    def _violation(self, logprobs: Tensor, texts: list[str] | None) -> Tensor:
        try:
            if self.constraint.level == "token":
                return checked_violation(self.constraint, logprobs=logprobs, context=self.context)
            return checked_violation(self.constraint, logprobs=logprobs, texts=texts, context=self.context)
        except ConstraintError:
            raise
        except Exception as exc:
            raise CZAOError(f"constraint {self.constraint.describe()} raised while scoring: {exc!r}") from exc

    def _screen(self, step: DecodeStep, base_lp: Tensor) -> float:
        if self.value is not None:
            return self._value_violation(step.activations[self.value.hook][0], base_lp[None])
        seq = self.constraint.level == "sequence"
        texts = self._texts(step, base_lp.argmax(-1, keepdim=True), None) if seq else None
        return float(self._violation(base_lp[None], texts)[0])

    def _value_violation(self, acts: Tensor, lp: Tensor) -> float | Tensor:
        """V from the value probe: how far the predicted violation is above the acceptance level, plus
        a conjunction's token parts scored exactly on the log-probabilities ``lp`` ([n, vocab])."""
        return self._probe_read(acts, lp)[1]

    def _probe_read(self, acts: Tensor, lp: Tensor) -> tuple[float | Tensor, float | Tensor]:
        """The probe's predicted p(violation) and V (see :meth:`_value_violation`), from one read."""
        assert self.value is not None
        accept = self.value.threshold if self.cfg.probe_accept is None else self.cfg.probe_accept
        p = self.value.predict(acts)
        v = (p - accept).clamp_min(0)
        if self.exact_parts:
            v = v + self._exact_violation(lp).reshape(v.shape)
        return (float(p), float(v)) if v.ndim == 0 else (p, v)

    def _exact_violation(self, lp: Tensor) -> Tensor:
        """The token-level parts of a probed conjunction, summed as And sums them: ``[n]``."""
        return torch.stack([checked_violation(p, logprobs=lp, context=self.context) for p in self.exact_parts]).sum(0)

    def _evaluate(self, step: DecodeStep, Z: Tensor, base_lp: Tensor, lim: _Limits, *, exact: bool = False) -> "Search[Scores]":
        """Score candidates z: asks the loop for one batched forward (plus rollouts, or a probe read,
        for sequence level) by yielding a :class:`CandidateBatch`, then scores its reply."""
        if lim.cap is not None:
            n = Z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            Z = Z * torch.clamp(lim.cap / n, max=1.0)
        if self.value is not None and not exact:
            # The candidates' own activations at the probe's hook, from the one batched forward.
            logits, _, acts = yield CandidateBatch(Z, 0, self.value.hook)
            lp = logits.float().log_softmax(-1)
            return self._scored(Z, lp, base_lp, self._value_violation(acts, lp), logits, lim, surrogate=False)
        seq = self.constraint.level == "sequence"
        use_probe = seq and self.probe is not None and not exact
        capture = self.probe_hook if seq and self.cfg.surrogate else None
        logits, rollout, acts = yield CandidateBatch(Z, self.cfg.lookahead if seq and not use_probe else 0, capture)
        lp = logits.float().log_softmax(-1)
        if use_probe:
            v = self.probe.predict(acts).squeeze(-1).clamp_min(0)
        else:
            v = self._violation(lp, self._texts(step, lp.argmax(-1), rollout) if seq else None)
            if capture is not None and self.probe is None:
                self._learn(acts, v)
        return self._scored(Z, lp, base_lp, v, logits, lim, surrogate=use_probe)

    def _run(self, step: DecodeStep, search: "Search[T]") -> T:
        """Drive a search on this step alone: each candidate batch it asks for is one forward."""
        try:
            batch = next(search)
            while True:
                batch = search.send(run_candidates(step, [self.subspace], [batch])[0])
        except StopIteration as done:
            return done.value

    def _scored(self, Z: Tensor, lp: Tensor, base_lp: Tensor, v: Tensor, logits: Tensor, lim: _Limits, *,
                surrogate: bool) -> Scores:
        """CZAO's objective: V + lambda |z|^2 + beta (KL - eps)_+; feasible when V = 0 and KL <= eps."""
        kl = (lp.exp() * (lp - base_lp[None])).sum(-1).clamp_min(0)
        loss = v + self.cfg.norm_penalty * Z.pow(2).sum(-1) + self.cfg.kl_beta * (kl - lim.eps).clamp_min(0)
        feasible = (v <= SAT_TOL) & (kl <= lim.eps)
        return Scores(loss, v, kl, logits, feasible, surrogate=surrogate)

    def _learn(self, h: Tensor, v: Tensor) -> None:
        """Collect (final residual, real V) pairs; fit the surrogate once there are enough."""
        self._probe_x.append(h.float())
        self._probe_y.append(v.float())
        if sum(len(x) for x in self._probe_x) >= self.cfg.surrogate_min_samples:
            X, Y = torch.cat(self._probe_x), torch.cat(self._probe_y)[:, None]
            self.probe = ViolationProbe.fit(X, Y, alpha=0.1, model=model_info(self.model), hooks=[self.probe_hook])

    # -- the loop's entry point

    def __call__(self, step: DecodeStep) -> StepDeltas | None:
        if step.resid.shape[0] != 1:
            raise CZAOError("CZAOController steers one prompt; BatchedCZAO steers several in one batch")
        return self._run(step, self.decide(step))

    def decide(self, step: DecodeStep) -> "Search[StepDeltas | None]":
        """This token's decision as a search: skip (screened, or over budget) or optimise, record the
        telemetry, and return the deltas (``None``: emit unperturbed)."""
        base_lp = _base_logprobs(step)
        self._sync(step)
        p0 = None
        if self.value is not None:  # one probe read gives both the prediction and V
            p0, v0 = self._probe_read(step.activations[self.value.hook][0], base_lp[None])
        else:
            v0 = self._screen(step, base_lp)
        skip = v0 <= SAT_TOL and (self.value is None or self.cfg.screen)
        if skip and self.held is not None and self.spent < self.cap:
            deltas = yield from self._hold(step, base_lp, v0, p0)
            if deltas is not None:
                return deltas
        if skip or self.spent >= self.cap:
            # Already holds (sequence level: the greedy next token keeps it, or the value probe
            # predicts the finished text will), or the prompt's compute budget is spent: then the
            # token takes the fallback unoptimised and is flagged (``over_budget``).
            broke = not skip and v0 > SAT_TOL
            rec = TokenRecord(step.index, False, 0, step.cost.passes, 0, 0.0, 0.0, 0.0, v0, v0, not broke, broke,
                              fallback=self.fallback if broke else None, row_passes=step.cost.row_passes,
                              p_violation=p0, over_budget=not skip)
            if broke and self.fallback == "mask":
                step.logit_bias = self._mask(step, step.logits[0])
            self.spent += rec.row_passes
            self.records.append(rec)
            return None
        lim = self._limits()
        best, steps = yield from self._optimize(step, base_lp, self._start(step, warm=self.cfg.warm_start), lim)
        rec = TokenRecord(
            index=step.index, optimized=True, steps=steps, passes=0.0, candidates=0, delta_norm=0.0,
            z_norm=0.0, kl=best.kl, v_before=v0, v_after=best.v, satisfied=best.feasible,
            unreachable=not best.feasible, p_violation=p0,
        )
        if not best.feasible and self.fallback == "relax":
            best, extra, eps = yield from self._relax(step, base_lp, best, lim)
            rec.steps += extra
            rec.fallback = f"relax(eps={eps:g})"
            rec.kl, rec.v_after, rec.satisfied = best.kl, best.v, best.feasible
        if not best.feasible:
            rec.fallback = rec.fallback or self.fallback
            if self.fallback == "mask":
                step.logit_bias = self._mask(step, best.logits)
        # rec.unreachable stays as set above: no feasible point within the budget at the configured
        # eps, even when relaxing eps then found one (rec.satisfied says so, rec.fallback says how).
        z = best.z
        rec.delta_norm, rec.z_norm = float(self.subspace.delta_norm(z)), float(z.norm())
        self.held = z if (best.feasible and self.cfg.hold) else None
        if best.feasible:
            self.z_prev = z
            self._pair_x.append(step.resid[0].detach() / self.subspace.scales[self.start_layer])
            self._pair_z.append(z.detach())
        # The loop re-runs the upper layers once with the chosen delta: count it here.
        n_layers = self.model.cfg.n_layers
        rec.passes = step.cost.passes + (n_layers - self.start_layer) / n_layers
        rec.row_passes = step.cost.row_passes + (n_layers - self.start_layer) / n_layers
        self.spent += rec.row_passes
        rec.candidates = step.cost.candidates
        self.records.append(rec)
        return self.subspace.deltas(z[None])  # [1, d] per hook

    def _hold(self, step: DecodeStep, base_lp: Tensor, v0: float, p0: float | None) -> "Search[StepDeltas | None]":
        """Apply the held z again when its KL here is within eps (one candidate row); else drop it."""
        assert self.held is not None
        lim = self._limits()
        ev = yield from self._evaluate(step, self.held[None], base_lp, lim)
        if float(ev.kl[0]) > lim.eps:
            self.held = None
            return None
        z, n_layers = self.held, self.model.cfg.n_layers
        rerun = (n_layers - self.start_layer) / n_layers
        rec = TokenRecord(step.index, False, 0, step.cost.passes + rerun, step.cost.candidates,
                          float(self.subspace.delta_norm(z)), float(z.norm()), float(ev.kl[0]), v0, float(ev.v[0]),
                          True, False, row_passes=step.cost.row_passes + rerun, p_violation=p0, held=True)
        self.spent += rec.row_passes
        self.records.append(rec)
        return self.subspace.deltas(z[None])

    # -- the search

    def _start(self, step: DecodeStep, *, warm: bool) -> Tensor:
        """The first z: the predictor's guess, else the previous token's z (``warm``), else 0."""
        if self.predictor is not None:
            return self.predictor.predict(step.resid[0] / self.subspace.scales[self.start_layer]).float()
        return self.z_prev.clone() if warm else torch.zeros(self.subspace.dim)

    def _optimize(self, step: DecodeStep, base_lp: Tensor, z: Tensor, lim: _Limits) -> "Search[tuple[_Best, int]]":
        """SPSA + batched line search from ``z`` until a feasible candidate appears or K steps are spent."""
        cfg = self.cfg
        radii = torch.tensor(cfg.radii)
        best, stale, last_key, first = None, 0, float("inf"), 1
        if self.seed_z is not None:
            # The seed line first: one small batch, and often already feasible.
            line = torch.cat([z[None], z[None] + radii[:, None] * self.seed_z[None]])
            ev = yield from self._evaluate(step, line, base_lp, lim)
            best = yield from self._verified(step, base_lp, self._keep_best(line, ev, None, lim), lim)
            if best.feasible or cfg.max_steps == 1 or self._spent_out(step):
                return best, 1
            z, first = best.z.clone(), 2
        for k in range(first, cfg.max_steps + 1):
            probe = spsa_candidates(z, cfg.n_dirs, cfg.mu, self.gen)
            pts = torch.cat([z[None], probe.points])  # the current point rides along for free
            ev = yield from self._evaluate(step, pts, base_lp, lim)
            best = yield from self._verified(step, base_lp, self._keep_best(pts, ev, best, lim), lim)
            if best.feasible or self._spent_out(step):
                return best, k
            g = spsa_gradient(probe, ev.loss[1:])
            if cfg.curvature:
                g = g / diagonal_curvature(probe, ev.loss[1:], float(ev.loss[0]))
            line = line_search_candidates(z, g, radii)
            ev = yield from self._evaluate(step, line, base_lp, lim)
            best = yield from self._verified(step, base_lp, self._keep_best(line, ev, best, lim), lim)
            if best.feasible or self._spent_out(step):
                return best, k
            # Stagnation: the budget is better reported as unreachable than spent on a plateau.
            cur = best.key - (0.0 if best.feasible else 1e6)  # the loss, without the ranking offset
            stale = stale + 1 if cur > last_key - 1e-3 * max(abs(last_key), 1.0) else 0
            last_key = min(last_key, cur)
            if stale >= cfg.patience:
                return best, k
            z = best.z.clone()
        assert best is not None
        return best, cfg.max_steps

    def _spent_out(self, step: DecodeStep) -> bool:
        """The prompt's budget is spent, counting this token's candidates so far: the search stops
        there (with its best point, or the fallback), so one hard token cannot overrun the cap."""
        return self.spent + step.cost.row_passes >= self.cap

    def _keep_best(self, pts: Tensor, ev: Scores, best: _Best | None, lim: _Limits) -> _Best:
        key = ev.loss + torch.where(ev.feasible, 0.0, 1e6)
        i = int(key.argmin())
        if best is not None and float(key[i]) >= best.key:
            return best
        z = pts[i].clone()
        if lim.cap is not None:  # _evaluate scored the projected point
            z = z * min(1.0, lim.cap / max(float(z.norm()), 1e-12))
        return _Best(z, float(ev.v[i]), float(ev.kl[i]), bool(ev.feasible[i]), ev.logits[i], float(key[i]), ev.surrogate)

    def _verified(self, step: DecodeStep, base_lp: Tensor, best: _Best, lim: _Limits) -> "Search[_Best]":
        """A point the surrogate calls feasible counts only after a real rollout agrees."""
        if not (best.feasible and best.surrogate):
            return best
        ev = yield from self._evaluate(step, best.z[None], base_lp, lim, exact=True)
        return _Best(best.z, float(ev.v[0]), float(ev.kl[0]), bool(ev.feasible[0]), ev.logits[0],
                     float(ev.loss[0]) + (0.0 if bool(ev.feasible[0]) else 1e6))

    def _relax(self, step: DecodeStep, base_lp: Tensor, best: _Best, lim: _Limits) -> "Search[tuple[_Best, int, float]]":
        """Fallback: double eps (up to relax_max_eps) and continue from the best point; returns the final eps."""
        eps, extra = lim.eps, 0
        while eps < self.cfg.relax_max_eps and not best.feasible:
            eps = min(eps * 2, self.cfg.relax_max_eps)
            best, k = yield from self._optimize(step, base_lp, best.z.clone(), replace(lim, eps=eps))
            extra += k
        return best, extra, eps

    def _mask(self, step: DecodeStep, logits: Tensor) -> Tensor:
        """Fallback: token-level guided decoding. Ban the tokens that would violate the constraint."""
        bias = torch.zeros_like(step.logits)
        if self.banned is not None:
            bias[0, banned_token_ids(self.constraint, self.model.tokenizer, self.context.generated)] = float("-inf")
            return bias
        # Sequence level: test the top next tokens as one-token continuations and ban violators.
        top = logits.float().topk(32).indices
        texts = self._texts(step, top, None)
        v = self._violation(logits.float().log_softmax(-1)[None].expand(len(texts), -1), texts)
        bias[0, top[v > SAT_TOL]] = float("-inf")
        return bias


class BatchedCZAO:
    """The loop's controller for several prompts in one batch: one :class:`CZAOController` per row.

    At every token each live row decides on its own (screen, budget, search), and the searches of
    all rows that need one advance in lockstep: every round, the candidate batches of those rows go
    through one batched forward (rows x candidates), grouped when their sizes differ. A row's
    decisions, random directions and telemetry are the ones it would have alone."""

    def __init__(self, rows: Sequence[CZAOController]) -> None:
        if not rows:
            raise CZAOError("BatchedCZAO needs at least one row controller")
        if len({c.start_layer for c in rows}) != 1 or len({tuple(c.read_hooks) for c in rows}) != 1:
            raise CZAOError("the rows of one batch must share the layers R and the probe hook")
        self.rows = list(rows)
        self.start_layer = rows[0].start_layer
        self.read_hooks = rows[0].read_hooks

    def __call__(self, step: DecodeStep) -> StepDeltas | None:
        if step.resid.shape[0] != len(self.rows):
            raise CZAOError(f"the batch has {step.resid.shape[0]} rows but BatchedCZAO has {len(self.rows)} controllers")
        views = {b: step.row(b) for b in range(len(self.rows)) if not bool(step.finished[b])}
        searches = {b: self.rows[b].decide(v) for b, v in views.items()}
        asked: dict[int, CandidateBatch] = {}
        done: dict[int, StepDeltas | None] = {}
        for b in searches:
            self._advance(b, searches[b], None, asked, done)
        while asked:
            groups: dict[tuple, list[int]] = {}
            for b, cb in asked.items():
                groups.setdefault((cb.Z.shape[0], cb.lookahead, cb.capture), []).append(b)
            now, asked = asked, {}
            for bs in groups.values():
                before = replace(step.cost)
                replies = run_candidates(step, [self.rows[b].subspace for b in bs], [now[b] for b in bs], rows=bs)
                for b, reply in zip(bs, replies):  # each row pays what it would have paid alone
                    c = views[b].cost
                    c.passes += step.cost.passes - before.passes
                    c.row_passes += step.cost.row_passes - before.row_passes
                    c.candidates += (step.cost.candidates - before.candidates) // len(bs)
                    c.batched_calls += step.cost.batched_calls - before.batched_calls
                    self._advance(b, searches[b], reply, asked, done)
        bias = [(b, views[b].logit_bias) for b in views if views[b].logit_bias is not None]
        if bias:
            step.logit_bias = torch.zeros_like(step.logits)
            for b, row_bias in bias:
                step.logit_bias[b] = row_bias[0]
        chosen = {b: d for b, d in done.items() if d}
        if not chosen:
            return None
        hooks = next(iter(chosen.values())).keys()
        out = {h: torch.zeros(step.resid.shape[0], *chosen[next(iter(chosen))][h].shape[1:]) for h in hooks}
        for b, d in chosen.items():
            for h in hooks:
                out[h][b] = d[h][0]
        return out

    @staticmethod
    def _advance(b: int, search: Search, reply: Reply | None, asked: dict, done: dict) -> None:
        """Send a row's search its reply; keep what it asks next, or its decision when it is done."""
        try:
            asked[b] = search.send(reply)
        except StopIteration as stop:
            done[b] = stop.value


def _base_logprobs(step: DecodeStep) -> Float[Tensor, "vocab"]:
    """Unperturbed next-token log-probs of the (single) row."""
    return step.logits[0].float().log_softmax(-1)


# ----------------------------------------------------------------------------- entry points


def _prompt_ids(enc: EncodedPrompts, b: int = 0) -> list[int]:
    """The token ids of row ``b`` of encoded prompts, padding left out (what the activation store keys on)."""
    return enc.tokens[b, enc.tokens.shape[1] - int(enc.prompt_lens[b]):].tolist()


def build_subspace(
    model: HookedTransformer,
    prompt: str | Sequence[int],
    config: CZAOConfig,
    *,
    chat: bool = False,
    store: ActivationStore | None = None,
    basis_directions: Mapping[int, Tensor] | None = None,
) -> Subspace:
    """The subspace of a config for one prompt (text, or its token ids), read through the shared store.

    ``basis_directions`` (``{layer: [k, d_model]}``, e.g. SAE decoder rows from
    ``FeatureBasis.directions_by_layer()``) replace ``config.basis``: the subspace is exactly their
    span at every layer of R (``config.rank`` is then ignored), scaled like the activation basis.
    """
    store = store or ActivationStore(model)
    if basis_directions is not None:
        missing = [l for l in config.layers if l not in basis_directions]
        if missing:
            raise SubspaceError(f"the basis directions cover layers {sorted(basis_directions)}, not the CZAO layer(s) {missing}")
        return direction_basis(store, prompt if isinstance(prompt, str) else list(prompt),
                               {l: basis_directions[l] for l in config.layers}, None, chat=chat, seed=config.seed, kind="sae")
    make = {"activation": activation_basis, "random": random_basis}.get(config.basis)
    if make is None:
        raise SubspaceError(f"unknown basis {config.basis!r}; use activation or random, or pass subspace=")
    return make(store, prompt if isinstance(prompt, str) else list(prompt), list(config.layers), config.rank,
                chat=chat, seed=config.seed)


def generate_czao(
    model: HookedTransformer,
    prompts: str | Sequence[str],
    constraint: Constraint,
    config: CZAOConfig | None = None,
    *,
    max_new_tokens: int = 32,
    chat: bool = False,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    document: str | None = None,
    subspace: Subspace | None = None,
    store: ActivationStore | None = None,
    predictor: ZPredictor | None = None,
    probe: "ValueProbe | Literal['auto'] | None" = "auto",
    directions: Directions | None = None,
    basis_directions: Mapping[int, Tensor] | None = None,
    batch_size: int = 8,
    progress: bool = False,
    keep_logprobs: bool = False,
    row_seeds: Sequence[int] | None = None,
) -> list[CZAOResult]:
    """Generate with CZAO for each prompt, returning text and telemetry in the prompts' order.

    Prompts go through the decode loop ``batch_size`` at a time (:class:`BatchedCZAO`: each row's
    search is its own, the candidates of all rows share one forward per round); greedy results do
    not depend on ``batch_size``. With sampling, the rows of a batch draw from one generator seeded
    by ``seed``. ``result.seconds`` is the batch's wall-clock over its prompts.
    Each prompt is encoded once; the subspace, the store and the decode loop share its tokens.
    ``directions`` (per layer of R, e.g. a CAA vector) seed the search; by default the constraint's
    own (:func:`czao_lens.seeds.seed_directions`) do, when ``config.seed_direction``.
    ``basis_directions`` (per layer of R, e.g. SAE decoder rows) span each prompt's subspace instead
    of ``config.basis`` (see :func:`build_subspace`).
    ``keep_logprobs`` also keeps the steered next-token log-probs (``result.step_logprobs``);
    ``result.pairs`` feeds :func:`distill_predictor`. ``row_seeds`` gives each prompt its own search
    seed (``config.seed`` per row), so a prompt's result does not depend on its batch (greedy decoding)."""
    config = config or CZAOConfig()
    check_sampling(max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p)
    if batch_size < 1:
        raise CZAOError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise CZAOError(f"{len(row_seeds)} row seeds for {len(prompts)} prompts: give one per prompt")
    configs = [config] * len(prompts) if row_seeds is None else [replace(config, seed=int(s)) for s in row_seeds]
    store = store or ActivationStore(model)
    value = resolve_probe(model, constraint, config, probe)
    # The seed directions depend on the constraint and the layers only: found once for all prompts.
    seeds = directions
    if seeds is None and config.seed_direction:
        layers = subspace.layers if subspace is not None else check_layers(
            model.cfg.n_layers, sorted(set(config.layers)), "layer in R", SubspaceError)
        seeds = seed_directions(model, constraint, value, layers)
    # Verified repair rewinds a finished greedy row through the run's KV cache (sequence level only).
    repairs = bool(config.repair) and constraint.level == "sequence" and greedy
    stops = stop_token_ids(model)
    results = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo: lo + batch_size]
        enc = encode_prompts(model, chunk, chat=chat)
        ctls = [_row_controller(model, constraint, configs[lo + b], enc, b, prompt, subspace=subspace, store=store,
                                value=value, seeds=seeds, document=document, predictor=predictor,
                                max_new_tokens=max_new_tokens, basis_directions=basis_directions)
                for b, prompt in enumerate(chunk)]
        t0 = time.perf_counter()
        gen = generate_tokens(model, enc, chunk, max_new_tokens=max_new_tokens, greedy=greedy,
                              temperature=temperature, top_p=top_p, seed=seed,
                              controller=ctls[0] if len(ctls) == 1 else BatchedCZAO(ctls), progress=progress,
                              keep_logprobs=keep_logprobs, config={"chat": chat, "system_prompt": None},
                              keep_cache=repairs)
        seconds = (time.perf_counter() - t0) / len(chunk)
        for b, (prompt, ctl) in enumerate(zip(chunk, ctls)):
            text, tokens, rec = gen.texts[b], gen.new_tokens[b], None
            lps = gen.step_logprobs[b] if keep_logprobs else None
            ok = _final_check(constraint, ctl.context, text)
            if repairs and not ok and tokens and ctl.spent < ctl.cap:
                fixed, fixed_lps, rec = _repair_row(model, constraint, config, ctl, enc, gen, b, seed=seed)
                seconds_b = seconds + rec.seconds
                if not rec.rounds:
                    rec = None  # what was left of the budget did not cover one row to the end
                elif fixed is not None:
                    tokens, lps = fixed, fixed_lps
                    text = model.tokenizer.decode([i for i in fixed if i not in stops], skip_special_tokens=False)
                    ok = _final_check(constraint, ctl.context, text)
            else:
                seconds_b = seconds
            results.append(CZAOResult(
                prompt=prompt, text=text, tokens=tokens, records=ctl.records, satisfied=ok,
                unreachable=any(r.unreachable for r in ctl.records), seconds=seconds_b,
                config=asdict(configs[lo + b]), constraint=constraint.describe(),
                step_logprobs=lps,
                pairs=ctl.pairs(), probe=ctl.probe, repair=rec.to_dict() if rec is not None else None,
            ))
    return results


def _final_check(constraint: Constraint, context: Context, text: str) -> bool:
    try:
        return bool(constraint.check_text(text, replace(context, generated=text)))
    except Exception as exc:
        raise CZAOError(f"constraint {constraint.describe()} raised in its final check: {exc!r}") from exc


def _repair_row(
    model: HookedTransformer, constraint: Constraint, config: CZAOConfig, ctl: CZAOController, enc: EncodedPrompts,
    gen: Any, b: int, *, seed: int,
) -> tuple[list[int] | None, Tensor | None, RepairRecord]:
    """Verified repair of row ``b`` (:mod:`czao_lens.repair`) at the first layer of its R, within what
    is left of the prompt's budget."""
    new = torch.tensor(gen.new_tokens[b], dtype=torch.long)
    trace = Trace(torch.cat([enc.tokens[b], new]), torch.cat([enc.attention_mask[b], torch.ones_like(new)]),
                  len(new), gen.cache, b, gen.step_logprobs[b] if gen.step_logprobs is not None else None)
    layer = ctl.subspace.start_layer
    return repair(model, constraint, replace(ctl.context, generated=""), trace, layer=layer,
                  scale=ctl.subspace.scales[layer], k=config.repair, rounds=config.repair_rounds,
                  kl_eps=config.kl_eps, seed=seed,
                  budget=None if math.isinf(ctl.cap) else ctl.cap - ctl.spent)


def _row_controller(
    model: HookedTransformer, constraint: Constraint, config: CZAOConfig, enc: EncodedPrompts, b: int, prompt: str, *,
    subspace: Subspace | None, store: ActivationStore, value: ValueProbe | None, seeds: Directions | None,
    document: str | None, predictor: ZPredictor | None, max_new_tokens: int,
    basis_directions: Mapping[int, Tensor] | None = None,
) -> CZAOController:
    """The controller of row ``b``: its own subspace (seeded when there is a direction) and state."""
    sub = subspace or build_subspace(model, _prompt_ids(enc, b), config, store=store, basis_directions=basis_directions)
    seed_z = None
    if seeds is not None:
        sub, seed_z = seeded(sub, seeds, seed=config.seed)
    return CZAOController(model, constraint, sub, config, prompt_text=prompt, document=document, predictor=predictor,
                          value=value, max_new_tokens=max_new_tokens, seed_z=seed_z)


def resolve_probe(
    model: HookedTransformer, constraint: Constraint, config: CZAOConfig, probe: "ValueProbe | Literal['auto'] | None"
) -> ValueProbe | None:
    """The value probe CZAO will use (:func:`czao_lens.probes.probe_for`); token-level constraints and
    ``value_probe=False`` use none."""
    if probe is None or not config.value_probe or constraint.level != "sequence":
        return None
    return probe_for(model, constraint, probe)


def distill_predictor(results: Sequence[CZAOResult], alpha: float = 0.01) -> ZPredictor:
    """Fit a :class:`ZPredictor` on the (residual, z*) pairs of earlier CZAO runs (``result.pairs``)."""
    pairs = [r.pairs for r in results if r.pairs is not None and len(r.pairs)]
    if not pairs:
        raise CZAOError("no optimised tokens to distill from: run CZAO on prompts that need steering first")
    dims = {p.z.shape[1] for p in pairs}
    if len(dims) > 1:
        raise CZAOError(f"the runs used subspaces of different sizes {sorted(dims)}; distill runs of one config")
    return ZPredictor.fit(torch.cat([p.x for p in pairs]), torch.cat([p.z for p in pairs]), alpha,
                          model=pairs[0].model, hooks=pairs[0].hooks)


class _MarginProbe:
    """A controller that measures the reachability margin at the first generated token."""

    def __init__(self, ctl: CZAOController, b_max: float, iters: int):
        self.ctl, self.b_max, self.iters = ctl, b_max, iters
        self.start_layer, self.read_hooks = ctl.start_layer, ctl.read_hooks
        self.result: dict[str, Any] = {}

    def __call__(self, step: DecodeStep) -> None:
        v0 = self.ctl.screen(step)
        if v0 <= SAT_TOL:
            self.result = {"rho": 0.0, "rho_delta_norm": 0.0, "reachable": True, "v0": v0}
            return None
        found = self.ctl.search(step, norm_cap=self.b_max)
        if not found.feasible:
            self.result = {"rho": math.inf, "rho_delta_norm": math.inf, "reachable": False, "v0": v0, "b_max": self.b_max}
            return None
        lo, hi, z_hi = 0.0, self.b_max, found.z
        for _ in range(self.iters):
            mid = (lo + hi) / 2
            found = self.ctl.search(step, norm_cap=mid)
            if found.feasible:
                hi, z_hi = mid, found.z
            else:
                lo = mid
        self.result = {"rho": hi, "rho_delta_norm": float(self.ctl.subspace.delta_norm(z_hi)), "reachable": True,
                       "v0": v0, "bracket": [lo, hi]}
        return None


def reachability_margin(
    model: HookedTransformer,
    prompt: str,
    constraint: Constraint,
    config: CZAOConfig | None = None,
    *,
    b_max: float = 3.0,
    iters: int = 6,
    chat: bool = False,
    store: ActivationStore | None = None,
) -> dict[str, Any]:
    """rho(C, x): the smallest |z| (and |delta|) that satisfies C at the first token, by bisection.

    ``rho = inf`` means unreachable even at ``b_max`` within the step budget and the KL bound.
    """
    config = config or CZAOConfig()
    enc = encode_prompts(model, prompt, chat=chat)
    sub = build_subspace(model, _prompt_ids(enc), config, store=store)
    probe = _MarginProbe(CZAOController(model, constraint, sub, config, prompt_text=prompt), b_max, iters)
    generate_tokens(model, enc, [prompt], max_new_tokens=1, controller=probe, config={"chat": chat, "system_prompt": None})
    return probe.result
