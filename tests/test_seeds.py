"""Seed directions: the seeded basis, the banned-token direction, and what the seed line buys CZAO."""

from __future__ import annotations

import pytest
import torch

from czao_lens.constraints import AvoidTokens
from czao_lens.czao import CZAOConfig, generate_czao
from czao_lens.generate import generate
from czao_lens.perturb import Perturbation
from czao_lens.seeds import seed_directions, seeded
from czao_lens.store import ActivationStore
from czao_lens.subspace import SubspaceError, prompt_scales, random_basis


def test_seeded_basis_leads_with_the_seed_and_stays_orthonormal(tiny):
    sub = random_basis(ActivationStore(tiny), "hello world", [0, 1], rank=4)
    g = torch.Generator().manual_seed(3)
    dirs = {l: torch.randn(tiny.cfg.d_model, generator=g) for l in (0, 1)}
    out, e = seeded(sub, dirs)
    assert out.dim == sub.dim + 2 and out.layers == [0, 1] and float(e.norm()) == pytest.approx(1.0)
    for l in (0, 1):
        A = out.bases[l]
        assert torch.allclose(A.T @ A, torch.eye(A.shape[1]), atol=1e-5)
        assert torch.allclose(A[:, 0], dirs[l] / dirs[l].norm(), atol=1e-6)
    # z = r e moves each layer along its own seed by r / sqrt(|R|) typical norms.
    d = out.deltas(0.8 * e)
    for l, h in zip((0, 1), out.hooks()):
        want = out.scales[l] * 0.8 / 2**0.5 * dirs[l] / dirs[l].norm()
        assert torch.allclose(d[h], want, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (lambda d: {0: torch.zeros(d), 1: torch.ones(d)}, "non-zero"),
    (lambda d: {0: torch.full((d,), float("nan")), 1: torch.ones(d)}, "finite"),
    (lambda d: {0: torch.ones(d - 1), 1: torch.ones(d)}, "width"),
    (lambda d: {0: torch.ones(d)}, r"layer\(s\) \[1\]"),
])
def test_seeded_refuses_bad_directions(tiny, bad, match):
    sub = random_basis(ActivationStore(tiny), "hello world", [0, 1], rank=4)
    with pytest.raises(SubspaceError, match=match):
        seeded(sub, bad(tiny.cfg.d_model))


@pytest.mark.real
def test_banned_token_direction_lowers_the_banned_token(smol):
    """Added at a middle layer, the direction away from " blue"'s unembedding makes "blue" less likely
    than on the unsteered model, on the same prompt."""
    c = AvoidTokens(["blue"])
    u = seed_directions(smol, c, None, [12])[12]
    blue = c.banned_ids(smol.tokenizer)
    prompt = "My favorite color is"
    base = generate(smol, prompt, max_new_tokens=1, keep_logprobs=True).step_logprobs[0][0]
    scale = prompt_scales(ActivationStore(smol), prompt, [12])[12]
    delta = 0.5 * scale * u / u.norm()  # half a typical residual norm at layer 12
    steered = generate(smol, prompt, max_new_tokens=1, keep_logprobs=True,
                       perturbations=[Perturbation("blocks.12.hook_resid_pre", delta[None], positions="all")]).step_logprobs[0][0]
    assert steered[blue].logsumexp(0) < base[blue].logsumexp(0) - 1.0


@pytest.mark.real
def test_seed_line_solves_banned_words_with_fewer_rows(smol):
    """Same prompts, same config but the seed: every text still avoids the word, the first steered
    token is solved on the seed line (one step, len(radii) + 1 candidate rows), and the whole run
    costs fewer row passes than SPSA from scratch."""
    c = AvoidTokens(["blue"])
    prompts = ["My favorite color is", "Roses are red, violets are"]
    runs = {s: generate_czao(smol, prompts, c, CZAOConfig(layers=(12,), seed_direction=s), max_new_tokens=4)
            for s in (False, True)}
    for s, rs in runs.items():
        assert all(r.satisfied for r in rs), (s, [r.text for r in rs])
    first = next(rec for r in runs[True] for rec in r.records if rec.optimized)
    assert first.steps == 1 and first.candidates == len(CZAOConfig().radii) + 1 and first.satisfied
    cost = {s: sum(rec.row_passes for r in rs for rec in r.records) for s, rs in runs.items()}
    assert cost[True] < cost[False], cost
