"""Subspaces and zero-order estimators: mechanics."""

from __future__ import annotations

import torch

from czao_lens.sites import resid_hook
from czao_lens.store import ActivationStore
from czao_lens.subspace import activation_basis, combine, direction_basis, random_basis
from czao_lens.zo import diagonal_curvature, line_search_candidates, spsa_candidates, spsa_gradient


def test_activation_basis_spans_prompt_directions(tiny):
    store = ActivationStore(tiny)
    prompt = "one two three four five six seven eight nine ten"
    sub = activation_basis(store, prompt, [1, 2], rank=6)
    for l in (1, 2):
        A = sub.bases[l]
        assert A.shape == (tiny.cfg.d_model, 6)
        assert torch.allclose(A.T @ A, torch.eye(6), atol=1e-5)
        # The top direction explains the centred prompt activations better than a random one.
        x = store.get(prompt, resid_hook(l))[0][resid_hook(l)][1:]
        x = x - x.mean(0)
        rnd = torch.linalg.qr(torch.randn(tiny.cfg.d_model, 1))[0]
        assert (x @ A[:, :1]).pow(2).sum() > (x @ rnd).pow(2).sum()
    p = store.stats.forward_passes
    activation_basis(store, prompt, [1, 2], rank=6)  # the store serves the second call
    assert store.stats.forward_passes == p


def test_short_prompt_is_topped_up_and_deltas_have_scale(tiny):
    store = ActivationStore(tiny)
    sub = activation_basis(store, "hi", [0], rank=10)
    A = sub.bases[0]
    assert torch.allclose(A.T @ A, torch.eye(10), atol=1e-5)
    z = torch.zeros(2, sub.dim)
    z[0, 0] = 1.0
    d = sub.deltas(z)[resid_hook(0)]
    assert torch.allclose(d[0].norm(), torch.tensor(sub.scales[0]), rtol=1e-5)
    assert d[1].abs().max() == 0
    assert torch.allclose(sub.delta_norm(z)[0], torch.tensor(sub.scales[0]), rtol=1e-5)


def test_direction_and_combined_bases(tiny):
    store = ActivationStore(tiny)
    v = torch.randn(2, tiny.cfg.d_model)
    sub = direction_basis(store, "some prompt here", {1: v})
    A = sub.bases[1]
    proj = A @ (A.T @ v.T)
    assert torch.allclose(proj, v.T, atol=1e-4)  # the basis spans exactly the given directions
    both = combine(sub, random_basis(store, "some prompt here", [1], rank=3))
    assert both.bases[1].shape[1] == 5 and both.kind == "contrastive+random"


def test_spsa_recovers_the_gradient_of_a_quadratic():
    g = torch.Generator().manual_seed(0)
    H = torch.diag(torch.tensor([1.0, 4.0, 9.0, 0.5]))
    f = lambda Z: 0.5 * ((Z @ H) * Z).sum(-1)
    z = torch.tensor([1.0, -1.0, 0.5, 2.0])
    probe = spsa_candidates(z, 4000, 1e-3, g)
    grad = spsa_gradient(probe, f(probe.points))
    assert torch.allclose(grad, H @ z, atol=0.35)
    curv = diagonal_curvature(probe, f(probe.points), float(f(z[None])[0]))
    # f is quadratic, so the diagonal estimate should recover diag(H) up to sampling noise.
    assert torch.allclose(curv, H.diagonal(), rtol=0.3), curv
    line = line_search_candidates(z, grad, torch.tensor([0.1, 0.2]))
    assert (f(line) < f(z[None])).all()
