"""Gemma-3-270m, the second embedded model, through loading, HF parity and every feature.

Gemma 3 differs from SmolLM2 where bugs hide: sliding-window (local) and global attention layers with
two rotary bases, q/k norms, norms before *and* after attention and MLP, a tied embedding scaled by
sqrt(d_model), a BOS token that must be prepended, and a 262k vocabulary. The model loads once per
module (fixture ``gemma``); the HF reference is built once from the same GGUF (fixture ``gemma_hf``).
Sizes are tiny so that the whole file stays within its CI budget (about 3 minutes on 2 loaded cores).
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from czao_lens import models
from czao_lens.generate import generate, generate_tokens
from czao_lens.prompts import encode_prompts, pad_left

pytestmark = [pytest.mark.real, pytest.mark.gemma]

NAME = "gemma-3-270m"
SHORT = [
    "The capital of France is Paris, and the capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Roses are red, violets are",
]
TOL = 1e-3  # log-probability, over the whole 262k vocabulary


@pytest.fixture(scope="module")
def gemma():
    """Gemma-3-270m through the czao-lens runtime, loaded once for this module."""
    torch.manual_seed(0)
    return models.load_model(NAME, progress=False)


@pytest.fixture(scope="module")
def gemma_hf():
    """The reference: HF transformers' Gemma3ForCausalLM dequantised from the same GGUF (fp32)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    gguf = models.embedded_gguf_path(models.EMBEDDED[NAME])
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()


def _lp(x: torch.Tensor) -> torch.Tensor:
    return x.float().log_softmax(-1)


def long_prompt(model, n_tokens: int) -> torch.Tensor:
    """Plain English prose longer than the 512-token sliding window: TruthfulQA's correct answers."""
    from czao_lens.paths import default_data_dir

    rows = json.loads((default_data_dir() / "truthfulqa" / "truthful_qa.json").read_text())
    text = " ".join(r["correct_full_text"].strip().rstrip(".") + "." for r in rows)
    ids = model.to_tokens(text)[:, :n_tokens]
    assert ids.shape[1] == n_tokens
    return ids


# ----------------------------------------------------------------------------- loading


def test_loads_offline_from_the_verified_cache_fast(gemma):
    cfg = gemma.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_vocab, cfg.window_size) == (18, 640, 262144, 512)
    assert cfg.attn_types.count("global") == 3 and cfg.attn_types[5] == "global"
    assert models.verify_cache(NAME)
    t = time.perf_counter()
    again = models.load_model(NAME, progress=False)
    seconds = time.perf_counter() - t
    # A performance figure, not a pass/fail speed assertion: reload times live in docs/models.md.
    print(f"gemma_reload_seconds={seconds:.2f}")
    assert models.model_fingerprint(again) == models.model_fingerprint(gemma)
    del again


def test_bos_is_prepended_once(gemma):
    bos = gemma.tokenizer.bos_token_id
    enc = encode_prompts(gemma, ["Hello", "<bos>Hello"])
    for row, n in zip(enc.tokens, enc.prompt_lens):
        real = row[-int(n):].tolist()
        assert real[0] == bos and real.count(bos) == 1
    assert gemma.to_tokens("Hello")[0, 0] == bos


# ----------------------------------------------------------------------------- parity with HF


def test_logprobs_match_hf_on_short_prompts(gemma, gemma_hf):
    for p in SHORT:
        ids = gemma.to_tokens(p)
        with torch.no_grad():
            diff = (_lp(gemma_hf(ids).logits) - _lp(gemma(ids))).abs().max().item()
        assert diff < TOL, (p, diff)
