"""Perturbations as hook points: effect, low rank, validation, cleanup."""

from __future__ import annotations

import pytest
import torch

from czao_lens.perturb import Perturbation, PerturbationError, attach, perturb, resid_hook


def no_hooks(model) -> bool:
    return not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_additive_delta_lands_exactly(tiny):
    toks = torch.tensor([[5, 6, 7, 8]])
    _, clean = tiny.run_with_cache(toks, names_filter=resid_hook(1))
    delta = torch.randn(tiny.cfg.d_model)
    with perturb(tiny, Perturbation(resid_hook(1), delta, positions=[1, 3])):
        _, cache = tiny.run_with_cache(toks, names_filter=resid_hook(1))
    diff = cache[resid_hook(1)] - clean[resid_hook(1)]
    assert torch.allclose(diff[0, 1], delta, atol=1e-6) and torch.allclose(diff[0, 3], delta, atol=1e-6)
    assert diff[0, 0].abs().max() == 0 and diff[0, 2].abs().max() == 0
    assert no_hooks(tiny)


def test_low_rank_and_per_row(tiny):
    d = tiny.cfg.d_model
    A = torch.linalg.qr(torch.randn(d, 3))[0]
    z = torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 0.0]])
    p = Perturbation.low_rank(resid_hook(2), A, z)
    assert p.delta.shape == (2, d)
    toks = torch.tensor([[5, 6, 7], [9, 10, 11]])
    _, clean = tiny.run_with_cache(toks, names_filter=resid_hook(2))
    with perturb(tiny, p):
        _, cache = tiny.run_with_cache(toks, names_filter=resid_hook(2))
    diff = cache[resid_hook(2)] - clean[resid_hook(2)]
    assert torch.allclose(diff[0, 2], A @ z[0], atol=1e-5)
    assert torch.allclose(diff[1, 0], A @ z[1], atol=1e-5)


def test_hooks_removed_when_exception_flies(tiny):
    p = Perturbation(resid_hook(0), torch.ones(tiny.cfg.d_model))
    with pytest.raises(KeyError):
        with perturb(tiny, p):
            assert not no_hooks(tiny)
            raise KeyError("inside")
    assert no_hooks(tiny)
    h = attach(tiny, p)
    h.remove()
    h.remove()  # idempotent
    assert no_hooks(tiny)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda m: Perturbation("blocks.0.hook_resid_banana", torch.ones(m.cfg.d_model)), "unknown hook"),
        (lambda m: Perturbation("blocks.99.hook_resid_pre", torch.ones(m.cfg.d_model)), "out of range"),
        (lambda m: Perturbation(resid_hook(0), torch.ones(m.cfg.d_model + 1)), "shape"),
        (lambda m: Perturbation(resid_hook(0), torch.full((m.cfg.d_model,), float("nan"))), "NaN"),
        (lambda m: Perturbation(resid_hook(0), torch.full((m.cfg.d_model,), float("inf"))), "NaN or inf"),
        (lambda m: Perturbation(resid_hook(0), torch.ones(m.cfg.d_model), scale=float("nan")), "finite"),
        (lambda m: Perturbation(resid_hook(0), torch.ones(m.cfg.d_model), positions=[]), "empty"),
    ],
)
def test_bad_perturbations_are_refused(tiny, make, match):
    with pytest.raises(PerturbationError, match=match):
        with perturb(tiny, [Perturbation(resid_hook(1), torch.ones(tiny.cfg.d_model)), make(tiny)]):
            pass
    assert no_hooks(tiny)


def test_low_rank_shape_errors(tiny):
    with pytest.raises(PerturbationError):
        Perturbation.low_rank(resid_hook(0), torch.randn(tiny.cfg.d_model, 3), torch.randn(4))
    with pytest.raises(PerturbationError):
        Perturbation.low_rank(resid_hook(0), torch.randn(tiny.cfg.d_model), torch.randn(4))


def test_batch_mismatch_is_an_error(tiny):
    p = Perturbation(resid_hook(0), torch.ones(3, tiny.cfg.d_model))
    with pytest.raises(PerturbationError):
        with perturb(tiny, p):
            tiny(torch.tensor([[1, 2], [3, 4]]))
    assert no_hooks(tiny)
