"""CZAO on the real model: satisfaction vs unsteered, telemetry, reachability, and failure modes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from czao_lens.constraints import AvoidTokens, Constraint, ConstraintError
from czao_lens.czao import (
    CZAOConfig,
    CZAOError,
    CZAOResult,
    ViolationProbe,
    ZPredictor,
    distill_predictor,
    generate_czao,
    reachability_margin,
)
from czao_lens.errors import ArtifactError
from czao_lens.generate import generate
from czao_lens.subspace import SubspaceError
from conftest import RACIST_PROMPT

BLUE_PROMPTS = ["My favorite color is", "The color of the clear sky is", "Roses are red, violets are"]
CFG = CZAOConfig(layers=(12,), rank=16)


def no_hooks(model) -> bool:
    return not any(hp.fwd_hooks for hp in model.hook_dict.values())


@pytest.fixture(scope="module")
def blue_runs(smol):
    c = AvoidTokens(["blue"])
    base = [generate(smol, p, max_new_tokens=8).texts[0] for p in BLUE_PROMPTS]
    steered = generate_czao(smol, BLUE_PROMPTS, c, CFG, max_new_tokens=8)
    return c, base, steered


@pytest.mark.real
def test_czao_raises_satisfaction_over_unsteered(blue_runs):
    c, base, steered = blue_runs
    base_ok = [c.check_text(t) for t in base]
    czao_ok = [r.satisfied for r in steered]
    assert sum(base_ok) < len(BLUE_PROMPTS), f"the unsteered model must say blue somewhere: {base}"
    assert all(czao_ok), [r.text for r in steered]
    assert sum(czao_ok) > sum(base_ok)
    for r in steered:
        assert "blue" not in r.text.lower()


@pytest.mark.real
def test_telemetry_is_consistent(blue_runs):
    _, _, steered = blue_runs
    opt = [rec for r in steered for rec in r.records if rec.optimized]
    assert opt, "some token must have needed optimisation"
    for rec in opt:
        assert 1 <= rec.steps <= CFG.max_steps
        assert rec.passes > 1.0 and rec.candidates > 0
        assert rec.v_before > 0
        if rec.satisfied:
            assert rec.v_after == 0 and rec.kl <= CFG.kl_eps and rec.delta_norm > 0
    for r in steered:
        s = r.summary()
        assert s["tokens"] == len(r.records) == len(r.tokens)
        assert s["passes_per_token"] >= 1.0


@pytest.mark.real
def test_results_carry_distillation_pairs_and_round_trip(blue_runs, smol, tiny, tmp_path):
    """Every solved token gives one (residual, z*) pair on its result; the predictor distilled from
    them is saved in the one layout and refused by another model; results round-trip as JSON."""
    _, _, steered = blue_runs
    solved = sum(rec.optimized and rec.satisfied for r in steered for rec in r.records)
    assert solved and sum(len(r.pairs) for r in steered) == solved
    pred = distill_predictor(steered)
    assert pred.weight.shape == (smol.cfg.d_model, steered[0].pairs.z.shape[1])
    path = pred.save(tmp_path / "pred")
    back = ZPredictor.load(path, smol)
    assert torch.equal(back.weight, pred.weight) and back.hooks == steered[0].pairs.hooks
    with pytest.raises(ArtifactError, match="d_model"):
        ZPredictor.load(path, tiny)
    with pytest.raises(ArtifactError, match="not a 'violation_probe'"):
        ViolationProbe.load(path)
    r = steered[0]
    again = CZAOResult.load(r.save(tmp_path / "result.json"))
    assert again.to_dict() == CZAOResult.load(again.save(tmp_path / "again.json")).to_dict()
    assert again.text == r.text and again.records == r.records and again.pairs is None


def test_config_is_checked_when_made():
    with pytest.raises(SubspaceError, match="empty"):
        CZAOConfig(layers=())
    with pytest.raises(CZAOError, match="KL bound of 0"):
        CZAOConfig(kl_eps=0.0)
    with pytest.raises(CZAOError, match="unknown fallback"):
        CZAOConfig(fallback="ignore")  # type: ignore[arg-type]
    with pytest.raises(CZAOError, match="max_norm"):
        CZAOConfig(max_norm=-1.0)


@pytest.mark.real
def test_reachability_margin_brackets_a_threshold(smol):
    c = AvoidTokens(["blue"])
    res = reachability_margin(smol, BLUE_PROMPTS[0], c, CFG, iters=4)
    assert res["reachable"] and 0 < res["rho"] <= 3.0
    lo, hi = res["bracket"]
    assert lo < hi and hi == res["rho"]
    # A cap far below the margin must fail.
    tiny_cap = reachability_margin(smol, BLUE_PROMPTS[0], c, CZAOConfig(layers=(12,), max_steps=2), b_max=1e-3, iters=1)
    assert tiny_cap["reachable"] is False and tiny_cap["rho"] == float("inf")


@dataclass(eq=False, repr=False)
class Impossible(Constraint):
    """Always violated: the next token would have to be impossible."""

    level = "token"

    def violation_logits(self, logprobs, context=None):
        return torch.ones(logprobs.shape[0])

    def check_text(self, text, context=None):
        return False


@pytest.mark.real
def test_unreachable_constraint_is_reported_never_success(smol):
    cfg = CZAOConfig(layers=(12,), max_steps=2, n_dirs=4)
    r = generate_czao(smol, "Hello", Impossible(), cfg, max_new_tokens=3)[0]
    assert r.unreachable and not r.satisfied
    assert all(rec.unreachable and not rec.satisfied and rec.fallback == "flag" for rec in r.records)
    assert r.summary()["unreachable_tokens"] == len(r.records)
    assert no_hooks(smol)


@pytest.mark.real
def test_mask_fallback_enforces_banned_tokens_when_unreachable(smol):
    c = AvoidTokens(["blue"])
    cfg = CZAOConfig(layers=(12,), max_steps=1, n_dirs=2, max_norm=1e-4, fallback="mask")
    r = generate_czao(smol, BLUE_PROMPTS[0], c, cfg, max_new_tokens=4)[0]
    assert r.unreachable, "a cap of 1e-4 cannot move p(blue) below the threshold"
    assert any(rec.fallback == "mask" for rec in r.records)
    assert r.satisfied and "blue" not in r.text.lower()


@pytest.mark.real
def test_a_banned_word_said_in_pieces_is_not_finished(smol):
    """SmolLM2 writes "Racist" as "R" + "ac" + "ist"; only " racist" is one token, so the word-start
    ban cannot stop it. The text so far now bans the finishing piece (before: "Racist" came out)."""
    base = generate(smol, [RACIST_PROMPT], max_new_tokens=8)
    assert [smol.tokenizer.decode([t]) for t in base.new_tokens[0][:3]] == ["R", "ac", "ist"]
    c = AvoidTokens(["racist"])
    assert not c.check_text(base.texts[0])
    r = generate_czao(smol, RACIST_PROMPT, c, CZAOConfig(), max_new_tokens=8)[0]
    assert r.satisfied and c.check_text(r.text), r.text
    assert any(rec.optimized or rec.fallback == "mask" for rec in r.records)
    assert no_hooks(smol)


@dataclass(eq=False, repr=False)
class Raises(Constraint):
    level = "token"

    def violation_logits(self, logprobs, context=None):
        raise RuntimeError("evaluator crashed")

    def check_text(self, text, context=None):
        return True


@dataclass(eq=False, repr=False)
class NaNs(Constraint):
    level = "token"

    def violation_logits(self, logprobs, context=None):
        return torch.full((logprobs.shape[0],), float("nan"))

    def check_text(self, text, context=None):
        return True


def test_bad_inputs_are_clear_errors_and_leave_no_hooks(tiny):
    c = AvoidTokens(["blue"])
    with pytest.raises(CZAOError, match="evaluator crashed"):
        generate_czao(tiny, "hello", Raises(), CZAOConfig(layers=(1,), rank=4), max_new_tokens=2)
    assert no_hooks(tiny)
    with pytest.raises(ConstraintError, match="NaN"):
        generate_czao(tiny, "hello", NaNs(), CZAOConfig(layers=(1,), rank=4), max_new_tokens=2)
    assert no_hooks(tiny)
    with pytest.raises(SubspaceError, match="empty"):
        generate_czao(tiny, "hello", c, CZAOConfig(layers=()))
    with pytest.raises(SubspaceError, match="larger than d_model"):
        generate_czao(tiny, "hello", c, CZAOConfig(layers=(1,), rank=tiny.cfg.d_model + 1))
    with pytest.raises(SubspaceError, match="out of range"):
        generate_czao(tiny, "hello", c, CZAOConfig(layers=(7,), rank=4))
    with pytest.raises(CZAOError, match="KL bound of 0"):
        generate_czao(tiny, "hello", c, CZAOConfig(layers=(1,), rank=4, kl_eps=0.0))
    assert no_hooks(tiny)


def test_z_predictor_recovers_a_linear_map(tmp_path):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 5, generator=g)
    X = torch.randn(200, 12, generator=g)
    Z = X @ W + 0.5
    p = ZPredictor.fit(X, Z, alpha=1e-4)
    Xt = torch.randn(20, 12, generator=g)
    assert torch.allclose(p.predict(Xt), Xt @ W + 0.5, atol=1e-2)
    q = ZPredictor.load(p.save(tmp_path / "pred"))
    assert torch.equal(q.weight, p.weight)


def test_surrogate_probe_is_trained_on_rollouts_and_verified(smol):
    """Sequence-level CZAO with the learned surrogate: the probe gets fitted, and every token it
    helped accept was re-checked by a real rollout (so V after is a real evaluator value)."""
    from czao_lens.constraints import Sentiment

    cfg = CZAOConfig(layers=(12,), rank=8, n_dirs=8, max_steps=3, lookahead=2, surrogate=True, surrogate_min_samples=17)
    res = generate_czao(smol, "The worst thing about my job is", Sentiment(min_compound=0.05), cfg, max_new_tokens=6)[0]
    assert any(r.optimized for r in res.records), "the negative prompt must need steering"
    assert res.probe is not None and res.probe.weight.shape == (smol.cfg.d_model, 1)
    for r in res.records:
        if r.optimized and r.satisfied:
            assert r.v_after == 0.0


@pytest.mark.real
def test_relax_fallback_is_transparent(smol):
    """At eps = 0.01 nats 'avoid blue' is unreachable; relaxing eps finds a point, and the record
    says both: unreachable at the configured eps, satisfied after relax(eps=...)."""
    cfg = CZAOConfig(layers=(12,), kl_eps=0.01, fallback="relax", relax_max_eps=4.0, max_steps=3)
    r = generate_czao(smol, BLUE_PROMPTS[0], AvoidTokens(["blue"]), cfg, max_new_tokens=2)[0]
    first = r.records[0]
    assert first.optimized and first.unreachable
    assert first.fallback.startswith("relax(eps=") and first.satisfied and first.kl > 0.01
    assert r.unreachable  # the sequence verdict keeps the flag


@pytest.mark.real
def test_batched_prompts_equal_one_at_a_time_on_the_real_model(blue_runs, smol):
    """The fixture ran the three prompts in one batch; one at a time gives the same texts and telemetry."""
    c, _, steered = blue_runs
    alone = generate_czao(smol, BLUE_PROMPTS, c, CFG, max_new_tokens=8, batch_size=1)
    assert [r.text for r in alone] == [r.text for r in steered]
    for a, b in zip(alone, steered):
        assert [(x.optimized, x.steps, x.candidates, x.satisfied) for x in a.records] == \
               [(x.optimized, x.steps, x.candidates, x.satisfied) for x in b.records]
        assert [x.kl for x in a.records] == pytest.approx([x.kl for x in b.records], abs=1e-3)
