"""Activation patching: per-head patching under GQA against a manual computation; errors; cache."""

from __future__ import annotations

import pytest
import torch

from czao_lens.diagnostics import DiagnosticError
from czao_lens.diagnostics.patching import activation_patching
from czao_lens.diagnostics.tracing import Target, single_token_id
from czao_lens.store import ActivationStore

CLEAN = "The Eiffel Tower is located in the city of"
CORR = "The Colosseum Tower is located in the city of"


def _pair(model):
    store = ActivationStore(model)
    a, b = store.tokenize([CLEAN])[0], store.tokenize([CORR])[0]
    n = min(len(a), len(b))
    # same length by construction: trim the longer one from the front of the subject
    return store, a[-n:], b[-n:]


def test_head_patching_under_gqa_matches_manual_w_o(tiny):
    assert tiny.cfg.n_key_value_heads < tiny.cfg.n_heads  # the fixture is a GQA model
    store, clean, corr = _pair(tiny)
    target = Target(single_token_id(tiny, " Paris"), single_token_id(tiny, " Rome"))
    res = activation_patching(tiny, clean, corr, target, kinds=["z", "z_all", "v", "resid_pre"], store=store)
    L, H, T = tiny.cfg.n_layers, tiny.cfg.n_heads, len(clean)
    assert res.effects["z"].shape == (L, T, H) and res.effects["z_all"].shape == (L, H)
    assert res.effects["v"].shape == (L, tiny.cfg.n_key_value_heads)  # KV heads, not query heads

    # Manual: patching head h's z at position p adds (z_clean - z_corr)[p, h] @ W_O[l, h] to attn_out.
    toks = torch.tensor([corr])
    _, cache_x = tiny.run_with_cache(toks)
    _, cache_c = tiny.run_with_cache(torch.tensor([clean]))
    denom = res.clean - res.corrupted
    checked = 0
    for l in range(L):
        for h in range(H):
            for p in (T - 1, T - 3):
                dz = cache_c[f"blocks.{l}.attn.hook_z"][0, p, h] - cache_x[f"blocks.{l}.attn.hook_z"][0, p, h]
                delta = dz @ tiny.W_O[l, h]

                def add(a, hook, p=p, delta=delta):
                    a = a.clone()
                    a[:, p] += delta
                    return a

                with torch.no_grad():
                    logits = tiny.run_with_hooks(toks, fwd_hooks=[(f"blocks.{l}.hook_attn_out", add)])[:, -1]
                want = (float(target(logits)[0]) - res.corrupted) / denom
                assert res.effects["z"][l, p, h].item() == pytest.approx(want, abs=1e-4)
                checked += 1
    assert checked == L * H * 2
    # patching the whole residual stream at the last layer's last position reproduces the clean run
    # only through that position, and position 0 (identical tokens) never matters
    same = [p for p in range(T) if clean[: p + 1] == corr[: p + 1]]
    for p in same:  # a position whose whole prefix is identical cannot carry the difference
        assert torch.all(res.effects["resid_pre"][:, p].abs() < 1e-5)


def test_patching_bad_inputs_and_cache(tiny):
    store, clean, corr = _pair(tiny)
    target = Target(single_token_id(tiny, " Paris"), single_token_id(tiny, " Rome"))
    with pytest.raises(DiagnosticError, match="same number of tokens"):
        activation_patching(tiny, clean, corr[1:], target, store=store)
    with pytest.raises(DiagnosticError, match="out of range"):
        activation_patching(tiny, clean, corr, target, layers=[7], store=store)
    with pytest.raises(DiagnosticError, match="unknown patching kind"):
        activation_patching(tiny, clean, corr, target, kinds=["hook_q"], store=store)
    activation_patching(tiny, clean, corr, target, kinds=["mlp_out"], layers=[1], store=store)
    passes = store.stats.forward_passes
    r = activation_patching(tiny, clean, corr, target, kinds=["mlp_out"], layers=[1], store=store)
    assert store.stats.forward_passes == passes  # clean activations came from the cache
    assert r.effects["mlp_out"].shape == (1, len(clean)) and r.layers == [1]


@pytest.mark.real
def test_last_position_resid_patch_is_full_on_smollm2(smol):
    store = ActivationStore(smol)
    a, b = store.tokenize(["The capital of France is"])[0], store.tokenize(["The capital of Italy is"])[0]
    assert len(a) == len(b)
    target = Target(single_token_id(smol, " Paris"), single_token_id(smol, " Rome"))
    res = activation_patching(smol, a, b, target, kinds=["resid_pre"], layers=[0, 29], store=store)
    e = res.effects["resid_pre"]
    assert res.clean > res.corrupted
    # the differing token carries everything at layer 0; the last position carries it at the end
    diff_pos = [i for i, (x, y) in enumerate(zip(a, b)) if x != y][0]
    assert e[0, diff_pos].item() == pytest.approx(1.0, abs=1e-3)
    assert e[1, -1].item() > 0.8
    assert abs(e[0, -1].item()) < 0.05
