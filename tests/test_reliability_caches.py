"""Caches under concurrency and faults: the model conversion cache, the Jacobian cache and the
activation store's disk cache.

* two processes converting (and filling the Jacobian and activation caches) at once end with one
  valid cache, and both load the same model;
* a cache file truncated, edited in place, or left half-written by a killed process is detected and
  rebuilt;
* an unwritable cache folder gives a warning and the result still comes back (nothing cached).

The model is a tiny random Llama saved as a local Hugging Face folder (SmolLM2's tokenizer), so a
conversion takes a second; the real model's cache is never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from czao_lens import models
from czao_lens.steering.lqr import block_jacobians
from czao_lens.store import ActivationStore

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["I love this wonderful day", "What a terrible and sad result"]


@pytest.fixture(scope="module")
def hf_folder(smol, tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tinyhf")
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=len(smol.tokenizer), max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    smol.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CZAO_LENS_CACHE", str(root))
    return root


def _cache_folder(root: Path) -> Path:
    (folder,) = [p for p in (root / "local").iterdir() if p.is_dir() and not p.name.count(".")]
    return folder


def _logits(m) -> torch.Tensor:
    with torch.no_grad():
        return m(torch.tensor([[1, 2, 3, 4]]))


def _count_conversions(monkeypatch) -> list:
    calls: list = []
    real = models._convert_hf_folder
    monkeypatch.setattr(models, "_convert_hf_folder", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


# ----------------------------------------------------------------------------- the model cache


def test_damaged_model_cache_is_detected_and_rebuilt(hf_folder, cache, monkeypatch):
    calls = _count_conversions(monkeypatch)
    ref = _logits(models.load_model(str(hf_folder), progress=False))
    folder = _cache_folder(cache)
    assert models._is_valid_cache(folder, check_hash=True) and calls == [1]
    _logits(models.load_model(str(hf_folder), progress=False))
    assert calls == [1], "a valid cache must be used as is"

    weights, config = folder / "model.safetensors", folder / "config.json"
    damages = {
        "truncated weights": lambda: weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2]),
        "weights edited in place": lambda: _flip(weights),
        "config edited in place": lambda: config.write_text(config.read_text().replace('"n_layers": 2', '"n_layers": 1')),
        "manifest not JSON": lambda: (folder / "manifest.json").write_text("{"),
        "half-written (no manifest)": lambda: (folder / "manifest.json").unlink(),
    }
    for what, damage in damages.items():
        damage()
        assert not models._is_valid_cache(folder, check_hash=True), f"{what} went unnoticed"
        n = len(calls)
        m = models.load_model(str(hf_folder), progress=False)
        assert len(calls) == n + 1, f"{what}: not rebuilt"
        assert torch.equal(_logits(m), ref), f"{what}: the rebuilt model differs"
        assert models._is_valid_cache(folder, check_hash=True), f"{what}: the rebuilt cache is not valid"


def test_killed_conversion_leftovers_are_cleaned(hf_folder, cache, monkeypatch):
    models.load_model(str(hf_folder), progress=False)
    folder = _cache_folder(cache)
    stale = folder.parent / f"{folder.name}.deadbeef"  # what a conversion killed mid-write leaves behind
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    old = time.time() - 2 * models.STALE_TMP_SECONDS
    os.utime(stale, (old, old))
    fresh = folder.parent / f"{folder.name}.cafe0001"  # a live conversion's folder must survive
    fresh.mkdir()
    models.load_model(str(hf_folder), rebuild_cache=True, progress=False)
    assert not stale.exists() and fresh.exists()


def test_unwritable_model_cache_warns_and_still_loads(hf_folder, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CZAO_LENS_CACHE", str(blocker / "cache"))  # every mkdir under it fails, even as root
    with pytest.warns(UserWarning, match="could not write the model cache"):
        m = models.load_model(str(hf_folder), progress=False)
    assert m.cfg.n_layers == 2


CHILD = r"""
import hashlib, sys, torch
from czao_lens import models
from czao_lens.steering.lqr import block_jacobians
from czao_lens.store import ActivationStore
converted = []
real = models._convert_hf_folder
models._convert_hf_folder = lambda *a, **k: converted.append(1) or real(*a, **k)
m = models.load_model(sys.argv[1], progress=False)
with torch.no_grad():
    logits = m(torch.tensor([[1, 2, 3, 4]]))
jac = block_jacobians(m, prompts=["I love this wonderful day", "What a terrible and sad result"], cache_dir=sys.argv[2])
acts = ActivationStore(m, disk_dir=sys.argv[3]).get(["I love this wonderful day"], ["blocks.1.hook_resid_pre"])
h = lambda t: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]
print("converted", len(converted), "logits", h(logits), "jac", h(jac.A), "acts", h(acts[0]["blocks.1.hook_resid_pre"]))
"""


def test_two_processes_fill_the_caches_at_once(hf_folder, tmp_path):
    env = {**os.environ, "CZAO_LENS_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = [sys.executable, "-c", CHILD, str(hf_folder), str(tmp_path / "jac"), str(tmp_path / "acts")]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    lines = [out.strip().splitlines()[-1].split() for out, _ in outs]
    assert sorted(int(l[1]) for l in lines) == [0, 1], f"the conversion must run once: {lines}"
    assert lines[0][2:] == lines[1][2:], f"the two processes disagree: {lines}"
    folder = _cache_folder(tmp_path / "cache")
    assert models._is_valid_cache(folder, check_hash=True)
    assert not [p for p in folder.parent.iterdir() if p.is_dir() and p != folder], "temporary folders left behind"
    assert len([p for p in (tmp_path / "jac").iterdir() if not p.name.startswith(".")]) == 1
    assert not [p for p in (tmp_path / "jac").iterdir() if p.name.startswith(".")], "temporary Jacobian folders left"
    assert not list((tmp_path / "acts").rglob("*.tmp")), "temporary activation files left"


# ----------------------------------------------------------------------------- the Jacobian cache


def _flip(path: Path) -> None:
    """Flip bytes in the second half of a file: same size, so only a checksum can tell."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size - size // 4)
        chunk = f.read(16)
        f.seek(size - size // 4)
        f.write(bytes(b ^ 0xFF for b in chunk))


def test_jacobian_cache_faults(tiny, tmp_path):
    root = tmp_path / "jac"
    ref = block_jacobians(tiny, prompts=PROMPTS, cache_dir=root)
    (entry,) = list(root.iterdir())
    tensors = entry / "tensors.safetensors"
    for what, damage in {"edited in place": lambda: _flip(tensors),
                         "truncated": lambda: tensors.write_bytes(tensors.read_bytes()[:100]),
                         "cfg.json not JSON": lambda: (entry / "cfg.json").write_text("{")}.items():
        damage()
        with pytest.warns(UserWarning, match="recomputing"):
            again = block_jacobians(tiny, prompts=PROMPTS, cache_dir=root)
        assert torch.equal(again.A, ref.A), what
        hit = block_jacobians(tiny, prompts=PROMPTS, cache_dir=root)  # the entry was rebuilt: a clean hit now
        assert hit.meta["seconds"] == again.meta["seconds"], f"{what}: the damaged entry was not replaced"
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="cannot write the Jacobian cache"):
        jac = block_jacobians(tiny, prompts=PROMPTS, cache_dir=blocker / "jac")
    assert torch.equal(jac.A, ref.A)


# ----------------------------------------------------------------------------- the activation store


def test_activation_disk_cache_faults(tiny, tmp_path):
    hook = "blocks.1.hook_resid_pre"
    ref = ActivationStore(tiny, disk_dir=tmp_path / "acts").get(PROMPTS[:1], [hook])[0][hook]
    (path,) = list((tmp_path / "acts").rglob("*.safetensors"))
    fresh = ActivationStore(tiny, disk_dir=tmp_path / "acts")
    assert torch.equal(fresh.get(PROMPTS[:1], [hook])[0][hook], ref) and fresh.stats.disk_hits == 1
    for what, damage in {"edited in place": lambda: _flip(path),
                         "truncated": lambda: path.write_bytes(path.read_bytes()[:40]),
                         "empty": lambda: path.write_bytes(b"")}.items():
        damage()
        store = ActivationStore(tiny, disk_dir=tmp_path / "acts")
        got = store.get(PROMPTS[:1], [hook])[0][hook]
        assert store.stats.disk_hits == 0 and torch.equal(got, ref), f"{what}: a damaged entry was used"
        again = ActivationStore(tiny, disk_dir=tmp_path / "acts")
        assert torch.equal(again.get(PROMPTS[:1], [hook])[0][hook], ref) and again.stats.disk_hits == 1, f"{what}: not rewritten"
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    store = ActivationStore(tiny, disk_dir=blocker / "acts")
    with pytest.warns(UserWarning, match="cannot write the activation store's disk cache"):
        got = store.get(PROMPTS, [hook])
    assert torch.equal(got[0][hook], ref)
