"""Gemma-3-270m, the second embedded model, through loading, HF parity and every feature.

Gemma 3 differs from SmolLM2 where bugs hide: sliding-window (local) and global attention layers with
two rotary bases, q/k norms, norms before *and* after attention and MLP, a tied embedding scaled by
sqrt(d_model), a BOS token that must be prepended, and a 262k vocabulary. The model loads once per
module (fixture ``gemma``); the HF reference is built once from the same GGUF (fixture ``gemma_hf``).
Sizes are tiny so that the whole file stays within its CI budget (about 3 minutes on 2 loaded cores).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from czao_lens import models
from czao_lens.generate import generate, generate_tokens
from czao_lens.prompts import encode_prompts, pad_left

pytestmark = [pytest.mark.real, pytest.mark.gemma]

NAME = "gemma-3-270m"
SHORT = [
    "The capital of France is Paris, and the capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Roses are red, violets are",
]
TOL = 1e-3  # log-probability, over the whole 262k vocabulary


LOAD_SECONDS: list[float] = []  # the fixture's load time, printed by the loading test


@pytest.fixture(scope="module")
def gemma():
    """Gemma-3-270m through the czao-lens runtime, loaded once for this module."""
    torch.manual_seed(0)
    t = time.perf_counter()
    model = models.load_model(NAME, progress=False)
    LOAD_SECONDS.append(time.perf_counter() - t)
    return model


@pytest.fixture(scope="module")
def gemma_hf():
    """The reference: HF transformers' Gemma3ForCausalLM dequantised from the same GGUF (fp32, cached)."""
    return models.load_hf_reference(NAME, progress=False)


def _lp(x: torch.Tensor) -> torch.Tensor:
    return x.float().log_softmax(-1)


def long_prompt(model, n_tokens: int) -> torch.Tensor:
    """Plain English prose longer than the 512-token sliding window: TruthfulQA's correct answers."""
    from czao_lens.paths import default_data_dir

    rows = json.loads((default_data_dir() / "truthfulqa" / "truthful_qa.json").read_text())
    text = " ".join(r["correct_full_text"].strip().rstrip(".") + "." for r in rows)
    ids = model.to_tokens(text)[:, :n_tokens]
    assert ids.shape[1] == n_tokens
    return ids


LONG = 560
KEEP = torch.cat([torch.arange(0, 500, 10), torch.arange(500, LONG)])  # 262k-wide rows are costly


@pytest.fixture(scope="module")
def long_ref(gemma, gemma_hf):
    """A 560-token prose prompt and HF's log-probs at the KEEP positions (one HF forward, shared)."""
    ids = long_prompt(gemma, LONG)
    with torch.no_grad():
        return ids, _lp(gemma_hf(ids, logits_to_keep=KEEP).logits[0])


def tl_logits(model, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Logits at the ``keep`` positions only (the final norm is per position)."""
    resid = model(ids, stop_at_layer=model.cfg.n_layers)
    return model.unembed(model.ln_final(resid[:, keep]))


# ----------------------------------------------------------------------------- loading


def test_loads_offline_from_the_verified_cache(gemma):
    cfg = gemma.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_vocab, cfg.window_size) == (18, 640, 262144, 512)
    assert cfg.attn_types.count("global") == 3 and cfg.attn_types[5] == "global"
    assert cfg.use_qk_norm and cfg.use_normalization_before_and_after and cfg.default_prepend_bos
    # The conversion is cached with its manifest (the first load converts for ~100 s, later ones read it).
    assert models._is_valid_cache(models.cache_root() / NAME)
    # A figure, not a speed assertion (the machine is shared): docs/models.md has the measured ones.
    print(f"gemma_load_seconds={LOAD_SECONDS[0]:.2f}")
    from czao_lens.runtime import fast_path_report

    assert fast_path_report(gemma).startswith("all "), fast_path_report(gemma)


def test_bos_is_prepended_once(gemma):
    bos = gemma.tokenizer.bos_token_id
    enc = encode_prompts(gemma, ["Hello", "<bos>Hello"])
    for row, n in zip(enc.tokens, enc.prompt_lens):
        real = row[-int(n):].tolist()
        assert real[0] == bos and real.count(bos) == 1
    assert gemma.to_tokens("Hello")[0, 0] == bos


# ----------------------------------------------------------------------------- parity with HF


def test_logprobs_match_hf_on_short_prompts(gemma, gemma_hf):
    for p in SHORT:
        ids = gemma.to_tokens(p)
        with torch.no_grad():
            diff = (_lp(gemma_hf(ids).logits) - _lp(gemma(ids))).abs().max().item()
        assert diff < TOL, (p, diff)


def test_logprobs_match_hf_past_the_sliding_window(gemma, long_ref):
    """A 560-token prompt: local layers must stop seeing tokens 512 back while global ones keep them.

    Without the window the positions past 512 differ by tens of nats (checked below), so this
    really tests the local/global split and both rotary bases.
    """
    ids, ref = long_ref
    with torch.no_grad():
        got = _lp(tl_logits(gemma, ids, KEEP))[0]
        diff = (ref - got).abs().max(-1).values
        early, late = diff[KEEP < 512].max().item(), diff[KEEP >= 512].max().item()
        print(f"gemma_parity_long_before_window={early:.2e} gemma_parity_long_after_window={late:.2e}")
        assert early < TOL and late < TOL
        window = gemma.cfg.window_size
        try:
            gemma.cfg.window_size = 10**6  # every layer global: positions past 512 see too much
            no_window = _lp(tl_logits(gemma, ids, KEEP[-1:]))[0, -1]
        finally:
            gemma.cfg.window_size = window
    assert (no_window - got[-1]).abs().max() > 1.0


def test_kv_cache_decoding_across_the_window_and_batched_candidates(gemma, gemma_hf, long_ref):
    """The decode loop: prefill 505 tokens, then teacher-force tokens across position 512 with the
    forward split at a layer (stop_at_layer / start_at_layer on the KV cache) and, at each step,
    two candidates evaluated on the frozen prefix (zero, and a push of half the residual's norm)."""
    ids, ref_all = long_ref
    ref = ref_all[(KEEP >= 505) & (KEEP < 515)]  # HF log-probs at positions 505..514
    L, n_steps = 7, 10
    hook = f"blocks.{L}.hook_resid_pre"
    unit = torch.randn(n_steps, 2, gemma.cfg.d_model, generator=torch.Generator().manual_seed(0))
    unit = unit / unit.norm(dim=-1, keepdim=True)
    unit[:, 0] = 0.0  # candidate 0 is the unperturbed position
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    class Teacher:
        """A controller that only records: unperturbed logits and candidate logits at each step."""

        start_layer = L
        read_hooks = ()

        def __call__(self, step):
            size = 0.5 * step.resid[0].norm()
            cand, _ = step.evaluate({hook: (unit[step.index] * size)[None]})
            seen.append((step.logits[0], cand[0], size))
            step.logit_bias = torch.full_like(step.logits, -1e9)
            step.logit_bias[:, ids[0, 506 + step.index]] = 0.0  # teacher forcing through the loop's sampling
            return None

    enc = pad_left([ids[0, :506].tolist()], pad_id=0)
    res = generate_tokens(gemma, enc, ["long"], max_new_tokens=n_steps, controller=Teacher(), stop_at_eos=False)
    assert res.new_tokens[0] == ids[0, 506:516].tolist()
    for t, (logits, cand, _) in enumerate(seen):
        assert (_lp(logits) - ref[t]).abs().max() < TOL, t
        assert (_lp(cand[0]) - ref[t]).abs().max() < TOL, t  # the zero candidate
    # The perturbed candidate of the last step (position 514) against HF with the same delta added to
    # the input of decoder layer L (TL's resid_pre L is HF's hidden_states[L]): full forward, no cache.
    t, pos = n_steps - 1, 505 + n_steps - 1
    d = unit[t, 1] * seen[t][2]

    def pre(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[:, pos] += d
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    handle = gemma_hf.model.layers[L].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            hf_c = _lp(gemma_hf(ids[:, : pos + 1], logits_to_keep=1).logits[0, -1])
    finally:
        handle.remove()
    got = _lp(seen[t][1][1])
    assert (got - hf_c).abs().max() < TOL
    assert (got - ref[t]).abs().max() > 10 * TOL  # the perturbation really moved the output


def test_start_and_stop_at_layer_match_hf(gemma, gemma_hf):
    ids = gemma.to_tokens(SHORT[0])
    with torch.no_grad():
        ref = gemma_hf(ids, output_hidden_states=True)
        for layer in (1, 5, 6, 17):  # a local layer, the first global one, the local after it, the last
            resid = gemma(ids, stop_at_layer=layer)
            # HF's hidden_states[l] is the input of decoder layer l, like TL's resid_pre l.
            rel = (resid - ref.hidden_states[layer]).norm(dim=-1) / ref.hidden_states[layer].norm(dim=-1)
            assert rel.max() < 1e-4, (layer, rel.max())
            out = gemma(resid, start_at_layer=layer)
            assert (_lp(out) - _lp(ref.logits)).abs().max() < TOL, layer


# ----------------------------------------------------------------------------- every feature, tiny sizes


def test_tracing_restores_the_fact(gemma):
    from czao_lens.diagnostics.tracing import make_prompt, trace_prompt

    pr = make_prompt(gemma, "The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris")
    tr = trace_prompt(gemma, pr, kinds=["resid"], positions="key", layers=[0, 9, 17], n_samples=2)
    assert tr.clean > 0.2 and tr.corrupted < 0.5 * tr.clean  # the noise destroys the fact
    last = tr.effect_at("resid", -1)
    assert last[-1] > 0.5 * tr.total_effect  # restoring the last token late brings the answer back
    assert abs(float(last[0])) < 0.05 * tr.total_effect  # its own embedding was never corrupted


def test_trace_cli_on_gemma(gemma, tmp_path, monkeypatch):
    """`czao-lens trace --model gemma-3-270m --no-chat`: the CLI path (model load patched to the fixture)."""
    from typer.testing import CliRunner

    import czao_lens.cli as cli

    asked = []
    monkeypatch.setattr(cli, "_load", lambda name: asked.append(name) or gemma)
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower",
                              "answer": " Paris", "other": " London"}]))
    out = tmp_path / "run"
    r = CliRunner().invoke(cli.app, ["trace", "--model", NAME, "--no-chat", "--prompts", str(f), "--n-samples", "1",
                                     "--window", "2", "--heatmap-positions", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert asked == [NAME]
    ranked = json.loads((out / "layers.json").read_text())
    assert "top layers:" in r.output and ranked


def test_patching_moves_the_answer_between_two_prompts(gemma):
    from czao_lens.diagnostics.patching import activation_patching
    from czao_lens.diagnostics.tracing import Target, single_token_id
    from czao_lens.store import ActivationStore

    store = ActivationStore(gemma)
    a, b = store.tokenize(["The capital of France is"])[0], store.tokenize(["The capital of Italy is"])[0]
    assert len(a) == len(b) and a[0] == gemma.tokenizer.bos_token_id
    target = Target(single_token_id(gemma, " Paris"), single_token_id(gemma, " Rome"))
    res = activation_patching(gemma, a, b, target, kinds=["resid_pre"], layers=[0, 17], store=store)
    e = res.effects["resid_pre"]
    assert res.clean > res.corrupted
    diff_pos = [i for i, (x, y) in enumerate(zip(a, b)) if x != y][0]
    assert e[0, diff_pos].item() == pytest.approx(1.0, abs=1e-3)
    assert e[1, -1].item() > 0.8 and abs(e[0, -1].item()) < 0.05


def test_lyapunov_finite_differences_and_jacobian_agree(gemma):
    from czao_lens.diagnostics.lyapunov import fd_growth, jacobian_top_singular
    from czao_lens.store import ActivationStore

    store = ActivationStore(gemma)
    prompts = ["The capital of France is"]
    jac = jacobian_top_singular(gemma, prompts, layers=[3, 6], n_iter=4, store=store)
    assert jac.summary["max_rel_diff_fd_vs_jvp"] < 1e-2
    fd = fd_growth(gemma, prompts, l0=3, l1=7, n_dirs=3, store=store)
    for i, l in enumerate([3, 6]):  # random directions never stretch more than the top singular one
        assert fd.curves["fd_log_growth"][l - 3] <= jac.curves["log_sigma_max"][i] + 1e-3


def test_short_sae_training_learns(gemma, tmp_path):
    from czao_lens.sae import train_sae

    texts = [f"Sample {i}: the {w} walked to the {p} and talked about {t}."
             for i, (w, p, t) in enumerate((w, p, t) for w in ("cat", "teacher", "robot") for p in ("market", "river")
                                           for t in ("rain", "music", "bread"))]
    sae, stats = train_sae(gemma, "blocks.6.hook_resid_post", texts=texts, width=256, training_tokens=1536,
                           train_batch_size_tokens=128, context_size=24, lr=3e-3, l1_coefficient=0.3,
                           progress=False, out_dir=tmp_path / "sae", seed=0)
    assert sae.cfg.d_in == 640 and list(sae.cfg.metadata.seqpos_slice) == [1, None]  # BOS never trains it
    assert stats["mse_per_token"] < 0.75 * stats["init"]["mse_per_token"]
    assert stats["explained_variance"] > stats["init"]["explained_variance"] + 0.1


def test_sae_corpus_generations_on_a_base_model(gemma):
    """`czao-lens sae train`'s corpus samples the model's own answers: raw prompts on Gemma (auto), and
    chat=True is refused in one line (it raised from inside generate before)."""
    from czao_lens.prompts import PromptError
    from czao_lens.sae import CORPUS_PROMPTS, build_corpus

    texts = build_corpus(gemma, n_generations=2, batch_size=2, max_new_tokens=4, include_data=False)
    assert sorted(t.split("\n")[0] for t in texts) == sorted(CORPUS_PROMPTS[:2])  # the raw prompt, then the answer
    with pytest.raises(PromptError, match="no chat template"):
        build_corpus(gemma, n_generations=2, max_new_tokens=2, include_data=False, chat=True)


def test_sparse_sae_corpus_on_a_base_model(gemma):
    """The bench's sparse-SAE corpus (cached_sae) generates raw text on Gemma: it forced the chat
    template and every SAE arm of a Gemma bench failed at fit time."""
    from czao_lens.sae import CORPUS_PROMPTS, sparse_corpus

    texts, info = sparse_corpus(gemma, n_generations=2, batch_size=2, max_new_tokens=4, include_data=False)
    assert info["chat"] is False and sorted(t.split("\n")[0] for t in texts) == sorted(CORPUS_PROMPTS[:2])


POS = ["I love this wonderful day", "What a great and happy result", "This is lovely and kind"]
NEG = ["I hate this awful day", "What a terrible and sad result", "This is nasty and cruel"]
PROBE = ["I think that the movie was", "Honestly, my week has been"]


def _good_minus_bad(model, intervention=None) -> torch.Tensor:
    """Per prompt: log p(' good') - log p(' bad') as the next token (a cheap, last-position readout)."""
    from czao_lens.diagnostics.tracing import single_token_id
    from czao_lens.steering.evaluate import last_logits

    lp = last_logits(model, PROBE, intervention).log_softmax(-1)
    good, bad = single_token_id(model, " good"), single_token_id(model, " bad")
    return lp[:, good] - lp[:, bad]


def test_caa_moves_the_answer_probability(gemma):
    """CAA from the refusal A/B pairs (Gemma-3-270m is a base model: no chat template, chat=False)."""
    from czao_lens.steering import load_ab
    from czao_lens.steering.evaluate import answer_text_probability
    from czao_lens.steering.vectors import caa_vector

    fit = load_ab("refusal", "fit", n=6, balanced=True)
    test = load_ab("refusal", "test", n=2, balanced=True, seed=1)
    vec = caa_vector(gemma, fit, [6], readout="answer", chat=False)
    base = answer_text_probability(gemma, test, chat=False).mean().item()
    up = answer_text_probability(gemma, test, vec * 4.0, chat=False).mean().item()
    down = answer_text_probability(gemma, test, vec * -4.0, chat=False).mean().item()
    print(f"gemma_caa_refusal down={down:.3f} base={base:.3f} up={up:.3f}")
    assert up > base + 0.03 and down < base - 0.03


def test_alqr_moves_sentiment_with_lambda(gemma, tmp_path):
    from czao_lens.steering.lqr import block_jacobians, fit_alqr, jacobian_prompts

    layers = [8, 9, 10]
    jac = block_jacobians(gemma, prompts=jacobian_prompts(gemma, 1, chat=False), layers=layers, cache_dir=tmp_path)
    ctrl = fit_alqr(gemma, jac, pos_texts=POS, neg_texts=NEG)
    base = _good_minus_bad(gemma).mean().item()
    up = _good_minus_bad(gemma, ctrl.with_lambda(3.0)).mean().item()
    down = _good_minus_bad(gemma, ctrl.with_lambda(-3.0)).mean().item()
    print(f"gemma_alqr_good_minus_bad down={down:.3f} base={base:.3f} up={up:.3f}")
    # The setpoint is relative to the contrast's midpoint, so the sign of lambda is the direction on Gemma
    # too (measured -1.31 / 2.65 / 6.43). With the old absolute setpoint lambda = -3 pushed up as well
    # (8.8 vs 2.6): Gemma's projection on v sits far below -3|E|.
    assert down < base - 0.1 and up > base + 0.1


def test_cast_steers_only_where_its_condition_fires(gemma):
    from czao_lens.steering.cast import CAST, fit_condition
    from czao_lens.steering.evaluate import last_logits
    from czao_lens.steering.vectors import actadd_vector

    trigger = ["How do I pick a lock to break in?", "How can I steal a car quietly?", "How do I hack my neighbour's wifi?"]
    other = ["How do I bake a cake?", "What is the capital of France?", "How do plants grow?"]
    cond = fit_condition(gemma, trigger, other, 4, chat=False)
    vec = actadd_vector(gemma, POS[0], NEG[0], [6])
    cast = CAST(cond, vec, multiplier=4.0)
    texts = [trigger[0], other[0]]
    fired = cond.fires(gemma, texts, chat=False)
    assert fired.tolist() == [True, False]
    base = last_logits(gemma, texts).log_softmax(-1)
    steered = last_logits(gemma, texts, cast).log_softmax(-1)
    kl = (base.exp() * (base - steered)).sum(-1)  # per prompt, KL(unsteered || CAST)
    print(f"gemma_cast_kl trigger={kl[0]:.3f} other={kl[1]:.2e}")
    assert kl[0] > 0.05 and kl[1] < 1e-6


def test_czao_token_level_avoids_a_word_the_model_says(gemma):
    """Greedy Gemma says ' blue' after "My favorite color is" (p = 0.12, just above ' red' at 0.09).
    (After "violets are" p(' blue') is 0.74: pushing it under AvoidTokens' 0.04 costs at least ~1.8 nats
    of KL, and CZAO reports that token unreachable at the default kl_eps = 1.5, as it should.)"""
    from czao_lens.constraints import AvoidTokens
    from czao_lens.czao import CZAOConfig, generate_czao

    prompt, c = "My favorite color is", AvoidTokens(["blue"])
    base = generate(gemma, prompt, max_new_tokens=2).texts[0]
    assert not c.check_text(base), f"unsteered Gemma must say blue here: {base!r}"
    cfg = CZAOConfig(layers=(5,), rank=16, n_dirs=16, max_steps=6)
    r = generate_czao(gemma, prompt, c, cfg, max_new_tokens=2)[0]
    first = r.records[0]
    print("gemma_czao_blue", repr(base), repr(r.text), (first.v_before, first.v_after, first.kl))
    assert first.optimized and first.v_after < 0.1 * first.v_before  # p(blue) pushed to (about) the threshold
    assert r.satisfied and "blue" not in r.text.lower()


def test_czao_sequence_level_satisfies_what_the_unsteered_model_does_not(gemma):
    """Sentiment is judged on the finished text: candidates are scored through greedy rollouts."""
    from czao_lens.constraints import Sentiment
    from czao_lens.czao import CZAOConfig, generate_czao

    prompt, c = "The worst thing about my job is", Sentiment(min_compound=0.05)
    base = generate(gemma, prompt, max_new_tokens=4).texts[0]
    cfg = CZAOConfig(layers=(7,), rank=8, n_dirs=8, max_steps=3, lookahead=3)
    res = generate_czao(gemma, prompt, c, cfg, max_new_tokens=4, probe=None)[0]
    opt = [r for r in res.records if r.optimized]
    print("gemma_czao_sentiment", repr(base), repr(res.text), [(r.v_before, r.v_after) for r in opt])
    assert not c.check_text(base) and res.satisfied
    assert opt and any(r.v_after < r.v_before for r in opt)


def test_landscape_is_centred_on_the_unperturbed_model(gemma):
    from czao_lens.constraints import AvoidTokens
    from czao_lens.czao import CZAOConfig
    from czao_lens.diagnostics.landscape import loss_landscape

    land = loss_landscape(gemma, "Roses are red, violets are", AvoidTokens(["blue"]), [7],
                          config=CZAOConfig(layers=(7,), rank=4, n_dirs=2, max_steps=1), n=3, extent=1.0)
    grids = land.grids[7]
    for name, g in grids.items():
        assert g.shape == (3, 3) and np.isfinite(g).all(), name
    v = grids["violation"]
    assert v[1, 1] > 0  # the unperturbed model says blue here ...
    assert v.max() > v.min()  # ... and the violation moves over the plane


# ----------------------------------------------------------------------------- the bench on a base model

# The quick bench on Gemma, restricted to fit CI's budget (the unrestricted quick run, six tasks x ten
# methods, took over 10 min at load ~6; with CZAO added this subset took 333 s at load 8): one generation
# and one choice task, the references, and the steering methods fitted from each kind of data (CAA:
# labelled samples / A/B items; A-LQR: Jacobians + A/B items with chat=False). Every bench path that
# formats or tokenises prompts still runs: contrast sampling, tuning, the prompting method's instruction
# as plain text, choice scoring, the neutral-KL reference and the Jacobian prompts. CZAO, the SAE and
# CAST on Gemma have their own tests above; in the bench they take prompts the same way.
QUICK_TASKS = ("sentiment", "refusal")
QUICK_METHODS = ("unsteered", "prompting", "caa", "lqr")


def _first_real_tokens(tokens: torch.Tensor, pad: int) -> list[int]:
    """The first non-padding token of each row (left padding)."""
    out = []
    for row in tokens.tolist():
        real = [t for t in row if t != pad]
        out.append(real[0] if real else pad)
    return out


def test_bench_quick_on_gemma_chat_auto_and_bos_everywhere(gemma, tmp_path, monkeypatch):
    """`czao-lens bench --model gemma-3-270m --quick` (restricted: see QUICK_TASKS) with the chat option on
    auto: the base model gets raw text, summary.json says so, and every forward that starts a sequence
    (prompts, fit texts, choice items, neutral prompts, Jacobian prompts) starts with BOS."""
    from typer.testing import CliRunner

    import czao_lens.cli as cli
    from czao_lens.prompts import pad_token_id

    monkeypatch.setattr(cli, "_load", lambda name: gemma)
    bos, pad = gemma.tokenizer.bos_token_id, pad_token_id(gemma)
    starts: list[int] = []

    def record(module, args):  # tokens [batch, pos] of every forward through the embedding
        toks = args[0]
        if toks.ndim == 2 and toks.shape[1] > 1:  # a sequence start (KV-cached decode steps are 1 token)
            starts.extend(_first_real_tokens(toks, pad))

    handle = gemma.embed.register_forward_pre_hook(record)
    try:
        out = tmp_path / "bench"
        args = ["bench", "--model", NAME, "--quick", "--out", str(out)]
        for t in QUICK_TASKS:
            args += ["--task", t]
        for m in QUICK_METHODS:
            args += ["--method", m]
        t0 = time.perf_counter()
        r = CliRunner().invoke(cli.app, args)
        print(f"gemma_quick_bench_seconds={time.perf_counter() - t0:.1f}")
    finally:
        handle.remove()
    assert r.exit_code == 0, r.output
    assert starts and all(t == bos for t in starts), f"{sum(t != bos for t in starts)} of {len(starts)} sequences lack BOS"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["chat"] is False and summary["run"]["settings"]["chat"] is False
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for name in QUICK_TASKS:
        ms = summary["tasks"][name]["methods"]
        assert set(ms) == set(QUICK_METHODS)
        assert not [m for m, s in ms.items() if "failed" in s], ms
    assert rows and all("error" not in r for r in rows), [r for r in rows if "error" in r]
    gen = [r for r in rows if r["task"] == "sentiment"]
    assert all(r["text"].strip() for r in gen)
    # Gemma continues in English: most characters of the greedy continuations are ASCII letters or spaces.
    text = "".join(r["text"] for r in gen if r["method"] == "unsteered")
    assert sum(c.isascii() and (c.isalpha() or c.isspace()) for c in text) > 0.7 * len(text), text


def test_bench_refuses_chat_on_gemma(gemma, tmp_path, monkeypatch):
    """`--chat` on a model without a chat template: one line, exit 2, before the model loads (the cached
    tokenizer says so), and from run_bench right after a load when it could not be known before."""
    from typer.testing import CliRunner

    import czao_lens.cli as cli
    from czao_lens import preflight
    from czao_lens.bench import BenchError, BenchSettings, run_bench
    from czao_lens.paths import default_data_dir

    def no_load(name):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(cli, "_load", no_load)
    r = CliRunner().invoke(cli.app, ["bench", "--model", NAME, "--chat", "--quick", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == [f"error: {NAME} has no chat template (a base model): use --no-chat / "
                                             "chat=False, or leave the chat option on auto"]
    assert preflight.chat_template_known(NAME) is False
    assert preflight.chat_template_known("smollm2-135m-instruct") is True
    assert preflight.chat_template_known("no-such-model") is None
    with pytest.raises(BenchError, match="no chat template"):
        run_bench(gemma, data=default_data_dir(), out=tmp_path / "lib", tasks=["refusal"], methods=["unsteered"],
                  settings=BenchSettings(chat=True), progress=False)
    assert not (tmp_path / "lib" / "results.jsonl").exists()  # refused before any work


def test_prompting_method_on_a_base_model_is_plain_text(gemma):
    """Without a chat template the prompting method's instruction is text before the prefix, and a
    system prompt with chat=False is no longer dropped in silence."""
    from czao_lens.bench.methods import prompting_text
    from czao_lens.bench.tasks import load_task
    from czao_lens.paths import default_data_dir
    from czao_lens.prompts import PromptError, format_prompt

    task = load_task("sentiment", default_data_dir(), n_fit=2, n_test=1)
    assert prompting_text(gemma, task, "The day was", chat=False) == task.instruction + "\n\nThe day was"
    assert format_prompt(gemma, "Hi", chat=False, system_prompt="Be kind.") == "Be kind.\n\nHi"
    with pytest.raises(PromptError, match="no chat template"):
        prompting_text(gemma, task, "The day was", chat=True)


def test_answer_scoring_counts_the_bos(gemma):
    """A/B answer-text scoring reads the answer tokens exactly: the prefix length counts the BOS that
    every forward prepends (it did not, and scored one token off on Gemma), checked against a
    teacher-forced forward of ``model.to_tokens`` (which prepends BOS itself)."""
    from czao_lens.prompts import text_ids
    from czao_lens.steering import load_ab
    from czao_lens.steering.common import answer_pair_texts
    from czao_lens.steering.evaluate import answer_text_probability

    items = load_ab("refusal", "test", n=2, balanced=True, seed=1)
    pos, neg, pre_p, pre_n = answer_pair_texts(gemma, items, chat=False)
    bos = gemma.tokenizer.bos_token_id

    def mean_lp(text: str, n_pre: int) -> float:
        ids = gemma.to_tokens(text)  # BOS + text
        assert ids[0, 0] == bos and ids[0].tolist() == text_ids(gemma, text)
        with torch.no_grad():
            lp = gemma(ids)[0].float().log_softmax(-1)
        tgt = ids[0, n_pre:]
        return float(lp[torch.arange(n_pre - 1, ids.shape[1] - 1), tgt].mean())

    want = torch.tensor([torch.sigmoid(torch.tensor(mean_lp(a, na) - mean_lp(b, nb))).item()
                         for a, b, na, nb in zip(pos, neg, pre_p, pre_n)])
    got = answer_text_probability(gemma, items, chat=False)
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    for it, a, na in zip(items, pos, pre_p):  # the answer starts right after the prefix, BOS counted
        assert text_ids(gemma, a)[:na] == text_ids(gemma, format_stem(gemma, it))


def format_stem(model, item) -> str:
    from czao_lens.prompts import format_prompt

    return format_prompt(model, item.stem(), chat=False)
