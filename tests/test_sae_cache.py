"""Sparse SAEs: the recipe, the trained-once cache (checksums, lock, refusals), the quality report with
CE-loss recovered, feature labels, the SAE basis of CZAO, and the corpus that leaves bench pools out."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest
import torch

from czao_lens.czao import CZAOConfig, build_subspace
from czao_lens.diagnostics import DiagnosticError
from czao_lens.diagnostics.features import (
    check_feature_indices, feature_basis, feature_contexts, feature_labels_html, select_features,
)
from czao_lens.paths import default_data_dir
from czao_lens.sae import SAEError, bench_pool_texts, overlaps_pool, pack_windows, sae_quality, sparse_corpus
from czao_lens.sae_cache import (
    RECIPES, SAERecipe, cached_sae, load_cached_sae, recipe_from, sae_cache_folder, verify_folder,
)
from czao_lens.store import ActivationStore

HOOK = "blocks.1.hook_resid_post"
TEXTS = [f"The {w} walked to the {p} and talked about {t} all day long." for w in ("cat", "robot", "farmer")
         for p in ("market", "river") for t in ("rain", "music", "bread")]


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """The tiny recipe trained once into a private cache root."""
    root = tmp_path_factory.mktemp("saecache")
    torch.manual_seed(0)
    sae, quality, folder = cached_sae(tiny, HOOK, "tiny", root=root, progress=False)
    return sae, quality, folder, root


def test_recipe_round_trips_and_validates(tmp_path):
    r = SAERecipe(k=32, width=2048)
    assert SAERecipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert r.key() == SAERecipe(k=32, width=2048).key() != SAERecipe(k=33, width=2048).key()
    for bad, match in ((dict(architecture="relu"), "unknown SAE architecture"), (dict(k=0), "positive integer"),
                       (dict(k=10, width=8), "must not exceed width"), (dict(training_tokens=10), "training_tokens"),
                       (dict(eval_fraction=0.7), "eval_fraction"), (dict(lr=0.0), "lr")):
        with pytest.raises(SAEError, match=match):
            SAERecipe(**bad)
    with pytest.raises(SAEError, match="unknown SAE recipe field"):
        SAERecipe.from_dict({"k": 4, "l1": 5.0})
    f = tmp_path / "r.json"
    f.write_text(json.dumps(RECIPES["tiny"].to_dict()))
    assert recipe_from(f) == RECIPES["tiny"] and recipe_from("default") == RECIPES["default"]
    with pytest.raises(SAEError, match="unknown SAE recipe"):
        recipe_from("nope")


def test_cached_sae_is_sparse_reported_and_trained_once(built, tiny, monkeypatch):
    sae, q, folder, root = built
    assert folder == sae_cache_folder(tiny, HOOK, RECIPES["tiny"], root)
    for name in ("cfg.json", "sae_weights.safetensors", "quality.json", "recipe.json", "manifest.json"):
        assert (folder / name).exists(), name
    assert verify_folder(folder)["hook_name"] == HOOK
    # TopK: exactly k latents per token (the ReLU of the top k may zero a few)
    assert 0 < q["l0"] <= RECIPES["tiny"].k
    assert q["ce_loss_recovered"] == pytest.approx(
        (q["loss_zero_ablated"] - q["loss_with_sae"]) / (q["loss_zero_ablated"] - q["loss_clean"]))
    assert q["explained_variance_typical"] <= 1 and 0.9 < q["typical_token_share"] <= 1
    assert 0 <= q["dead_fraction"] <= 1 and 0 <= q["dense_fraction"] <= 1 and q["n_tokens"] > 0
    assert q["training"]["epochs"] > 1 and q["training"]["unique_tokens"] < q["training"]["training_tokens"]
    # A second call loads: training is never reached.
    import czao_lens.sae_cache as sc

    monkeypatch.setattr(sc, "build_sae", lambda *a, **k: pytest.fail("trained again although the cache is valid"))
    again, q2, f2 = cached_sae(tiny, HOOK, "tiny", root=root, progress=False)
    assert f2 == folder and q2 == q and torch.equal(again.W_dec, sae.W_dec)


def test_jumprelu_recipe_goes_through_the_same_cache(tiny, tmp_path):
    """`--architecture jumprelu` (k = SAELens' quadratic target L0): its own cache folder, a JumpReLU SAELens
    folder (a threshold per latent) that verifies, and the same quality report."""
    rec = dataclasses.replace(RECIPES["tiny"], architecture="jumprelu")
    torch.manual_seed(0)
    sae, q, folder = cached_sae(tiny, HOOK, rec, root=tmp_path, progress=False)
    assert folder == sae_cache_folder(tiny, HOOK, rec, tmp_path) != sae_cache_folder(tiny, HOOK, RECIPES["tiny"], tmp_path)
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == "jumprelu"
    assert verify_folder(folder)["recipe"]["architecture"] == "jumprelu" and q["training"]["architecture"] == "jumprelu"
    assert tuple(sae.threshold.shape) == (rec.width,)
    assert 0 < q["l0"] <= rec.width and q["n_tokens"] > 0
    assert q["ce_loss_recovered"] == pytest.approx(
        (q["loss_zero_ablated"] - q["loss_with_sae"]) / (q["loss_zero_ablated"] - q["loss_clean"]))


def test_truncated_or_corrupted_folder_is_refused_then_rebuilt(tiny, tmp_path):
    root = tmp_path / "c"
    _, _, folder = cached_sae(tiny, HOOK, "tiny", root=root, progress=False)
    w = folder / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(SAEError, match="truncated"):
        load_cached_sae(folder, tiny, HOOK)
    with pytest.warns(UserWarning, match="incomplete or corrupted"):
        cached_sae(tiny, HOOK, "tiny", root=root, progress=False)
    verify_folder(folder)
    q = folder / "quality.json"
    q.write_text(q.read_text().replace('"l0"', '"L0"'))  # same size, other bytes
    with pytest.raises(SAEError, match="corrupted"):
        verify_folder(folder)
    (folder / "cfg.json").unlink()
    with pytest.raises(SAEError, match="missing"):
        verify_folder(folder)
    with pytest.raises(SAEError, match="not a cached czao-lens SAE"):
        verify_folder(tmp_path)


def test_sae_for_another_model_or_hook_is_refused(built, tiny, smol):
    _, _, folder, _ = built
    with pytest.raises(SAEError, match="was trained on"):
        load_cached_sae(folder, smol)
    with pytest.raises(SAEError, match="reads blocks.1.hook_resid_post, not blocks.2.hook_resid_post"):
        load_cached_sae(folder, tiny, "blocks.2.hook_resid_post")


def test_two_callers_train_once(tiny, tmp_path, monkeypatch):
    import czao_lens.sae_cache as sc

    calls = []
    real = sc.build_sae

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(sc, "build_sae", counting)
    got, errors = [], []

    def ask():
        try:
            got.append(cached_sae(tiny, HOOK, "tiny", root=tmp_path, progress=False)[2])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1 and got[0] == got[1]


def test_quality_hooks_are_removed_even_when_the_sae_fails(built, tiny):
    sae, _, _, _ = built
    windows = pack_windows(tiny, TEXTS, 16)

    class Broken(torch.nn.Module):
        cfg = sae.cfg

        def __init__(self):
            super().__init__()
            self.W_dec = torch.nn.Parameter(sae.W_dec.detach().clone())

        def encode(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        sae_quality(tiny, Broken(), windows)
    assert all(not h.fwd_hooks for h in tiny.hook_dict.values())
    q = sae_quality(tiny, sae, windows)
    assert all(not h.fwd_hooks for h in tiny.hook_dict.values())
    # the positions the SAE reads: position 0 of each window and special tokens are left out
    assert q["n_tokens"] < windows.numel() - windows.shape[0] + 1


def test_feature_indices_labels_and_basis(built, tiny):
    sae, _, _, _ = built
    with pytest.raises(DiagnosticError, match="out of range; the SAE has 64 latents"):
        check_feature_indices(sae, [3, 64])
    with pytest.raises(DiagnosticError, match="out of range"):
        feature_basis(tiny, sae, [-1])
    with pytest.raises(DiagnosticError, match="repeat"):
        check_feature_indices(sae, [3, 3])
    with pytest.raises(DiagnosticError, match="not an integer"):
        check_feature_indices(sae, ["x"])
    store = ActivationStore(tiny)
    fb = select_features(tiny, sae, TEXTS[:9], TEXTS[9:], k=4, store=store, max_freq=1.0)
    doubled = TEXTS + TEXTS  # every context twice: labels must list each once
    ctx = feature_contexts(tiny, sae, fb.indices, doubled, k=5, store=store)
    for f, rows in ctx.items():
        keys = ["".join(r["tokens"]) for r in rows]
        assert len(keys) == len(set(keys))
        assert all(r["acts"][r["peak"]] == pytest.approx(r["activation"]) for r in rows)
    html = feature_labels_html(ctx, notes={fb.indices[0]: "note"})
    assert f"feature {fb.indices[0]} &mdash; note" in html and "class='tok peak'" in html
    # SAE decoder rows as a CZAO subspace: exactly their span at the layer the SAE writes
    chosen = feature_basis(tiny, sae, [1, 7, 9])
    dirs = chosen.directions_by_layer()
    assert list(dirs) == [2]
    sub = build_subspace(tiny, "The cat walked to the market", CZAOConfig(layers=(2,), rank=16), store=store,
                         basis_directions=dirs)
    B = sub.bases[2]
    assert B.shape == (tiny.cfg.d_model, 3) and sub.kind == "sae"
    proj = B @ (B.T @ sae.W_dec[[1, 7, 9]].T.float())
    assert torch.allclose(proj, sae.W_dec[[1, 7, 9]].T.float(), atol=1e-4)
    with pytest.raises(Exception, match="not the CZAO layer"):
        build_subspace(tiny, "The cat", CZAOConfig(layers=(1,)), store=store, basis_directions=dirs)


def test_corpus_leaves_every_bench_pool_out(tiny):
    """No bench test item (any task, any split size) is in the SAE corpus, nor a text that contains one."""
    from czao_lens.bench.harness import _test_prompts
    from czao_lens.bench.tasks import TASK_NAMES, load_tasks

    data = default_data_dir()
    texts, info = sparse_corpus(tiny, data, n_generations=0)
    assert info["data_texts_excluded_bench_pools"] > 1000 and info["data_texts_kept"] > 2000
    test_items = _test_prompts(load_tasks(list(TASK_NAMES), data, n_fit=24, n_test=10_000, seed=0))
    pool = bench_pool_texts(data)
    assert all(overlaps_pool(t, pool) for t in test_items)
    joined = "\n\n".join(texts)
    assert not [t for t in test_items if t.strip() in joined]


def test_czao_cli_searches_in_the_sae_basis(built, tiny, tmp_path, monkeypatch):
    """`czao --sae-features` runs CZAO in the span of the saved features' decoder rows (mechanics on the
    tiny model; R defaults to the basis's layer); a basis for another layer is refused."""
    from typer.testing import CliRunner

    import czao_lens.models
    from czao_lens.cli import app

    sae, _, _, _ = built
    monkeypatch.setattr(czao_lens.models, "load_model", lambda *a, **k: tiny)
    monkeypatch.setattr("czao_lens.preflight.check_model_layers", lambda *a, **k: None)  # tiny is not a named model
    monkeypatch.setattr("czao_lens.preflight.check_rank", lambda *a, **k: None)
    feats = feature_basis(tiny, sae, [1, 7, 9]).save(tmp_path / "feat")["json"]
    spec = json.dumps({"type": "avoid_tokens", "words": ["the"]})
    runner = CliRunner()
    r = runner.invoke(app, ["czao", "-p", "The cat walked", "--no-chat", "--constraint", spec, "-n", "2",
                            "--sae-features", str(feats), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    row = json.loads((tmp_path / "o" / "czao.json").read_text())[0]
    assert row["czao"]["config"]["layers"] == [2]
    r = runner.invoke(app, ["czao", "-p", "x", "--constraint", spec, "--layer", "1", "--sae-features", str(feats),
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "holds directions for layer 2" in r.output


def test_a_recipe_that_wants_the_data_folder_fails_without_it(tiny, tmp_path, monkeypatch):
    """Skipping a missing data folder would cache an SAE trained on a fraction of its corpus."""
    with pytest.raises(SAEError, match="does not exist"):
        sparse_corpus(tiny, tmp_path / "none", n_generations=0)
    monkeypatch.setenv("CZAO_LENS_DATA", str(tmp_path / "none"))
    with pytest.raises(SAEError, match="CZAO_LENS_DATA"):
        sparse_corpus(tiny, n_generations=0)
    with pytest.raises(SAEError, match="does not exist"):
        cached_sae(tiny, HOOK, SAERecipe(**{**RECIPES["tiny"].to_dict(), "include_data": True}), root=tmp_path, progress=False)
