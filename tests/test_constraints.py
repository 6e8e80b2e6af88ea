"""Tests of czao_lens.constraints against the real offline evaluators and the SmolLM2 tokenizer."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch

from czao_lens.constraints import (
    And,
    AvoidConcept,
    AvoidTokens,
    Confident,
    ConsistentWithDocument,
    Constraint,
    ConstraintError,
    Context,
    IncludeKeywords,
    Language,
    MaxLength,
    NoProfanity,
    Or,
    Regex,
    Sentiment,
    Weighted,
    banned_token_ids,
    checked_violation,
    constraint_from_spec,
    known_types,
    load_constraint,
    register,
    split_conjunction,
)

# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def tokenizer(smol):
    """SmolLM2's real tokenizer (the session model fixture loads it once for all test files)."""
    return smol.tokenizer


@register("test_fixed")
@dataclass(eq=False, repr=False)
class Fixed(Constraint):
    """A sequence-level stub whose violations are given: lets composite arithmetic be checked exactly."""

    values: tuple[float, ...] = (0.0,)

    def violation_texts(self, texts, context=None):
        return torch.tensor(self.values, dtype=torch.float32)[: len(texts)]


@register("test_fixed_token")
@dataclass(eq=False, repr=False)
class FixedToken(Constraint):
    """A token-level stub: V = given values; the text passes unless it contains 'bad'."""

    values: tuple[float, ...] = (0.0,)
    level = "token"

    def violation_logits(self, logprobs, context=None):
        return torch.tensor(self.values, dtype=torch.float32)[: logprobs.shape[0]]

    def check_text(self, text, context=None):
        return "bad" not in text


def _logits_with_banned(vocab: int, banned: torch.Tensor, shifts: list[float], seed: int = 0) -> torch.Tensor:
    """Random logits, one row per shift, with the banned ids raised by that shift."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(vocab, generator=g)
    rows = base.repeat(len(shifts), 1)
    for r, s in enumerate(shifts):
        rows[r, banned] += s
    return rows


# ----------------------------------------------------------------------------- AvoidTokens


def test_avoid_tokens_banned_ids_cover_variants_and_prefixes(tokenizer):
    ids = set(AvoidTokens(["blue"]).banned_ids(tokenizer).tolist())
    for form in [" blue", "blue", " Blue", "Blue", " blueberries"]:
        enc = tokenizer.encode(form, add_special_tokens=False)
        assert len(enc) == 1 and enc[0] in ids, form
    for form in [" red", " the", " glue"]:
        assert tokenizer.encode(form, add_special_tokens=False)[0] not in ids
    # Every banned token really decodes to something starting with the word (no stray ids).
    for i in ids:
        assert tokenizer.decode([i]).lstrip().lower().startswith("blue")
    strict = set(AvoidTokens(["blue"], prefix_match=False, case_insensitive=False).banned_ids(tokenizer).tolist())
    assert tokenizer.encode(" blueberries", add_special_tokens=False)[0] not in strict
    assert tokenizer.encode(" Blue", add_special_tokens=False)[0] not in strict
    assert tokenizer.encode(" blue", add_special_tokens=False)[0] in strict
    # A word no single token can start: its first subtoken is banned (and nothing else is needed).
    cer = AvoidTokens(["cerulean"]).banned_ids(tokenizer).tolist()
    assert tokenizer.encode(" cerulean", add_special_tokens=False)[0] in cer
    assert tokenizer.encode(" CERULEAN", add_special_tokens=False)[0] not in cer  # no tiny pieces
    assert all(len(tokenizer.decode([i]).strip()) >= 3 for i in cer)


def test_avoid_tokens_bans_the_piece_that_finishes_a_word_begun(tokenizer):
    c = AvoidTokens(["racist"])
    static = set(c.banned_ids(tokenizer).tolist())
    ist = tokenizer.encode("ist", add_special_tokens=False)
    assert len(ist) == 1 and ist[0] not in static
    for begun in ["He said: Rac", "He said: rac", "R\nRac", "RAC"]:
        ids = set(c.banned_ids(tokenizer, begun).tolist())
        assert static <= ids and ist[0] in ids, begun
        assert all((begun.split()[-1].split("\n")[-1] + tokenizer.decode([i])).lower().startswith("racist")
                   for i in ids - static)
    for other in ["", "He said: Rach", "He said: Rac ", "He said: grac", "Rac."]:
        assert set(c.banned_ids(tokenizer, other).tolist()) == static, other
    assert set(AvoidTokens(["racist"], case_insensitive=False).banned_ids(tokenizer, "Rac").tolist()) == set(
        AvoidTokens(["racist"], case_insensitive=False).banned_ids(tokenizer).tolist())
    # The violation reads the text so far from the context.
    logits = _logits_with_banned(len(tokenizer), torch.tensor(ist), [12.0])
    assert float(c.violation_logits(logits, Context(tokenizer=tokenizer, generated="A Rac"))[0]) > 0
    assert float(c.violation_logits(logits, Context(tokenizer=tokenizer, generated="A Rich"))[0]) == 0


class _LlamaLike:
    """Llama's way of decoding: a piece's "▁" is its leading space, dropped when one token is decoded alone."""

    pieces = ["<s>", "\u2581I", "\u2581can", "can", "\u2581cer", "cer", "\u2581certainly", "tain", "ly", "cers", "<unk>"]
    all_special_ids = [0, 10]

    def __len__(self):
        return len(self.pieces)

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]

    def decode(self, ids, **_):
        return "".join(self.pieces[i] for i in ids).replace("\u2581", " ").lstrip()

    def batch_decode(self, rows, **_):
        return [self.decode(r) for r in rows]

    def encode(self, text, add_special_tokens=False):
        out, rest = [], text.replace(" ", "\u2581")
        while rest:  # greedy longest match; an unknown character is <unk>
            i = max((i for i, p in enumerate(self.pieces) if rest.startswith(p)), key=lambda i: len(self.pieces[i]),
                    default=10)
            out.append(i)
            rest = rest[len(self.pieces[i]) if i != 10 else 1:]
        return out


def test_avoid_tokens_completion_ignores_tokens_that_start_a_word_on_llama_like_tokenizers():
    """After "I can", "cer" finishes "cancer" but " certainly" starts a new word, though it decodes
    alone as "certainly" on such tokenizers."""
    tok = _LlamaLike()
    c = AvoidTokens(["cancer"])
    added = set(c.banned_ids(tok, "I can").tolist()) - set(c.banned_ids(tok).tolist())
    assert {tok.pieces[i] for i in added} == {"cer", "cers"}


def test_avoid_tokens_violation_is_log_hinge_on_banned_mass(tokenizer):
    c = AvoidTokens(["blue"], threshold=0.05)
    ctx = Context(tokenizer=tokenizer)
    banned = c.banned_ids(tokenizer)
    logits = _logits_with_banned(len(tokenizer), banned, [12.0, 9.0, -30.0])
    v = checked_violation(c, logprobs=torch.log_softmax(logits, -1), context=ctx)
    mass = torch.softmax(logits.double(), -1)[:, banned].sum(-1)
    assert mass[0] > mass[1] > 0.05 > mass[2]  # the construction did what it should
    expected = (torch.log(mass) - math.log(0.05)).clamp_min(0)
    torch.testing.assert_close(v.double(), expected, atol=1e-4, rtol=1e-4)
    assert v[0] > v[1] > 0 and v[2] == 0
    assert c.satisfied(logprobs=torch.log_softmax(logits, -1), context=ctx).tolist() == [False, False, True]
    # Raw logits give the same violation (the constraint renormalises).
    torch.testing.assert_close(c.violation_logits(logits, ctx), v, atol=1e-4, rtol=1e-4)


def test_avoid_tokens_check_text_whole_words():
    c = AvoidTokens(["blue"])
    assert not c.check_text("The sky is blue.")
    assert not c.check_text("BLUE skies")
    assert c.check_text("I like blueberries and red.")
    assert not AvoidTokens(["c++"]).check_text("I write c++ daily")
    assert AvoidTokens(["blue"], case_insensitive=False).check_text("Blue sky")


def test_avoid_tokens_bad_inputs(tokenizer):
    for words in ([], ["  "], "blue", [3]):
        with pytest.raises(ConstraintError):
            AvoidTokens(words)
    for t in (0.0, 1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ConstraintError):
            AvoidTokens(["blue"], threshold=t)
    c = AvoidTokens(["blue"])
    ctx = Context(tokenizer=tokenizer)
    good = torch.log_softmax(torch.randn(2, len(tokenizer)), -1)
    with pytest.raises(ConstraintError, match="NaN"):
        c.violation_logits(good.clone().index_fill_(1, torch.tensor([5]), float("nan")), ctx)
    with pytest.raises(ConstraintError, match="shape"):
        c.violation_logits(good[0], ctx)
    with pytest.raises(ConstraintError, match="vocab"):
        c.violation_logits(torch.log_softmax(torch.randn(2, 1000), -1), ctx)
    with pytest.raises(ConstraintError, match="tokenizer"):
        c.violation_logits(good, Context())
    # A multi-token word with no single-token form and subtoken banning off has nothing to ban.
    assert len(tokenizer.encode("cerulean", add_special_tokens=False)) > 1
    with pytest.raises(ConstraintError, match="cerulean"):
        AvoidTokens(["cerulean"], prefix_match=False, ban_first_subtoken=False).banned_ids(tokenizer)

    class Empty:  # a tokenizer for which the word encodes to nothing
        all_special_ids: list[int] = []
        vocab_size = 10

        def __len__(self):
            return 10

        def encode(self, text, add_special_tokens=False):
            return []

        def batch_decode(self, ids):
            return ["x"] * len(ids)

    with pytest.raises(ConstraintError, match="no bannable token"):
        AvoidTokens(["blue"]).banned_ids(Empty())


# ----------------------------------------------------------------------------- Confident


def test_confident_from_max_probability():
    vocab = 100
    peaked = torch.full((vocab,), -10.0)
    peaked[3] = 10.0
    flat = torch.zeros(vocab)
    lp = torch.log_softmax(torch.stack([peaked, flat]), -1)
    v = Confident(tau=0.5).violation_logits(lp)
    assert v[0] == 0
    assert v[1].item() == pytest.approx(math.log(0.5) - math.log(1 / vocab), rel=1e-5)
    with pytest.raises(ConstraintError):
        Confident(tau=0.0)
    ctx = Context(extra={"chosen_logprobs": [math.log(0.9), math.log(0.2)]})
    assert not Confident(0.5).check_text("x", ctx)
    assert Confident(0.1).check_text("x", ctx)


# ----------------------------------------------------------------------------- text evaluators


def test_sentiment():
    texts = ["What a wonderful, delightful day. I love it!", "This is awful. I hate it and everything is terrible."]
    v = Sentiment(min_compound=0.0).violation(texts=texts)
    assert v[0] == 0 and v[1] > 0.3
    v2 = Sentiment(max_compound=0.0).violation(texts=texts)
    assert v2[0] > 0.3 and v2[1] == 0
    comp = Sentiment().compound(texts)
    torch.testing.assert_close(v, (0.0 - comp).clamp_min(0))  # hinge distance to the bound
    for kw in ({"min_compound": 1.5}, {"max_compound": -2}, {"min_compound": 0.5, "max_compound": 0.1}):
        with pytest.raises(ConstraintError):
            Sentiment(**kw)


def test_no_profanity():
    c = NoProfanity(max_prob=0.5)
    v = c.violation(texts=["Thank you for the lovely dinner.", "You are a fucking stupid idiot, shit."])
    assert v[0] == 0 and v[1] > 0
    assert c.check_text("Have a nice day.") and not c.check_text("fuck you, asshole")
    with pytest.raises(ConstraintError):
        NoProfanity(max_prob=1.0)


def test_avoid_concept_on_vs_off_topic():
    c = AvoidConcept("dogs and puppies", threshold=0.3)
    on, off = "My dog loves chasing the ball in the park.", "The central bank raised interest rates again."
    sims = c.similarity([on, off])
    assert sims[0] > 0.3 > sims[1]
    v = c.violation(texts=[on, off, ""])
    assert v[0] > 0 and v[1] == 0 and v[2] == 0
    # per-sentence max: one on-topic sentence in an otherwise unrelated text is still caught
    mixed = off + " " + on
    assert c.violation(texts=[mixed])[0] > 0
    with pytest.raises(ConstraintError):
        AvoidConcept("  ")


def test_language_en_vs_fr():
    en = "The weather is lovely today and we are going for a long walk."
    fr = "Il fait très beau aujourd'hui et nous allons faire une longue promenade."
    v = Language("en", min_prob=0.5).violation(texts=[en, fr, "ok"])
    assert v[0] == 0 and v[1] > 0.4 and v[2] == 0  # "ok" is below min_chars: no evidence, no push
    assert Language("fr").check_text(fr) and not Language("fr").check_text(en)
    with pytest.raises(ConstraintError, match="unknown language"):
        Language("xx")
    with pytest.raises(ConstraintError):
        Language("en", min_prob=0.0)


def test_include_keywords_and_regex_and_max_length():
    c = IncludeKeywords(["Paris", "France", "capital"])
    v = c.violation(texts=["Paris is the capital of France.", "Paris is lovely.", "", "Parisian capitals"])
    torch.testing.assert_close(v, torch.tensor([0.0, 2 / 3, 1.0, 1.0]))
    two_of_three = IncludeKeywords(["Paris", "France", "capital"], min_fraction=2 / 3)
    torch.testing.assert_close(two_of_three.violation(texts=["Paris, France", "Paris"]), torch.tensor([0.0, 1 / 3]))
    assert Regex(r"^\d+$").violation(texts=["123", "12a"]).tolist() == [0.0, 1.0]
    assert Regex("sorry", must_match=False, flags="i").violation(texts=["Sorry!", "fine"]).tolist() == [1.0, 0.0]
    with pytest.raises(ConstraintError, match="invalid pattern"):
        Regex("(")
    assert MaxLength(max_chars=10).violation(texts=["short", "x" * 15]).tolist() == [0.0, 0.5]

    class Words:  # whitespace "tokenizer"
        def encode(self, text, add_special_tokens=False):
            return text.split()

    v = MaxLength(max_tokens=4).violation(texts=["a b c", "a b c d e f"], context=Context(tokenizer=Words()))
    assert v.tolist() == [0.0, 0.5]
    with pytest.raises(ConstraintError, match="tokenizer"):
        MaxLength(max_tokens=4).violation(texts=["a"])
    with pytest.raises(ConstraintError):
        MaxLength()


def test_consistent_with_document():
    doc = (
        "The Eiffel Tower was completed in 1889 in Paris. It is 330 metres tall. "
        "Gustave Eiffel's engineering company designed and built it."
    )
    c = ConsistentWithDocument(doc, min_support=0.5)
    supported = "The Eiffel Tower in Paris was completed in 1889."
    wrong_number = "The Eiffel Tower in Paris was completed in 1925."
    wrong_entity = "The tower was designed by Thomas Edison."
    off_topic = "Bananas are a good source of potassium."
    v = c.violation(texts=[supported, wrong_number, wrong_entity, off_topic])
    assert v[0] == 0 and (v[1:] > 0).all()
    info = c.explain(wrong_number)
    assert "1925" in info["unsupported_items"] and "1889" not in info["unsupported_items"]
    # document from the context
    assert ConsistentWithDocument().check_text(supported, Context(document=doc))
    with pytest.raises(ConstraintError, match="document"):
        ConsistentWithDocument().violation(texts=[supported])


# ----------------------------------------------------------------------------- composition


def test_composite_arithmetic():
    a, b = Fixed((0.0, 2.0, 1.0)), Fixed((3.0, 0.0, 0.5))
    texts = ["x", "y", "z"]
    torch.testing.assert_close((a & b).violation(texts=texts), torch.tensor([3.0, 2.0, 1.5]))
    torch.testing.assert_close((a | b).violation(texts=texts), torch.tensor([0.0, 0.0, 0.5]))
    torch.testing.assert_close((2 * a & b).violation(texts=texts), torch.tensor([3.0, 4.0, 2.5]))
    torch.testing.assert_close((a * 0.5 | b).violation(texts=texts), torch.tensor([0.0, 0.0, 0.5]))
    torch.testing.assert_close((3 * (2 * a)).violation(texts=texts), torch.tensor([0.0, 12.0, 6.0]))
    assert (a & b).satisfied(texts=texts).tolist() == [False, False, False]
    assert (a | b).satisfied(texts=texts).tolist() == [True, True, False]
    nested = a & b & Fixed((1.0, 1.0, 1.0))
    assert isinstance(nested, And) and len(nested.parts) == 3  # flattened
    with pytest.raises(ConstraintError):
        Weighted(a, 0.0)
    with pytest.raises(ConstraintError):
        a & "not a constraint"  # noqa: B018


def test_mixed_composite_needs_logits_and_texts(tokenizer):
    tok_part, seq_part = FixedToken((0.0, 1.0)), Fixed((0.5, 0.0))
    mixed = tok_part & seq_part
    assert mixed.level == "sequence" and (tok_part & FixedToken((1.0, 1.0))).level == "token"
    lp = torch.log_softmax(torch.randn(2, 50), -1)
    torch.testing.assert_close(mixed.violation(logprobs=lp, texts=["ok", "ok"]), torch.tensor([0.5, 1.0]))
    # texts only: the token part falls back to a 0/1 verdict from check_text
    torch.testing.assert_close(mixed.violation(texts=["ok", "bad"]), torch.tensor([0.5, 1.0]))
    with pytest.raises(ConstraintError, match="mixes"):
        mixed.violation_logits(lp)
    with pytest.raises(ConstraintError, match="texts"):
        mixed.violation(logprobs=lp)
    with pytest.raises(ConstraintError, match="same candidates"):
        checked_violation(mixed, logprobs=lp, texts=["only one"])
    # With real parts: banned-token mass and sentiment together.
    real = AvoidTokens(["blue"]) & Sentiment(min_compound=0.0)
    ctx = Context(tokenizer=tokenizer)
    banned = AvoidTokens(["blue"]).banned_ids(tokenizer)
    logits = _logits_with_banned(len(tokenizer), banned, [12.0, -30.0])
    v = real.violation(logprobs=logits, texts=["I hate this awful day.", "I love this!"], context=ctx)
    assert v[0] > 0 and v[1] == 0
    assert real.check_text("I love red.") and not real.check_text("I love blue.")


def test_banned_token_ids_and_conjunction_split(tokenizer):
    """What CZAO's mask fallback bans and what a value probe covers, for each kind of composite."""
    blue, red = AvoidTokens(["blue"]), AvoidTokens(["red"])
    ids = lambda c: banned_token_ids(c, tokenizer)  # noqa: E731
    union = set(blue.banned_ids(tokenizer).tolist()) | set(red.banned_ids(tokenizer).tolist())
    assert set(ids(blue & red & Sentiment(min_compound=0.0)).tolist()) == union
    assert torch.equal(ids(Weighted(blue, 2.0)), blue.banned_ids(tokenizer))
    assert ids(blue | red) is None and ids(Sentiment(min_compound=0.0)) is None
    sent = Sentiment(min_compound=0.0)
    assert split_conjunction(blue & sent & red) == (sent, (blue, red))
    assert split_conjunction(sent) is None and split_conjunction(blue & red) is None
    assert split_conjunction(sent & NoProfanity()) is None  # two sequence parts: no one probe covers them


# ----------------------------------------------------------------------------- spec, registry, checks


def test_spec_round_trip(tmp_path):
    c = (2.0 * AvoidTokens(["blue", "azure"], threshold=0.1) & Sentiment(min_compound=0.2)) | (
        Language("en") & Regex(r"^\w", flags="m") & IncludeKeywords(["sky"], case_insensitive=False)
    )
    spec = c.to_dict()
    text = json.dumps(spec)
    again = load_constraint(text)
    assert again.to_dict() == spec
    path = tmp_path / "c.json"
    path.write_text(text)
    assert load_constraint(path).to_dict() == spec and load_constraint(str(path)).to_dict() == spec
    built = constraint_from_spec({"all": [{"type": "avoid_tokens", "words": ["blue"]}, {"weight": 3, "constraint": {"type": "no_profanity"}}]})
    assert isinstance(built, And) and isinstance(built.parts[1], Weighted) and built.parts[1].weight == 3.0
    assert isinstance(constraint_from_spec({"any": [{"type": "regex", "pattern": "a"}]}), Or)
    assert set(known_types()) >= {"avoid_tokens", "avoid_concept", "sentiment", "no_profanity", "include_keywords",
                                  "language", "regex", "max_length", "confident", "consistent_with_document"}


def test_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="avoid_tokens"):  # the message lists the known types
        constraint_from_spec({"type": "nope"})
    with pytest.raises(ConstraintError, match="accepted"):
        constraint_from_spec({"type": "sentiment", "minimum": 0.1})
    with pytest.raises(ConstraintError):
        constraint_from_spec({"type": "avoid_tokens"})  # missing words
    with pytest.raises(ConstraintError):
        constraint_from_spec({"all": []})
    with pytest.raises(ConstraintError):
        constraint_from_spec({"weight": 2.0})
    with pytest.raises(ConstraintError, match="Invalid JSON"):
        load_constraint('{"type": ')
    bad = tmp_path / "c.yaml"
    bad.write_text("type: regex")
    with pytest.raises(ConstraintError, match="JSON only"):
        load_constraint(bad)
    with pytest.raises(ConstraintError):
        load_constraint(tmp_path / "missing.json")


def test_custom_constraint_via_register():
    @register("test_short_answer")
    @dataclass(eq=False, repr=False)
    class ShortAnswer(Constraint):
        max_words: int = 3

        def violation_texts(self, texts, context=None):
            return torch.tensor([max(0, len(t.split()) - self.max_words) / self.max_words for t in texts])

    c = constraint_from_spec({"type": "test_short_answer", "max_words": 2})
    assert c.violation(texts=["yes", "one two three four"]).tolist() == [0.0, 1.0]
    assert c.check_text("two words") and not c.check_text("far too many words")
    assert load_constraint(json.dumps((c & Sentiment()).to_dict())).to_dict() == (c & Sentiment()).to_dict()
    with pytest.raises(ConstraintError, match="already registered"):
        register("sentiment")(ShortAnswer)


def test_checked_violation_catches_broken_constraints():
    @dataclass(eq=False, repr=False)
    class Broken(Constraint):
        out: tuple = ()

        def violation_texts(self, texts, context=None):
            return torch.tensor(self.out)

    with pytest.raises(ConstraintError, match="NaN.*|.*Broken.*NaN") as e:
        checked_violation(Broken((0.0, float("nan"))), texts=["a", "b"])
    assert "Broken" in str(e.value)
    with pytest.raises(ConstraintError, match="negative") as e:
        checked_violation(Broken((0.0, -0.5)), texts=["a", "b"])
    assert "Broken" in str(e.value)
    with pytest.raises(ConstraintError, match="shape"):
        checked_violation(Broken((0.0,)), texts=["a", "b"])
    # inside a composite the broken part is still named
    with pytest.raises(ConstraintError, match="Broken"):
        (Broken((0.0, -1.0)) & Fixed((0.0, 0.0))).violation(texts=["a", "b"])
    with pytest.raises(ConstraintError, match="list of strings"):
        checked_violation(Fixed((0.0,)), texts="a")
