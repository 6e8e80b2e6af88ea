"""The benchmark's methods: how each one is fitted on a task's fit split and run on one test item.

The methods are the steering registry's (:mod:`czao_lens.steering.registry`) that have a strength
sweep here (:data:`SWEEPS`), between the references: ``unsteered`` and ``prompting`` first, ``czao``
and ``bestofn`` last. A steering method is fitted through the registry from one
:class:`~czao_lens.steering.registry.FitInput` per task (:class:`TaskFit`): labelled samples for
generation tasks, pooled over their continuation tokens, and the A/B items for choice tasks.

Every method ends up as a :class:`Fitted`: a chosen setting plus ``run(prompt)`` for generation tasks
or an ``intervention`` for choice tasks. Hyperparameters come from a small sweep scored on the fit
split only (``tune``): maximise satisfaction subject to fluency guards (for generation: mean perplexity
under the unsteered model at most ``ppl_guard`` times unsteered's, and distinct-2 at least
``distinct_guard`` times unsteered's, since a text that repeats one token has a low perplexity too;
for choice tasks: KL on neutral prompts at most ``kl_guard`` nats); ties go to the gentler setting.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence

from torch import Tensor
from transformer_lens import HookedTransformer

from czao_lens.bench.metrics import distinct_n, fluency, mean, unsteered_logprobs
from czao_lens.bench.tasks import BenchError, Task
from czao_lens.constraints import Context
from czao_lens.czao import CZAOConfig, generate_czao
from czao_lens.generate import generate
from czao_lens.guided import generate_guided
from czao_lens.probes import probe_for
from czao_lens.perturb import Intervention
from czao_lens.prompts import format_prompt
from czao_lens.steering.common import answer_pair_texts
from czao_lens.steering.evaluate import NEUTRAL_PROMPTS, ab_probability, answer_text_probability, generate_steered, last_logits
from czao_lens.steering.registry import FitInput, get_method, pool_continuation, steering_methods
from czao_lens.steering.vectors import SteeringVector
from czao_lens.store import ActivationStore


REFERENCES = ("unsteered", "prompting")  # the model as is, and asked by instruction
# They select, guide or constrain generated text (choice tasks read fixed answers). probe-guided is
# output-space guidance with CZAO's value probe; unsteered-sampled is the fluency reference of the
# sampled method (best-of-n), with the same decoding.
# czao-sae is CZAO in the span of SAE decoder rows (the task's contrastive features) instead of the
# activation basis.
GENERATE_ONLY = ("czao", "czao-sae", "probe-guided", "bestofn", "unsteered-sampled")
SAMPLED = ("bestofn", "unsteered-sampled")  # nucleus sampling; every other method decodes greedily


@dataclass
class Output:
    """One method on one generation prompt."""

    text: str
    tokens: list[int]
    steered_lp: Tensor | None  # [n_new, vocab] or None (the unsteered distribution)
    passes_per_token: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Fitted:
    """A method with its chosen setting, ready to run on test items."""

    name: str
    setting: dict[str, Any]
    run: Callable[[str], Output] | None = None  # generation tasks
    intervention: Intervention | None = None  # choice tasks: the steering applied while scoring
    system_prompt: str | None = None  # choice tasks: the prompting method
    sweep: list[dict[str, Any]] = field(default_factory=list)
    fit_seconds: float = 0.0


@dataclass
class BenchSettings:
    """Sizes and grids of one benchmark run (see ``czao-lens bench --help``)."""

    max_new_tokens: int = 24
    layer: int = 12  # steering layer of CAA / SAE / CAST and CZAO's R; A-LQR runs from here to the last layer
    condition_layer: int = 8  # CAST decides here
    samples_per_fit_prompt: int = 4
    n_tune: int = 8
    caa_grid: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)  # multiples of the raw mean difference
    choice_caa_grid: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    sae_grid: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)  # the SAE vector is scaled to the CAA vector's norm first
    lqr_grid: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 3.0)
    czao_eps_grid: tuple[float, ...] = (0.5, 1.5)
    sae_features: int = 8
    ppl_guard: float = 2.0
    distinct_guard: float = 0.5  # degenerate repetition ("?\n\n?\n\n...") satisfies many evaluators
    kl_guard: float = 1.0
    jac_prompts: int = 24
    jac_layers: tuple[int, ...] | None = None  # None: layer..n_layers-1
    bestofn_top_p: float = 0.9  # nucleus sampling: pure temperature-1 samples of a 135M model are barely fluent
    guided_top_k: int = 4  # probe-guided decoding re-ranks this many next tokens (1 + k row passes/token at most)
    seed: int = 0
    # Chat template for the prompting method, the choice tasks, the neutral KL prompts and the Jacobian
    # prompts; None: auto (the template when the tokenizer has one), resolved to a bool by run_bench.
    # Generation tasks always continue the raw text.
    chat: bool | None = None

    def __post_init__(self) -> None:
        counts = ("max_new_tokens", "samples_per_fit_prompt", "n_tune", "sae_features", "jac_prompts", "guided_top_k")
        for name in counts:
            _check(name, getattr(self, name), 1, integer=True)
        for name in ("layer", "condition_layer"):  # the upper bound needs the model: run_bench checks it
            _check(name, getattr(self, name), 0, integer=True)
        for name in ("caa_grid", "choice_caa_grid", "sae_grid", "lqr_grid", "czao_eps_grid"):
            grid = getattr(self, name)
            if not grid:
                raise BenchError(f"BenchSettings.{name} is empty; give at least one value")
            for v in grid:
                _check(name, v, 0.0, open_low=True)
        if self.jac_layers is not None:
            if not self.jac_layers:
                raise BenchError("BenchSettings.jac_layers is empty; give layers or None (layer..n_layers-1)")
            for v in self.jac_layers:
                _check("jac_layers", v, 0, integer=True)
        _check("ppl_guard", self.ppl_guard, 1.0)  # a ratio to unsteered's perplexity
        _check("kl_guard", self.kl_guard, 0.0, open_low=True)
        _check("distinct_guard", self.distinct_guard, 0.0, high=1.0)
        _check("bestofn_top_p", self.bestofn_top_p, 0.0, high=1.0, open_low=True)


def _check(name: str, value: Any, low: float, *, high: float = math.inf, integer: bool = False, open_low: bool = False) -> None:
    """One BenchSettings field: a number (an integer where asked), finite, in its range."""
    kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not kind_ok or not math.isfinite(value):
        raise BenchError(f"BenchSettings.{name} must be a finite {'integer' if integer else 'number'}, got {value!r}")
    if (value <= low if open_low else value < low) or value > high:
        bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise BenchError(f"BenchSettings.{name} must be in {bounds}, got {value!r}")


# ----------------------------------------------------------------------------- generation


def static_run(model: HookedTransformer, intervention: Intervention | None, s: BenchSettings) -> Callable[[str], Output]:
    """Greedy generation of one prompt, steered by ``intervention`` (``None``: unsteered)."""

    def run(prompt: str) -> Output:
        t0 = time.perf_counter()
        if intervention is None:
            g = generate(model, prompt, max_new_tokens=s.max_new_tokens, seed=s.seed, keep_logprobs=True)
        else:
            g = generate_steered(model, prompt, intervention, chat=False, max_new_tokens=s.max_new_tokens, seed=s.seed, keep_logprobs=True)
        sec = time.perf_counter() - t0
        steered = g.step_logprobs[0] if intervention is not None else None
        return Output(g.texts[0], g.new_tokens[0], steered, _passes(g), sec)

    return run


def settings_chat(s: BenchSettings) -> bool:
    if s.chat is None:  # run_bench resolves it; a caller building settings by hand must too
        raise BenchError("BenchSettings.chat is unresolved (None): resolve it with prompts.resolve_chat first")
    return s.chat


def _passes(g) -> float:
    return mean([c["passes"] for c in g.cost]) if g.cost else 1.0


def prompting_text(model: HookedTransformer, task: Task, prompt: str, *, chat: bool) -> str:
    """With ``chat``: the chat template with the task's system instruction, the assistant turn starting
    with the prefix. Without (a base model): the instruction as plain text, a blank line, the prefix."""
    if not chat:
        return format_prompt(model, prompt, chat=False, system_prompt=task.instruction)
    return format_prompt(model, "Continue this text.", chat=True, system_prompt=task.instruction) + prompt


def prompting_run(model: HookedTransformer, task: Task, s: BenchSettings) -> Callable[[str], Output]:
    chat = settings_chat(s)

    def run(prompt: str) -> Output:
        text = prompting_text(model, task, prompt, chat=chat)
        t0 = time.perf_counter()
        g = generate(model, text, max_new_tokens=s.max_new_tokens, seed=s.seed, keep_logprobs=True)
        sec = time.perf_counter() - t0
        tok = model.tokenizer
        extra = len(tok(text)["input_ids"]) - len(tok(prompt)["input_ids"])  # instruction positions prefilled
        n = max(len(g.new_tokens[0]), 1)
        return Output(g.texts[0], g.new_tokens[0], g.step_logprobs[0], _passes(g) + extra / n, sec)

    return run


def check(task: Task, model: HookedTransformer, prompt: str, text: str) -> bool:
    """The task's primary evaluator on one continuation."""
    return bool(task.constraint.check_text(text, Context(prompt=prompt, generated=text, tokenizer=model.tokenizer)))


def matched_n(passes_per_token: float) -> int:
    """Best-of-n's n for a compute budget of ``passes_per_token`` (rounded, within [2, 16])."""
    return int(min(16, max(2, round(passes_per_token))))


def bestofn_run(model: HookedTransformer, task: Task, n: int, s: BenchSettings) -> Callable[..., Output]:
    """Sample n continuations (nucleus sampling, one batch) and keep the first the primary evaluator
    accepts. ``run(prompt, n=...)`` overrides n per item (the harness matches it to CZAO's compute)."""

    def run(prompt: str, n: int = n) -> Output:
        t0 = time.perf_counter()
        g = generate(model, [prompt] * n, max_new_tokens=s.max_new_tokens, greedy=False, temperature=1.0,
                     top_p=s.bestofn_top_p, seed=s.seed)
        oks = [check(task, model, prompt, t) for t in g.texts]
        pick = oks.index(True) if any(oks) else 0
        sec = time.perf_counter() - t0
        # Samples come from the unsteered model (nucleus-truncated): KL is reported as 0.
        return Output(g.texts[pick], g.new_tokens[pick], None, float(n), sec, {"n": n, "accepted": sum(oks)})

    return run


def sampled_run(model: HookedTransformer, s: BenchSettings) -> Callable[[str], Output]:
    """One nucleus sample of the unsteered model, with best-of-n's decoding and seed."""

    def run(prompt: str) -> Output:
        t0 = time.perf_counter()
        g = generate(model, prompt, max_new_tokens=s.max_new_tokens, greedy=False, temperature=1.0,
                     top_p=s.bestofn_top_p, seed=s.seed)
        return Output(g.texts[0], g.new_tokens[0], None, 1.0, time.perf_counter() - t0)

    return run


def czao_run(model: HookedTransformer, task: Task, cfg: CZAOConfig, s: BenchSettings, store: ActivationStore,
             basis_directions: dict[int, Any] | None = None) -> Callable[[str], Output]:
    """CZAO on one prompt. Its cost is the row-weighted passes per token (what a CPU pays; best-of-n
    is matched to it), the batched-call count kept as ``passes_batched``. ``basis_directions``
    (``{layer: [k, d]}``, SAE decoder rows) replace the activation basis."""

    def run(prompt: str) -> Output:
        t0 = time.perf_counter()
        r = generate_czao(model, prompt, task.constraint, cfg, max_new_tokens=s.max_new_tokens, seed=s.seed,
                          store=store, keep_logprobs=True, basis_directions=basis_directions)[0]
        sec = time.perf_counter() - t0
        summ = r.summary()
        opt = [rec.steps for rec in r.records if rec.optimized]
        return Output(r.text, r.tokens, r.step_logprobs, summ["row_passes_per_token"], sec,
                      {"unreachable": r.unreachable, "steps": opt, "optimized_tokens": summ["optimized_tokens"],
                       "unreachable_tokens": summ["unreachable_tokens"], "passes_batched": summ["passes_per_token"],
                       "screened_tokens": summ["screened_tokens"],
                       "probe": any(rec.p_violation is not None for rec in r.records)})

    return run


def guided_run(model: HookedTransformer, task: Task, s: BenchSettings) -> Callable[[str], Output]:
    """Probe-guided decoding (:mod:`czao_lens.guided`) with the task's cached value probe; refuses at
    fit time when there is none (train it with ``czao-lens probe train``)."""
    probe = probe_for(model, task.constraint, "auto")
    if probe is None:
        raise BenchError(f"no value probe for {task.constraint.describe()}: train one with "
                         f"`czao-lens probe train --constraint '{json.dumps(task.constraint.to_dict())}'`")

    def run(prompt: str) -> Output:
        t0 = time.perf_counter()
        r = generate_guided(model, prompt, task.constraint, probe=probe, top_k=s.guided_top_k,
                            max_new_tokens=s.max_new_tokens, seed=s.seed, keep_logprobs=True)[0]
        summ = r.summary()
        return Output(r.text, r.tokens, r.step_logprobs, summ["row_passes_per_token"], time.perf_counter() - t0,
                      {"mean_p_violation": summ["mean_p_violation"]})

    return run


@dataclass
class Contrast:
    """Unsteered samples on the fit prompts, labelled by the task's primary evaluator."""

    pos_ids: list[list[int]]  # prompt + continuation token ids that satisfy the constraint
    neg_ids: list[list[int]]
    pos_texts: list[str]
    neg_texts: list[str]
    prompt_lens_pos: list[int]
    prompt_lens_neg: list[int]
    trigger_prompts: list[str]  # fit prompts whose samples mostly violate
    other_prompts: list[str]

    def describe(self) -> dict:
        return {"positive": len(self.pos_ids), "negative": len(self.neg_ids),
                "trigger_prompts": len(self.trigger_prompts), "other_prompts": len(self.other_prompts)}


def sample_contrast(model: HookedTransformer, task: Task, s: BenchSettings) -> Contrast:
    """``samples_per_fit_prompt`` temperature-1 samples per fit prompt, split by the primary evaluator."""
    c = Contrast([], [], [], [], [], [], [], [])
    for i, prompt in enumerate(task.fit):
        g = generate(model, [prompt] * s.samples_per_fit_prompt, max_new_tokens=s.max_new_tokens, greedy=False,
                     temperature=1.0, seed=s.seed + i)
        bad = 0
        for toks, text, ptoks in zip(g.new_tokens, g.texts, g.prompt_tokens):
            ok = check(task, model, prompt, text)
            bad += not ok
            (c.pos_ids if ok else c.neg_ids).append(ptoks + toks)
            (c.pos_texts if ok else c.neg_texts).append(prompt + text)
            (c.prompt_lens_pos if ok else c.prompt_lens_neg).append(len(ptoks))
        (c.trigger_prompts if 2 * bad >= len(g.texts) else c.other_prompts).append(prompt)
    if not c.pos_ids or not c.neg_ids:
        raise BenchError(f"task {task.name}: the fit samples are all {'satisfying' if c.pos_ids else 'violating'}; "
                         "no contrast to build a steering direction from (use more fit prompts)")
    return c


def tune_generate(model: HookedTransformer, task: Task, runs: dict[str, Callable[[str], Output]], s: BenchSettings,
                  base: dict | None) -> tuple[str, list[dict]]:
    """Score each setting on the tune prompts; return the chosen key and the sweep table. ``base`` is
    unsteered's row of this table (None when scoring unsteered itself): the guards are relative to it."""
    prompts = task.fit[: s.n_tune]
    rows = []
    for key, run in runs.items():
        oks, ppls, passes, texts = [], [], [], []
        for p in prompts:
            out = run(p)
            oks.append(check(task, model, p, out.text))
            if out.tokens:
                ppls.append(fluency(unsteered_logprobs(model, p, out.tokens), out.tokens, None)["ppl"])
            passes.append(out.passes_per_token)
            texts.append(out.text)
        rows.append({"setting": key, "satisfaction": mean(oks), "ppl": mean(ppls), "passes_per_token": mean(passes),
                     "distinct2": distinct_n(texts, 2)})
    bounds = {} if base is None else {"ppl": (-math.inf, base["ppl"] * s.ppl_guard),
                                      "distinct2": (base["distinct2"] * s.distinct_guard, math.inf)}
    return choose(rows, "satisfaction", bounds), rows


def choose(rows: list[dict], score_key: str, bounds: dict[str, tuple[float, float]]) -> str:
    """The best-scoring setting with every ``bounds[key] = (lo, hi)`` met (a NaN passes); else the
    gentlest (grids go gentle first)."""
    ok = [r for r in rows if not any(r[k] < lo or r[k] > hi for k, (lo, hi) in bounds.items())]
    if not ok:
        return rows[0]["setting"]
    best = max(r[score_key] for r in ok)
    return next(r["setting"] for r in ok if r[score_key] == best)


# ----------------------------------------------------------------------------- choice tasks


def choice_scores(model: HookedTransformer, items: Sequence, intervention: Intervention | None = None,
                  system_prompt: str | None = None, *, chat: bool) -> dict[str, Tensor]:
    """p(matching answer text) and p(matching letter) per item."""
    return {"p_text": answer_text_probability(model, items, intervention, chat=chat, system_prompt=system_prompt),
            "p_letter": ab_probability(model, items, intervention, chat=chat, system_prompt=system_prompt)}


def neutral_reference(model: HookedTransformer, *, chat: bool) -> Tensor:
    """Unsteered next-token logits after the neutral prompts, formatted as the choice tasks are."""
    return last_logits(model, [format_prompt(model, p, chat=chat) for p in NEUTRAL_PROMPTS])


def neutral_kl(model: HookedTransformer, intervention: Intervention | None = None, system_prompt: str | None = None,
               reference: Tensor | None = None, *, chat: bool) -> float:
    """Mean KL(steered || unsteered) of the first response token on neutral prompts (nats)."""
    base = reference if reference is not None else neutral_reference(model, chat=chat)
    if intervention is None and system_prompt is None:
        return 0.0
    texts = [format_prompt(model, p, chat=chat, system_prompt=system_prompt) for p in NEUTRAL_PROMPTS]
    got = last_logits(model, texts, intervention)
    lq, lp = base.log_softmax(-1), got.log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def tune_choice(model: HookedTransformer, task: Task, interventions: dict[str, Intervention], s: BenchSettings,
                reference: Tensor) -> tuple[str, list[dict]]:
    """Score each setting on the first fit items; return the chosen key and the sweep table."""
    items = task.fit[: max(s.n_tune, 2)]
    rows = []
    for key, f in interventions.items():
        p = answer_text_probability(model, items, f, chat=settings_chat(s))
        rows.append({"setting": key, "satisfaction": float((p > 0.5).float().mean()), "p_text": float(p.mean()),
                     "kl_neutral": neutral_kl(model, f, reference=reference, chat=settings_chat(s))})
    # Mean probability is a finer signal than the >0.5 rate on a handful of items.
    return choose(rows, "p_text", {"kl_neutral": (-math.inf, s.kl_guard)}), rows


def answer_texts(model: HookedTransformer, items: Sequence, *, chat: bool) -> tuple[list[str], list[str]]:
    pos, neg, _, _ = answer_pair_texts(model, items, chat=chat)
    return pos, neg


# ----------------------------------------------------------------------------- steering methods via the registry


class Resources(Protocol):
    """What several tasks share (built lazily by the harness)."""

    def jacobians(self) -> Any: ...

    def sae(self) -> Any: ...


class TaskFit:
    """One task's :class:`FitInput` and CAA vector, built once, on the first steering method's turn.

    Generation tasks fit from unsteered samples labelled by the primary evaluator (CAA pools their
    continuation tokens; A-LQR reads their last token; CAST's condition contrasts the prompts whose
    samples mostly violate); choice tasks from their A/B items (answer-text readout).
    """

    def __init__(self, model: HookedTransformer, task: Task, s: BenchSettings, store: ActivationStore, res: Resources,
                 info: dict[str, Any]):
        self.model, self.task, self.s, self.store, self.res, self.info = model, task, s, store, res, info
        self.contrast: Contrast | None = None
        self.inp: FitInput | None = None
        self.caa: SteeringVector | None = None
        self.sae_bases: dict[int, Any] = {}  # top-k contrastive SAE features, by k

    def prepare(self) -> None:
        """Sample the contrast (generation tasks) and fit the CAA vector, once per task."""
        if self.inp is None:
            self.inp = self._input()
        if self.caa is None:
            self.caa = get_method("caa").fit(self.model, self.inp)
            self.info["caa_norm"] = float(self.caa.directions[self.s.layer].norm())

    def _input(self) -> FitInput:
        s, task = self.s, self.task
        common = dict(layers=[s.layer], condition_layer=s.condition_layer, concept=task.name, store=self.store)
        if task.kind == "generate":
            c = self.contrast = sample_contrast(self.model, task, s)
            self.info["contrast"] = c.describe()
            return FitInput(pos_texts=c.pos_texts, neg_texts=c.neg_texts, pos_ids=c.pos_ids, neg_ids=c.neg_ids,
                            prompt_lens_pos=c.prompt_lens_pos, prompt_lens_neg=c.prompt_lens_neg,
                            trigger=c.trigger_prompts, other=c.other_prompts, pool=pool_continuation, chat=False, **common)
        return FitInput(items=task.fit, readout="answer", trigger=[it.stem() for it in task.fit],
                        other=[it.stem() for it in task.contrast_items], chat=settings_chat(s), **common)

    def fit(self, name: str) -> Any:
        """The fitted object of steering method ``name`` on this task."""
        self.prepare()
        return SWEEPS[name].fit(self)

    def sae_basis(self, k: int) -> Any:
        """The top-``k`` contrastive SAE features of this task (FGAA-style, dense and BOS features
        dropped), computed once per ``k``: SAE steering's vector and CZAO's SAE subspace."""
        from czao_lens.diagnostics.features import select_features

        self.prepare()
        if k not in self.sae_bases:
            if self.contrast is not None:
                pos, neg = self.contrast.pos_texts, self.contrast.neg_texts
            else:
                pos, neg = answer_texts(self.model, self.task.fit, chat=settings_chat(self.s))
            self.sae_bases[k] = select_features(self.model, self.res.sae(), pos, neg, k=k, store=self.store)
        return self.sae_bases[k]


def _fit_caa(f: TaskFit) -> SteeringVector:
    return f.caa


def _fit_sae(f: TaskFit) -> SteeringVector:
    """FGAA-style: top-k SAE features by (positive - negative) mean activation, decoded with those
    weights, and scaled to the CAA vector's norm so both methods share one multiplier grid."""
    sae = f.res.sae()
    basis = f.sae_basis(f.s.sae_features)
    vec = get_method("sae").fit(f.model, replace(f.inp, sae=sae, features=basis.indices, coeffs=basis.scores.tolist()))
    (layer,) = vec.directions
    raw = float(vec.directions[layer].norm())
    vec.directions[layer] = vec.directions[layer] * (f.info["caa_norm"] / max(raw, 1e-12))
    vec.meta.update({"features": basis.indices, "scores": basis.scores.tolist(), "raw_norm": raw})
    return vec


def _fit_cast(f: TaskFit) -> Any:
    return get_method("cast").fit(f.model, replace(f.inp, vector=f.caa))


def _fit_lqr(f: TaskFit) -> Any:
    jac = f.res.jacobians()
    return get_method("lqr").fit(f.model, replace(f.inp, jacobians=jac, horizon=list(jac.layers)))


@dataclass(frozen=True)
class Sweep:
    """How the bench fits a steering method on a task and sweeps its strength: the BenchSettings grid
    for generation and for choice tasks, and how a setting is named in the sweep table."""

    fit: Callable[[TaskFit], Any]
    grid: str
    choice_grid: str
    label: str

    def values(self, s: BenchSettings, kind: str) -> tuple[float, ...]:
        return getattr(s, self.grid if kind == "generate" else self.choice_grid)


SWEEPS = {
    "caa": Sweep(_fit_caa, "caa_grid", "choice_caa_grid", "x{:g}"),
    "sae": Sweep(_fit_sae, "sae_grid", "sae_grid", "x{:g}"),
    "cast": Sweep(_fit_cast, "caa_grid", "choice_caa_grid", "x{:g}"),
    "lqr": Sweep(_fit_lqr, "lqr_grid", "lqr_grid", "lambda={:g}"),
}
STEERING = tuple(m.name for m in steering_methods() if m.name in SWEEPS)  # registry order
METHODS = REFERENCES + STEERING + GENERATE_ONLY


def strength_grid(name: str, obj: Any, s: BenchSettings, kind: str) -> dict[str, Intervention]:
    """The fitted object at every strength of its sweep, by setting name."""
    sweep, method = SWEEPS[name], get_method(name)
    return {sweep.label.format(g): method.at(obj, g) for g in sweep.values(s, kind)}
