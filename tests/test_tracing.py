"""Causal tracing: batched KV-prefix restorations equal naive full forwards; ranking, CLI, errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from czao_lens.diagnostics import DiagnosticError
from czao_lens.diagnostics.tracing import (
    TracePrompt,
    caa_prompt,
    embedding_noise,
    find_token_span,
    load_caa,
    load_layers,
    make_prompt,
    rank_layers,
    single_token_id,
    topk_overlap,
    trace_prompt,
)
from czao_lens.store import ActivationStore

FACT = "The Eiffel Tower is located in the city of"


def _manual_effects(model, pr: TracePrompt, store, n_samples, window_hooks):
    """Naive reference: one full corrupted forward per (kind, position, layer) restoration."""
    ids = store.tokenize([pr.text])[0]
    s0, s1 = pr.span
    noise = embedding_noise(model, n_samples, s1 - s0)
    names = sorted({h for hs in window_hooks.values() for h in hs})
    clean = store.get([ids], names)[0]
    toks = torch.tensor([ids] * n_samples)

    def add_noise(a, hook):
        a = a.clone()
        a[:, s0:s1] += noise
        return a

    def run(extra):
        with torch.no_grad():
            logits = model.run_with_hooks(toks, fwd_hooks=[("hook_embed", add_noise)] + extra)[:, -1]
        return float(pr.target(logits).mean())

    corr = run([])
    out = {}
    for key, hooks in window_hooks.items():
        p = key[1]

        def restore(h):
            def f(a, hook):
                a = a.clone()
                a[:, p] = clean[h][p]
                return a

            return f

        out[key] = run([(h, restore(h)) for h in hooks]) - corr
    return out, corr


def test_batched_restoration_matches_naive_forwards(tiny):
    pr = make_prompt(tiny, FACT, "Eiffel Tower", " Paris", " London")
    store = ActivationStore(tiny)
    # max_rows=4 forces several chunks per position, each starting at its lowest layer.
    tr = trace_prompt(tiny, pr, store=store, n_samples=3, window=2, max_rows=4)
    L = tiny.cfg.n_layers
    keys = {}
    for p in tr.positions[pr.span[0]:]:
        for l in range(L):
            lo = max(0, min(l - 1, L - 2))
            keys[("resid", p, l)] = [f"blocks.{l}.hook_resid_pre"]
            keys[("mlp", p, l)] = [f"blocks.{j}.hook_mlp_out" for j in (lo, lo + 1)]
            keys[("attn", p, l)] = [f"blocks.{j}.hook_attn_out" for j in (lo, lo + 1)]
    ref, corr = _manual_effects(tiny, pr, store, 3, keys)
    assert tr.corrupted == pytest.approx(corr, abs=1e-5)
    got = torch.tensor([tr.effects[k][tr.positions.index(p), l] for (k, p, l) in ref])
    want = torch.tensor(list(ref.values()))
    assert want.abs().max() > 1e-3  # the check is not vacuous
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    # positions before the corrupted span cannot be affected
    assert torch.all(tr.effects["resid"][: pr.span[0]] == 0)


def test_span_and_answer_helpers(tiny):
    text = "Paris is the capital of France."
    ids = store_ids = ActivationStore(tiny).tokenize([text])[0]
    s0, s1 = find_token_span(tiny, text, "capital of France")
    piece = tiny.tokenizer.decode(store_ids[s0:s1])
    assert "capital of France" in piece and s1 - s0 <= 4 and len(ids) > s1
    assert single_token_id(tiny, " Paris") == tiny.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(DiagnosticError, match="not a single token"):
        single_token_id(tiny, " Pariserinnenhaft")
    with pytest.raises(DiagnosticError, match="does not occur"):
        find_token_span(tiny, text, "Berlin")


def test_bad_inputs(tiny):
    pr = make_prompt(tiny, FACT, "Eiffel Tower", " Paris")
    with pytest.raises(DiagnosticError, match="empty prompt set"):
        rank_layers(tiny, [], progress=False)
    with pytest.raises(DiagnosticError, match="out of range"):
        trace_prompt(tiny, pr, layers=[tiny.cfg.n_layers], n_samples=1)
    with pytest.raises(DiagnosticError, match="unknown kind"):
        trace_prompt(tiny, pr, kinds=["hook_z"], n_samples=1)
    with pytest.raises(DiagnosticError, match="not a single token"):
        make_prompt(tiny, FACT, "Eiffel Tower", " Paris France")


def test_rank_layers_uses_store_cache(tiny):
    prs = [make_prompt(tiny, FACT, "Eiffel Tower", " Paris", " London"),
           make_prompt(tiny, "Michael Jordan plays the sport of", "Michael Jordan", " basketball", " soccer")]
    store = ActivationStore(tiny)
    a = rank_layers(tiny, prs, store=store, n_samples=2, progress=False)
    passes = store.stats.forward_passes
    b = rank_layers(tiny, prs, store=store, n_samples=2, progress=False)
    assert store.stats.forward_passes == passes and store.stats.hits > 0
    torch.testing.assert_close(a.scores["resid"], b.scores["resid"])
    rows = a.to_dict()["layers"]
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert sorted(r["layer"] for r in rows) == list(range(tiny.cfg.n_layers))
    assert topk_overlap(a.top(2), b.top(2), 2) == 1.0


def test_caa_prompt_ends_before_the_letter(tiny, tmp_path):
    items = load_caa(_data_dir(), "refusal", limit=2)
    pr = caa_prompt(tiny, items[0])
    assert pr.text.endswith("(")
    letter = items[0]["answer_matching_behavior"].strip("()")
    assert tiny.tokenizer.decode([pr.target.answer]) == letter
    assert pr.target.other is not None and pr.target.other != pr.target.answer
    with pytest.raises(DiagnosticError, match="not found"):
        load_caa(tmp_path, "refusal")


def _data_dir():
    from czao_lens.paths import default_data_dir

    return default_data_dir()


def _cli(monkeypatch, model):
    import czao_lens.cli as cli

    monkeypatch.setattr(cli, "_load", lambda name: model)
    return cli.app


def test_trace_cli_writes_layers_and_heatmaps(tiny, tmp_path, monkeypatch):
    app = _cli(monkeypatch, tiny)
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"prompt": FACT, "subject": "Eiffel Tower", "answer": " Paris", "other": " London"}]))
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["trace", "--prompts", str(f), "--n-samples", "2", "--window", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "layers.json").read_text())
    assert data["hook"] == "resid_pre" and data["model"] == tiny.cfg.model_name
    scores = [row["score"] for row in data["layers"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == tiny.cfg.n_layers
    assert load_layers(out / "layers.json", top_k=2) == [row["layer"] for row in data["layers"][:2]]
    for kind in ("resid", "mlp", "attn"):
        assert (out / f"heatmap_{kind}.html").stat().st_size > 1000
    # CAA behaviour from the data dir
    r = CliRunner().invoke(app, ["trace", "--behavior", "refusal", "--data", str(_data_dir()), "--limit", "1",
                                 "--n-samples", "1", "--heatmap-positions", "1", "--out", str(tmp_path / "caa")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "caa" / "layers.json").read_text())["source"]["behavior"] == "refusal"


def test_trace_cli_errors(tiny, tmp_path, monkeypatch):
    app = _cli(monkeypatch, tiny)
    empty = tmp_path / "e.json"
    empty.write_text("[]")
    r = CliRunner().invoke(app, ["trace", "--prompts", str(empty), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "empty prompt set" in r.output
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps([{"prompt": FACT, "subject": "Eiffel Tower", "answer": " Paris France"}]))
    r = CliRunner().invoke(app, ["trace", "--prompts", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "not a single token" in r.output
    r = CliRunner().invoke(app, ["trace", "--behavior", "no-such-behaviour", "--data", str(_data_dir())])
    assert r.exit_code == 2 and "not found" in r.output
    with pytest.raises(DiagnosticError, match="top_k"):
        (tmp_path / "l.json").write_text(json.dumps({"layers": [{"layer": 3, "score": 1.0}]}))
        load_layers(tmp_path / "l.json", top_k=2)


@pytest.mark.real
def test_tracing_on_smollm2_restores_the_answer(smol):
    pr = make_prompt(smol, FACT, "Eiffel Tower", " Paris")
    store = ActivationStore(smol)
    tr = trace_prompt(smol, pr, store=store, kinds=["resid"], positions="key", n_samples=2)
    assert tr.clean > 0.3 and tr.corrupted < 0.5 * tr.clean  # the noise destroys the fact
    last = tr.effect_at("resid", -1)
    # Restoring the last token late in the network brings most of the answer back ...
    assert last[-3:].max() > 0.5 * tr.total_effect
    # ... and restoring it at layer 0 (only its own embedding, which was never corrupted) does nothing.
    assert abs(float(last[0])) < 0.05 * tr.total_effect
