"""The benchmark harness: `czao-lens bench --quick` end to end, its metrics, its errors, and that a
method failing on one item is recorded as a failure while the run goes on."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer
from typer.testing import CliRunner

from czao_lens.bench import QUICK, BenchError, BenchSettings, check_methods, load_task, run_bench
from czao_lens.bench import harness
from czao_lens.bench.methods import GENERATE_ONLY
from czao_lens.bench.metrics import bootstrap_ci, distinct_n, fluency, paired_diff_ci, unsteered_logprobs
from czao_lens.bench.tasks import no_violent_words, split, textblob_ok, wordlist_ok
from czao_lens.cli import app
from czao_lens.distributed import without_timings
from czao_lens.paths import default_data_dir
from czao_lens.generate import generate
from czao_lens.perturb import Perturbation, resid_hook
from conftest import tiny_config

runner = CliRunner()
DATA = default_data_dir()


@pytest.mark.real
def test_bench_quick_runs_end_to_end(smol, tmp_path):
    """The harness works on every task and method; no performance is asserted here."""
    out = tmp_path / "bench"
    res = runner.invoke(app, ["bench", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["chat"] is True  # auto: SmolLM2-Instruct has a chat template
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert set(summary["tasks"]) == {"profanity", "sentiment", "concept", "refusal", "sycophancy", "truthfulness"}
    for name, t in summary["tasks"].items():
        ran = {m for m, s in t["methods"].items() if "failed" not in s}
        assert "unsteered" in ran
        for m in ran:  # one row per test item per method that was fitted
            got = [r for r in rows if r["task"] == name and r["method"] == m]
            assert len(got) == t["n_test"] == 2, (name, m)
            assert all("error" not in r for r in got), got
        if t["kind"] == "generate":
            assert {"czao", "czao-sae", "bestofn", "prompting", "unsteered-sampled"} <= ran
            sae_arm = t["methods"]["czao-sae"]  # CZAO in the span of 16 SAE decoder rows
            assert sae_arm["setting"]["config"]["basis"] == "sae" and t["methods"]["czao"]["setting"]["config"]["basis"] == "activation"
            assert 0 <= sae_arm["unreachable_share"] <= 1 and sae_arm["passes_per_token"] >= 1
            cz = t["methods"]["czao"]
            assert 0 <= cz["unreachable_share"] <= 1 and cz["passes_per_token"] >= 1
            # Sampled methods are compared with a sample of the unsteered model, greedy ones with greedy.
            bon, samp = t["methods"]["bestofn"], t["methods"]["unsteered-sampled"]
            assert bon["ppl_ratio_same_decoding"] == pytest.approx(bon["ppl"] / samp["ppl"])
            assert cz["ppl_ratio_same_decoding"] == pytest.approx(cz["ppl_ratio"])
            guided = t["methods"]["probe-guided"]  # runs where a value probe is cached, else says why not
            assert "probe-guided" in ran or "no value probe" in guided["failed"]
        else:
            assert set(t["not_applicable"]) == set(GENERATE_ONLY)
    html = (out / "report.html").read_text()
    assert "plotly" in html and "Satisfaction vs fluency cost" in html
    assert "<td>|</td>" not in html
    assert "| method |" in (out / "report.md").read_text()
    sae = summary["run"]["resources"]["sae"]  # the tiny recipe from the cache (trained there once) since no --sae
    assert sae["recipe"] == "tiny" and sae["l0"] <= 4 and "manifest.json" in {p.name for p in Path(sae["folder"]).iterdir()}


def test_bench_bad_inputs(tmp_path):
    with pytest.raises(BenchError, match="unknown method"):
        check_methods(["unsteered", "telepathy"])
    with pytest.raises(BenchError, match="reference"):
        check_methods(["caa"])
    assert check_methods(["bestofn", "czao", "unsteered"]) == ["unsteered", "czao", "bestofn"]
    with pytest.raises(BenchError, match="no data for task 'profanity'"):
        load_task("profanity", tmp_path / "nowhere", n_fit=2, n_test=2)
    (tmp_path / "rtp").mkdir()
    with pytest.raises(BenchError, match="rtp_threat.txt does not exist"):
        load_task("concept", tmp_path, n_fit=2, n_test=2)
    with pytest.raises(BenchError, match="no data for task 'refusal'"):
        load_task("refusal", tmp_path, n_fit=2, n_test=2)
    with pytest.raises(BenchError, match="unknown task"):
        load_task("poetry", tmp_path, n_fit=2, n_test=2)
    res = runner.invoke(app, ["bench", "--method", "telepathy", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown method" in res.output
    res = runner.invoke(app, ["bench", "--task", "poetry", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown task" in res.output
    res = runner.invoke(app, ["bench", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "no data for task 'profanity'" in res.output
    res = runner.invoke(app, ["bench", "--task", "truthfulness", "--data", str(tmp_path), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "no data for task 'truthfulness'" in res.output
    res = runner.invoke(app, ["bench", "--n-test", "0", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "n_fit and n_test must be >= 1" in res.output
    res = runner.invoke(app, ["bench", "--sae", str(tmp_path / "no_sae"), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "no_sae" in res.output


def test_bench_rejects_a_layer_the_model_does_not_have(tiny, tmp_path):
    with pytest.raises(BenchError, match="do not fit"):
        run_bench(tiny, data=DATA, out=tmp_path, settings=BenchSettings(layer=tiny.cfg.n_layers), progress=False)
    with pytest.raises(BenchError, match="do not fit"):
        run_bench(tiny, data=DATA, out=tmp_path, settings=BenchSettings(layer=1, condition_layer=2), progress=False)


@pytest.mark.parametrize("field, value, message", [
    ("max_new_tokens", 0, r"max_new_tokens must be in \[1, inf\]"),
    ("n_tune", 2.5, "n_tune must be a finite integer"),
    ("layer", -1, r"layer must be in \[0, inf\]"),
    ("caa_grid", (), "caa_grid is empty"),
    ("sae_grid", (1.0, float("nan")), "sae_grid must be a finite number"),
    ("lqr_grid", (0.0,), r"lqr_grid must be in \(0, inf\]"),
    ("jac_layers", (), "jac_layers is empty"),
    ("ppl_guard", 0.5, r"ppl_guard must be in \[1, inf\]"),
    ("kl_guard", float("inf"), "kl_guard must be a finite number"),
    ("distinct_guard", 1.5, r"distinct_guard must be in \[0, 1\]"),
    ("bestofn_top_p", 0.0, r"bestofn_top_p must be in \(0, 1\]"),
    ("guided_top_k", True, "guided_top_k must be a finite integer"),
])
def test_bench_settings_refuse_out_of_range_values(field, value, message):
    with pytest.raises(BenchError, match=message):
        BenchSettings(**{field: value})
    with pytest.raises(BenchError, match=message):  # replace() runs the same checks
        replace(BenchSettings(), **{field: value})


def test_split_is_deterministic_and_disjoint():
    items = list(range(50))
    fit, test = split(items, 10, 30, seed=3)
    assert (fit, test) == split(items, 10, 30, seed=3)
    assert len(fit) == 10 and len(test) == 30 and not set(fit) & set(test)
    assert split(items, 10, 30, seed=4) != (fit, test)
    fit, test = split(items, 40, 40, seed=0)  # the fit part never takes more than half
    assert len(fit) == 25 and len(test) == 25
    t = load_task("refusal", DATA, n_fit=8, n_test=5)
    assert len(t.fit) == 8 and len(t.test) == 5
    assert not {i.question for i in t.fit} & {i.question for i in t.test}


def test_second_evaluators_disagree_where_they_should():
    assert not wordlist_ok("what the fuck is this") and wordlist_ok("what a lovely day")
    assert textblob_ok("I love this wonderful place") and not textblob_ok("This is a terrible, awful mess")
    assert not no_violent_words("He grabbed a knife.") and no_violent_words("He grabbed a sandwich.")


def test_metrics():
    assert distinct_n(["a b a b"]) == pytest.approx(2 / 3)  # bigrams ab, ba, ab
    assert distinct_n(["a b", "a b"]) == pytest.approx(1 / 2)
    vals = [float(i % 2) for i in range(200)]
    lo, hi = bootstrap_ci(vals)
    assert lo < 0.5 < hi and hi - lo < 0.2
    lo4, hi4 = bootstrap_ci(vals[:8])
    assert hi4 - lo4 > hi - lo  # fewer items, wider interval
    d, dlo, dhi = paired_diff_ci([1, 1, 1, 0], [0, 0, 0, 0])
    assert d == pytest.approx(0.75) and dlo <= d <= dhi


def test_step_logprobs_match_teacher_forcing_and_kl(tiny):
    """keep_logprobs records the distribution each token was drawn from: unsteered it equals a
    teacher-forced forward (KL 0); with a perturbation the KL is positive."""
    prompt = "The cat sat on the"
    g = generate(tiny, prompt, max_new_tokens=6, keep_logprobs=True, stop_at_eos=False)
    base = unsteered_logprobs(tiny, prompt, g.new_tokens[0])
    assert g.step_logprobs[0].shape == base.shape == (6, tiny.cfg.d_vocab)
    f = fluency(base, g.new_tokens[0], g.step_logprobs[0])
    assert f["kl"] < 1e-4 and f["ppl"] > 1
    delta = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 5
    s = generate(tiny, prompt, max_new_tokens=6, keep_logprobs=True, stop_at_eos=False,
                 perturbations=[Perturbation(resid_hook(1), delta)])
    f2 = fluency(unsteered_logprobs(tiny, prompt, s.new_tokens[0]), s.new_tokens[0], s.step_logprobs[0])
    assert f2["kl"] > 0.01 and f2["kl_steered"] >= f2["kl"]
    assert "step_logprobs" not in g.to_dict()


@pytest.mark.real
def test_a_method_failing_on_one_item_is_recorded_and_the_run_goes_on(smol, tmp_path, monkeypatch):
    real = harness.static_run

    def flaky(model, factory, s):
        run = real(model, factory, s)

        def maybe(prompt):
            if factory is not None and prompt == bad_prompt:
                raise RuntimeError("boom on one prompt")
            return run(prompt)

        return maybe

    bad_prompt = load_task("sentiment", DATA, n_fit=6, n_test=3).test[1]
    monkeypatch.setattr(harness, "static_run", flaky)
    real_scores = harness.choice_scores

    def flaky_scores(model, items, factory=None, system_prompt=None, *, chat):
        if system_prompt is not None and any(it == bad_item for it in items):
            raise RuntimeError("boom on one item")
        return real_scores(model, items, factory, system_prompt, chat=chat)

    bad_item = load_task("refusal", DATA, n_fit=4, n_test=3).test[2]
    monkeypatch.setattr(harness, "choice_scores", flaky_scores)
    s = BenchSettings(max_new_tokens=4, n_tune=1, caa_grid=(1.0,), choice_caa_grid=(1.0,))
    summary = run_bench(smol, data=DATA, out=tmp_path, tasks=["sentiment", "refusal"], methods=["unsteered", "caa", "prompting"],
                        n_fit=6, n_test=3, settings=s, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    caa = [r for r in rows if r["task"] == "sentiment" and r["method"] == "caa"]
    assert [("error" in r) for r in caa] == [False, True, False]
    assert "boom on one prompt" in caa[1]["error"] and caa[1]["ok"] is False
    st = summary["tasks"]["sentiment"]["methods"]["caa"]
    assert st["errors"] == 1 and st["n"] == 3
    assert st["satisfaction"] == pytest.approx(sum(r["ok"] for r in caa) / 3)  # the failure counts as unsatisfied
    pr = [r for r in rows if r["task"] == "refusal" and r["method"] == "prompting"]
    assert [("error" in r) for r in pr] == [False, False, True]
    assert summary["tasks"]["refusal"]["methods"]["prompting"]["errors"] == 1


def test_an_interrupted_bench_reruns_only_the_unfinished_tasks(smol, tmp_path, monkeypatch):
    """In-process, Ctrl-C during the second task, then the same call again: the first task is not run
    again and the final files equal an uninterrupted run's apart from timings (the mechanics: a tiny model)."""
    tiny = HookedTransformer(tiny_config(n_ctx=512), tokenizer=smol.tokenizer, default_padding_side="left").eval()
    kw = dict(data=DATA, tasks=["refusal", "sycophancy"], methods=["unsteered", "prompting", "caa"], n_fit=QUICK["n_fit"],
              n_test=QUICK["n_test"], settings=replace(QUICK["settings"], layer=1, condition_layer=1), progress=False)
    whole = run_bench(tiny, out=tmp_path / "whole", **kw)
    real, ran, interrupt = harness.run_task, [], [True]

    def ctrl_c_in_the_second_task(model, task, *args, **kwargs):
        ran.append(task.name)
        if len(ran) == 2 and interrupt.pop():
            raise KeyboardInterrupt
        return real(model, task, *args, **kwargs)

    monkeypatch.setattr(harness, "run_task", ctrl_c_in_the_second_task)
    with pytest.raises(KeyboardInterrupt):
        run_bench(tiny, out=tmp_path / "cut", **kw)
    assert ran == ["refusal", "sycophancy"] and not (tmp_path / "cut" / "summary.json").exists()
    resumed = run_bench(tiny, out=tmp_path / "cut", **kw)
    assert ran == ["refusal", "sycophancy", "sycophancy"]  # refusal was not run again
    assert resumed["run"]["resources"]["distributed"]["skipped"] == 1

    def rows(folder):
        return [without_timings(json.loads(line)) for line in (folder / "results.jsonl").read_text().splitlines()]

    assert rows(tmp_path / "cut") == rows(tmp_path / "whole") and len(rows(tmp_path / "whole")) == 2 * 3 * QUICK["n_test"]
    same = [json.dumps(without_timings(x["tasks"]), sort_keys=True, default=str) for x in (whole, resumed)]  # NaN-safe
    assert same[0] == same[1] and list(resumed["tasks"]) == ["refusal", "sycophancy"]
    assert "failed" not in resumed["tasks"]["sycophancy"]["methods"]["caa"]
    # The run's item time counts the refusal item of the interrupted invocation too.
    items = [json.loads(line) for line in (tmp_path / "cut" / "tasks" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in items) == ["refusal", "sycophancy"]
    assert resumed["run"]["item_seconds"] == pytest.approx(sum(r["timing"]["seconds"] for r in items))
    assert resumed["run"]["item_seconds"] > items[[r["key"] for r in items].index("sycophancy")]["timing"]["seconds"]


def test_method_groups_and_their_merge():
    """Best-of-n rides with CZAO, every group carries the unsteered reference, choice tasks drop the
    generation-only methods; merging restores the whole-task row order and recomputes the ratios that
    compare entries of different items (best-of-n against the unsteered sample)."""
    ms = ["unsteered", "caa", "czao", "bestofn", "unsteered-sampled"]
    assert harness.method_groups("generate", ms) == [["unsteered"], ["unsteered", "caa"], ["unsteered", "czao", "bestofn"],
                                                     ["unsteered", "unsteered-sampled"]]
    assert harness.method_groups("choice", ms) == [["unsteered"], ["unsteered", "caa"]]
    assert harness.method_groups("generate", ["unsteered", "bestofn"]) == [["unsteered"], ["unsteered", "bestofn"]]

    def part(group, ppl):
        rows = [{"method": m, "item": i} for i in (1, 0) for m in group]
        entry = {"kind": "generate", "fit_info": {f"fit_{group[-1]}": 1},
                 "methods": {m: {"ppl": ppl[m], "setting": m} for m in group}}
        return group, rows, entry

    task = harness.Task("t", "generate", "", "", "")
    rows, entry = harness.merge_groups(task, ms, [part(["unsteered"], {"unsteered": 2.0}),
                                                  part(["unsteered", "czao", "bestofn"], {"unsteered": 2.0, "czao": 3.0, "bestofn": 5.0}),
                                                  part(["unsteered", "unsteered-sampled"], {"unsteered": 2.0, "unsteered-sampled": 4.0})])
    assert [(r["item"], r["method"]) for r in rows] == [(i, m) for i in (0, 1) for m in ("unsteered", "czao", "bestofn", "unsteered-sampled")]
    assert list(entry["methods"]) == ["unsteered", "czao", "bestofn", "unsteered-sampled"]
    assert entry["methods"]["bestofn"]["ppl_ratio_same_decoding"] == pytest.approx(5.0 / 4.0)  # not NaN: the other item's sample
    assert entry["methods"]["czao"]["ppl_ratio"] == pytest.approx(1.5) and set(entry["fit_info"]) == {"fit_unsteered", "fit_bestofn", "fit_unsteered-sampled"}
    choice = harness.Task("c", "choice", "", "", "")
    rows, entry = harness.merge_groups(choice, ms, [part(["unsteered"], {"unsteered": 1.0}), part(["unsteered", "caa"], {"unsteered": 1.0, "caa": 1.0})])
    assert [(r["method"], r["item"]) for r in rows] == [("unsteered", 0), ("unsteered", 1), ("caa", 0), ("caa", 1)]  # method by method
    assert set(entry["not_applicable"]) == {"czao", "bestofn", "unsteered-sampled"} and "ppl_ratio" not in entry["methods"]["caa"]


def test_the_trilemma_chart_leaves_out_a_method_whose_every_item_failed():
    from czao_lens.bench.report import trilemma_figure

    ok = {"satisfaction": 0.5, "ci": [0.25, 0.75], "ppl_ratio": 1.1, "passes_per_token": 2.0, "wall_ratio": 1.5}
    nan = float("nan")
    dead = {"satisfaction": nan, "ci": [nan, nan], "ppl_ratio": nan, "passes_per_token": nan, "wall_ratio": nan}
    fig = trilemma_figure({"tasks": {"sentiment": {"kind": "generate", "methods": {"czao": ok, "caa": dead}}}})
    assert [t.name for t in fig.data] == ["czao"]


def test_the_sweep_never_picks_a_setting_that_degenerates_into_repetition(tiny):
    """Seen on Gemma: SAE steering at x4 wrote "?\\n\\n?\\n\\n..." on every sentiment prompt, which VADER
    scores neutral (satisfied) and whose perplexity stayed within the guard. The distinct-2 guard
    leaves it out; without the guard (distinct_guard=0) it would win on satisfaction."""
    from czao_lens.bench.methods import Output, tune_generate

    task = load_task("sentiment", DATA, n_fit=4, n_test=1)
    s = replace(BenchSettings(), n_tune=4)

    def fixed(text: str):
        toks = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
        return lambda prompt: Output(text, toks, None, 1.0, 0.0)

    runs = {"x1": fixed(" and then they all went home angry and sad about it."),
            "x2": fixed("?\n\n?\n\n?\n\n?\n\n?\n\n?\n\n?\n\n?"),
            "x4": fixed(" it was a good day, the sun was out and we were happy.")}
    _, base = tune_generate(tiny, task, {"unsteered": runs["x1"]}, s, None)
    key, rows = tune_generate(tiny, task, runs, s, base[0])
    by = {r["setting"]: r for r in rows}
    assert by["x2"]["distinct2"] < 0.2 < by["x4"]["distinct2"]
    assert by["x2"]["satisfaction"] == by["x4"]["satisfaction"] == 1.0 and by["x1"]["satisfaction"] == 0.0
    assert key == "x4"
    # Ties go to the gentler setting: without the guard the repetition would be chosen.
    assert tune_generate(tiny, task, runs, replace(s, distinct_guard=0.0), base[0])[0] == "x2"
