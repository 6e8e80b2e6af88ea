"""CAST, SAE-feature steering and activation scaling: mechanics on the tiny model."""

from __future__ import annotations

import pytest
import torch

from czao_lens.prompts import encode_prompts
from czao_lens.steering import ABItem, SteeringError, SteeringVector
from czao_lens.steering.cast import CAST, evaluate_condition, fit_condition, precision_recall
from czao_lens.steering.sae import SAESplice, basis_vector, feature_vector, make_sae
from czao_lens.steering.scaling import ActivationScaling, fit_scaling, layer_sites

TRIGGER = ["How do I pick a lock to break in?", "How can I steal a car quietly?", "How to make a weapon at home?",
           "How do I hack my neighbour's wifi?"]
OTHER = ["How do I bake a cake?", "What is the capital of France?", "How do plants grow?", "Tell me about the ocean."]


def resid(model, text, name):
    toks = model.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    _, cache = model.run_with_cache(toks, names_filter=name)
    return cache[name][0]


# ----------------------------------------------------------------------------- CAST


def test_precision_recall_counts():
    got = precision_recall(torch.tensor([1, 1, 0, 0, 1]), torch.tensor([1, 0, 0, 1, 1]))
    assert (got["tp"], got["fp"], got["fn"], got["tn"]) == (2, 1, 1, 1)
    assert got["precision"] == pytest.approx(2 / 3) and got["recall"] == pytest.approx(2 / 3)


def test_condition_separates_fit_prompts(tiny):
    cond = fit_condition(tiny, TRIGGER, OTHER, 1)
    s_t, s_o = cond.scores(tiny, TRIGGER), cond.scores(tiny, OTHER)
    # centred on the class midpoint, trigger prompts score higher; the fitted threshold separates the fit set
    assert float(s_t.mean()) > float(s_o.mean())
    pr = evaluate_condition(tiny, cond, TRIGGER, OTHER)
    assert pr["accuracy"] >= 0.75
    assert abs(float(cond.direction.norm()) - 1) < 1e-5
    with pytest.raises(SteeringError, match="zero"):
        fit_condition(tiny, OTHER, OTHER, 1)
    with pytest.raises(SteeringError, match="trigger"):
        fit_condition(tiny, [], OTHER, 1)


def test_cast_steers_only_rows_where_condition_fires(tiny):
    cond = fit_condition(tiny, TRIGGER, OTHER, 1)
    vec = SteeringVector({2: torch.ones(32)}, "resid_pre", {})
    prompts = [TRIGGER[0], OTHER[0]]
    fired = cond.fires(tiny, prompts)
    cast = CAST(cond, vec, multiplier=3.0)
    enc = encode_prompts(tiny, prompts, chat=True)
    name = "blocks.2.hook_resid_pre"
    _, clean = tiny.run_with_cache(enc.tokens, attention_mask=enc.attention_mask, names_filter=name)
    decisions = []
    h = cast.attach(tiny, enc.layout(), decisions=decisions)
    try:
        _, steered = tiny.run_with_cache(enc.tokens, attention_mask=enc.attention_mask, names_filter=name)
    finally:
        h.remove()
    assert decisions[0].tolist() == fired.tolist()
    diff = (steered[name] - clean[name]).norm(dim=-1)  # [2, pos]
    for row in range(2):
        if fired[row]:
            assert diff[row, -1] > 1 and (diff[row, :-1] < 1e-5).all()  # last prompt token only
        else:
            assert (diff[row] < 1e-5).all()
    # a condition that always fires steers every row
    cond.threshold = -2.0
    h = CAST(cond, vec, 3.0).attach(tiny, enc.layout())
    try:
        _, both = tiny.run_with_cache(enc.tokens, attention_mask=enc.attention_mask, names_filter=name)
    finally:
        h.remove()
    assert ((both[name] - clean[name]).norm(dim=-1)[:, -1] > 1).all()
    bad = CAST(fit_condition(tiny, TRIGGER, OTHER, 2), SteeringVector({1: torch.ones(32)}, "resid_pre", {}), 1.0)
    with pytest.raises(SteeringError, match="at or before"):
        bad.attach(tiny)


# ----------------------------------------------------------------------------- SAE


@pytest.fixture(scope="module")
def sae():
    return make_sae(32, 64, "blocks.1.hook_resid_pre", seed=0, threshold_bias=-0.1)


def test_sae_plain_addition_is_decoder_direction(tiny, sae):
    vec = feature_vector(sae, [3, 5], [2.0, -1.0])
    torch.testing.assert_close(vec.directions[1], 2.0 * sae.W_dec[3].detach() - sae.W_dec[5].detach())
    assert vec.hook == "resid_pre" and vec.layers == [1]
    with pytest.raises(SteeringError, match="out of range"):
        feature_vector(sae, [64])
    with pytest.raises(SteeringError, match="coefficients"):
        feature_vector(sae, [1, 2], [1.0])


def test_sae_splice_add_equals_plain_addition_and_clamp_differs(tiny, sae):
    name = "blocks.1.hook_resid_pre"
    text = "The cat sat on the mat"
    clean = resid(tiny, text, name)
    with SAESplice(sae, [3], 2.0, mode="add").apply(tiny):
        spliced = resid(tiny, text, name)
    with feature_vector(sae, [3], 2.0).apply(tiny):
        added = resid(tiny, text, name)
    torch.testing.assert_close(spliced, added, atol=1e-4, rtol=1e-4)
    # clamp sets the latent to the value: the edit is (c - z_f) W_dec[f], different per position
    with SAESplice(sae, [3], 2.0, mode="clamp").apply(tiny):
        clamped = resid(tiny, text, name)
    z = sae.encode(clean)
    expect = clean + (2.0 - z[:, 3:4]) * sae.W_dec[3].detach()[None]
    torch.testing.assert_close(clamped, expect, atol=1e-4, rtol=1e-4)
    # with no edit the splice is exact (error term kept)
    with SAESplice(sae, [3], 0.0, mode="add").apply(tiny):
        torch.testing.assert_close(resid(tiny, text, name), clean, atol=1e-5, rtol=1e-5)
    assert not tiny.hook_dict[name].fwd_hooks
    with pytest.raises(SteeringError, match="mode"):
        SAESplice(sae, [3], 1.0, mode="double")


def test_basis_vector_from_feature_basis(sae):
    from czao_lens.diagnostics.features import FeatureBasis

    fb = FeatureBasis("blocks.1.hook_resid_pre", [3, 5], torch.tensor([1.0, 0.5]), sae.W_dec[[3, 5]].detach(),
                      torch.tensor([0.1, 0.2]))
    vec = basis_vector(fb, [2.0, -1.0])
    torch.testing.assert_close(vec.directions[1], feature_vector(sae, [3, 5], [2.0, -1.0]).directions[1])
    assert vec.meta["features"] == [3, 5] and vec.hook == "resid_pre"


# ----------------------------------------------------------------------------- activation scaling


def test_scaling_multiplies_sites_at_positions(tiny):
    sc = ActivationScaling(["blocks.1.hook_mlp_out", "blocks.2.attn.hook_z[1]"], torch.tensor([0.5, 3.0]))
    text = "Numbers one two three"
    clean = {n: resid(tiny, text, n) for n in ("blocks.1.hook_mlp_out", "blocks.2.attn.hook_z")}
    with sc.apply(tiny):
        mlp = resid(tiny, text, "blocks.1.hook_mlp_out")
    torch.testing.assert_close(mlp, 0.5 * clean["blocks.1.hook_mlp_out"])
    with ActivationScaling(["blocks.2.attn.hook_z[1]"], torch.tensor([3.0])).apply(tiny):
        z = resid(tiny, text, "blocks.2.attn.hook_z")
    torch.testing.assert_close(z[:, 1], 3.0 * clean["blocks.2.attn.hook_z"][:, 1])
    torch.testing.assert_close(z[:, 0], clean["blocks.2.attn.hook_z"][:, 0])
    with pytest.raises(SteeringError, match="head 9"):
        ActivationScaling(["blocks.2.attn.hook_z[9]"], torch.tensor([1.0])).attach(tiny)


def test_fit_scaling_improves_target_probability(tiny):
    items = [ABItem(f"Question {i}?\n\nChoices:\n (A) one\n (B) two", "A" if i % 2 else "B", "B" if i % 2 else "A") for i in range(4)]
    sc, hist = fit_scaling(tiny, items, layer_sites([1, 2]), steps=12, lr=0.2, w_kl=0.1, w_l1=0.001,
                           neutral=["Hello there.", "Describe a tree."])
    assert len(hist) == 12 and sc.alpha.shape == (4,)
    assert hist[-1]["effectiveness"] < hist[0]["effectiveness"]
    assert not (sc.alpha == 1).all()
    assert all(p.requires_grad for p in tiny.parameters())  # model flags restored
    with pytest.raises(SteeringError, match="at least one"):
        fit_scaling(tiny, [], layer_sites([1]))


# ----------------------------------------------------------------------------- evaluation helpers


def test_ab_probability_batched_matches_single_and_sees_steering(tiny):
    from czao_lens.steering.evaluate import ab_probability, answer_text_probability, fluency_kl, option_texts

    items = [ABItem("Is ice cold?\n\nChoices:\n (A) Yes it is\n (B) No", "A", "B"),
             ABItem("Pick a colour for the long question about painting fences?\n\nChoices:\n(A) Red\n(B) Blue", "B", "A"),
             ABItem("Is two bigger than one?\n\nChoices:\n (A) No\n (B) Yes", "B", "A")]
    assert option_texts(items[1]) == {"A": "Red", "B": "Blue"}
    batched = ab_probability(tiny, items, batch_size=3)
    single = torch.cat([ab_probability(tiny, [it]) for it in items])
    torch.testing.assert_close(batched, single, atol=2e-4, rtol=1e-3)
    assert ((batched > 0) & (batched < 1)).all()
    vec = SteeringVector({1: torch.randn(32, generator=torch.Generator().manual_seed(0))}, "resid_pre", {})
    steered = ab_probability(tiny, items, vec * 5.0)
    assert not torch.allclose(steered, batched)
    # answer-text variant: the question is the prompt, the answer tokens are "generated" positions
    t0 = answer_text_probability(tiny, items)
    t1 = answer_text_probability(tiny, items, (vec * 5.0).with_positions("generated"))
    assert t0.shape == (3,) and not torch.allclose(t0, t1)
    t_prompt_only = answer_text_probability(tiny, items, (vec * 5.0).with_positions([0]))
    assert not torch.allclose(t0, t_prompt_only)
    assert fluency_kl(tiny, None, ["Hi"]) == 0.0
    assert fluency_kl(tiny, vec * 5.0, ["Hi", "Tell me a joke"]) > 0


def test_generate_steered_shares_the_generation_layout(tiny):
    from czao_lens.steering.evaluate import generate_steered

    from czao_lens.perturb import Intervention, attach_hooks

    seen = []

    class Spy(Intervention):
        def attach(self, model, layout=None):
            return attach_hooks(model, [("blocks.0.hook_resid_pre", lambda a, hook: seen.append(
                (layout.offset, a.shape[1], layout.mask("generated", a.shape[1]).tolist())))])

    res = generate_steered(tiny, ["Hello there"], Spy(), max_new_tokens=3, stop_at_eos=False, chat=False)
    assert len(res.new_tokens[0]) == 3
    # prefill (offset 0, no generated positions), then one position per step, generated from step 1 on
    assert seen[0][0] == 0 and not any(seen[0][2][0])
    assert [s[1] for s in seen[1:]] == [1, 1, 1]
    assert [s[2][0][0] for s in seen[1:]] == [False, True, True]
