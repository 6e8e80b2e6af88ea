"""The fast runtime must be indistinguishable from stock TransformerLens: outputs, hook names,
hook values, hook effects and gradients. Tiny random models keep this fast; one real-model test
checks SmolLM2 end to end."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from czao_lens.runtime import accelerate, clear_weight_caches, decelerate, is_accelerated

ATOL = 1e-5

FLAVOURS = {
    # SmolLM2/Llama flavour after weight folding: RMSPre norms, rotary, GQA, gated SiLU MLP.
    "llama-gqa-rmspre": dict(
        normalization_type="RMSPre", positional_embedding_type="rotary", n_key_value_heads=2,
        gated_mlp=True, act_fn="silu", final_rms=True,
    ),
    # Unfolded RMS norms with weights, plain multi-head attention.
    "llama-mha-rms": dict(
        normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True,
        act_fn="silu", final_rms=True,
    ),
    # Gemma 3 flavour: per-head q/k norms, norms after attention and MLP, one KV head, local
    # (sliding-window 4) and global layers with their own rotary bases, gated GELU-tanh MLP.
    "gemma3-like": dict(
        normalization_type="RMSPre", positional_embedding_type="rotary", n_key_value_heads=1,
        gated_mlp=True, act_fn="gelu_pytorch_tanh", final_rms=True, use_qk_norm=True,
        use_normalization_before_and_after=True, use_local_attn=True, attn_types=["local", "global", "local"],
        window_size=4, rotary_base_local=100, original_architecture="Gemma3ForCausalLM",
    ),
    # GPT-2 flavour: LayerNorm, learned positions, ungated MLP (stock components stay stock).
    "gpt2-like": dict(normalization_type="LN", positional_embedding_type="standard", act_fn="gelu_new"),
}


def make_model(flavour: str = "llama-gqa-rmspre", seed: int = 0) -> HookedTransformer:
    """A tiny random model; biases are randomised too so that every term is exercised."""
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=64, n_heads=4, d_head=16, d_mlp=96, d_vocab=97, n_ctx=64,
        rotary_dim=16, rotary_base=10000, seed=seed, dtype=torch.float32, device="cpu",
        **FLAVOURS[flavour],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".b_Q", ".b_K", ".b_V", ".b_O", ".b_in", ".b_out", "b_U", "_b_K", "_b_V")):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".w"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    model.eval()
    return model


def pair(flavour: str = "llama-gqa-rmspre") -> tuple[HookedTransformer, HookedTransformer]:
    stock = make_model(flavour)
    fast = accelerate(copy.deepcopy(stock))
    return stock, fast


def padded_batch(vocab: int = 97, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Three sequences of length 9 with 0, 3 and 5 left pads."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :5] = 0
    tokens[mask == 0] = 0
    return tokens, mask


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape
    # Masked attention scores are -inf in both: same positions, compare the finite rest.
    inf = torch.isinf(a)
    assert torch.equal(inf, torch.isinf(b)) and torch.equal(a[inf], b[inf])
    assert not torch.isnan(a).any() and not torch.isnan(b).any()
    a, b = a.masked_fill(inf, 0.0), b.masked_fill(inf, 0.0)
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    assert diff <= atol, f"max abs diff {diff} > {atol}"


# ----------------------------------------------------------------------------- structure


def test_accelerate_swaps_instances_only_and_is_idempotent():
    stock, fast = pair()
    from transformer_lens.components import GroupedQueryAttention, TransformerBlock

    assert is_accelerated(fast) and not is_accelerated(stock)
    assert type(fast.blocks[0].attn) is not GroupedQueryAttention
    assert isinstance(fast.blocks[0].attn, GroupedQueryAttention)
    assert type(stock.blocks[0]) is TransformerBlock  # the TL classes were not patched
    types = [type(m) for m in fast.modules()]
    accelerate(fast)
    assert [type(m) for m in fast.modules()] == types
    assert set(fast.hook_dict) == set(stock.hook_dict)
    assert fast.state_dict().keys() == stock.state_dict().keys()


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_logits_batch_left_padding(flavour):
    stock, fast = pair(flavour)
    tokens, mask = padded_batch()
    with torch.no_grad():
        a = stock(tokens, attention_mask=mask)
        b = fast(tokens, attention_mask=mask)
        assert_close(a, b)
        assert_close(stock(tokens), fast(tokens))  # no mask at all


@pytest.mark.parametrize("flavour", ["llama-gqa-rmspre", "llama-mha-rms", "gemma3-like"])
def test_kv_cached_decoding_matches_stock_and_full_forward(flavour):
    stock, fast = pair(flavour)
    tokens, mask = padded_batch()
    caches = [TransformerLensKeyValueCache.init_cache(m.cfg, "cpu", 3) for m in (stock, fast)]
    g = torch.Generator().manual_seed(5)
    seq, seq_mask = tokens, mask
    with torch.no_grad():
        outs = [m(tokens, attention_mask=mask, past_kv_cache=c) for m, c in zip((stock, fast), caches)]
        assert_close(*outs)
        for _ in range(4):
            new = torch.randint(1, 97, (3, 1), generator=g)
            ones = torch.ones(3, 1, dtype=torch.long)
            outs = [m(new, attention_mask=ones, past_kv_cache=c) for m, c in zip((stock, fast), caches)]
            assert_close(*outs)
            seq, seq_mask = torch.cat([seq, new], 1), torch.cat([seq_mask, ones], 1)
        full = fast(seq, attention_mask=seq_mask)[:, -1]
    assert_close(outs[1][:, -1], full, atol=1e-4)  # cached vs uncached differ only by float order
    for e_s, e_f in zip(caches[0].entries, caches[1].entries):
        assert_close(e_s.past_keys, e_f.past_keys)
        assert_close(e_s.past_values, e_f.past_values)


def test_frozen_expanded_cache_candidates():
    """The batched-candidate recipe: frozen prefix, expand-ed views, stop/start at a layer."""
    stock, fast = pair()
    prefix = torch.randint(1, 97, (1, 7), generator=torch.Generator().manual_seed(9))
    new = torch.tensor([[11]])
    layer, n_cand = 1, 5
    deltas = 0.3 * torch.randn(n_cand, 1, 64, generator=torch.Generator().manual_seed(4))
    results = []
    for m in (stock, fast):
        cache = TransformerLensKeyValueCache.init_cache(m.cfg, "cpu", 1)
        with torch.no_grad():
            m(prefix, past_kv_cache=cache, attention_mask=torch.ones(1, 7, dtype=torch.long))
            cache.freeze()
            keys_before = cache[0].past_keys.clone()
            resid = m(new, stop_at_layer=layer, past_kv_cache=cache,
                      attention_mask=torch.ones(1, 1, dtype=torch.long))
            for e in cache.entries:
                e.past_keys = e.past_keys.expand(n_cand, -1, -1, -1)
                e.past_values = e.past_values.expand(n_cand, -1, -1, -1)
            cache.previous_attention_mask = cache.previous_attention_mask.expand(n_cand, -1)
            logits = m(resid + deltas, start_at_layer=layer, past_kv_cache=cache)
        assert cache[0].past_keys.shape[1] == 7
        assert torch.equal(cache[0].past_keys[0], keys_before[0])
        results.append((resid, logits))
    assert_close(results[0][0], results[1][0])
    assert_close(results[0][1], results[1][1])
    assert results[1][1].shape == (n_cand, 1, 97)


def test_gemma3_like_takes_the_fast_path(monkeypatch):
    """q/k norms, post norms and local/global windows are specialised, not handed back to stock TL."""
    from transformer_lens.components import GroupedQueryAttention, TransformerBlock

    stock, fast = pair("gemma3-like")
    calls = []
    for cls in (GroupedQueryAttention, TransformerBlock):
        orig = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, *a, _o=orig, **k: calls.append(type(self)) or _o(self, *a, **k))
    tokens, mask = padded_batch()
    with torch.no_grad():
        fast(tokens, attention_mask=mask)
        assert calls == []
        stock(tokens, attention_mask=mask)
    assert len(calls) == 6  # the probe does see stock forwards: 3 blocks + 3 attention layers


def test_start_and_stop_at_layer():
    stock, fast = pair()
    tokens, mask = padded_batch()
    with torch.no_grad():
        for stop in (0, 1, 2, -1):
            assert_close(stock(tokens, stop_at_layer=stop, attention_mask=mask),
                         fast(tokens, stop_at_layer=stop, attention_mask=mask))
        resid = stock(tokens, stop_at_layer=1, attention_mask=mask)
        assert_close(stock(resid, start_at_layer=1, attention_mask=mask),
                     fast(resid, start_at_layer=1, attention_mask=mask))
        assert_close(stock(resid, start_at_layer=1, stop_at_layer=2),
                     fast(resid, start_at_layer=1, stop_at_layer=2))


def test_model_generate_matches():
    stock, fast = pair()
    tokens = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=False, verbose=False, stop_at_eos=False, use_past_kv_cache=True)
    assert torch.equal(stock.generate(tokens, **kw), fast.generate(tokens, **kw))


# ----------------------------------------------------------------------------- hooks


@pytest.mark.parametrize("flavour", ["llama-gqa-rmspre", "gemma3-like", "gpt2-like"])
def test_run_with_cache_every_hook_matches(flavour):
    stock, fast = pair(flavour)
    tokens, mask = padded_batch()
    with torch.no_grad():
        la, ca = stock.run_with_cache(tokens, attention_mask=mask)
        lb, cb = fast.run_with_cache(tokens, attention_mask=mask)
    assert set(ca.keys()) == set(cb.keys())
    assert len(ca.keys()) > 20
    for name in ca.keys():
        assert_close(ca[name], cb[name])
    assert_close(la, lb)


def test_run_with_cache_during_kv_decoding():
    stock, fast = pair()
    tokens, mask = padded_batch()
    caches = []
    for m in (stock, fast):
        c = TransformerLensKeyValueCache.init_cache(m.cfg, "cpu", 3)
        with torch.no_grad():
            m(tokens, attention_mask=mask, past_kv_cache=c)
        caches.append(c)
    new, ones = torch.tensor([[5], [6], [7]]), torch.ones(3, 1, dtype=torch.long)
    with torch.no_grad():
        _, ca = stock.run_with_cache(new, attention_mask=ones, past_kv_cache=caches[0])
        _, cb = fast.run_with_cache(new, attention_mask=ones, past_kv_cache=caches[1])
    assert set(ca.keys()) == set(cb.keys())
    for name in ca.keys():
        assert_close(ca[name], cb[name])


def _edits():
    def pattern_hook(pattern, hook):
        out = pattern.clone()
        out[:, 1] = 0.0  # ablate head 1's attention everywhere
        return out

    def z_hook(z, hook):
        return z * torch.linspace(0.5, 1.5, z.shape[2])[None, None, :, None]

    def mlp_hook(out, hook):
        return out + 0.5

    def scores_hook(scores, hook):
        return scores * 0.7

    return [
        ("blocks.1.attn.hook_pattern", pattern_hook),
        ("blocks.0.attn.hook_z", z_hook),
        ("blocks.2.hook_mlp_out", mlp_hook),
        ("blocks.1.attn.hook_attn_scores", scores_hook),
    ]


@pytest.mark.parametrize("edit", range(4))
def test_modifying_hooks_change_outputs_identically(edit):
    stock, fast = pair()
    tokens, mask = padded_batch()
    name, fn = _edits()[edit]
    calls = []

    def counted(x, hook):
        calls.append(hook.name)
        return fn(x, hook)

    with torch.no_grad():
        base = fast(tokens, attention_mask=mask)
        a = stock.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(name, counted)])
        n_stock = len(calls)
        b = fast.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(name, counted)])
        after = fast(tokens, attention_mask=mask)
    assert len(calls) == 2 * n_stock and n_stock >= 1  # the hook fired as often as in stock
    assert_close(a, b)
    assert (b - base).abs().max() > 1e-3  # the edit really changed the output
    assert_close(after, base)  # hooks were removed and the fast path is back


@pytest.mark.parametrize("setter", ["set_use_attn_result", "set_use_split_qkv_input", "set_use_hook_mlp_in"])
def test_config_flags_switched_after_accelerate(setter):
    """Flags that add hook points are read at call time: the new hooks appear and match stock."""
    stock, fast = pair()
    for m in (stock, fast):
        getattr(m, setter)(True)
    tokens, mask = padded_batch()
    with torch.no_grad():
        la, ca = stock.run_with_cache(tokens, attention_mask=mask)
        lb, cb = fast.run_with_cache(tokens, attention_mask=mask)
    assert set(ca.keys()) == set(cb.keys())
    for name in ca.keys():
        assert_close(ca[name], cb[name])
    assert_close(la, lb)


def test_norm_hooks_fire_like_stock():
    """TL normalises q, k and v inputs separately; a hooked ln1 must still see three calls."""
    stock, fast = pair()
    tokens = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(1))
    counts = []
    for m in (stock, fast):
        calls = []
        m.blocks[0].ln1.hook_normalized.add_hook(lambda x, hook: calls.append(1) or x * 1.1)
        with torch.no_grad():
            out = m(tokens)
        m.reset_hooks()
        counts.append((len(calls), out))
    assert counts[0][0] == counts[1][0] == 3
    assert_close(counts[0][1], counts[1][1])


# ----------------------------------------------------------------------------- gradients


def test_gradients_flow_to_params_and_inputs():
    stock, fast = pair()
    tokens, mask = padded_batch()
    grads = []
    for m in (stock, fast):
        m.zero_grad(set_to_none=True)
        loss = m(tokens, attention_mask=mask, return_type="loss")
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g_stock in grads[0].items():
        g_fast = grads[1][name]
        if g_stock is None:
            assert g_fast is None or g_fast.abs().max() == 0, name
            continue
        assert g_fast is not None, f"no gradient reached {name}"
        assert_close(g_stock, g_fast, atol=1e-5)


def test_block_jacobian_with_torch_func():
    stock, fast = pair()
    x = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0))

    def block_fn(model):
        return lambda inp: model.blocks[1](inp)[0, -1]

    jacs = [torch.func.jacrev(block_fn(m))(x) for m in (stock, fast)]
    assert_close(jacs[0], jacs[1], atol=1e-5)
    # Reverse mode through the fast path itself (plain autograd, input requires grad).
    for m in (stock, fast):
        xi = x.clone().requires_grad_(True)
        m.blocks[1](xi)[0, -1].sum().backward()
        jacs.append(xi.grad)
    assert_close(jacs[2], jacs[3])


def test_cached_weights_follow_in_place_edits():
    stock, fast = pair()
    tokens = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fast(tokens)  # builds the fused QKV cache
        for m in (stock, fast):
            m.blocks[1].attn.W_Q.mul_(1.7)
            m.blocks[2].attn._W_K.add_(0.05)
            m.blocks[0].attn._b_V.sub_(0.2)
        assert_close(stock(tokens), fast(tokens))
        for m in (stock, fast):  # a replaced parameter object is picked up too
            m.blocks[0].attn.W_Q = torch.nn.Parameter(m.blocks[0].attn.W_Q * -1.0)
        assert_close(stock(tokens), fast(tokens))
        for m in (stock, fast):  # .data edits bypass version counters: clear explicitly
            m.blocks[2].attn.W_Q.data.mul_(0.5)
        clear_weight_caches(fast)
        assert_close(stock(tokens), fast(tokens))


# ----------------------------------------------------------------------------- decelerate


def test_decelerate_restores_stock():
    stock, fast = pair()
    stock_types = [type(m) for m in stock.modules()]
    tokens, mask = padded_batch()
    with torch.no_grad():
        fast(tokens, attention_mask=mask)
    decelerate(fast)
    assert not is_accelerated(fast)
    assert [type(m) for m in fast.modules()] == stock_types
    assert not any(k.startswith("_czao") for m in fast.modules() for k in vars(m))
    with torch.no_grad():
        assert torch.equal(stock(tokens, attention_mask=mask), fast(tokens, attention_mask=mask))
    accelerate(fast)
    assert is_accelerated(fast)


# ----------------------------------------------------------------------------- real model


@pytest.mark.real
def test_real_smollm2_matches_stock():
    """SmolLM2-135M: logits within 1e-4 of the logit scale, and identical greedy tokens.

    30 layers with an attention sink of norm ~2e4 amplify float reordering (fused QKV GEMM,
    fused rms_norm, SDPA) to ~4e-5 absolute on logits of magnitude ~20, hence the relative bound.
    """
    from czao_lens.models import load_model

    fast = load_model("smollm2-135m-instruct", progress=False)
    assert is_accelerated(fast)
    stock = decelerate(copy.deepcopy(fast))
    tokens = fast.to_tokens("The capital of France is")
    with torch.no_grad():
        a, b = stock(tokens), fast(tokens)
    scale = a.abs().max().item()
    assert (a - b).abs().max().item() <= 1e-4 * scale

    def greedy(model, n=16):
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
        out, nxt = [], tokens
        with torch.no_grad():
            for _ in range(n):
                nxt = model(nxt, past_kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
                out.append(nxt.item())
        return out

    assert greedy(stock) == greedy(fast)
