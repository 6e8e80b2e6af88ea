"""A-LQR: Jacobians, Riccati recursion, feedback hooks (tiny model) and a measured effect (SmolLM2)."""

from __future__ import annotations

import json

import pytest
import torch

from czao_lens.prompts import encode_prompts
from czao_lens.steering import load_ab
from czao_lens.steering.common import contrastive_activations
from czao_lens.steering.evaluate import answer_text_probability
from czao_lens.steering.lqr import (
    ALQR,
    RiccatiError,
    _prefix_run,
    block_jacobians,
    fit_alqr,
    last_position_jacobian,
    riccati,
    tracking_diagnostic,
)
from czao_lens.steering.vectors import SteeringError

POS = ["I love this wonderful day", "What a great and happy result", "This is lovely and kind"]
NEG = ["I hate this awful day", "What a terrible and sad result", "This is nasty and cruel"]

# Real-model settings (small so the test is fast): Jacobians from 2 prompts over the last layers.
LQR_LAYERS = list(range(18, 30))
LQR_LAMBDA = 3.0


@pytest.fixture(scope="session")
def tiny_jac(tiny, tmp_path_factory):
    return block_jacobians(tiny, n_prompts=3, cache_dir=tmp_path_factory.mktemp("jac"))


def test_jacobian_matches_finite_differences(tiny):
    toks = encode_prompts(tiny, "The quick brown fox jumps").tokens
    cache, xs = _prefix_run(tiny, toks, [1])
    x = xs[1][0]
    J = last_position_jacobian(tiny, 1, x, cache.entries[1], chunk=7)
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry as Entry

    e = cache.entries[1]

    def f(v):
        with torch.no_grad():
            return tiny.blocks[1](v.reshape(1, 1, -1), past_kv_cache_entry=Entry(e.past_keys, e.past_values, frozen=True))[0, 0]

    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        dx = torch.randn(x.shape, generator=g) * 1e-3 * x.norm()
        fd = (f(x + dx) - f(x - dx)) / 2
        assert float((fd - J @ dx).norm() / fd.norm()) < 1e-2
    # the prefix cache was not changed by the Jacobian passes
    assert e.past_keys.shape[1] == toks.shape[1] - 1


def test_block_jacobians_are_cached_on_disk(tiny, tmp_path):
    a = block_jacobians(tiny, n_prompts=2, cache_dir=tmp_path)
    assert a.A.shape == (3, 32, 32) and a.meta["n_prompts"] == 2 and a.meta["seconds"] >= 0
    files = list(tmp_path.glob("*/tensors.safetensors"))  # one cache entry (an artifact folder)
    assert len(files) == 1
    b = block_jacobians(tiny, n_prompts=2, cache_dir=tmp_path)
    torch.testing.assert_close(a.A, b.A)
    assert b.meta["seconds"] == a.meta["seconds"]  # loaded, not recomputed


def test_riccati_matches_scalar_closed_form():
    a, q, r, qf = 0.8, 0.3, 2.0, 1.5
    g = riccati(torch.tensor([[[a]], [[a]]]), q=q, r=r, qf=qf)
    S2 = qf
    K1 = S2 * a / (S2 + r)
    S1 = q + a * S2 * a - a * S2 / (S2 + r) * S2 * a
    K0 = S1 * a / (S1 + r)
    assert abs(float(g.K[1, 0, 0]) - K1) < 1e-6 and abs(float(g.K[0, 0, 0]) - K0) < 1e-6
    assert abs(float(g.S[1, 0, 0]) - S1) < 1e-6


def test_riccati_raises_on_singular_step():
    A = torch.eye(4).expand(3, 4, 4).clone()
    with pytest.raises(RiccatiError, match="singular or ill-conditioned"):
        riccati(A, q=0.0, r=0.0, qf=0.0)
    with pytest.raises(RiccatiError, match="non-negative"):
        riccati(A, q=-1.0)


def test_alqr_tracks_setpoint_and_cleans_up(tiny, tiny_jac):
    ctrl = fit_alqr(tiny, tiny_jac, pos_texts=POS, neg_texts=NEG, lam=2.0, q=1.0, r=0.5, qf=2.0)
    assert ctrl.Kv.shape == (1, 3, 32) and ctrl.layers == [0, 1, 2]
    diag = tracking_diagnostic(tiny, ctrl, tiny_jac, POS, NEG)
    # the feedback shrinks the tracking error at the last layer versus the unsteered model
    assert diag["heldout_tracking_error"][-1] < diag["heldout_tracking_error_unsteered"][-1]
    assert diag["holds"] and len(diag["residual_eps"]) == 3
    for name in ("blocks.0.hook_resid_pre", "blocks.2.hook_resid_post"):
        assert not tiny.hook_dict[name].fwd_hooks


def test_alqr_positions_last_vs_all(tiny, tiny_jac):
    ctrl = fit_alqr(tiny, tiny_jac, pos_texts=POS, neg_texts=NEG, lam=3.0)
    toks = encode_prompts(tiny, "One two three four five").tokens
    name = "blocks.2.hook_resid_post"
    _, clean = tiny.run_with_cache(toks, names_filter=name)
    with ctrl.apply(tiny):
        _, last = tiny.run_with_cache(toks, names_filter=name)
    with ctrl.with_positions("all").apply(tiny):
        _, every = tiny.run_with_cache(toks, names_filter=name)
    d_last = (last[name] - clean[name])[0].norm(dim=-1)
    d_all = (every[name] - clean[name])[0].norm(dim=-1)
    assert (d_last[:-1] < 1e-5).all() and d_last[-1] > 1e-4
    assert d_all[0] < 1e-5 and (d_all[1:] > 1e-4).all()  # the first (sink) token is never steered
    with pytest.raises(SteeringError, match="positions"):
        ctrl.with_positions("prompt")


def test_alqr_concepts_sum_and_save_load(tiny, tiny_jac, tmp_path):
    a = fit_alqr(tiny, tiny_jac, pos_texts=POS, neg_texts=NEG, lam=1.0, concept="pos")
    b = fit_alqr(tiny, tiny_jac, pos_texts=NEG, neg_texts=POS, lam=0.5, concept="neg")
    both = a + b
    assert both.v.shape[0] == 2 and both.lam.tolist() == [1.0, 0.5]
    toks = encode_prompts(tiny, "Hello world again").tokens
    rec_a, rec_b, rec_ab = [], [], []
    for c, rec in ((a, rec_a), (b, rec_b), (both, rec_ab)):
        h = c.attach(tiny, record=rec)
        try:
            with torch.no_grad():
                tiny(toks, stop_at_layer=1)  # block 0 only: same input state for each controller
        finally:
            h.remove()
    torch.testing.assert_close(rec_ab[0][1], rec_a[0][1] + rec_b[0][1], atol=1e-5, rtol=1e-4)
    path = both.save(tmp_path / "c")
    back = ALQR.load(path, tiny)
    torch.testing.assert_close(back.Kv, both.Kv)
    torch.testing.assert_close(back.offset, both.offset)
    torch.testing.assert_close(back.beta, both.beta)
    with pytest.raises(SteeringError, match="A/B pair"):
        fit_alqr(tiny, tiny_jac, items=[])
    with pytest.raises(SteeringError, match="zero"):
        fit_alqr(tiny, tiny_jac, pos_texts=POS, neg_texts=POS)


def test_alqr_setpoint_sits_on_the_contrast(tiny, tiny_jac):
    """The setpoint is relative to the contrast's midpoint: at the negative examples' own states the
    control pushes towards the positive side for every lambda >= 0, however far the states' projection
    sits from 0 (the old absolute setpoint lambda |E| could lie below both means and push backwards)."""
    ctrl = fit_alqr(tiny, tiny_jac, pos_texts=POS, neg_texts=NEG, lam=0.0)
    P, N = contrastive_activations(tiny, POS, NEG, ctrl.layers, paired=False)
    for i, l in enumerate(ctrl.layers):
        v = ctrl.v[0, i]
        torch.testing.assert_close(ctrl.offset[0, i], v @ (P[l].mean(0) + N[l].mean(0)) / 2)
        for lam in (0.0, 0.5, 2.0):
            coef = ctrl.with_lambda(lam).beta[0, i] - N[l].mean(0) @ v  # the control's sign at the negative mean
            assert coef > 0
    shifted = ALQR(ctrl.layers, ctrl.v, ctrl.E_norm, ctrl.Kv, ctrl.lam, offset=ctrl.offset + 1e3)
    assert (shifted.beta - ctrl.beta).sub(1e3).abs().max() < 1e-3
    with pytest.raises(SteeringError, match="offset"):
        ALQR(ctrl.layers, ctrl.v, ctrl.E_norm, ctrl.Kv, ctrl.lam, offset=torch.zeros(2, 3))


@pytest.fixture(scope="session")
def smol_jac(smol, tmp_path_factory):
    # Cached within the test session (in a temporary folder, so the test measures the real computation).
    return block_jacobians(smol, n_prompts=2, layers=LQR_LAYERS, cache_dir=tmp_path_factory.mktemp("smoljac"))


@pytest.mark.real
def test_alqr_moves_refusal_probability_with_lambda(smol, smol_jac):
    fit = load_ab("refusal", "fit", n=8, balanced=True)
    test = load_ab("refusal", "test", n=4, balanced=True, seed=1)
    ctrl = fit_alqr(smol, smol_jac, items=fit, readout="answer")
    base = answer_text_probability(smol, test)
    up = answer_text_probability(smol, test, ctrl.with_lambda(LQR_LAMBDA))
    down = answer_text_probability(smol, test, ctrl.with_lambda(-LQR_LAMBDA))
    print(json.dumps({"down": down.mean().item(), "base": base.mean().item(), "up": up.mean().item()}))
    assert up.mean() > base.mean() + 0.05
    assert down.mean() < base.mean() - 0.05
