"""Verified repair: rewinding through the KV cache, steering the broken token away, keeping only
what the evaluator accepts; plus the measured effect on the real model."""

from __future__ import annotations

import re

import pytest
import torch

from czao_lens.constraints import Regex, Sentiment
from czao_lens.czao import CZAOConfig, CZAOError, generate_czao
from czao_lens.generate import GenerationError, generate_tokens, prefix_cache
from czao_lens.prompts import encode_prompts
from czao_lens.repair import RepairError, Trace, first_violation, repair

PROMPTS = ["The weather today", "My friend said", "Numbers go up", "Once there lived", "Cats and dogs", "A B C"]


def _run(model, prompts, n=8):
    enc = encode_prompts(model, prompts)
    return enc, generate_tokens(model, enc, prompts, max_new_tokens=n, keep_cache=True)


def _trace(enc, gen, b) -> Trace:
    new = torch.tensor(gen.new_tokens[b], dtype=torch.long)
    return Trace(torch.cat([enc.tokens[b], new]), torch.cat([enc.attention_mask[b], torch.ones_like(new)]),
                 len(new), gen.cache, b)


def _no_hooks(model) -> bool:
    return not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_a_rewound_cache_continues_exactly_like_the_original_run(tiny):
    enc, gen = _run(tiny, PROMPTS[:3])  # left-padded batch: the cut must respect each row's padding
    for b in range(3):
        for t0 in (0, 3):
            tr = _trace(enc, gen, b)
            cut = len(tr.ids) - tr.n_new + t0
            sub = enc.__class__(tokens=tr.ids[:cut][None], attention_mask=tr.mask[:cut][None],
                                prompt_lens=tr.mask[:cut].sum()[None])
            cont = generate_tokens(tiny, sub, [""], max_new_tokens=8 - t0, past=prefix_cache(gen.cache, b, cut - 1, 1))
            assert cont.new_tokens[0] == gen.new_tokens[b][t0:], (b, t0)


def _broken_word(model, tokens) -> Regex:
    """A constraint the greedy text breaks at its third token: that token's word must not appear."""
    word = model.tokenizer.decode([tokens[2]]).strip()
    return Regex(re.escape(word), must_match=False)


def test_repair_rewinds_to_the_broken_token_and_keeps_only_accepted_text(tiny):
    enc, gen = _run(tiny, PROMPTS)
    repaired = 0
    for b in range(len(PROMPTS)):
        c = _broken_word(tiny, gen.new_tokens[b])
        tr = _trace(enc, gen, b)
        t0 = first_violation(c, _ctx(tiny), tiny.tokenizer, tr.new)
        assert t0 <= 2  # the word is there by the third token at the latest
        fixed, _, rec = repair(tiny, c, _ctx(tiny), tr, layer=1, scale=1.0, k=3, rounds=2)
        assert _no_hooks(tiny)
        assert rec.positions[0] == t0 and rec.row_passes > 0
        if fixed is None:
            assert not rec.repaired and rec.chosen is None and rec.candidates == 3 * rec.rounds
            continue
        # Nearest first: the next-best token alone, the other two only when it is rejected.
        assert rec.candidates == 3 * (rec.rounds - 1) + (1 if rec.chosen == 0 else 3)
        repaired += 1
        text = tiny.tokenizer.decode(fixed, skip_special_tokens=True)
        assert c.check_text(text) and fixed[:t0] == gen.new_tokens[b][:t0] and fixed[t0] != gen.new_tokens[b][t0]
    assert repaired >= len(PROMPTS) // 2  # every text broke the constraint before; most are mended


def test_the_other_alternatives_run_only_when_the_nearest_is_rejected(tiny):
    enc, gen = _run(tiny, PROMPTS)
    staged = 0
    for b in range(len(PROMPTS)):
        c = _broken_word(tiny, gen.new_tokens[b])
        near, _, rec = repair(tiny, c, _ctx(tiny), _trace(enc, gen, b), layer=1, scale=1.0, k=3, rounds=1)
        if near is None:
            continue
        t0 = rec.positions[0]
        # Ban the nearest alternative's word too: it is now rejected, so alternatives 1 and 2 roll out.
        words = [tiny.tokenizer.decode([gen.new_tokens[b][t0]]).strip(), tiny.tokenizer.decode([near[t0]]).strip()]
        if not all(words) or words[0] == words[1]:
            continue
        both = Regex("|".join(re.escape(w) for w in words), must_match=False)
        fixed, _, rec2 = repair(tiny, both, _ctx(tiny), _trace(enc, gen, b), layer=1, scale=1.0, k=3, rounds=1)
        assert _no_hooks(tiny) and rec2.positions[0] <= t0
        if rec2.positions[0] < t0:
            continue  # the second word appears earlier in the text: another position, another test
        staged += 1
        assert rec2.candidates == 3 and rec2.chosen != 0  # 1 row, then the other 2 in one batch
        if fixed is not None:
            assert both.check_text(tiny.tokenizer.decode(fixed, skip_special_tokens=True))
            assert fixed[t0] not in (gen.new_tokens[b][t0], near[t0])
    assert staged >= 2


def test_a_stage_starts_only_when_its_rows_fit_the_budget(tiny):
    enc, gen = _run(tiny, PROMPTS[:1])
    c = _broken_word(tiny, gen.new_tokens[0])
    tr = _trace(enc, gen, 0)
    t0 = first_violation(c, _ctx(tiny), tiny.tokenizer, tr.new)
    rows_to_end = 8 - t0
    fixed, _, rec = repair(tiny, c, _ctx(tiny), tr, layer=1, scale=1.0, k=3, budget=rows_to_end - 1)
    assert fixed is None and rec.rounds == 0 and rec.candidates == 0 and rec.row_passes == 0
    # One row fits, three do not: the nearest alternative runs, the other two never do.
    anything = Regex(".", must_match=False)  # rejects every text from the first token on
    _, _, rec = repair(tiny, anything, _ctx(tiny), tr, layer=1, scale=1.0, k=3, budget=8 + 1)
    assert rec.rounds == 1 and rec.candidates == 1 and not rec.repaired


def _ctx(model):
    from czao_lens.constraints import Context
    return Context(prompt="", tokenizer=model.tokenizer)


def test_repair_in_generate_czao_is_verified_and_counted(tiny):
    _, gen = _run(tiny, PROMPTS[:1])
    c = _broken_word(tiny, gen.new_tokens[0])
    # |z| capped at 0: the per-token search cannot move anything, so only repair can mend the text.
    cfg = CZAOConfig(layers=(1,), rank=4, max_steps=1, value_probe=False, budget=None, max_norm=0.0)
    off = generate_czao(tiny, PROMPTS[:1], c, CZAOConfig(**{**cfg.__dict__, "repair": 0}), max_new_tokens=8,
                        keep_logprobs=True)[0]
    on = generate_czao(tiny, PROMPTS[:1], c, cfg, max_new_tokens=8, keep_logprobs=True)[0]
    assert _no_hooks(tiny)
    assert not off.satisfied and off.repair is None  # the constraint was built so that the text breaks it
    assert on.repair is not None and on.satisfied == on.repair["repaired"]
    assert on.satisfied == bool(c.check_text(on.text))
    s_on, s_off = on.summary(), off.summary()
    assert s_on["row_passes_per_token"] > s_off["row_passes_per_token"]  # repair's rows are paid for
    assert not on.repair["repaired"] or on.text != off.text
    # The distributions the kept tokens came from follow the repair: the run's up to the rewind.
    t0 = on.repair["positions"][0]
    assert on.step_logprobs.shape[0] == len(on.tokens)
    assert torch.allclose(on.step_logprobs[:t0], off.step_logprobs[:t0])
    picked = on.step_logprobs[torch.arange(len(on.tokens)), torch.tensor(on.tokens)]
    assert torch.isfinite(picked).all()


def test_a_failing_evaluator_inside_repair_leaves_no_hook(tiny):
    enc, gen = _run(tiny, PROMPTS[:1])

    class Boom(Regex):
        def check_text(self, text, context=None):
            raise RuntimeError("evaluator down")

    c = Boom(re.escape(tiny.tokenizer.decode([gen.new_tokens[0][2]]).strip()), must_match=False)
    with pytest.raises(RuntimeError, match="evaluator down"):
        repair(tiny, c, _ctx(tiny), _trace(enc, gen, 0), layer=1, scale=1.0, k=2)
    assert _no_hooks(tiny)


def test_bad_repair_settings_are_refused(tiny):
    enc, gen = _run(tiny, PROMPTS[:2])
    with pytest.raises(CZAOError, match="repair"):
        CZAOConfig(repair=-1)
    with pytest.raises(CZAOError, match="repair"):
        CZAOConfig(repair_rounds=0)
    c = Regex("zzz", must_match=False)
    with pytest.raises(RepairError, match="k >= 1"):
        repair(tiny, c, _ctx(tiny), _trace(enc, gen, 0), layer=1, scale=1.0, k=0)
    with pytest.raises(RepairError, match="nothing was generated"):
        first_violation(c, _ctx(tiny), tiny.tokenizer, [])
    with pytest.raises(GenerationError, match="no row"):
        prefix_cache(gen.cache, 5, 3, 1)
    with pytest.raises(GenerationError, match="every token but the last"):
        generate_tokens(tiny, enc, PROMPTS[:2], max_new_tokens=2, past=prefix_cache(gen.cache, 0, 2, 2))


NEGATIVE = [  # written here: not bench items, not the benchmark's prompts
    "The hotel room was filthy and the staff", "I regret buying this laptop because", "The concert was a mess:",
    "My landlord ignored the leak again and", "The meeting dragged on and everyone", "That referee ruined the game by",
]


def test_repair_raises_sentiment_satisfaction_on_the_real_model(smol):
    """Unsteered greedy texts against the same texts through repair (rewind, steer, verify)."""
    from czao_lens.constraints import Context
    from czao_lens.store import ActivationStore
    from czao_lens.subspace import prompt_scales

    scale = prompt_scales(ActivationStore(smol), NEGATIVE[0], [12])[12]  # typical residual norm there
    c = Sentiment(min_compound=0.0)
    enc, gen = _run(smol, NEGATIVE, n=16)
    before = [bool(c.check_text(t)) for t in gen.texts]
    assert not all(before), "every text already satisfied the constraint: the prompts test nothing"
    after = list(before)
    for b, ok in enumerate(before):
        if not ok:
            fixed, _, rec = repair(smol, c, Context(prompt=NEGATIVE[b], tokenizer=smol.tokenizer), _trace(enc, gen, b),
                                layer=12, scale=scale, k=4, rounds=2)
            assert _no_hooks(smol) and rec.repaired == (fixed is not None)
            if fixed is not None:  # nothing the evaluator rejected is ever returned
                after[b] = bool(c.check_text(smol.tokenizer.decode(fixed, skip_special_tokens=True)))
                assert after[b]
    assert sum(after) > sum(before), (before, after)
