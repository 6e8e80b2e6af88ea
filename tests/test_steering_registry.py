"""The steering registry and the one save layout: every registered method fits on the tiny model,
saves as cfg.json + tensors.safetensors, loads back (by class and through ``artifacts.load``) and
steers exactly as before; a file fitted on one model is refused by another."""

from __future__ import annotations

import json

import pytest
import torch
from transformer_lens import HookedTransformer

from czao_lens import artifacts
from czao_lens.errors import ArtifactError
from czao_lens.perturb import Intervention
from czao_lens.steering import ABItem, FitInput, SteeringError, SteeringVector, caa_vector, pca_vector
from czao_lens.steering.lqr import block_jacobians
from czao_lens.steering.registry import (
    fit_method,
    get_method,
    method_names,
    pool_continuation,
    register_method,
    steering_methods,
)
from czao_lens.steering.sae import make_sae
from czao_lens.store import ActivationStore
from tests.conftest import tiny_config

ITEMS = [
    ABItem("Is the sky green?\n\nChoices:\n (A) Yes\n (B) No", "A", "B"),
    ABItem("Do fish fly to work?\n\nChoices:\n (A) No\n (B) Yes", "B", "A"),
    ABItem("Should I eat rocks?\n\nChoices:\n (A) Sure\n (B) No", "A", "B"),
    ABItem("Is fire cold?\n\nChoices:\n (A) No\n (B) Yes", "B", "A"),
]
TRIGGER = ["How do I pick a lock to break in?", "How can I steal a car quietly?", "How do I hack my neighbour's wifi?"]
OTHER = ["How do I bake a cake?", "What is the capital of France?", "How do plants grow?"]
PROBE = "Tell me a short story about a dog"


@pytest.fixture(scope="module")
def fit_input(tiny, tmp_path_factory) -> FitInput:
    return FitInput(
        layers=[2], items=ITEMS, pos_texts=["I love this."], neg_texts=["I hate this."], trigger=TRIGGER, other=OTHER,
        sae=make_sae(32, 64, "blocks.1.hook_resid_pre", seed=0), features=[3, 5],
        jacobians=block_jacobians(tiny, n_prompts=2, cache_dir=tmp_path_factory.mktemp("jac")),
        multiplier=2.0, condition_layer=1,
    )


def last_resid(model: HookedTransformer, iv: Intervention | None) -> torch.Tensor:
    toks = model.tokenizer(PROBE, add_special_tokens=False, return_tensors="pt")["input_ids"]
    name = "blocks.2.hook_resid_post"
    if iv is None:
        _, cache = model.run_with_cache(toks, names_filter=name)
    else:
        with iv.apply(model):
            _, cache = model.run_with_cache(toks, names_filter=name)
    return cache[name][0]


def test_every_method_round_trips_through_the_one_layout(tiny, fit_input, tmp_path):
    assert method_names() == ("caa", "actadd", "pca", "sae", "cast", "scaling", "lqr")
    clean = last_resid(tiny, None)
    for m in steering_methods():
        obj = fit_method(m.name, tiny, fit_input)
        assert isinstance(obj, m.artifact) and isinstance(obj, Intervention), m.name
        folder = obj.save(tmp_path / m.name)
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["type"] == m.artifact.ARTIFACT_TYPE and cfg["version"] == artifacts.FORMAT_VERSION
        assert cfg["model"]["d_model"] == 32 and cfg["sites"], m.name
        assert (folder / "tensors.safetensors").exists()
        back = m.artifact.load(folder, tiny)
        any_back = artifacts.load(folder, tiny)
        assert type(back) is type(obj) and type(any_back) is type(obj)
        for k, t in obj.tensors().items():
            torch.testing.assert_close(back.tensors()[k], t, rtol=0, atol=0)
        # saving the loaded object writes the same cfg.json: nothing is lost on the way
        again = back.save(tmp_path / f"{m.name}-again")
        assert json.loads((again / "cfg.json").read_text()) == cfg, m.name
        # and it steers exactly like the fitted one
        iv, iv_back = m.strength(obj, fit_input), m.strength(back, fit_input)
        steered = last_resid(tiny, iv)
        torch.testing.assert_close(last_resid(tiny, iv_back), steered, rtol=0, atol=0)
        if m.name != "cast":  # CAST may (rightly) not fire on the probe
            assert not torch.allclose(steered, clean), m.name


def test_registry_caa_and_pca_are_the_classic_vectors(tiny, fit_input):
    for name, classic in (("caa", caa_vector), ("pca", pca_vector)):
        reg = fit_method(name, tiny, fit_input)
        old = classic(tiny, ITEMS, [2])
        assert torch.equal(reg.directions[2], old.directions[2]), name
        assert reg.meta["data_hash"] == old.meta["data_hash"]
    assert torch.equal((get_method("caa").strength(reg, fit_input)).directions[2], 2.0 * reg.directions[2])


def test_continuation_pooling_is_the_bench_contrast_vector(tiny):
    """Unpaired samples: mean over each sample's continuation tokens, then the difference of the means."""
    tok = tiny.tokenizer
    prompt = tok("Once upon a time", add_special_tokens=False)["input_ids"]
    pos = [prompt + tok(" the sun was warm", add_special_tokens=False)["input_ids"],
           prompt + tok(" we sang happy songs", add_special_tokens=False)["input_ids"]]
    neg = [prompt + tok(" the storm broke the door", add_special_tokens=False)["input_ids"]]
    store = ActivationStore(tiny)
    inp = FitInput(layers=[1], pos_ids=pos, neg_ids=neg, prompt_lens_pos=[len(prompt)] * 2, prompt_lens_neg=[len(prompt)],
                   pool=pool_continuation, store=store)
    vec = fit_method("caa", tiny, inp)
    hook = "blocks.1.hook_resid_pre"

    def pooled(ids, lens):
        acts = store.get(ids, [hook])
        return torch.stack([a[hook][n:].float().mean(0) for a, n in zip(acts, lens)]).mean(0)

    assert torch.equal(vec.directions[1], pooled(pos, [len(prompt)] * 2) - pooled(neg, [len(prompt)]))
    assert vec.meta["n_pos"] == 2 and vec.meta["n_neg"] == 1


def test_a_file_fitted_on_one_model_is_refused_by_another(tiny, fit_input, tmp_path):
    other = HookedTransformer(tiny_config(seed=1), tokenizer=tiny.tokenizer)  # same shapes, other weights
    path = fit_method("caa", tiny, fit_input).save(tmp_path / "caa")
    with pytest.raises(SteeringError, match="fingerprint"):
        SteeringVector.load(path, other)
    with pytest.raises(ArtifactError, match="fingerprint"):
        SteeringVector.load(path, other)
    with pytest.raises(ArtifactError, match="fingerprint"):
        artifacts.load(path, other)
    assert SteeringVector.load(path, other, strict_fingerprint=False).layers == [2]
    for m in steering_methods():  # every method's file carries the model it was fitted on
        folder = fit_method(m.name, tiny, fit_input).save(tmp_path / m.name)
        with pytest.raises(ArtifactError, match="fingerprint"):
            artifacts.load(folder, other)


def test_registry_errors_and_a_user_method(tiny, fit_input):
    with pytest.raises(SteeringError, match="unknown method 'telepathy'"):
        get_method("telepathy")
    with pytest.raises(SteeringError, match="block Jacobians"):
        fit_method("lqr", tiny, FitInput(layers=[2], items=ITEMS))
    with pytest.raises(SteeringError, match="positive and a negative text"):
        fit_method("actadd", tiny, FitInput(layers=[2], items=ITEMS))

    @register_method("mean_shift", artifact=SteeringVector, needs=("contrast",), knob="multiplier", at=lambda v, g: v * g)
    def fit_mean_shift(model, inp: FitInput) -> SteeringVector:
        acts = inp.pool(model, inp, inp.layers, inp.hook)
        return SteeringVector({l: acts.pos[l].mean(0) for l in inp.layers}, inp.hook, {"method": "mean_shift"})

    try:
        assert "mean_shift" in method_names()
        vec = fit_method("mean_shift", tiny, fit_input)
        assert vec.layers == [2] and get_method("mean_shift").needs == ("contrast",)
        with pytest.raises(SteeringError, match="already registered"):
            register_method("mean_shift", artifact=SteeringVector)(lambda model, inp: None)
    finally:
        from czao_lens.steering import registry

        registry._METHODS.pop("mean_shift", None)
