"""The shared activation store: caching, partial forwards, LRU, disk persistence."""

from __future__ import annotations

import pytest
import torch

from czao_lens.perturb import PerturbationError, resid_hook
from czao_lens.prompts import PromptError
from czao_lens.store import ActivationStore


def test_second_identical_request_runs_no_forward(tiny):
    store = ActivationStore(tiny)
    a = store.get(["hello world", "the cat sat"], [resid_hook(1), resid_hook(2)])
    passes = store.stats.forward_passes
    assert passes >= 1
    b = store.get(["hello world", "the cat sat"], [resid_hook(1), resid_hook(2)])
    assert store.stats.forward_passes == passes
    assert store.stats.hits == 4
    for x, y in zip(a, b):
        for h in x:
            assert torch.equal(x[h], y[h])


def test_values_match_run_with_cache_and_only_misses_are_computed(tiny):
    store = ActivationStore(tiny)
    store.get("hello world", resid_hook(0))
    p0 = store.stats.forward_passes
    got = store.get("hello world", [resid_hook(0), "blocks.2.mlp.hook_post"])
    assert store.stats.forward_passes == p0 + 1  # only the missing hook was computed
    toks = torch.tensor([store.tokenize("hello world")[0]])
    _, cache = tiny.run_with_cache(toks)
    assert torch.allclose(got[0]["blocks.2.mlp.hook_post"], cache["blocks.2.mlp.hook_post"][0], atol=1e-6)
    assert torch.allclose(got[0][resid_hook(0)], cache[resid_hook(0)][0], atol=1e-6)


def test_forward_stops_at_last_needed_layer(tiny):
    store = ActivationStore(tiny)
    ran = []
    h = lambda act, hook: ran.append(hook.name)
    tiny.blocks[2].hook_resid_post.add_hook(h)
    try:
        store.get("some words", resid_hook(1))
    finally:
        tiny.reset_hooks()
    assert ran == []


def test_lru_eviction_under_byte_budget(tiny):
    one = tiny.cfg.d_model * 4 * 3  # three tokens of float32
    store = ActivationStore(tiny, max_bytes=2 * one)
    for ids in ([1, 2, 3], [4, 5, 6], [7, 8, 9]):
        store.get([ids], resid_hook(0))
    assert store.stats.evictions == 1
    assert store.stats.bytes_in_memory <= 2 * one
    p = store.stats.forward_passes
    store.get([[1, 2, 3]], resid_hook(0))  # evicted: recomputed
    assert store.stats.forward_passes == p + 1


def test_disk_persistence_across_stores(tiny, tmp_path):
    s1 = ActivationStore(tiny, disk_dir=tmp_path)
    a = s1.get("persist me", resid_hook(2))
    s2 = ActivationStore(tiny, disk_dir=tmp_path)
    b = s2.get("persist me", resid_hook(2))
    assert s2.stats.forward_passes == 0 and s2.stats.disk_hits == 1
    assert torch.equal(a[0][resid_hook(2)], b[0][resid_hook(2)])
    assert not list(tmp_path.rglob("*.tmp"))


def test_store_bad_input(tiny):
    store = ActivationStore(tiny)
    with pytest.raises(PromptError):
        store.get([], resid_hook(0))
    with pytest.raises(PromptError):
        store.get([""], resid_hook(0))
    with pytest.raises(PerturbationError):
        store.get("x", "blocks.0.hook_nope")
    with pytest.raises(PerturbationError, match="out of range"):
        store.get("x", "blocks.40.hook_resid_pre")
    with pytest.raises(PromptError):
        store.get([[1, 2, 10**9]], resid_hook(0))
