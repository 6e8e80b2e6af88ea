"""No hook ever leaks: every public API that attaches hooks (bench method runs included), with a
failure injected at a random point.

For each API, hypothesis draws a fault (an exception or a ``KeyboardInterrupt`` raised from inside the
k-th transformer block call, a constraint or evaluator that raises or returns NaN at its k-th call, a
NaN in the steering delta) and afterwards checks that

* no hook is left on any hook point (TL's lists and torch's own hook dicts on every module),
* the model's logits on a fixed prompt equal the clean model's bit for bit,
* an injected ``KeyboardInterrupt`` reaches the caller as itself (never swallowed or re-wrapped),
* a NaN delta is refused with a czao-lens error, never applied silently.

Mechanics only, so a tiny random Llama-like model (SmolLM2's tokenizer). Example counts are small in
CI; set ``CZAO_LENS_HYPOTHESIS_EXAMPLES`` for a longer run.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformer_lens import HookedTransformer

from czao_lens.bench.methods import BenchSettings, choice_scores, czao_run, neutral_kl, static_run
from czao_lens.bench.tasks import Task
from czao_lens.constraints import Constraint
from czao_lens.czao import CZAOConfig, generate_czao, reachability_margin
from czao_lens.diagnostics.landscape import loss_landscape
from czao_lens.diagnostics.lyapunov import fd_growth, jacobian_top_singular, lyapunov_spectrum
from czao_lens.diagnostics.patching import activation_patching
from czao_lens.diagnostics.tracing import Target, make_prompt, rank_layers, single_token_id, trace_prompt
from czao_lens.errors import CzaoLensError
from czao_lens.generate import generate
from czao_lens.perturb import Perturbation, resid_hook
from czao_lens.runtime import accelerate
from czao_lens.steering import ABItem, SteeringVector
from czao_lens.steering.cast import CAST, fit_condition
from czao_lens.steering.evaluate import ab_probability, generate_steered
from czao_lens.steering.lqr import block_jacobians, fit_alqr
from czao_lens.steering.sae import SAESplice, make_sae
from czao_lens.steering.scaling import ActivationScaling
from czao_lens.store import ActivationStore
from tests.conftest import tiny_config

EXAMPLES = int(os.environ.get("CZAO_LENS_HYPOTHESIS_EXAMPLES", "4"))
PROBE = "The quick brown fox jumps over the lazy dog"
POS = ["I love this wonderful day", "What a great and happy result"]
NEG = ["I hate this awful day", "What a terrible and sad result"]
FAULTS = ("none", "error", "interrupt", "evaluator", "evaluator_interrupt", "nan")


class Injected(RuntimeError):
    """The failure the tests inject (not a czao-lens error: an arbitrary bug in user code)."""


@dataclass
class Fault:
    kind: str
    at: int  # the k-th call (of a block forward, or of the evaluator) fails
    fired: bool = False

    def exception(self) -> BaseException:
        self.fired = True
        return KeyboardInterrupt() if "interrupt" in self.kind else Injected(f"injected at call {self.at}")


@dataclass(eq=False, repr=False)
class FaultyConstraint(Constraint):
    """Always violated (so CZAO searches), and fails at its ``fault.at``-th call when told to."""

    fault: Fault | None = None
    calls: int = 0
    level = "token"

    def violation_logits(self, logprobs, context=None):
        self.calls += 1
        f = self.fault
        if f is not None and self.calls == f.at:
            if f.kind in ("evaluator", "evaluator_interrupt"):
                raise f.exception()
            if f.kind == "nan":
                f.fired = True
                return torch.full((logprobs.shape[0],), float("nan"))
        return torch.ones(logprobs.shape[0])

    def check_text(self, text, context=None):
        return False


class FaultySequence(FaultyConstraint):
    """The same on whole texts: sequence level, so CZAO's verified repair runs on every prompt."""

    level = "sequence"

    def violation_texts(self, texts, context=None):
        return self.violation_logits(torch.zeros(len(texts), 1), context)


@contextmanager
def block_fault(model: HookedTransformer, fault: Fault):
    """Make the ``fault.at``-th call of any transformer block raise (restored on exit)."""
    calls = [0]
    originals = [b.forward for b in model.blocks]

    def wrap(fwd):
        def forward(*a, **kw):
            calls[0] += 1
            if calls[0] == fault.at:
                raise fault.exception()
            return fwd(*a, **kw)

        return forward

    if fault.kind in ("error", "interrupt"):
        for b in model.blocks:
            b.forward = wrap(b.forward)
    try:
        yield
    finally:
        for b, fwd in zip(model.blocks, originals):
            if "forward" in b.__dict__:
                del b.forward
            assert b.forward == fwd


def leftover_hooks(model: HookedTransformer) -> list[str]:
    """Every hook still attached anywhere: TL's hook-point lists and torch's module hook dicts."""
    out = [f"{n} (TL)" for n, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]
    for n, mod in model.named_modules():
        if mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks:
            out.append(f"{n or 'model'} (torch)")
    return out


# ----------------------------------------------------------------------------- the model and fitted objects


@pytest.fixture(scope="module")
def env(smol, tmp_path_factory):
    """A tiny accelerated model (as load_model returns them) and one fitted object of each kind."""
    model = accelerate(HookedTransformer(tiny_config(), tokenizer=smol.tokenizer, default_padding_side="left"))
    model.eval()
    toks = model.to_tokens(PROBE, prepend_bos=False)
    with torch.no_grad():
        clean = model(toks).clone()
    d = model.cfg.d_model
    g = torch.Generator().manual_seed(0)
    jac = block_jacobians(model, prompts=POS + NEG, cache_dir=tmp_path_factory.mktemp("jac"))
    store = ActivationStore(model)
    a, b = store.tokenize(["The Eiffel Tower is located in the city of"])[0], store.tokenize(["The Colosseum Tower is located in the city of"])[0]
    n = min(len(a), len(b))
    return {
        "model": model,
        "tokens": toks,
        "clean": clean,
        "vec": torch.randn(d, generator=g),
        "cond": fit_condition(model, POS, NEG, 1),
        "alqr": fit_alqr(model, jac, pos_texts=POS, neg_texts=NEG, lam=2.0),
        "sae": make_sae(d, 64, "blocks.1.hook_resid_pre", seed=0, threshold_bias=-0.1),
        "trace": make_prompt(model, "The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris"),
        "patch": (a[-n:], b[-n:], Target(single_token_id(model, " Paris"), single_token_id(model, " Rome"))),
        "items": [ABItem("Is the sky blue?\n\n(A) Yes\n(B) No", "A", "B"), ABItem("Is fire cold?\n\n(A) Yes\n(B) No", "B", "A")],
    }


def _delta(e, fault: Fault) -> torch.Tensor:
    v = e["vec"].clone()
    if fault.kind == "nan":
        fault.fired = True
        v[fault.at % v.numel()] = float("nan")
    return v


def _value(fault: Fault, value: float) -> float:
    """``value``, or NaN when the fault is a NaN in the intervention's own numbers."""
    if fault.kind == "nan":
        fault.fired = True
        return float("nan")
    return value


CZ = CZAOConfig(layers=(1,), rank=4, max_steps=2, n_dirs=2)
CZ_UNCAPPED = CZAOConfig(layers=(1,), rank=4, max_steps=2, n_dirs=2, budget=None)  # repair is never skipped for budget


def _constraint(fault):
    return FaultyConstraint(fault=fault)


def _task(fault) -> Task:
    return Task(name="t", kind="generate", description="", instruction="Be kind.", source="", constraint=_constraint(fault))


# Each API: a callable (env, fault) that runs it the way a user would, on tiny inputs.
APIS = {
    "generate+perturbation": lambda e, f: generate(
        e["model"], "a b c", max_new_tokens=3, stop_at_eos=False,
        perturbations=[Perturbation(resid_hook(1), _delta(e, f))]),
    "steering vector": lambda e, f: generate_steered(
        e["model"], "a b c", SteeringVector({1: _delta(e, f)}, "resid_pre", {}), chat=False, max_new_tokens=3),
    "steering vector ab_probability": lambda e, f: ab_probability(
        e["model"], e["items"], SteeringVector({1: _delta(e, f)}, "resid_pre", {})),
    "CAST": lambda e, f: generate_steered(
        e["model"], POS[:1] + NEG[:1], CAST(e["cond"], SteeringVector({2: _delta(e, f)}, "resid_pre", {}), 3.0),
        chat=False, max_new_tokens=3),
    "activation scaling": lambda e, f: generate_steered(
        e["model"], "a b c", ActivationScaling(["blocks.1.hook_mlp_out"], torch.tensor([_value(f, 0.5)])),
        chat=False, max_new_tokens=3),
    "A-LQR": lambda e, f: generate_steered(e["model"], "a b c", e["alqr"], chat=False, max_new_tokens=3),
    "SAE splice": lambda e, f: generate_steered(
        e["model"], "a b c", SAESplice(e["sae"], [3], _value(f, 2.0)), chat=False, max_new_tokens=3),
    "generate_czao": lambda e, f: generate_czao(e["model"], "hello", _constraint(f), CZ, max_new_tokens=2, probe=None),
    "generate_czao with verified repair": lambda e, f: generate_czao(
        e["model"], "hello", FaultySequence(fault=f), CZ_UNCAPPED, max_new_tokens=2, probe=None),
    "reachability_margin": lambda e, f: reachability_margin(e["model"], "hello", _constraint(f), CZ, iters=2),
    "landscape": lambda e, f: loss_landscape(e["model"], "hello", _constraint(f), [1], config=CZ, n=3),
    "tracing": lambda e, f: (trace_prompt(e["model"], e["trace"], kinds=("resid", "mlp"), n_samples=2, window=2),
                             rank_layers(e["model"], [e["trace"]], n_samples=2, progress=False)),
    "patching": lambda e, f: activation_patching(e["model"], *e["patch"], kinds=["resid_pre", "z"]),
    "bench static run": lambda e, f: static_run(
        e["model"], SteeringVector({1: _delta(e, f)}, "resid_pre", {}), BenchSettings(max_new_tokens=3))("a b c"),
    "bench czao run": lambda e, f: czao_run(e["model"], _task(f), CZ, BenchSettings(max_new_tokens=2), ActivationStore(e["model"]))("hello"),
    "bench choice scores": lambda e, f: (choice_scores(e["model"], e["items"], SteeringVector({1: _delta(e, f)}, "resid_pre", {}), chat=True),
                                         neutral_kl(e["model"], SteeringVector({1: _delta(e, f)}, "resid_pre", {}), chat=True)),
    "lyapunov": lambda e, f: (fd_growth(e["model"], "a b c d", n_dirs=2), jacobian_top_singular(e["model"], "a b c d", n_iter=2),
                              lyapunov_spectrum(e["model"], "a b c d", k=2)),
}
# APIs whose own input carries a delta (a NaN there must be refused) and those that call an evaluator.
TAKES_DELTA = {"bench static run", "bench choice scores", "generate+perturbation", "steering vector", "steering vector ab_probability", "CAST", "activation scaling", "SAE splice"}
TAKES_EVALUATOR = {"bench czao run", "generate_czao", "generate_czao with verified repair", "reachability_margin", "landscape"}


def _run(e, name: str, fault: Fault) -> BaseException | None:
    model = e["model"]
    grad_before = torch.is_grad_enabled()
    requires_before = [p.requires_grad for p in model.parameters()]
    raised = None
    try:
        with block_fault(model, fault):
            APIS[name](e, fault)
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt included on purpose
        raised = exc
    assert torch.is_grad_enabled() == grad_before, f"{name} left grad mode switched"
    assert not leftover_hooks(model), f"{name} with {fault}: hooks left on {leftover_hooks(model)}"
    assert [p.requires_grad for p in model.parameters()] == requires_before, f"{name} left requires_grad switched"
    with torch.no_grad():
        after = model(e["tokens"])
    assert torch.equal(after, e["clean"]), f"{name} with {fault}: logits differ from the clean model's"
    return raised


@pytest.mark.parametrize("name", list(APIS))
def test_no_hook_leaks_under_injected_faults(env, name):
    applicable = ["none", "error", "interrupt"]
    applicable += ["nan"] if name in TAKES_DELTA else []
    applicable += ["evaluator", "evaluator_interrupt", "nan"] if name in TAKES_EVALUATOR else []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(kind=st.sampled_from(applicable), at=st.integers(1, 40))
    def check(kind, at):
        fault = Fault(kind, at)
        raised = _run(env, name, fault)
        if fault.fired and "interrupt" in kind:
            assert type(raised) is KeyboardInterrupt, f"{name}: a KeyboardInterrupt came back as {raised!r}"
        elif fault.fired and kind == "nan":
            assert isinstance(raised, CzaoLensError), f"{name}: a NaN was not refused ({raised!r})"
            assert "nan" in str(raised).lower(), f"{name}: the error does not name the NaN: {raised}"
        elif fault.fired:
            assert raised is not None, f"{name}: the injected {kind} failure was swallowed"
        elif raised is not None:
            raise raised  # the API itself failed without a fault: a real defect

    check()
    # Every fault kind at the first call always fires: run them once each, deterministically.
    for kind in applicable[1:]:
        fault = Fault(kind, 1)
        raised = _run(env, name, fault)
        assert fault.fired, f"{name}: the {kind} fault at call 1 did not fire"
        assert raised is not None, f"{name}: the {kind} fault at call 1 was swallowed"
        if "interrupt" in kind:
            assert type(raised) is KeyboardInterrupt, f"{name}: a KeyboardInterrupt came back as {raised!r}"


def test_leak_detector_sees_a_leaked_hook(env):
    """The checker itself: a hook left behind on purpose must be reported and change the logits."""
    model = env["model"]
    model.hook_dict["blocks.1.hook_resid_pre"].add_hook(lambda a, hook: a + 1.0)
    try:
        assert leftover_hooks(model) == ["blocks.1.hook_resid_pre (TL)", "blocks.1.hook_resid_pre (torch)"]
        with torch.no_grad():
            assert not torch.equal(model(env["tokens"]), env["clean"])
    finally:
        model.reset_hooks()
    assert not leftover_hooks(model)
