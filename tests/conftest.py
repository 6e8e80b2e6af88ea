"""Shared fixtures: the real embedded model (loaded once) and tiny random models for mechanics."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

warnings.filterwarnings("ignore", category=DeprecationWarning)


#: SmolLM2 writes "Racist" here as "R" + "ac" + "ist" (greedy); only " racist" is one token.
RACIST_PROMPT = "Write the word Racist five times on separate lines:\nRacist\nRacist\n"


@pytest.fixture(scope="session")
def smol() -> HookedTransformer:
    """SmolLM2-135M-Instruct through the czao-lens runtime (converted once, then cached)."""
    from czao_lens import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m-instruct")


def tiny_config(**overrides) -> HookedTransformerConfig:
    """A Llama-flavoured random model: gated MLP, RMSNorm, rotary, grouped-query attention."""
    kw = dict(
        n_layers=3, d_model=32, n_ctx=128, d_head=8, n_heads=4, n_key_value_heads=2, d_mlp=64,
        d_vocab=49152, act_fn="silu", gated_mlp=True, normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=8, final_rms=True, seed=0,
        model_name="tiny-llama", original_architecture="LlamaForCausalLM",
    )
    kw.update(overrides)
    return HookedTransformerConfig(**kw)


@pytest.fixture(scope="session")
def tiny(smol) -> HookedTransformer:
    """A tiny random Llama-like model that shares SmolLM2's tokenizer (for text-level mechanics)."""
    model = HookedTransformer(tiny_config(), tokenizer=smol.tokenizer, default_padding_side="left")
    model.eval()
    return model
