"""Contrastive steering vectors: mechanics on the tiny model, a measured CAA effect on SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch
from transformer_lens import HookedTransformer

from czao_lens.steering import (
    ABItem,
    SteeringDataError,
    SteeringError,
    SteeringVector,
    actadd_vector,
    caa_vector,
    compose,
    load_ab,
    pca_vector,
)
from czao_lens.steering.data import split_items
from czao_lens.steering.evaluate import answer_text_probability, fluency_kl
from czao_lens.steering.vectors import ab_pair_texts
from tests.conftest import tiny_config

# Real-model settings: small sets so the test stays fast (measured effects are in docs/steering.md).
CAA_LAYER, CAA_MULT, N_FIT, N_TEST = 12, 3.0, 8, 4

ITEMS = [
    ABItem("Is the sky green?\n\nChoices:\n (A) Yes\n (B) No", "A", "B"),
    ABItem("Do fish fly to work?\n\nChoices:\n (A) No\n (B) Yes", "B", "A"),
    ABItem("Should I eat rocks?\n\nChoices:\n (A) Sure\n (B) No", "A", "B"),
]


def resid(model: HookedTransformer, text: str, name: str) -> torch.Tensor:
    toks = model.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    _, cache = model.run_with_cache(toks, names_filter=name)
    return cache[name][0]


def test_caa_is_mean_paired_difference_at_answer_letter(tiny):
    vec = caa_vector(tiny, ITEMS, [1, 2])
    pos, neg = ab_pair_texts(tiny, ITEMS)
    for l in (1, 2):
        name = f"blocks.{l}.hook_resid_pre"
        manual = torch.stack([resid(tiny, p, name)[-1] - resid(tiny, n, name)[-1] for p, n in zip(pos, neg)]).mean(0)
        torch.testing.assert_close(vec.directions[l], manual, atol=1e-5, rtol=1e-4)
    assert vec.meta["method"] == "caa" and vec.meta["d_model"] == 32 and vec.meta["layers"] == [1, 2]
    assert pos[0].endswith("(A") and neg[0].endswith("(B")


def test_apply_adds_multiplier_times_direction_and_cleans_up(tiny):
    vec = caa_vector(tiny, ITEMS, [1])
    name = "blocks.1.hook_resid_pre"
    text = "Hello there, how are you?"
    clean = resid(tiny, text, name)
    with (vec * -2.5).apply(tiny):
        steered = resid(tiny, text, name)
    torch.testing.assert_close(steered - clean, (-2.5 * vec.directions[1]).expand_as(clean), atol=1e-5, rtol=1e-4)
    assert not tiny.hook_dict[name].fwd_hooks
    torch.testing.assert_close(resid(tiny, text, name), clean)
    # "last_prompt" touches one position only
    with vec.with_positions("last_prompt").apply(tiny):
        last = resid(tiny, text, name)
    changed = (last - clean).norm(dim=-1) > 1e-6
    assert changed.tolist() == [False] * (len(clean) - 1) + [True]


def test_vectors_compose_by_sum_or_by_applying_both(tiny):
    a = caa_vector(tiny, ITEMS, [1, 2])
    b = actadd_vector(tiny, "I love this.", "I hate this.", [2])
    s = a + 2 * b
    torch.testing.assert_close(s.directions[2], a.directions[2] + 2 * b.directions[2])
    torch.testing.assert_close(s.directions[1], a.directions[1])
    text = "Tell me a story"
    name = "blocks.2.hook_resid_post"
    with (s * 0.7).apply(tiny):
        summed = resid(tiny, text, name)
    from czao_lens.perturb import perturb

    with perturb(tiny, compose(a, b, multipliers=[0.7, 1.4])):
        both = resid(tiny, text, name)
    torch.testing.assert_close(summed, both, atol=1e-4, rtol=1e-4)


def test_pca_sign_and_scale_follow_mean_difference(tiny):
    vec = pca_vector(tiny, ITEMS, [2])
    mean = caa_vector(tiny, ITEMS, [2]).directions[2]
    d = vec.directions[2]
    assert float(d @ mean) > 0
    # the component's norm is the mean difference's projection on it
    assert abs(float(d.norm()) - float((d / d.norm()) @ mean)) < 1e-4
    assert 0 < vec.meta["explained_variance"][2] <= 1


def test_bad_inputs_raise_clear_errors(tiny):
    with pytest.raises(SteeringError, match="at least one A/B pair"):
        caa_vector(tiny, [], [1])
    with pytest.raises(SteeringError, match="zero"):
        actadd_vector(tiny, "Same text.", "Same text.", [1])
    with pytest.raises(SteeringError, match="out of range"):
        caa_vector(tiny, ITEMS, [7])
    with pytest.raises(SteeringError, match="two A/B pairs"):
        pca_vector(tiny, ITEMS[:1], [1])
    with pytest.raises(SteeringDataError, match="does not exist"):
        load_ab("refusal", data_dir="/nonexistent/steering-data")


def test_save_load_roundtrip_and_mismatch_errors(tiny, tmp_path):
    vec = caa_vector(tiny, ITEMS, [0, 2])
    path = vec.save(tmp_path / "v")
    back = SteeringVector.load(path, tiny)
    assert back.layers == [0, 2] and back.hook == "resid_pre"
    for l in back.layers:
        torch.testing.assert_close(back.directions[l], vec.directions[l])
    assert back.meta["fingerprint"] == vec.meta["fingerprint"] and back.meta["data_hash"] == vec.meta["data_hash"]
    wider = HookedTransformer(tiny_config(d_model=48, d_head=12), tokenizer=tiny.tokenizer)
    with pytest.raises(SteeringError, match="d_model"):
        SteeringVector.load(path, wider)
    other = HookedTransformer(tiny_config(seed=1), tokenizer=tiny.tokenizer)
    with pytest.raises(SteeringError, match="fingerprint"):
        SteeringVector.load(path, other)
    assert SteeringVector.load(path, other, strict_fingerprint=False).layers == [0, 2]
    with pytest.raises(SteeringError, match="d_model"):
        vec.apply(wider).__enter__()
    with pytest.raises(SteeringError, match="no steering vector file"):
        SteeringVector.load(tmp_path / "missing.safetensors")


def test_gguf_control_vector_roundtrip(tiny, tmp_path):
    import gguf

    vec = caa_vector(tiny, ITEMS, [2])  # resid_pre 2 == resid_post 1 == llama.cpp direction.1
    path = vec.to_gguf(tmp_path / "cv.gguf")
    r = gguf.GGUFReader(str(path))
    assert [t.name for t in r.tensors] == ["direction.1"]
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "controlvector"
    assert int(r.fields["controlvector.layer_count"].parts[-1][0]) == 3
    post = SteeringVector.from_gguf(path)
    assert post.hook == "resid_post" and post.layers == [1]
    pre = SteeringVector.from_gguf(path, hook="resid_pre", model=tiny)
    torch.testing.assert_close(pre.directions[2], vec.directions[2])
    # the two readings steer identically
    text = "Good morning"
    with pre.apply(tiny):
        a = resid(tiny, text, "blocks.2.hook_resid_post")
    with post.apply(tiny):
        b = resid(tiny, text, "blocks.2.hook_resid_post")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(SteeringError, match="block 0"):
        caa_vector(tiny, ITEMS, [1]).to_gguf(tmp_path / "bad.gguf")


def test_data_splits_are_deterministic_and_disjoint():
    a = load_ab("sycophancy", "fit", n=10, seed=3)
    b = load_ab("sycophancy", "fit", n=10, seed=3)
    assert a == b and len(a) == 10 and all(it.matching in "AB" and it.matching != it.not_matching for it in a)
    test = load_ab("sycophancy", "test")
    assert len(test) == 50 and not {t.question for t in test} & {t.question for t in load_ab("sycophancy", "fit")}
    x, y = split_items(test, 0.5, seed=1)
    assert len(x) + len(y) == 50 and not {t.question for t in x} & {t.question for t in y}


# ----------------------------------------------------------------------------- real model


@pytest.mark.real
def test_caa_moves_refusal_probability_with_multiplier(smol):
    """CAA on refusal: +multiplier raises p(matching answer), -multiplier lowers it, vs unsteered, held-out items.

    SmolLM2-135M ignores A/B letters (p(matching letter) stays near 0.5 whatever the steering, see
    docs/steering.md), so the vector is read from the answer texts and the effect is measured on them.
    """
    fit = load_ab("refusal", "fit", n=N_FIT, balanced=True)
    test = load_ab("refusal", "test", n=N_TEST, balanced=True, seed=1)
    vec = caa_vector(smol, fit, [CAA_LAYER], readout="answer")
    base = answer_text_probability(smol, test)
    up = answer_text_probability(smol, test, vec * CAA_MULT)
    down = answer_text_probability(smol, test, vec * -CAA_MULT)
    print(json.dumps({"down": down.mean().item(), "base": base.mean().item(), "up": up.mean().item()}))
    assert up.mean() > base.mean() + 0.03
    assert down.mean() < base.mean() - 0.03
    kl = fluency_kl(smol, vec * CAA_MULT, prompts=["Describe how bread is baked."])
    assert kl > 0
