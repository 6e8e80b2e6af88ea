"""Bad input never gets a traceback or a silent wrong result.

Hypothesis draws constraint specs (random JSON: wrong types, missing fields, unknown types, nested
all/any/weight, huge, negative and non-finite numbers), data files (truncated JSON, wrong schema,
multiple-choice items, empty files, non-UTF-8 bytes), layers.json files and command-line arguments.
Each either works or raises ``CzaoLensError`` with a message naming the bad value; the command line
exits 2 with one line, before any model loads. The distinct bad inputs tried are counted and printed
after the module (``-s``; docs/reliability.md quotes the CI count).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from czao_lens import cli
from czao_lens.constraints import Constraint, Context, known_types, load_constraint
from czao_lens.diagnostics.tracing import load_caa, load_layers
from czao_lens.errors import CzaoLensError
from czao_lens.steering.common import ab_pair_texts
from czao_lens.steering.data import ABItem, balance_letters, load_ab, selection_note

EXAMPLES = int(os.environ.get("CZAO_LENS_HYPOTHESIS_EXAMPLES", "0")) or None
TRIED: dict[str, set[str]] = defaultdict(set)  # distinct bad inputs per family
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _report_count():
    """After the module: print the number of distinct bad inputs tried (the figure docs/reliability.md quotes;
    shown with ``-s``). A report, not a test: a ``-k`` subset tries fewer."""
    yield
    counts = {k: len(v) for k, v in TRIED.items()}
    print(f"\ndistinct bad inputs tried: {sum(counts.values())} {counts}")


def fuzz(n: int):
    """Hypothesis settings: ``n`` examples in CI (or $CZAO_LENS_HYPOTHESIS_EXAMPLES), reproducible."""
    return settings(max_examples=max(EXAMPLES or 0, n), deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# ----------------------------------------------------------------------------- constraint specs

NUMBERS = st.one_of(
    st.integers(-10**30, 10**30), st.sampled_from([0, -1, 1, 10**400 // 10**380]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -0.0]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12), st.sampled_from(["", " ", "blue", "en", "(", "^OK$"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
PARAMS = ["words", "threshold", "tau", "code", "min_prob", "min_chars", "max_chars", "max_tokens", "max_prob", "pattern",
          "must_match", "flags", "min_compound", "max_compound", "min_fraction", "case_insensitive", "prefix_match",
          "description", "document", "min_support", "min_words"]
# Types whose construction needs no model download (semantic ones load MiniLM only on first use).
TYPES = st.sampled_from(known_types() + ["", "no_such_type", "AVOID_TOKENS", "all"])


def _leaf():
    return st.one_of(
        st.fixed_dictionaries({"type": TYPES}, optional={p: VALUES for p in PARAMS}),
        st.fixed_dictionaries({}, optional={p: VALUES for p in PARAMS}),  # no "type"
        VALUES,  # not even an object
    )


SPECS = st.recursive(
    _leaf(),
    lambda inner: st.one_of(
        st.fixed_dictionaries({"all": st.lists(inner, max_size=3)}, optional={"extra": VALUES}),
        st.fixed_dictionaries({"any": st.one_of(st.lists(inner, max_size=3), VALUES)}),
        st.fixed_dictionaries({"weight": NUMBERS}, optional={"constraint": inner, "x": VALUES}),
    ),
    max_leaves=4,
)


def _non_finite(obj) -> bool:
    if isinstance(obj, float):
        return not math.isfinite(obj)
    if isinstance(obj, dict):
        return any(_non_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_non_finite(v) for v in obj)
    return False


@pytest.fixture(scope="module")
def tokenizer(smol):
    return smol.tokenizer


def test_constraint_specs_work_or_fail_clearly(tokenizer):
    @fuzz(150)
    @given(spec=SPECS)
    def check(spec):
        text = json.dumps(spec)  # NaN/Infinity survive as JSON's non-standard literals, as users may write them
        TRIED["constraint spec"].add(text)
        try:
            c = load_constraint(text)
        except CzaoLensError as exc:
            assert str(exc).strip(), f"an empty error message for {text}"
            return
        # It loaded: it must be a usable constraint, never one that silently holds a NaN.
        assert isinstance(c, Constraint)
        assert not _non_finite(spec), f"a non-finite number was accepted: {text}"
        c.describe()
        if c.level == "token":
            lp = torch.log_softmax(torch.zeros(2, len(tokenizer)), -1)
            v = c.violation_logits(lp, Context(tokenizer=tokenizer))
            assert torch.isfinite(v).all(), f"{text} gives a non-finite violation"

    check()


@pytest.mark.parametrize("spec, named", [
    ('{"type": "avoid_tokens", "words": ["a"], "threshold": NaN}', "nan"),
    ('{"type": "avoid_tokens", "words": ["a"], "threshold": 1e999}', "inf"),
    ('{"weight": NaN, "constraint": {"type": "confident"}}', "nan"),
    ('{"weight": -2, "constraint": {"type": "confident"}}', "-2"),
    ('{"type": "max_length", "max_chars": -5}', "-5"),
    ('{"type": "sentiment", "min_compound": "high"}', "high"),
    ('{"type": "regex", "pattern": "("}', "("),
    ('{"all": []}', "[]"),
    ('{"any": [{"type": "confident"}, 7]}', "7"),
    ('{"type": "avoid_tokens"}', "words"),
    ('{"type": "no_such"}', "no_such"),
    ('{"type": "confident", "tau": 0.5', "json"),
])
def test_constraint_errors_name_the_bad_value(spec, named):
    TRIED["constraint spec"].add(spec)
    with pytest.raises(CzaoLensError) as err:
        load_constraint(spec)
    assert named.lower() in str(err.value).lower(), str(err.value)


# ----------------------------------------------------------------------------- data files

GOOD_ITEM = {"question": "Q?\n\nChoices:\n (A) yes\n (B) no", "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"}


def _mc_item(i: int, m: str, n: str) -> dict:
    opts = "\n".join(f" ({c}) option {c} of {i}" for c in "ABCDEFGH")
    return {"question": f"Question {i}?\n\nChoices:\n{opts}", "answer_matching_behavior": f"({m})", "answer_not_matching_behavior": f"({n})"}


ITEMS = st.one_of(
    st.just(GOOD_ITEM),
    st.builds(_mc_item, st.integers(0, 99), st.sampled_from("ABCDEFGH"), st.sampled_from("ABCDEFGH")),
    st.fixed_dictionaries({}, optional={"question": VALUES, "answer_matching_behavior": VALUES, "answer_not_matching_behavior": VALUES}),
    VALUES,
)
FILE_BYTES = st.one_of(
    st.lists(ITEMS, max_size=6).map(lambda rows: json.dumps(rows).encode()),
    st.lists(ITEMS, min_size=1, max_size=4).flatmap(
        lambda rows: st.integers(0, len(json.dumps(rows)) - 1).map(lambda k: json.dumps(rows).encode()[:k])),  # truncated
    st.binary(max_size=40),  # arbitrary bytes, mostly not UTF-8
    st.sampled_from([b"", b"   ", b"{}", b"null", b"\xff\xfe[]", "[\"caf\u00e9\"]".encode("latin-1"), b"[1, 2, 3]"]),
    VALUES.map(lambda v: json.dumps(v).encode()),
)


def test_data_files_load_or_fail_clearly(tmp_path):
    folder = tmp_path / "caa" / "fuzz"
    folder.mkdir(parents=True)

    @fuzz(150)
    @given(data=FILE_BYTES)
    def check(data):
        TRIED["data file"].add(data.hex())
        for name in ("generate_dataset.json", "test_dataset_ab.json"):
            (folder / name).write_bytes(data)
        for load in (lambda: load_ab("fuzz", "fit", data_dir=tmp_path), lambda: load_caa(tmp_path, "fuzz", split="test")):
            try:
                items = load()
            except CzaoLensError as exc:
                assert str(exc).strip(), "an empty error message"
                continue
            assert items, "an empty file must not load as an empty item list"
            for it in items:
                it = it if isinstance(it, ABItem) else ABItem.from_json(it)
                assert it.matching != it.not_matching and it.question.strip()

    check()


def test_multiple_choice_items_are_used_matching_against_non_matching(smol):
    letters = "ABCDEFGH"
    rows = [_mc_item(i, letters[i % 8], letters[(i + 3) % 8]) for i in range(40)] + [_mc_item(99, "H", "A")]
    items = [ABItem.from_json(r) for r in rows]
    chosen = balance_letters(items, 16, seed=0)
    assert len(chosen) == 16  # the old exact balance kept 8 x (rarest letter's count) = 40 -> fine, but n=64 below
    assert {it.matching for it in chosen} == set(letters)  # round robin: every letter appears
    many = balance_letters(items, 64, seed=0)
    assert len(many) == len(items)  # all 41 used: no letter-balance cut on multiple-choice sets
    note = selection_note(items, many, 64)
    assert note is not None and "41 of the 64" in note and "only 41 items" in note
    assert selection_note(items, chosen, 16) is None
    # two letters keep the exact balance, and the note says why fewer came back
    ab = [ABItem(f"Q{i}?\n\nChoices:\n (A) y\n (B) n", "A", "B") for i in range(5)]
    ab += [ABItem(f"R{i}?\n\nChoices:\n (A) y\n (B) n", "B", "A") for i in range(2)]
    bal = balance_letters(ab, 6)
    assert len(bal) == 4 and "rarer letter 'B' has 2" in selection_note(ab, bal, 6)
    pos, neg = ab_pair_texts(smol, chosen[:3])
    for it, p, n in zip(chosen[:3], pos, neg):
        assert p.endswith("(" + it.matching) and n.endswith("(" + it.not_matching)


def test_layers_json_loads_or_fails_clearly(tmp_path):
    path = tmp_path / "layers.json"

    @fuzz(60)
    @given(data=st.one_of(
        st.fixed_dictionaries({"layers": st.lists(st.fixed_dictionaries({}, optional={"layer": VALUES, "score": VALUES}), max_size=4)}).map(json.dumps),
        VALUES.map(json.dumps), st.text(max_size=20)),
        top_k=st.one_of(st.none(), st.integers(-2, 5)))
    def check(data, top_k):
        TRIED["layers.json"].add(f"{data}|{top_k}")
        path.write_text(data)
        try:
            layers = load_layers(path, top_k)
        except CzaoLensError as exc:
            assert str(exc).strip()
            return
        assert all(isinstance(x, int) for x in layers)

    check()
    TRIED["layers.json"].update(["<missing>", "<dir>"])
    with pytest.raises(CzaoLensError, match="does not exist"):
        load_layers(tmp_path / "missing.json")
    with pytest.raises(CzaoLensError, match="cannot read"):
        load_layers(tmp_path)


# ----------------------------------------------------------------------------- command-line arguments

SPEC = '{"type": "avoid_tokens", "words": ["blue"]}'
# (command, option, bad value, text the one-line error must contain)
BAD_ARGS = [
    (["generate", "-p", "hi"], "-n", v, "--max-new-tokens") for v in ("0", "-5", "-100000")
] + [
    (["generate", "-p", "hi", "--sample"], "--temperature", "0", "--temperature"),
    (["generate", "-p", "hi", "--sample"], "--top-p", "1.5", "--top-p"),
    (["generate", "-p", "hi", "--sample"], "--temperature", "nan", "--temperature"),
    (["generate"], "-p", "", "empty"),
    (["generate"], "-p", "   ", "empty"),
    (["czao", "--constraint", SPEC], "-p", "", "empty"),
    (["czao", "-p", "hi", "--constraint", SPEC], "-n", "-5", "--max-new-tokens"),
    (["czao", "-p", "hi", "--constraint", SPEC], "--layer", "30", "30"),
    (["czao", "-p", "hi", "--constraint", SPEC], "--layer", "-1", "-1"),
    (["czao", "-p", "hi", "--constraint", SPEC], "--rank", "577", "577"),
    (["czao", "-p", "hi", "--constraint", SPEC], "--rank", "0", "0"),
    (["czao", "-p", "hi", "--constraint", SPEC], "--kl-eps", "0", "KL bound of 0"),
    (["czao", "-p", "hi", "--constraint", SPEC], "--repair", "-1", "repair must be >= 0"),
    (["czao", "-p", "hi", "--constraint", SPEC], "--layers-json", "/no/such/layers.json", "does not exist"),
    (["czao", "-p", "hi"], "--constraint", '{"type": "avoid_tokens", "words": ["a"], "threshold": NaN}', "nan"),
    (["czao", "-p", "hi"], "--constraint", "/no/such/spec.json", "/no/such/spec.json"),
    (["steer", "-p", "Hi"], "-n", "-5", "--max-new-tokens"),
    (["steer"], "--layer", "99", "99"),
    (["steer"], "--n-fit", "0", "--n-fit"),
    (["steer"], "--method", "nope", "nope"),
    (["steer"], "--multiplier", "inf", "--multiplier"),
    (["steer", "--method", "sae", "--sae-path", "/no/such/sae"], "--features", "1,x", "/no/such/sae"),
    (["steer"], "--layers-json", "/no/such/layers.json", "does not exist"),
    (["steer", "--method", "caa"], "--workers", "2", "nothing to run on workers"),
    (["steer", "--method", "lqr"], "--workers", "-1", "workers"),
    (["steer", "--method", "lqr"], "--ray-address", "127.0.0.1:9", "cannot reach the Ray cluster"),  # nothing listens on port 9
    (["bench", "--quick"], "--ray-address", "127.0.0.1:9", "cannot reach the Ray cluster"),
    (["landscape", "--constraint", SPEC], "-p", "", "empty"),
    (["landscape", "-p", "x", "--constraint", SPEC], "--n", "1", "--n"),
    (["landscape", "-p", "x", "--constraint", SPEC], "--layer", "31", "31"),
    (["landscape", "-p", "x", "--constraint", SPEC], "--extent", "-1", "--extent"),
    (["lyapunov", "-p", "x"], "--l0", "30", "30"),
    (["lyapunov", "-p", "x", "--l0", "3"], "--l1", "2", "--l1"),
    (["lyapunov", "-p", "x"], "--n-dirs", "0", "--n-dirs"),
    (["lyapunov"], "--prompts", "/no/such/prompts.txt", "does not exist"),
    (["trace", "--behavior", "refusal"], "--n-samples", "0", "--n-samples"),
    (["trace", "--behavior", "refusal"], "--window", "0", "--window"),
    (["trace"], "--prompts", "/no/such/p.json", "does not exist"),
    (["bench", "--quick"], "--layer", "40", "40"),
    (["bench"], "--n-test", "0", "n_test"),
    (["bench"], "-n", "0", "--max-new-tokens"),
    (["bench"], "--task", "nope", "nope"),
    (["bench"], "--items", "item", "--items"),
    (["sae", "train"], "--hook", "blocks.99.hook_resid_post", "99"),
    (["sae", "train"], "--tokens", "0", "--tokens"),
    (["sae", "train"], "--recipe", "/no/such/recipe.json", "/no/such/recipe.json"),
    (["sae", "train"], "--k", "0", "--k"),
    (["sae", "train"], "--architecture", "relu", "relu"),
    (["bench"], "--sae-recipe", "/no/such/recipe.json", "/no/such/recipe.json"),
    (["sae", "features", "--behavior", "refusal"], "--sae", "/no/such/sae", "/no/such/sae"),
    (["sae", "features", "--behavior", "refusal", "--sae", "/tmp"], "--k", "0", "--k"),
    (["probe", "train", "--constraint", '{"type": "no_profanity"}'], "--limit", "1", "--limit"),
    (["probe", "train", "--constraint", '{"type": "no_profanity"}'], "--layer", "30", "30"),
    # values the option parser itself refuses: also one line, exit 2
    (["generate", "-p", "hi"], "-n", "abc", "--max-new-tokens"),
    (["czao", "-p", "hi", "--constraint", SPEC], "--rank", "1.5", "--rank"),
    (["steer"], "--no-such-option", "1", "--no-such-option"),
    (["bench"], "--seed", "", "--seed"),
    ([], "no-such-command", "x", "no-such-command"),
]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command tries to load a model: these errors must come first."""
    def refuse(name):
        raise AssertionError(f"the model {name} was loaded before the bad argument was refused")

    monkeypatch.setattr(cli, "_load", refuse)


@pytest.mark.parametrize("cmd, opt, value, named", BAD_ARGS, ids=[f"{(c or [''])[0]} {o} {v!r}" for c, o, v, _ in BAD_ARGS])
def test_bad_cli_argument_exits_2_with_one_line_before_loading(no_model, tmp_path, cmd, opt, value, named):
    TRIED["cli argument"].add(f"{' '.join(cmd)} {opt} {value!r}")
    args = cmd + [opt, value]
    if "--out" not in args and cmd and cmd[0] not in ("sae", "probe", "generate"):
        args += ["--out", str(tmp_path / "out")]
    res = runner.invoke(cli.app, args)
    out = res.output.strip()
    assert res.exit_code == 2, f"exit {res.exit_code}: {out}"
    assert out.startswith("error:") and "\n" not in out, f"not one line: {out!r}"
    assert named.lower() in out.lower(), f"the error does not name {named!r}: {out}"
    assert not (tmp_path / "out").exists(), "a refused command wrote output"


def test_cli_fuzzed_token_counts_and_layers(no_model, tmp_path):
    @fuzz(40)
    @given(n=st.integers(-10**6, 0), layer=st.one_of(st.integers(-10**6, -1), st.integers(30, 10**6)))
    def check(n, layer):
        TRIED["cli argument"].add(f"czao -n {n} --layer {layer}")
        for args in (["generate", "-p", "hi", "-n", str(n)],
                     ["czao", "-p", "hi", "--constraint", SPEC, "--layer", str(layer), "--out", str(tmp_path)],
                     ["steer", "--layer", str(layer), "--out", str(tmp_path)]):
            res = runner.invoke(cli.app, args)
            assert res.exit_code == 2 and res.output.strip().count("\n") == 0, res.output

    check()
