"""Amortised CZAO (value probe, screening, budget) and probe-guided decoding, against an exact oracle.

The oracle is a value probe that is exact by construction for one-token continuations: from the
activation the real probe reads (the last block's output) it computes the logits, takes the argmax
token and checks the constraint on it. With it, the probe-scored path must choose what the exact
(lookahead 1) path chooses, and screening must never skip a token the exact evaluator rejects.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from czao_lens.artifacts import model_info
from czao_lens.constraints import AvoidTokens, Regex, Sentiment
from czao_lens.czao import CZAOConfig, CZAOController, CZAOError, build_subspace, generate_czao
from czao_lens.generate import generate
from czao_lens.guided import GuidanceError, ProbeGuide, generate_guided
from czao_lens.probes import ProbeError, ValueProbe, default_probe_hook, probe_for
from czao_lens.prompts import encode_prompts
from conftest import RACIST_PROMPT

NO_E = Regex("e", must_match=False)  # sequence level: the text must not contain an "e"
PROMPTS = ["The weather today", "My friend said", "Numbers go up", "Once there lived", "Cats and dogs", "A B C"]


class OracleProbe(ValueProbe):
    """p(violation) = 1 when the activation's argmax token contains an "e", else 0 (exact for NO_E)."""

    def predict(self, acts):
        m = self._model
        x = acts.float().reshape(-1, 1, acts.shape[-1])
        toks = m.unembed(m.ln_final(x))[:, 0].argmax(-1)
        text = [m.tokenizer.decode([int(t)], skip_special_tokens=True) for t in toks]
        return NO_E.violation_texts(text).reshape(acts.shape[:-1])


class TokenOracle(ValueProbe):
    """Reads the embedding of the token at its position (the first block's input) and says whether
    that token contains an "e": exact for FUDGE-style guidance, which feeds each candidate token."""

    def predict(self, acts):
        m = self._model
        x = acts.float().reshape(-1, acts.shape[-1])
        toks = torch.cdist(x, m.W_E.float()).argmin(-1)
        text = [m.tokenizer.decode([int(t)], skip_special_tokens=True) for t in toks]
        return NO_E.violation_texts(text).reshape(acts.shape[:-1])


def oracle(model, kind: type = None) -> OracleProbe:
    d = model.cfg.d_model
    kind = kind or OracleProbe
    hook = "blocks.0.hook_resid_pre" if kind is TokenOracle else default_probe_hook(model)
    p = kind(hook, NO_E.to_dict(), torch.zeros(d), 0.0, torch.zeros(d), torch.ones(d),
                    0.5, model=model_info(model))
    p._model = model
    return p


def e_share(model, token_rows) -> float:
    toks = [t for row in token_rows for t in row]
    return sum("e" in model.tokenizer.decode([t], skip_special_tokens=True) for t in toks) / max(len(toks), 1)


class _Both:
    """At the first token, run a fresh search with each controller on the same step."""

    def __init__(self, exact: CZAOController, probed: CZAOController) -> None:
        self.exact, self.probed = exact, probed
        self.start_layer = exact.start_layer
        self.read_hooks = probed.read_hooks
        self.found: list = []

    def __call__(self, step):
        if step.index == 0:
            self.found.append((self.exact.screen(step), self.exact.search(step),
                               self.probed.screen(step), self.probed.search(step)))
        return None


#: The tiny model's greedy first word on each of PROMPTS (a conjunction bans them beside NO_E).
FIRST_WORDS = ["Preserving", "motivates", "Guid", "cyn", "wallet", "unp"]
NO_E_NOR_FIRST = NO_E & AvoidTokens(FIRST_WORDS)


@pytest.mark.parametrize("constraint", [NO_E, NO_E_NOR_FIRST], ids=["sequence", "conjunction"])
def test_probe_scored_search_chooses_what_the_exact_path_chooses(tiny, constraint):
    """A conjunction of a sequence-level part and token-level parts takes the part's probe and scores
    the token parts exactly: its search is the exact path's, step for step."""
    cfg = CZAOConfig(layers=(1,), rank=4, max_steps=3, n_dirs=8, mu=1.0, lookahead=1, probe_accept=0.0, kl_eps=20.0)
    exact_cfg = CZAOConfig(**{**cfg.__dict__, "value_probe": False})
    probe = probe_for(tiny, constraint, oracle(tiny))
    nontrivial = 0
    for prompt in PROMPTS:
        sub = build_subspace(tiny, prompt, cfg)
        both = _Both(CZAOController(tiny, constraint, sub, exact_cfg),
                     CZAOController(tiny, constraint, sub, cfg, value=probe))
        assert both.exact.value is None and both.probed.value is probe
        generate(tiny, prompt, max_new_tokens=1, controller=both)
        (v_exact, s_exact, v_probe, s_probe), = both.found
        assert v_exact == v_probe
        assert torch.equal(s_exact.z, s_probe.z) and s_exact.feasible == s_probe.feasible
        assert s_exact.steps == s_probe.steps and s_exact.v == s_probe.v
        nontrivial += bool(v_exact > 0 and s_exact.feasible)
    assert nontrivial >= 1, "no prompt needed a search: the comparison would be empty"


def test_screening_never_skips_a_token_the_exact_evaluator_rejects(tiny):
    cfg = CZAOConfig(layers=(1,), rank=4, max_steps=2, n_dirs=4, probe_accept=0.0, budget=None, kl_eps=0.05)
    rs = generate_czao(tiny, PROMPTS, NO_E, cfg, probe=oracle(tiny), max_new_tokens=6)
    skipped = [(r, rec) for r in rs for rec in r.records if not rec.optimized]
    optimised = [rec for r in rs for rec in r.records if rec.optimized]
    assert skipped and optimised, "the case must exercise both branches"
    for r, rec in skipped:
        tok = r.tokens[rec.index]
        assert "e" not in tiny.tokenizer.decode([tok], skip_special_tokens=True), (r.prompt, rec)
        assert rec.p_violation == 0.0
    assert all(rec.p_violation == 1.0 for rec in optimised)


def test_budget_stops_optimising_and_flags_the_rest(tiny):
    cfg = CZAOConfig(layers=(1,), rank=4, max_steps=3, n_dirs=4, probe_accept=0.0, budget=1.0, kl_eps=0.05)
    rs = generate_czao(tiny, PROMPTS, NO_E, cfg, probe=oracle(tiny), max_new_tokens=8)
    over = [rec for r in rs for rec in r.records if rec.over_budget]
    assert over and all(not rec.optimized and rec.unreachable and rec.fallback == "flag" for rec in over)
    for r in rs:  # once over budget, every later token that needed steering is over budget too
        first = next((rec.index for rec in r.records if rec.over_budget), None)
        if first is not None:
            assert not any(rec.optimized for rec in r.records if rec.index > first)


def test_the_budget_also_stops_a_search_midway(tiny):
    """The cap holds within a token: a hard token's search stops at the first candidate batch that
    reaches it, so a prompt overruns its budget by at most one batch (8 directions + the point here)."""
    kw = dict(layers=(1,), rank=4, max_steps=10, patience=10, n_dirs=8, probe_accept=0.0, kl_eps=1e-4, repair=0,
              seed_direction=False)
    capped = generate_czao(tiny, PROMPTS[:2], NO_E, CZAOConfig(**kw, budget=2.0), probe=oracle(tiny), max_new_tokens=6)
    free = generate_czao(tiny, PROMPTS[:2], NO_E, CZAOConfig(**kw, budget=None), probe=oracle(tiny), max_new_tokens=6)
    one_batch = 9 * 2 / 3 + 1  # 9 rows through layers 1-2 of 3, plus the token's own pass
    for c, f in zip(capped, free):
        spent = sum(r.row_passes for r in c.records)
        assert spent <= 2.0 * 6 + one_batch
        assert sum(r.row_passes for r in f.records) > 2.0 * 6 + one_batch  # uncapped, the search runs on
    assert any(r.optimized and r.steps < 10 and not r.satisfied for c in capped for r in c.records)


def test_a_conjunction_masks_its_banned_words_when_the_search_fails(tiny):
    """With one search step and a tight KL bound the search cannot satisfy NO_E, so the fallback acts:
    the conjunction's banned words are masked (before: it was flagged and the first word came out)."""
    base = generate(tiny, PROMPTS, max_new_tokens=1)
    assert [tiny.tokenizer.decode(row).strip() for row in base.new_tokens] == FIRST_WORDS
    cfg = CZAOConfig(layers=(1,), rank=4, max_steps=1, n_dirs=2, kl_eps=1e-4, budget=None)
    rs = generate_czao(tiny, PROMPTS, NO_E_NOR_FIRST, cfg, probe=oracle(tiny), max_new_tokens=1)
    assert all(r.records[0].p_violation is not None for r in rs), "the conjunction must use its part's probe"
    assert any(r.records[0].fallback == "mask" for r in rs)
    for r, word in zip(rs, FIRST_WORDS):
        assert word.lower() not in r.text.lower(), (r.prompt, r.text)


def test_probe_guided_decoding_never_takes_a_conjunctions_banned_words(tiny):
    rs = generate_guided(tiny, PROMPTS, NO_E_NOR_FIRST, probe=oracle(tiny, TokenOracle), top_k=8, max_new_tokens=1)
    for r, word in zip(rs, FIRST_WORDS):
        assert word.lower() not in r.text.lower(), (r.prompt, r.text)


@pytest.mark.real
def test_probe_guided_decoding_does_not_finish_a_banned_word_said_in_pieces(smol):
    """Per row, the text so far bans the piece that would finish "Racist" ("R" + "ac" + "ist", no "e")."""
    avoid, prompts, probe = AvoidTokens(["racist"]), [RACIST_PROMPT, "Hello"], oracle(smol, TokenOracle)
    base = generate_guided(smol, prompts, NO_E, probe=probe, max_new_tokens=4)
    assert not avoid.check_text(base[0].text)
    rs = generate_guided(smol, prompts, NO_E & avoid, probe=probe, max_new_tokens=4)
    assert avoid.check_text(rs[0].text) and rs[0].text.startswith("Rac"), rs[0].text
    assert rs[1].text == base[1].text  # the other row is left alone


def test_a_probe_for_another_constraint_or_not_a_probe_is_refused(tiny):
    other = Sentiment(min_compound=0.0)
    with pytest.raises(ProbeError, match="trained for"):
        generate_czao(tiny, "Hi", other, CZAOConfig(layers=(1,), rank=4), probe=oracle(tiny), max_new_tokens=2)
    with pytest.raises(ProbeError, match="ValueProbe, 'auto' or None"):
        generate_czao(tiny, "Hi", NO_E, CZAOConfig(layers=(1,), rank=4), probe="best", max_new_tokens=2)
    with pytest.raises(ProbeError, match="got dict"):
        generate_czao(tiny, "Hi", NO_E, CZAOConfig(layers=(1,), rank=4), probe={}, max_new_tokens=2)


def test_probe_guided_decoding_avoids_what_the_probe_flags(tiny):
    """With an exact probe, guidance re-ranks the top tokens: (almost) no "e" tokens where the unguided
    model on the same prompts has many, at 1 + k x (share of layers run) row passes per token."""
    base = generate(tiny, PROMPTS, max_new_tokens=6)
    rs = generate_guided(tiny, PROMPTS, NO_E, probe=oracle(tiny, TokenOracle), top_k=8, strength=5.0, max_new_tokens=6)
    assert e_share(tiny, base.new_tokens) > 0.3 and e_share(tiny, [r.tokens for r in rs]) <= 0.05
    assert sum(r.satisfied for r in rs) > sum(NO_E.check_text(t) for t in base.texts)
    n = tiny.cfg.n_layers  # the probe reads the first block's input: candidates run one block of n
    assert all(c == pytest.approx(1.0 + 8.0 / n) for r in rs for c in r.row_passes)
    assert all(p in (0.0, 1.0) for r in rs for p in r.p_violation)


def test_probe_guided_refuses_bad_settings(tiny):
    with pytest.raises(GuidanceError, match="top_k"):
        ProbeGuide(tiny, oracle(tiny), top_k=0)
    with pytest.raises(GuidanceError, match="strength"):
        ProbeGuide(tiny, oracle(tiny), strength=float("nan"))
    with pytest.raises(GuidanceError, match="no value probe"):
        generate_guided(tiny, "Hi", Sentiment(min_compound=0.0), max_new_tokens=2)
    with pytest.raises(ProbeError, match="trained for"):
        generate_guided(tiny, "Hi", Sentiment(min_compound=0.0), probe=oracle(tiny), max_new_tokens=2)


def test_next_token_activations_match_a_full_forward(tiny):
    """The candidate next tokens' activations equal those of running prompt + token from scratch."""
    hook = default_probe_hook(tiny)
    got = {}

    class Grab:
        start_layer, read_hooks = tiny.cfg.n_layers, ()

        def __call__(self, step):
            if step.index == 0:
                got["cand"] = step.logits.topk(3).indices
                got["acts"] = step.next_token_activations(got["cand"], hook)

    prompt = "The weather today"
    generate(tiny, prompt, max_new_tokens=1, controller=Grab())
    ids = encode_prompts(tiny, prompt).tokens
    for j, t in enumerate(got["cand"][0]):
        _, cache = tiny.run_with_cache(torch.cat([ids, t.view(1, 1)], 1), names_filter=hook)
        assert torch.allclose(got["acts"][0, j], cache[hook][0, -1], atol=1e-4)


def _same_run(a, b) -> None:
    assert [r.text for r in a] == [r.text for r in b]
    for ra, rb in zip(a, b):
        assert ra.tokens == rb.tokens and ra.satisfied == rb.satisfied and ra.unreachable == rb.unreachable
        assert [(x.optimized, x.steps, x.candidates, x.satisfied, x.over_budget, x.fallback) for x in ra.records] == \
               [(x.optimized, x.steps, x.candidates, x.satisfied, x.over_budget, x.fallback) for x in rb.records]
        assert [x.row_passes for x in ra.records] == pytest.approx([x.row_passes for x in rb.records])
        assert [x.z_norm for x in ra.records] == pytest.approx([x.z_norm for x in rb.records], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("hold", [False, True])
def test_batched_prompts_equal_per_prompt_runs_row_by_row(tiny, hold):
    """Prompts of different lengths in one batch (left padding, rows finishing at different steps):
    the same texts, decisions, steps and row passes as one prompt at a time, with the same seeds."""
    cfg = CZAOConfig(layers=(1,), rank=4, max_steps=3, n_dirs=4, mu=1.0, probe_accept=0.0, kl_eps=20.0, budget=6.0,
                     hold=hold)
    one = generate_czao(tiny, PROMPTS, NO_E, cfg, probe=oracle(tiny), max_new_tokens=6, batch_size=1)
    many = generate_czao(tiny, PROMPTS, NO_E, cfg, probe=oracle(tiny), max_new_tokens=6, batch_size=4)
    assert sum(rec.optimized for r in one for rec in r.records) >= 3, "the case must exercise the search"
    _same_run(one, many)
    with pytest.raises(CZAOError, match="batch_size"):
        generate_czao(tiny, PROMPTS, NO_E, cfg, probe=oracle(tiny), max_new_tokens=2, batch_size=0)


def test_hold_reapplies_the_last_feasible_z_within_the_kl_bound(tiny):
    """With hold, a token that needs no search after a solved one gets the same z again (one candidate
    row to check its KL, plus the re-run of the upper layers); without it, it decodes unperturbed."""
    cfg = CZAOConfig(layers=(1,), rank=4, max_steps=3, n_dirs=8, mu=1.0, probe_accept=0.0, kl_eps=20.0, budget=None)
    held = generate_czao(tiny, PROMPTS, NO_E, replace(cfg, hold=True), probe=oracle(tiny), max_new_tokens=6)
    plain = generate_czao(tiny, PROMPTS, NO_E, cfg, probe=oracle(tiny), max_new_tokens=6)
    recs = [rec for r in held for rec in r.records if rec.held]
    assert recs and not any(rec.held for r in plain for rec in r.records)
    share = (tiny.cfg.n_layers - 1) / tiny.cfg.n_layers
    for rec in recs:
        assert rec.kl <= cfg.kl_eps and rec.z_norm > 0 and rec.satisfied and not rec.optimized
        assert rec.row_passes == pytest.approx(1.0 + 2 * share)
    assert sum(r.summary()["held_tokens"] for r in held) == len(recs)
