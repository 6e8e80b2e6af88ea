"""SAE training (SAELens), loading, statistics and contrastive feature selection."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from typer.testing import CliRunner

from czao_lens.diagnostics import DiagnosticError
from czao_lens.diagnostics.features import FeatureBasis, select_features, top_activating_tokens
from czao_lens.sae import SAEError, check_sae_fits, load_sae, sae_stats, train_sae
from czao_lens.store import ActivationStore
from czao_lens.subspace import direction_basis

HOOK = "blocks.1.hook_resid_post"
TEXTS = [
    f"Sample text number {i}: the {w} walked to the {p} and talked about {t}."
    for i, (w, p, t) in enumerate(
        [(w, p, t) for w in ("cat", "teacher", "robot", "farmer") for p in ("market", "river", "school") for t in ("rain", "music", "bread", "maths")]
    )
]
POS = ["I love this wonderful sunny day", "What a great and happy moment", "This is a lovely gift, thank you",
       "We had a fantastic time at the party"]
NEG = ["I hate this awful rainy day", "What a terrible and sad moment", "This is a horrible gift, go away",
       "We had a miserable time at the funeral"]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("sae")
    torch.manual_seed(0)
    sae, stats = train_sae(tiny, HOOK, texts=TEXTS, width=64, training_tokens=3072, train_batch_size_tokens=128,
                           context_size=32, lr=3e-3, l1_coefficient=0.3, progress=False, out_dir=out, seed=0)
    return sae, stats, out


def test_training_gives_back_the_callers_ctrl_c_handler(trained):
    """SAELens installs its own SIGINT handler while training; afterwards Ctrl-C must be the caller's again."""
    import signal

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_train_gives_loadable_saelens_sae_that_learned(trained, tiny):
    sae, stats, out = trained
    assert (out / "cfg.json").exists() and (out / "sae_weights.safetensors").exists()
    again = SAE.load_from_disk(str(out))
    assert isinstance(again, SAE) and again.cfg.d_sae == 64 and again.cfg.d_in == 32
    assert again.cfg.metadata.hook_name == HOOK
    assert list(again.cfg.metadata.seqpos_slice) == [1, None]  # position 0 never reaches the SAE
    assert torch.allclose(again.W_dec, sae.W_dec)
    # reconstruction on held-out text improves over the SAE's initial weights
    assert stats["mse_per_token"] < 0.75 * stats["init"]["mse_per_token"]
    assert stats["explained_variance"] > stats["init"]["explained_variance"] + 0.1
    assert 0 < stats["l0"] <= 64
    assert json.loads((out / "stats.json").read_text())["width"] == 64
    fresh = sae_stats(tiny, load_sae(out), TEXTS[:5])
    assert 0 <= fresh["dead_fraction"] <= 1 and fresh["n_tokens"] > 0


def _planted(tiny, store, *, dense_index=None, bos_index=None):
    """An SAE whose feature 5 reads (and writes) the positive-minus-negative residual direction."""
    acts = store.get(POS + NEG, [HOOK])
    rows = [a[HOOK].float() for a in acts]
    rest = [r[1:] for r in rows]
    mp = torch.cat(rest[: len(POS)]).mean(0)
    mn = torch.cat(rest[len(POS):]).mean(0)
    m = torch.cat(rest).mean(0)
    d = (mp - mn) / (mp - mn).norm()
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 16, generator=g)
    W = W - d[:, None] * (d @ W)[None, :]  # other features see nothing of d
    W = W / W.norm(dim=0, keepdim=True)
    W[:, 5] = d
    b_enc = torch.zeros(16)
    if dense_index is not None:
        W[:, dense_index] = 2 * d  # a stronger contrast than feature 5, but it fires everywhere
        b_enc[dense_index] = 1e4
    if bos_index is not None:
        r0 = torch.stack([r[0] for r in rows])
        u = r0.mean(0) - m
        u = u / u.norm()
        W[:, bos_index] = u
        hi0 = float(((r0 - m) @ u).min())
        lo = float(((torch.cat(rest) - m) @ u).max())
        assert hi0 > lo, "precondition: position 0 separates along u in the tiny model"
        b_enc[bos_index] = -(hi0 + lo) / 2
    cfg = StandardSAEConfig(d_in=32, d_sae=16, metadata=SAEMetadata(hook_name=HOOK))
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(W)
        sae.W_dec.copy_(W.T)
        sae.b_enc.copy_(b_enc)
        sae.b_dec.copy_(m)
    return sae, d


def test_planted_feature_is_recovered_dense_dropped_and_store_cached(tiny):
    store = ActivationStore(tiny)
    sae, d = _planted(tiny, store, dense_index=9)
    fb = select_features(tiny, sae, POS, NEG, k=3, store=store)
    assert fb.indices[0] == 5
    assert 9 not in fb.indices and 9 in fb.info["dropped_dense_indices"]
    assert torch.allclose(fb.directions[0], d, atol=1e-5)
    assert fb.scores[0] > 0 and (fb.scores[:-1] >= fb.scores[1:]).all()
    # without the dense filter the dense feature wins: the filter is what removes it
    assert select_features(tiny, sae, POS, NEG, k=1, store=store, max_freq=1.0).indices == [9]
    passes = store.stats.forward_passes
    again = select_features(tiny, sae, POS, NEG, k=3, store=store)
    assert store.stats.forward_passes == passes and again.indices == fb.indices
    last = select_features(tiny, sae, POS, NEG, k=2, store=store, last_token_only=True)
    assert last.info["tokens_positive"] == len(POS)


def test_bos_feature_dropped(tiny):
    store = ActivationStore(tiny)
    sae, _ = _planted(tiny, store, bos_index=3)
    fb = select_features(tiny, sae, POS, NEG, k=5, store=store)
    assert 3 in fb.info["dropped_bos_indices"] and 3 not in fb.indices
    # the feature fires at position 0 only, so it never shows up among a text's top tokens
    assert top_activating_tokens(tiny, sae, 3, POS + NEG, 5, store=store) == []


def test_feature_basis_plugs_into_subspace_and_round_trips(tiny, tmp_path):
    store = ActivationStore(tiny)
    sae, _ = _planted(tiny, store)
    fb = select_features(tiny, sae, POS, NEG, k=4, store=store)
    B = fb.basis()
    assert B.shape == (32, fb.k)
    assert torch.allclose(B.T @ B, torch.eye(fb.k), atol=1e-5)
    byl = fb.directions_by_layer()
    assert list(byl) == [2]  # resid_post of block 1 is resid_pre of block 2
    sub = direction_basis(store, POS[0], byl)
    assert sub.hooks() == ["blocks.2.hook_resid_pre"] and sub.dim == fb.k
    paths = fb.save(tmp_path / "features")
    back = FeatureBasis.load(paths["json"])
    assert back.indices == fb.indices and torch.equal(back.directions, fb.directions) and back.hook_name == HOOK
    hits = top_activating_tokens(tiny, sae, 5, POS + NEG, 4, store=store)
    assert len(hits) == 4 and all(h.position > 0 for h in hits)
    assert [h.activation for h in hits] == sorted((h.activation for h in hits), reverse=True)
    assert all("[[" in h.context for h in hits)


def test_bad_inputs(tiny, trained):
    sae, _, _ = trained
    with pytest.raises(DiagnosticError, match="empty prompt set"):
        select_features(tiny, sae, [], NEG)
    with pytest.raises(DiagnosticError, match="empty prompt set"):
        select_features(tiny, sae, POS, ["  "])
    with pytest.raises(SAEError, match="out of range"):
        train_sae(tiny, "blocks.7.hook_resid_post", texts=TEXTS)
    with pytest.raises(SAEError, match="unknown hook"):
        train_sae(tiny, "blocks.1.hook_nonsense", texts=TEXTS)
    with pytest.raises(SAEError, match="empty corpus"):
        train_sae(tiny, HOOK, texts=[])
    wrong = StandardSAE(StandardSAEConfig(d_in=48, d_sae=8, metadata=SAEMetadata(hook_name=HOOK)))
    with pytest.raises(SAEError, match="width"):
        check_sae_fits(tiny, wrong)
    with pytest.raises(DiagnosticError, match="width 48"):
        select_features(tiny, wrong, POS, NEG)
    with pytest.raises(DiagnosticError, match="out of range"):
        top_activating_tokens(tiny, sae, 10_000, POS)
    with pytest.raises(SAEError, match="local folder"):
        load_sae("no-such-release-xyz", "some/sae-id")
    with pytest.raises(SAEError, match="not a local folder"):
        load_sae("no-such-release-xyz")


def test_cli_train_and_features(tiny, tmp_path, monkeypatch):
    """`sae train` trains the tiny recipe into the cache (a second call loads it), prints the quality
    report; `sae features` selects, labels (labels.html) and refuses out-of-range indices."""
    import czao_lens.models
    from czao_lens.cli import app

    monkeypatch.setattr(czao_lens.models, "load_model", lambda *a, **k: tiny)
    monkeypatch.setenv("CZAO_LENS_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    out = tmp_path / "sae"
    r = runner.invoke(app, ["sae", "train", "--hook", HOOK, "--recipe", "tiny", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "CE-loss recovered" in r.output and "L0 " in r.output and (out / "cfg.json").exists()
    cached = next((tmp_path / "cache" / "sae").glob("*/*/manifest.json")).parent
    assert (cached / "sae_weights.safetensors").read_bytes() == (out / "sae_weights.safetensors").read_bytes()
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("\n".join(POS))
    neg.write_text("\n".join(NEG))
    fo = tmp_path / "feat"
    r = runner.invoke(app, ["sae", "features", "--sae", str(out), "--pos-file", str(pos), "--neg-file", str(neg),
                            "--k", "3", "--max-freq", "1.0", "--out", str(fo)])
    assert r.exit_code == 0, r.output
    js = json.loads((fo / "features.json").read_text())
    assert js["hook_name"] == HOOK and 1 <= len(js["features"]) <= 3
    assert (fo / "features.safetensors").exists() and (fo / "features.html").exists()
    labels = (fo / "labels.html").read_text()
    assert f"feature {js['features'][0]['index']}" in labels and "rgba(255,140,0," in labels
    r = runner.invoke(app, ["sae", "features", "--sae", str(out), "--pos-file", str(pos), "--neg-file", str(neg),
                            "--feature", "2", "--feature", "5", "--out", str(fo)])
    assert r.exit_code == 0, r.output
    assert [f["index"] for f in json.loads((fo / "features.json").read_text())["features"]] == [2, 5]
    # without --sae: the cached SAE of the recipe at the hook (never trained here)
    r = runner.invoke(app, ["sae", "features", "--recipe", "tiny", "--hook", HOOK, "--pos-file", str(pos), "--neg-file", str(neg),
                            "--feature", "3", "--out", str(fo)])
    assert r.exit_code == 0 and str(cached) in r.output, r.output
    # bad inputs: clear errors, exit code 2
    r = runner.invoke(app, ["sae", "features", "--recipe", "default", "--hook", HOOK, "--pos-file", str(pos), "--neg-file", str(neg)])
    assert r.exit_code == 2 and "train it once" in r.output
    w = cached / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:-8])
    r = runner.invoke(app, ["sae", "features", "--sae", str(cached), "--pos-file", str(pos), "--neg-file", str(neg)])
    assert r.exit_code == 2 and "truncated" in r.output
    r = runner.invoke(app, ["sae", "features", "--sae", str(out), "--pos-file", str(pos), "--neg-file", str(neg),
                            "--feature", "64"])
    assert r.exit_code == 2 and "out of range" in r.output and "64 latents" in r.output
    r = runner.invoke(app, ["sae", "train", "--hook", "blocks.9.hook_resid_post", "--recipe", "tiny"])
    assert r.exit_code == 2 and "out of range" in r.output
    r = runner.invoke(app, ["sae", "train", "--hook", HOOK, "--recipe", "no-such-recipe"])
    assert r.exit_code == 2 and "unknown SAE recipe" in r.output
    r = runner.invoke(app, ["sae", "train", "--hook", HOOK, "--recipe", "tiny", "--k", "65"])
    assert r.exit_code == 2 and "must not exceed width" in r.output
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    r = runner.invoke(app, ["sae", "features", "--sae", str(out), "--pos-file", str(empty), "--neg-file", str(neg)])
    assert r.exit_code == 2 and "empty prompt set" in r.output
    r = runner.invoke(app, ["sae", "features", "--sae", str(out), "--pos-file", str(pos)])
    assert r.exit_code == 2
