"""Studies (docs/findings.md): their statistics, the quick form of each, and the CLI's errors."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from czao_lens.cli import STUDY_NAMES, app
from czao_lens.studies import STUDIES, StudyError, StudySettings, run_study
from czao_lens.studies.common import override_sizes, pareto_front, spearman, spearman_ci
from czao_lens.bench.report import read_summaries
from czao_lens.bench.tasks import BenchError

runner = CliRunner()
finite = st.floats(-100, 100, allow_nan=False)


@pytest.mark.filterwarnings("ignore:An input array is constant")
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=3, max_size=12))
def test_spearman_matches_scipy(pairs):
    from scipy.stats import spearmanr

    x, y = [p[0] for p in pairs], [p[1] for p in pairs]
    ref = spearmanr(x, y).statistic
    got = spearman(x, y)
    assert (math.isnan(got) and math.isnan(ref)) or got == pytest.approx(ref, abs=1e-9)


def test_spearman_ci_brackets_a_clear_trend():
    x = list(range(12))
    y = [v + (0.5 if v % 3 == 0 else 0.0) for v in x]
    r = spearman_ci(x, y, n_boot=300)
    assert r["rho"] > 0.95 and r["ci"][0] <= r["rho"] <= r["ci"][1] and r["n"] == 12
    assert math.isnan(spearman([1, 2], [2, 1]))
    with pytest.raises(StudyError, match="3 against 2"):
        spearman([1, 2, 3], [1, 2])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.5, 1.0, math.nan]), st.integers(0, 4), st.integers(0, 4)),
                min_size=1, max_size=10))
def test_pareto_front_is_exactly_the_undominated_points(points):
    up = (True, False, False)
    front = pareto_front(points, up)

    def dominates(q, p):
        return (all(math.isfinite(v) for v in q) and all((a >= b) if u else (a <= b) for a, b, u in zip(q, p, up))
                and any((a > b) if u else (a < b) for a, b, u in zip(q, p, up)))

    for p, on in zip(points, front):
        if any(not math.isfinite(v) for v in p):
            assert not on
        else:
            assert on == (not any(dominates(q, p) for q in points))


def _summary(model: str, tasks: dict, n_test: int = 12) -> dict:
    return {"run": {"model": model, "n_test": n_test, "n_fit": 8, "settings": {"seed": 0},
                    "started": "2026-12-07 12:00:00", "seconds": 60.0}, "tasks": tasks}


def _gen_task(methods: dict) -> dict:
    return {"kind": "generate", "methods": {m: {"satisfaction": s, "ci": [s - 0.1, s + 0.1], "ppl_ratio_same_decoding": p,
                                                "row_passes_per_token": c} for m, (s, p, c) in methods.items()}}


@pytest.fixture
def bench_dirs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, model, meths in ((a, "m1", {"unsteered": (0.3, 1.0, 1.0), "czao": (0.8, 1.0, 2.0), "bestofn": (0.8, 1.2, 2.0),
                                       "caa": (0.6, 2.5, 1.0)}),
                            (b, "m2", {"unsteered": (0.3, 1.0, 1.0), "czao": (0.5, 1.1, 2.0), "bestofn": (0.9, 1.0, 2.0),
                                       "caa": {"failed": "boom"}})):
        d.mkdir()
        t = _gen_task({k: v for k, v in meths.items() if isinstance(v, tuple)})
        t["methods"].update({k: v for k, v in meths.items() if isinstance(v, dict)})
        (d / "summary.json").write_text(json.dumps(_summary(model, {"sentiment": t})))
    return a, b


def test_pareto_study_fronts_and_files(bench_dirs, tmp_path):
    res = run_study("pareto", StudySettings(bench=list(bench_dirs)), tmp_path / "out")
    front = {(r["model"], r["method"]) for r in res.rows if r["on_front"]}
    # m1: bestofn is dominated by czao (same satisfaction and compute, worse perplexity); caa trades fluency for compute
    assert front == {("m1", "unsteered"), ("m1", "czao"), ("m1", "caa"), ("m2", "unsteered"), ("m2", "bestofn")}
    assert res.stats["sentiment"]["on_every_front"] == ["unsteered"]
    assert all(r["method"] != "caa" for r in res.rows if r["model"] == "m2")  # a failed method has no point
    md = (tmp_path / "out" / "pareto" / "table.md").read_text()
    assert "| m1 | sentiment | czao | 0.8 | 1 | 2 | True |" in md and res.answer in md
    saved = json.loads((tmp_path / "out" / "pareto" / "table.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(res.rows)) and (tmp_path / "out" / "pareto" / "figure.html").is_file()
    assert "unsteered" in res.answer


def test_bench_folders_merge_a_rerun_arm_over_the_first_run(bench_dirs, tmp_path):
    """A later folder's arm replaces the earlier one's (a rerun after a fix); its unsteered does not."""
    a, _ = bench_dirs
    fix = tmp_path / "fix"
    fix.mkdir()
    (fix / "summary.json").write_text(json.dumps(_summary("m1", {"sentiment": _gen_task(
        {"unsteered": (0.1, 1.0, 1.0), "caa": (0.95, 1.0, 1.0)})})))
    runs, lines = read_summaries([a, fix])
    meths = runs["m1"]["sentiment"]["methods"]
    assert meths["caa"]["satisfaction"] == 0.95 and meths["unsteered"]["satisfaction"] == 0.3
    assert meths["czao"]["satisfaction"] == 0.8 and len(lines["m1"]) == 2
    res = run_study("pareto", StudySettings(bench=[a, fix]), tmp_path / "out")
    assert {r["method"] for r in res.rows if r["on_front"]} == {"caa"}  # the fixed arm dominates every other
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps(_summary("m1", {"sentiment": _gen_task({"caa": (0.9, 1, 1)})}, n_test=40)))
    with pytest.raises(BenchError, match="other items"):
        read_summaries([a, other])


def test_pareto_study_refuses_bad_bench_folders(bench_dirs, tmp_path):
    with pytest.raises(BenchError, match="no bench summary"):
        read_summaries([tmp_path / "nowhere"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text('{"tasks": 3}')
    with pytest.raises(BenchError, match="not a bench summary"):
        read_summaries([tmp_path / "bad"])
    with pytest.raises(StudyError, match="not a bench summary"):
        run_study("pareto", StudySettings(bench=[tmp_path / "bad"]))
    with pytest.raises(StudyError, match="give --bench"):
        run_study("pareto", StudySettings())


@pytest.fixture(scope="module")
def tiny_long(smol):
    """The tiny random model with room for CAA's long sycophancy questions."""
    from conftest import tiny_config
    from transformer_lens import HookedTransformer

    model = HookedTransformer(tiny_config(n_ctx=1024), tokenizer=smol.tokenizer, default_padding_side="left")
    return model.eval()


@pytest.mark.real
def test_steerability_quick_harness(tiny_long, tmp_path):
    tiny = tiny_long
    res = run_study("steerability", StudySettings(models=["tiny"], quick=True, load=lambda name: tiny), tmp_path)
    assert [r["behaviour"] for r in res.rows] == ["refusal", "sycophancy"]
    for r in res.rows:
        assert 0.0 <= r["anti_share"] <= 1.0 and -1.0 <= r["consistency"] <= 1.0
        assert all(math.isfinite(r[k]) for k in ("p_unsteered", "p_up", "p_down", "steerability", "vector_norm"))
        assert r["layer"] == tiny.cfg.n_layers - 1 and r["n_test"] == 4
    assert set(res.stats) == {"multiplier", "tiny", "pooled"}
    assert (tmp_path / "steerability" / "table.json").is_file() and (tmp_path / "steerability" / "figure.html").is_file()


@pytest.mark.real
def test_steerability_caa_raises_refusal_on_smollm2(smol, tmp_path):
    """The study's CAA vector moves SmolLM2's answers on refusal the intended way on most items."""
    from czao_lens.studies.steerability import behaviour_row

    row, swing = behaviour_row(smol, "refusal", layer=12, n_fit=8, n_test=8, multiplier=2.0, chat=True, seed=0, data=None)
    assert row["p_up"] > row["p_unsteered"] > row["p_down"]
    assert row["anti_share"] < 0.5 and len(swing) == 8


@pytest.mark.real
def test_sensitivity_quick_harness(smol, tmp_path):
    res = run_study("sensitivity", StudySettings(quick=True, load=lambda name: smol), tmp_path)
    assert [r["layer"] for r in res.rows] == [1, smol.cfg.n_layers - 1]
    for r in res.rows:
        assert r["roughness"] > 0 and math.isfinite(r["lyapunov_local"]) and math.isfinite(r["lyapunov_ahead"])
        assert r["steps"] >= 1 and r["z_norm"] > 0  # the banned word was likely, so CZAO had to move
    assert len(res.stats["prompt_words"]["smollm2-135m-instruct"]) == 1
    assert (tmp_path / "sensitivity" / "figure.html").is_file()
    with pytest.raises(StudyError, match="no prompt"):
        run_study("sensitivity", StudySettings(quick=True, load=lambda name: _Unsure(smol)))


@pytest.mark.real
def test_localization_quick_harness(smol, tmp_path):
    res = run_study("localization", StudySettings(quick=True, load=lambda name: smol), tmp_path)
    L = smol.cfg.n_layers
    assert [r["layer"] for r in res.rows] == [1, L // 2, L - 1]
    for r in res.rows:
        assert math.isfinite(r["trace_score"]) and -1 <= r["caa_effect"] <= 1
    s = res.stats["smollm2-135m-instruct/refusal"]
    assert s["top_trace_layer"] in (1, L // 2, L - 1) and 1 <= s["caa_rank_of_top_trace_layer"] <= 3
    # CAA in the middle of the network moves SmolLM2 towards refusal more than at its first block
    assert res.rows[1]["caa_effect"] > res.rows[0]["caa_effect"]
    assert (tmp_path / "localization" / "table.json").is_file()


@pytest.mark.real
def test_steps_quick_harness(smol, tmp_path):
    # --size laid over the quick form: ranks 4 and 8 instead of 4 and 16
    res = run_study("steps", StudySettings(quick=True, sizes={"ranks": "4,8"}, load=lambda name: smol), tmp_path)
    assert {(r["type"], r["rank"], r["n_layers"]) for r in res.rows} == {
        (t, r, k) for t in ("banned words", "sentiment") for r in (4, 8) for k in (1, 2)}
    traced = res.stats["layers"]["smollm2-135m-instruct"]
    for r in res.rows:
        assert r["layers"] == sorted(traced[: r["n_layers"]]) and r["seed_line"]
        assert r["row_passes_per_token"] >= 1.0 and 0 <= r["satisfaction"] <= 1
    # a banned word the model was sure to say forces a search at every setting
    assert all(r["optimized_share"] > 0 and r["mean_steps"] >= 1 for r in res.rows if r["type"] == "banned words")
    assert (tmp_path / "steps" / "figure.html").is_file()


@pytest.mark.real
def test_gaming_quick_harness(smol, tmp_path):
    res = run_study("gaming", StudySettings(quick=True, load=lambda name: smol), tmp_path)
    assert [r["level"] for r in res.rows] == ["unsteered", "light", "strong"]
    for r in res.rows:
        assert 0 <= r["gaming"] <= r["accepted"] <= 1 and len(r["texts"]) == r["n"] == 1
    assert set(res.stats) == {f"smollm2-135m-instruct/sentiment/{lv}" for lv in ("unsteered", "light", "strong")}


@pytest.mark.real
def test_conjunction_quick_harness(smol, tmp_path):
    res = run_study("conjunction", StudySettings(quick=True, load=lambda name: smol), tmp_path)
    (row,) = res.rows
    assert row["pair"] == "sentiment+avoid word" and set(row) >= {"unsteered", "A", "B", "A&B"}
    assert row["unsteered"]["b"] is False  # the banned word is the one the model was sure to say
    s = res.stats["smollm2-135m-instruct/sentiment+avoid word"]
    assert s["n"] == 1 and 0 <= s["both_under_conjunction"] <= 1 and s["row_passes"]["A&B"] >= 1


@pytest.mark.real
def test_reachability_quick_harness(smol, tmp_path):
    res = run_study("reachability", StudySettings(quick=True, load=lambda name: smol), tmp_path)
    (row,) = res.rows
    assert row["type"] == "banned words" and set(row) >= {"rho@12/1", "rho@6/1", "lyapunov_ahead"}
    # the banned word is the model's confident next word: moving off it takes a positive radius
    assert 0 < row["rho@12/1"] <= 1.0
    s = res.stats["smollm2-135m-instruct"]
    assert s["layers"] == [12, 6] and math.isnan(s["auroc_activation_probe"])  # one prompt: nothing to predict


def test_cv_logistic_auroc_separates_separable_data():
    import torch

    from czao_lens.studies.common import cv_logistic_auroc

    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0.0, 1.0] * 20)
    x = torch.randn(40, 5, generator=g) + 3 * y[:, None] * torch.tensor([1.0, 0, 0, 0, 0])
    assert cv_logistic_auroc(x, y) > 0.9
    assert cv_logistic_auroc(torch.randn(40, 5, generator=g), y) < 0.8  # noise: no better than chance by much
    assert math.isnan(cv_logistic_auroc(x, torch.zeros(40)))


@pytest.mark.real
def test_cast_transfer_quick_harness(smol, tmp_path):
    res = run_study("cast_transfer", StudySettings(quick=True, load=lambda name: smol), tmp_path)
    assert len(res.rows) == 3 * 6 and {r["recipe"] for r in res.rows} == {
        "today (refusal vs TruthfulQA)", "same-format contrast (refusal vs other CAA + TruthfulQA)",
        "two formats (stems and A/B on both sides)"}
    for r in res.rows:
        assert 0 <= r["fire_rate"] <= 1 and r["n"] == 4
    for s in res.stats.values():
        assert all(0 <= s[k] <= 1 for k in ("in_distribution", "format_shift", "unseen_format", "category_shift"))


def test_cast_transfer_sets_keep_fit_and_test_apart():
    from czao_lens.studies.cast_transfer import prompt_sets

    sets = prompt_sets(8, None, 0)
    fit = {p for k, v in sets.items() if k.startswith("fit:") for p in v}
    test = {p for k, v in sets.items() if k.startswith("test:") for p in v}
    assert not fit & test and all(len(v) >= 4 for v in sets.values())


class _Unsure:
    """SmolLM2 with flat next-token logits: no prompt has a confident next word."""

    def __init__(self, model):
        self.model, self.cfg, self.tokenizer = model, model.cfg, model.tokenizer

    def __call__(self, tokens, **kw):
        import torch

        return torch.zeros(tokens.shape[0], tokens.shape[1], self.cfg.d_vocab)


def test_size_overrides_are_read_as_the_full_forms_types():
    full = {"ranks": (4, 8), "prompts": 4, "budgets": (1.0, 3.0), "multiplier": 2.0, "types": ("banned words", "sentiment")}
    got = override_sizes({**full, "prompts": 1}, full, {"ranks": "16, 32", "budgets": "0.5", "multiplier": 3, "types": "sentiment"})
    assert got == {"ranks": (16, 32), "prompts": 1, "budgets": (0.5,), "multiplier": 3.0, "types": ("sentiment",)}
    assert override_sizes(full, full, {}) == full
    assert override_sizes(full, full, {"ranks": 4, "budgets": [2, 3.5]})["ranks"] == (4,)
    assert override_sizes(full, full, {"budgets": [2, 3.5]})["budgets"] == (2.0, 3.5)


@pytest.mark.parametrize("sizes, message", [
    ({"rank": "4"}, "unknown size 'rank'"),
    ({"ranks": ""}, "non-empty"),
    ({"ranks": "4,,8"}, "non-empty"),
    ({"ranks": "4,x"}, "must be an integer"),
    ({"ranks": "0"}, "must be >= 1"),
    ({"prompts": 2.5}, "must be an integer"),
    ({"prompts": True}, "must be an integer"),
    ({"multiplier": "nan"}, "must be a finite number > 0"),
    ({"multiplier": "inf"}, "must be a finite number > 0"),
    ({"multiplier": "-2"}, "must be a finite number > 0"),
    ({"types": "sentiment,nonsense"}, "unknown types 'nonsense'"),
])
def test_bad_size_overrides_are_refused(sizes, message):
    full = {"ranks": (4, 8), "prompts": 4, "multiplier": 2.0, "types": ("banned words", "sentiment")}
    with pytest.raises(StudyError, match=message):
        override_sizes(full, full, sizes)


def test_study_cli_help_names_and_errors(tmp_path, bench_dirs):
    assert set(STUDY_NAMES) == set(STUDIES)
    res = runner.invoke(app, ["study", "--help"])
    assert res.exit_code == 0 and all(n in res.output for n in STUDY_NAMES)
    res = runner.invoke(app, ["study", "no-such-study"])
    assert res.exit_code == 2 and "unknown study 'no-such-study'" in res.output
    res = runner.invoke(app, ["study", "pareto", "--bench", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "no bench summary" in res.output
    res = runner.invoke(app, ["study", "pareto"])
    assert res.exit_code == 2 and "give --bench" in res.output
    res = runner.invoke(app, ["study", "steerability", "--model", "smollm2-135m-instruct", "--model", "no-such-model"])
    assert res.exit_code == 2 and "Unknown model 'no-such-model'" in res.output
    res = runner.invoke(app, ["study", "steps", "--layers-json", str(tmp_path / "nowhere.json")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["study", "steerability", "--layer", "-1"])
    assert res.exit_code == 2 and "--layer must be >= 0" in res.output
    res = runner.invoke(app, ["study", "steerability", "--layer", "99"])
    assert res.exit_code == 2 and "99" in res.output
    # bad --size: refused before any model loads (the study's sizes are checked first)
    res = runner.invoke(app, ["study", "steps", "--size", "ranks"])
    assert res.exit_code == 2 and "KEY=VALUE" in res.output
    res = runner.invoke(app, ["study", "steps", "--size", "ranks=4,-8"])
    assert res.exit_code == 2 and "ranks must be >= 1" in res.output
    res = runner.invoke(app, ["study", "gaming", "--size", "ranks=4"])
    assert res.exit_code == 2 and "unknown size 'ranks'" in res.output and "levels" in res.output
    res = runner.invoke(app, ["study", "pareto", "--bench", str(bench_dirs[0]), "--size", "prompts=2"])
    assert res.exit_code == 2 and "no sizes to set" in res.output
    res = runner.invoke(app, ["study", "pareto", "--bench", str(bench_dirs[0]), "--bench", str(bench_dirs[1]),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "pareto" / "table.json").read_text())["name"] == "pareto"


def test_findings_lists_every_studys_sizes():
    """docs/findings.md's --size table names exactly the keys each study accepts."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "findings.md").read_text()
    for name, study in STUDIES.items():
        if not study.sizes:
            continue
        row = re.search(rf"^\| {name} \| (.+) \|$", doc, flags=re.M)
        assert row, f"no --size row for {name}"
        assert set(re.findall(r"`(\w+)`", row.group(1))) == set(study.sizes), name
