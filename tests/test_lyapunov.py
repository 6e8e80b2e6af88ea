"""Lyapunov diagnostics: FD growth vs exact JVPs, power iteration vs a dense Jacobian, QR spectrum."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from czao_lens.diagnostics import DiagnosticError
from czao_lens.diagnostics.lyapunov import (
    _block_last,
    fd_growth,
    jacobian_top_singular,
    lyapunov_spectrum,
)
from czao_lens.store import ActivationStore

PROMPTS = ["The capital of France is", "Roses are red, violets are"]


def _dense_jacobian(model, store, prompt, l):
    a = store.get([prompt], [f"blocks.{l}.hook_resid_pre"])[0][f"blocks.{l}.hook_resid_pre"]
    return torch.autograd.functional.jacobian(lambda x: _block_last(model, l, a, x[None])[0], a[-1])


def test_power_iteration_matches_dense_svd(tiny):
    store = ActivationStore(tiny)
    res = jacobian_top_singular(tiny, PROMPTS[:1], n_iter=30, store=store)
    for j, l in enumerate(res.layers):
        s = torch.linalg.svdvals(_dense_jacobian(tiny, store, PROMPTS[0], l))
        assert res.curves["log_sigma_max"][j] == pytest.approx(float(s[0].log()), abs=2e-3)
    assert res.summary["max_rel_diff_fd_vs_jvp"] < 1e-2  # FD along the top direction = sigma_max


def test_fd_growth_matches_dense_jacobian_and_cache(tiny):
    store = ActivationStore(tiny)
    r = fd_growth(tiny, PROMPTS, n_dirs=4, store=store)
    passes = store.stats.forward_passes
    r2 = fd_growth(tiny, PROMPTS, n_dirs=4, store=store)
    assert store.stats.forward_passes == passes and r.curves == r2.curves
    # The first block's growth for the seeded directions, recomputed with the dense Jacobian.
    g = torch.Generator().manual_seed(0)
    want = []
    for p in PROMPTS:
        d = torch.randn(4, tiny.cfg.d_model, generator=g)
        J = _dense_jacobian(tiny, store, p, 0)
        want.append(torch.log((d @ J.T).norm(dim=-1) / d.norm(dim=-1)))
        d = torch.randn(0, tiny.cfg.d_model, generator=g)  # keep the generator in step: one draw per prompt
    assert r.curves["fd_log_growth"][0] == pytest.approx(float(torch.cat(want).mean()), abs=5e-3)
    assert len(r.curves["fd_log_growth"]) == tiny.cfg.n_layers


def test_spectrum_of_one_layer_equals_top_singular_values_squared_sum(tiny):
    store = ActivationStore(tiny)
    res = lyapunov_spectrum(tiny, PROMPTS[:1], l0=1, l1=2, k=tiny.cfg.d_model, store=store)
    J = _dense_jacobian(tiny, store, PROMPTS[0], 1)
    # with k = d, the sum of log|R_ii| of one QR step is log|det J|
    got = sum(res.summary.values())
    assert got == pytest.approx(float(torch.linalg.slogdet(J)[1]), abs=1e-2)


def test_bad_inputs(tiny):
    with pytest.raises(DiagnosticError, match="empty prompt set"):
        fd_growth(tiny, [])
    with pytest.raises(DiagnosticError, match="out of range"):
        jacobian_top_singular(tiny, PROMPTS, layers=[3])
    with pytest.raises(DiagnosticError, match="out of range"):
        fd_growth(tiny, PROMPTS, l0=5, l1=6)
    with pytest.raises(DiagnosticError, match="k must be"):
        lyapunov_spectrum(tiny, PROMPTS, k=0)


def test_lyapunov_cli(tiny, tmp_path, monkeypatch):
    import czao_lens.cli as cli

    monkeypatch.setattr(cli, "_load", lambda name: tiny)
    out = tmp_path / "ly"
    r = CliRunner().invoke(cli.app, ["lyapunov", "-p", PROMPTS[0], "--n-dirs", "2", "--k", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "lyapunov.json").read_text())
    assert set(data) == {"fd", "jacobian", "spectrum"} and (out / "curves.html").exists()
    r = CliRunner().invoke(cli.app, ["lyapunov", "--out", str(out)])
    assert r.exit_code == 2 and "empty prompt set" in r.output
    r = CliRunner().invoke(cli.app, ["lyapunov", "-p", PROMPTS[0], "--l0", "9", "--out", str(out)])
    assert r.exit_code == 2 and "out of range" in r.output


@pytest.mark.real
def test_fd_and_jacobian_agree_on_smollm2(smol):
    store = ActivationStore(smol)
    layers = [3, 15]
    jac = jacobian_top_singular(smol, PROMPTS[:1], layers=layers, n_iter=5, store=store)
    assert jac.summary["max_rel_diff_fd_vs_jvp"] < 1e-2
    fd = fd_growth(smol, PROMPTS[:1], l0=3, l1=16, n_dirs=4, store=store)
    # random directions never stretch more than the top singular direction
    for l in layers:
        assert fd.curves["fd_log_growth"][l - 3] <= jac.curves["log_sigma_max"][layers.index(l)] + 1e-3
