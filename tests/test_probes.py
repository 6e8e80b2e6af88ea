"""Value probes: training mechanics, metrics, the save layout and its refusals."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer

from czao_lens import CzaoLensError
from czao_lens.artifacts import load
from czao_lens.constraints import AvoidTokens, Regex
from czao_lens.probes import (
    ProbeError,
    Rollouts,
    ValueProbe,
    auroc,
    calibration,
    collect_rollouts,
    corpus_prompts,
    find_probe,
    fit_probe,
    probe_path,
    train_probe,
)

from conftest import tiny_config

VOWELS = Regex("[aeiou][aeiou]", must_match=False)
PROMPTS = [f"Story number {i} begins" for i in range(6)]


def test_auroc_and_calibration_on_known_values():
    s = torch.tensor([0.1, 0.4, 0.35, 0.8])
    y = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert auroc(s, y) == pytest.approx(0.75)
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(0.5)  # a tie counts half
    cal = calibration(torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert cal["ece"] == pytest.approx(0.0) and cal["brier"] == pytest.approx(0.0)
    cal = calibration(torch.tensor([0.9, 0.9]), torch.tensor([0.0, 0.0]))
    assert cal["ece"] == pytest.approx(0.9)


def test_fit_recovers_a_separable_rule(tiny):
    """Labels that are a linear function of the activations: held-out AUROC near 1, threshold keeps recall."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, tiny.cfg.d_model, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0.3).float()
    data = Rollouts(x, y, [i // 20 for i in range(600)], [{}] * 30)
    probe = fit_probe(tiny, VOWELS, data, recall=0.95)
    assert probe.metrics["evaluated_on"].startswith("out-of-fold")
    assert probe.metrics["auroc_heldout"] > 0.97
    assert probe.metrics["screen_miss_rate"] <= 0.05 + 1e-9
    p = probe.predict(x)
    assert ((p > 0.5) == (y > 0.5)).float().mean() > 0.9


def test_rollouts_label_every_generated_position(tiny):
    raw = collect_rollouts(tiny, PROMPTS[:2], samples=2, max_new_tokens=5, perturb_layers=(1,), progress=False)
    assert raw.labels is None
    data = raw.labelled(VOWELS, tiny.tokenizer)
    # per prompt: 1 greedy + 2 sampled + 2 perturbed rollouts of at most 5 positions each
    assert len(data.texts) == 2 * 5
    assert [r["kind"] for r in data.texts[:5]] == ["greedy", "sampled", "sampled", "perturbed", "perturbed"]
    assert data.acts.shape[1] == tiny.cfg.d_model and len(data.labels) == len(data.acts) == len(data.group)
    assert len(data.acts) <= 2 * 5 * 5
    for row in data.texts:
        assert row["violates"] == (VOWELS.violation_texts([row["text"]])[0] > 0).item()
    assert set(data.labels.tolist()) <= {0.0, 1.0}
    for pos, r in enumerate(data.row):
        assert data.labels[pos] == float(data.texts[r]["violates"])


def test_greedy_row_of_a_rollout_batch_is_the_greedy_continuation(tiny):
    from czao_lens.generate import generate

    raw = collect_rollouts(tiny, PROMPTS[:1], samples=2, max_new_tokens=6, perturb_layers=(1,), progress=False)
    plain = generate(tiny, PROMPTS[0], max_new_tokens=6)
    assert raw.texts[0]["text"] == plain.texts[0]


def test_probe_round_trip_and_cache(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CZAO_LENS_CACHE", str(tmp_path / "cache"))
    probe, _ = train_probe(tiny, VOWELS, PROMPTS, samples=2, max_new_tokens=6, perturb_layers=(1,), progress=False)
    assert probe_path(tiny, VOWELS).is_dir()
    again = find_probe(tiny, VOWELS)
    assert again is not None
    assert torch.equal(again.weight, probe.weight) and again.threshold == probe.threshold and again.hook == probe.hook
    generic = load(probe_path(tiny, VOWELS), tiny)  # one loader for every saved object
    assert isinstance(generic, ValueProbe)
    assert generic.model == probe.model and generic.model["fingerprint"]  # a re-save keeps the model record
    x = torch.randn(4, tiny.cfg.d_model)
    assert torch.allclose(generic.predict(x), probe.predict(x))


def test_probe_refuses_another_model_and_another_constraint(tiny, tmp_path):
    g = torch.Generator().manual_seed(1)
    data = Rollouts(torch.randn(80, tiny.cfg.d_model, generator=g), torch.tensor([0.0, 1.0] * 40), [i // 8 for i in range(80)])
    probe = fit_probe(tiny, VOWELS, data)
    probe.save(tmp_path / "p")
    other = HookedTransformer(tiny_config(seed=7), tokenizer=tiny.tokenizer, default_padding_side="left")
    with pytest.raises(CzaoLensError, match="fingerprint"):
        ValueProbe.load(tmp_path / "p", other)
    loaded = ValueProbe.load(tmp_path / "p", tiny)
    with pytest.raises(ProbeError, match="trained for"):
        loaded.check(tiny, Regex("zz", must_match=False))
    loaded.check(tiny, VOWELS)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: train_probe(m, AvoidTokens(["blue"]), PROMPTS, progress=False, save=False), "token-level"),
        (lambda m: collect_rollouts(m, [], progress=False), "no prompts"),
        (lambda m: collect_rollouts(m, PROMPTS, perturb_layers=(9,), progress=False), "out of range"),
        (lambda m: collect_rollouts(m, PROMPTS, samples=0, progress=False), "samples"),
        (lambda m: fit_probe(m, VOWELS, Rollouts(torch.zeros(4, m.cfg.d_model), None, [0, 0, 1, 1])), "not labelled"),
        (lambda m: fit_probe(m, VOWELS, Rollouts(torch.zeros(4, m.cfg.d_model), torch.ones(4), [0, 0, 1, 1])), "nothing to separate"),
    ],
)
def test_bad_probe_inputs(tiny, call, match):
    with pytest.raises(ProbeError, match=match):
        call(tiny)


def test_load_finds_the_type_in_a_fresh_process(tmp_path):
    """cfg.json names the defining module, so load() works before anything imported it."""
    import subprocess
    import sys

    p = ValueProbe("blocks.1.hook_resid_post", {"type": "regex"}, torch.ones(4), 0.0, torch.zeros(4), torch.ones(4), 0.3,
                   model={"fingerprint": "f00", "d_model": 4})
    p.save(tmp_path / "p")
    code = "import sys; from czao_lens.artifacts import load; o = load(sys.argv[1]); print(type(o).__name__, o.model['fingerprint'])"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p")], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["ValueProbe", "f00"], out.stderr[-2000:]


def test_corrupt_probe_folder_is_refused(tiny, tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(CzaoLensError, match="not valid JSON"):
        ValueProbe.load(folder, tiny)
    import pickle

    (folder / "cfg.json").write_text('{"type": "value_probe", "version": 1, "params": {}}')
    (folder / "tensors.safetensors").write_bytes(pickle.dumps({"weight": torch.zeros(3)}))
    with pytest.raises(CzaoLensError, match="safetensors"):
        ValueProbe.load(folder, tiny)


def test_corpus_excludes_evaluation_prompts(tmp_path):
    (tmp_path / "rtp").mkdir()
    (tmp_path / "rtp" / "rtp_a.txt").write_text("one\ntwo\n\nthree\n")
    (tmp_path / "rtp" / "rtp_b.txt").write_text("two\nfour\n")
    got = corpus_prompts(tmp_path, exclude=["three"])
    assert sorted(got) == ["four", "one", "two"]
    with pytest.raises(ProbeError, match="no prompt corpus"):
        corpus_prompts(tmp_path / "missing")


@pytest.mark.parametrize("args, match", [
    (["--constraint", '{"type": "avoid_tokens", "words": ["blue"]}'], "token-level"),
    (["--constraint", '{"type": "sentiment", "min_compound": 0.0}', "--limit", "1"], "--limit"),
    (["--constraint", '{"type": "nope"}'], "bad constraint spec"),
])
def test_probe_train_cli_rejects_bad_input_before_loading_the_model(args, match):
    from typer.testing import CliRunner

    from czao_lens.cli import app

    r = CliRunner().invoke(app, ["probe", "train", *args])
    assert r.exit_code == 2 and match in r.output
