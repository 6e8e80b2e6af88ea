"""A fast CPU hot path for ``HookedTransformer`` that keeps every hook point and its values.

Stock TransformerLens 3.9 spends most of a decode step copying weights (``W.T.contiguous()`` in
``GatedMLP`` and ``Unembed``, the ``einops`` rearrangements of ``W_Q/W_K/W_V/W_O``), expanding
grouped K/V heads with ``repeat_interleave``, rebuilding the causal/padding mask and the rotary
position ids in every layer, and calling ~20 identity ``HookPoint`` modules per block.

:func:`accelerate` swaps the class of supported component instances (never the TL classes
themselves) for a subclass whose ``forward``

* multiplies by the stored weights (views, no per-call copies; the fused QKV matrix is a cache keyed
  on every source parameter's identity, ``data_ptr`` and ``_version``, and is used only when no
  gradient has to reach those parameters);
* computes the masks and rotary position ids once per forward and shares them across layers;
* calls a hook point only when something is attached to it (an unhooked ``HookPoint`` is the
  identity, so skipping the call changes nothing);
* applies Gemma 3's per-head q/k norms and its norms after attention and MLP where TL does;
* uses ``scaled_dot_product_attention`` only when ``hook_attn_scores`` and ``hook_pattern`` are both
  unhooked (and there is no soft-cap), and computes scores and pattern explicitly otherwise.

Anything it does not specialise (other architectures, 4-bit weights, ``use_attn_result``,
split QKV inputs, functorch-transformed inputs, ...) runs the stock TL ``forward`` unchanged.
:func:`decelerate` restores the stock classes.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _nn_module
from transformer_lens.components import (
    Attention,
    GroupedQueryAttention,
    RMSNorm,
    RMSNormPre,
    TransformerBlock,
    Unembed,
)
from transformer_lens.components.mlps.gated_mlp import GatedMLP
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities.activation_functions import apply_softcap, softcap_enabled
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

__all__ = ["accelerate", "decelerate", "is_accelerated", "clear_weight_caches", "fast_path_report"]

_FLAG = "_czao_accelerated"
_STOCK = "_czao_stock_class"  # instance attribute: the class to restore
_ATTRS = ("_czao_stock_class", "_czao_qkv", "_czao_memo", "_czao_hook_names")
_FLOAT_FULL = (torch.float32, torch.float64)
_OLMO = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
# torch.func (jacrev, vmap, ...) inputs take the stock path; the probe is private, so guard it.
_is_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", lambda t: False)


# ----------------------------------------------------------------------------- hook helpers


def _global_hooks() -> bool:
    """True when a process-wide module hook exists: then every hook point must run."""
    m = _nn_module
    return bool(
        m._global_forward_hooks
        or m._global_forward_pre_hooks
        or m._global_backward_hooks
        or m._global_backward_pre_hooks
    )


def _live(hp: nn.Module) -> bool:
    """Whether a hook point must be called: it has hooks, or it was replaced (e.g. by an SAE)."""
    return (
        type(hp) is not HookPoint
        or bool(hp._forward_hooks)
        or bool(hp._forward_pre_hooks)
        or bool(hp._backward_hooks)
        or bool(hp._backward_pre_hooks)
        or bool(hp.fwd_hooks)
        or bool(hp.bwd_hooks)
        or _global_hooks()
    )


def _h(hp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a hook point only when it is live; an unhooked HookPoint is the identity."""
    return hp(x) if _live(hp) else x


def _module_live(mod: nn.Module) -> bool:
    """Whether a submodule (a norm) or any hook point inside it has hooks or is unknown to us."""
    names = mod.__dict__.get("_czao_hook_names")
    if names is None:  # a module put in after accelerate(): treat it as hooked, run it like stock
        return True
    if mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks:
        return True
    return any(_live(getattr(mod, n)) for n in names)


def _linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ w + b`` for a [d_in, d_out] weight, as one GEMM on the stored layout (no copy of w)."""
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.mm(x2, w) if b is None else torch.addmm(b, x2, w)
    return out.view(*x.shape[:-1], w.shape[-1])


def _param_key(params: tuple[torch.Tensor, ...]) -> Optional[tuple]:
    """Identity + storage + version of each parameter: changes whenever one is replaced or edited."""
    try:
        return tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in params)
    except (RuntimeError, NotImplementedError):  # functorch / fake tensors have no storage
        return None


# ----------------------------------------------------------------------------- shared mask memo


class _MaskMemo:
    """Masks and position ids derived from one forward's attention mask, shared by every layer.

    Entries hold a reference to the mask tensor, so identity comparison is safe; a few entries
    cover layers with different window sizes.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[Any, tuple, dict]] = []
        self.canon = _TableCanon()

    def get(
        self,
        attention_mask: Optional[torch.Tensor],
        offset: int,
        q_len: int,
        kv_len: int,
        causal: bool,
        window: Optional[int],
        device: torch.device,
    ) -> dict:
        version = None if attention_mask is None else attention_mask._version
        key = (version, offset, q_len, kv_len, causal, window, device)
        for mask, k, val in self.entries:
            if mask is attention_mask and k == key:
                return val
        val = self._build(attention_mask, offset, q_len, kv_len, causal, window, device)
        val["canon"] = self.canon
        self.entries.insert(0, (attention_mask, key, val))
        del self.entries[4:]
        return val

    @staticmethod
    def _build(attention_mask, offset, q_len, kv_len, causal, window, device) -> dict:
        val: dict[str, Any] = {"folded": {}}
        if attention_mask is not None:
            # Same as TL's get_offset_position_ids(0, mask); queries use its last columns.
            pos = attention_mask.cumsum(dim=1) - 1
            val["pos"] = pos.masked_fill(pos < 0, 0).to(device)
        attend = None
        if causal:
            if q_len + offset != kv_len:
                raise ValueError(
                    f"query_ctx_length {q_len} + past_kv_pos_offset {offset} != key_ctx_length "
                    f"{kv_len} - you likely have a bug."
                )
            qp = torch.arange(offset, offset + q_len, device=device)
            kp = torch.arange(kv_len, device=device)
            attend = kp[None, :] <= qp[:, None]
            if window is not None:
                attend = attend & (kp[None, :] > qp[:, None] - window)
            attend = attend[None, None]
            if attention_mask is not None:
                attend = attend & attention_mask.to(device)[:, None, None, :].bool()
        val["attend"] = attend  # [batch|1, 1, q, kv] bool, or None = attend everywhere
        if attend is None:
            val["all"], val["rows_ok"] = True, None
        else:
            val["all"] = bool(attend.all())
            rows = attend.any(dim=-1, keepdim=True)
            val["rows_ok"] = None if bool(rows.all()) else rows  # rows that attend to nothing
        return val


def _folded_masks(memo_val: dict, group: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The SDPA mask and the valid-row mask with the GQA group folded into the query axis."""
    cached = memo_val["folded"].get(group)
    if cached is not None:
        return cached
    attend, rows_ok = memo_val["attend"], memo_val["rows_ok"]
    if memo_val["all"]:
        out: tuple = (None, None)
    else:
        if rows_ok is not None:
            # A fully masked row is NaN in TL and then zeroed; let SDPA see a finite row instead.
            attend = attend | ~rows_ok
        b, _, q, kv = attend.shape
        fold = attend.unsqueeze(2).expand(b, 1, group, q, kv).reshape(b, 1, group * q, kv)
        rows = None
        if rows_ok is not None:
            rows = rows_ok.unsqueeze(2).expand(b, 1, group, q, 1).reshape(b, 1, group * q, 1)
        out = (fold, rows)
    memo_val["folded"][group] = out
    return out


# ----------------------------------------------------------------------------- rotary


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, adjacent: bool) -> torch.Tensor:
    """TL's apply_rotary arithmetic (x*cos + rotate(x)*sin on the first rotary_dim dims), out of place."""
    x_rot = x[..., :rotary_dim]
    if adjacent:
        flip = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
    else:
        half = rotary_dim // 2
        flip = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    rotated = x_rot * cos + flip * sin
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def _rotate_half_roll(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """The same rotation when rotary_dim == d_head (NeoX halves): roll(x) * [-sin1, sin2] equals
    [-x2, x1] * sin exactly, in 3 ops instead of 7."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class _TableCanon:
    """Maps each layer's rotary (cos, sin) buffers to a canonical pair when their contents are equal,
    so per-forward gathers are done once for all layers (Llama's 30 layers hold identical tables).

    Keys include data_ptr and _version, so a replaced or edited buffer is compared afresh.
    """

    def __init__(self) -> None:
        self.seen: dict[tuple, int] = {}
        self.reps: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.keep: list[tuple[torch.Tensor, torch.Tensor]] = []  # pins data_ptrs used in keys

    def canon(self, cos: torch.Tensor, sin: torch.Tensor) -> int:
        key = (cos.data_ptr(), cos._version, sin.data_ptr(), sin._version, cos.shape, cos.dtype)
        idx = self.seen.get(key)
        if idx is not None:
            return idx
        for i, (c, s) in enumerate(self.reps):
            if c.shape == cos.shape and c.dtype == cos.dtype and torch.equal(c, cos) and torch.equal(s, sin):
                idx = i
                break
        else:
            idx = len(self.reps)
            self.reps.append((cos.detach().clone(), sin.detach().clone()))
        if len(self.seen) > 4096:  # tables are rebuilt only on growth; bound it anyway
            self.seen.clear()
            self.keep.clear()
        self.seen[key] = idx
        self.keep.append((cos, sin))
        return idx


# ----------------------------------------------------------------------------- what stays stock

# Configurations the fast components do not specialise: (what it is, whether cfg has it). They are read
# at call time (cfg flags can change after accelerate()) and named by fast_path_report().
_ATTENTION_LIMITS: tuple[tuple[str, Any], ...] = (
    ("4-bit weights", lambda c: c.load_in_4bit),
    ("OLMo QK-norm across heads", lambda c: c.original_architecture in _OLMO),
    ("clip_qkv", lambda c: c.clip_qkv is not None),
    ("log-n attention scaling", lambda c: c.use_logn_attn),
    ("attention sinks", lambda c: c.use_attention_sinks),
    ("use_attn_result", lambda c: c.use_attn_result),
    ("use_split_qkv_input", lambda c: c.use_split_qkv_input),
    ("use_attn_in", lambda c: c.use_attn_in),
    ("dynamic NTK rope", lambda c: c.use_dynamic_ntk_rope),
    ("ungrouped GQA", lambda c: getattr(c, "ungroup_grouped_query_attention", False)),
    ("ALiBi / relative positions", lambda c: c.positional_embedding_type not in ("standard", "shortformer", "rotary")),
    ("several devices", lambda c: c.n_devices != 1),
)
_BLOCK_LIMITS: tuple[tuple[str, Any], ...] = (
    ("use_attn_in", lambda c: c.use_attn_in),
    ("use_split_qkv_input", lambda c: c.use_split_qkv_input),
    ("parallel attention and MLP", lambda c: c.parallel_attn_mlp),
    ("post-norm blocks", lambda c: c.original_architecture in POST_NORM_ARCHITECTURES),
    ("several devices", lambda c: c.n_devices != 1),
)


def _unsupported(cfg: Any, limits: tuple[tuple[str, Any], ...]) -> list[str]:
    """The names of the limits ``cfg`` hits (empty: the fast path applies)."""
    return [name for name, hit in limits if hit(cfg)]


# ----------------------------------------------------------------------------- components


class _FastAttentionMethods:
    """Fast forward shared by the MHA and GQA attention classes (copied into both class bodies:
    a mixin base would change the instance layout and forbid swapping ``__class__``)."""

    def _czao_static_ok(self) -> bool:
        return not _unsupported(self.cfg, _ATTENTION_LIMITS)

    def _czao_params(self) -> tuple[torch.Tensor, ...]:
        if isinstance(self, GroupedQueryAttention):
            return (self.W_Q, self._W_K, self._W_V, self.b_Q, self._b_K, self._b_V)
        return (self.W_Q, self.W_K, self.W_V, self.b_Q, self.b_K, self.b_V)

    def _czao_fused_qkv(self, params: tuple[torch.Tensor, ...]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """[d_model, (n_q + 2 n_kv) d_head] weight and its bias, rebuilt when any source changes.

        None when gradients must reach the parameters (the cached copy is detached).
        """
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return None
        key = _param_key(params)
        if key is None:
            return None
        cached = self.__dict__.get("_czao_qkv")
        if cached is not None and cached[0] == key:
            w = cached[1]
            # An inference tensor cannot be saved for backward outside inference mode.
            if not (w.is_inference() and not torch.is_inference_mode_enabled()):
                return cached[1], cached[2]
        with torch.no_grad():
            d_model = params[0].shape[1]
            w = torch.cat([p.permute(1, 0, 2).reshape(d_model, -1) for p in params[:3]], dim=1).contiguous()
            b = torch.cat([p.reshape(-1) for p in params[3:]])
        self.__dict__["_czao_qkv"] = (key, w, b)
        return w, b

    def _czao_rotary_tables(self, memo: dict, attention_mask, offset: int, q_len: int, kv_len: int):
        """cos/sin rows for the query and key positions, gathered once per forward for all layers
        whose tables are equal. With ``rotary_dim == d_head`` (NeoX halves) sin comes signed for
        :func:`_rotate_half_roll`."""
        cfg = self.cfg
        cos_t, sin_t = self.rotary_cos, self.rotary_sin
        try:
            canon = memo["canon"].canon(cos_t, sin_t)
        except (RuntimeError, NotImplementedError):
            canon = None
        rolled = cfg.rotary_dim == cfg.d_head and not cfg.rotary_adjacent_pairs
        key = ("rot", canon, rolled)
        hit = memo.get(key) if canon is not None else None
        if hit is not None:
            return hit
        if attention_mask is None:
            cos_k, sin_k = cos_t[None, :kv_len, None, :], sin_t[None, :kv_len, None, :]
        else:
            pos = memo["pos"]
            cos_k, sin_k = cos_t[pos, None, :], sin_t[pos, None, :]
        if rolled:
            half = cfg.rotary_dim // 2
            sin_k = torch.cat((-sin_k[..., :half], sin_k[..., half:]), dim=-1)
        # Queries sit at the last q_len key positions (TL slices the same position ids).
        out = (cos_k[:, offset:], sin_k[:, offset:], cos_k, sin_k)
        if canon is not None:
            memo[key] = out
        return out

    def forward(
        self,
        query_input: torch.Tensor,
        key_input: torch.Tensor,
        value_input: torch.Tensor,
        past_kv_cache_entry: Any = None,
        additive_attention_mask: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        if (
            not self._czao_static_ok()  # read at call time: cfg flags can change after accelerate()
            or additive_attention_mask is not None
            or position_bias is not None
            or query_input.dim() != 3
            or _is_wrapped(query_input)
            or _is_wrapped(key_input)
            or _is_wrapped(value_input)
            or query_input.device != self.W_Q.device
            or (
                attention_mask is not None
                and attention_mask.shape[-1]
                != key_input.shape[1] + (0 if past_kv_cache_entry is None else past_kv_cache_entry.past_keys.size(1))
            )
        ):
            return self.__dict__[_STOCK].forward(
                self, query_input, key_input, value_input, past_kv_cache_entry,
                additive_attention_mask, attention_mask, position_bias,
            )

        n_q, d_head = cfg.n_heads, cfg.d_head
        params = self._czao_params()
        n_kv = params[1].shape[0]
        group = n_q // n_kv
        batch, q_len, d_model = query_input.shape

        # --- Q, K, V projections
        fused = self._czao_fused_qkv(params)
        if fused is not None:
            w, b = fused
            nq, nk = n_q * d_head, n_kv * d_head
            if key_input is query_input and value_input is query_input:
                qkv = _linear(query_input, w, b).view(batch, q_len, n_q + 2 * n_kv, d_head)
                q, k, v = qkv[:, :, :n_q], qkv[:, :, n_q : n_q + n_kv], qkv[:, :, n_q + n_kv :]
            else:
                q = _linear(query_input, w[:, :nq], b[:nq]).view(batch, q_len, n_q, d_head)
                k = _linear(key_input, w[:, nq : nq + nk], b[nq : nq + nk])
                v = _linear(value_input, w[:, nq + nk :], b[nq + nk :])
                k = k.view(*key_input.shape[:2], n_kv, d_head)
                v = v.view(*value_input.shape[:2], n_kv, d_head)
        else:  # differentiable path: per-head batched matmul on the stored weights
            q = torch.einsum("bpm,hmd->bphd", query_input, params[0]) + params[3]
            k = torch.einsum("bpm,hmd->bphd", key_input, params[1]) + params[4]
            v = torch.einsum("bpm,hmd->bphd", value_input, params[2]) + params[5]
        q = _h(self.hook_q, q)
        k = _h(self.hook_k, k)
        v = _h(self.hook_v, v)
        if cfg.use_qk_norm:  # per-head RMSNorm (Gemma 3, Qwen 3): after hook_q/hook_k, before the cache, as in TL
            q = self._apply_qk_norm(q, self.q_norm)
            k = self._apply_qk_norm(k, self.k_norm)

        # --- KV cache (the entry's own append keeps frozen/unfrozen semantics)
        if past_kv_cache_entry is not None:
            offset = past_kv_cache_entry.past_keys.size(1)
            k, v = past_kv_cache_entry.append(k, v)
        else:
            offset = 0
        kv_len = k.size(1)

        causal = (self._attention_dir_override or cfg.attention_dir) == "causal"
        window = cfg.window_size if self.attn_type == "local" else None
        memo = self.__dict__["_czao_memo"].get(
            attention_mask, offset, q_len, kv_len, causal, window, q.device
        )

        # --- rotary (keys are cached unrotated, so all of them are rotated, as in TL)
        if cfg.positional_embedding_type == "rotary":
            if q.device != self.rotary_cos.device:
                return self.__dict__[_STOCK].forward(
                    self, query_input, key_input, value_input, past_kv_cache_entry,
                    additive_attention_mask, attention_mask, position_bias,
                )
            for need in (offset + q_len, kv_len):  # TL extends the tables in this order
                if need > self.rotary_cos.shape[0]:
                    self._extend_rotary_embeddings(min(cfg.n_ctx, max(need, 2 * self.rotary_cos.shape[0])))
            rd, adj = cfg.rotary_dim, cfg.rotary_adjacent_pairs
            cos_q, sin_q, cos_k, sin_k = self._czao_rotary_tables(memo, attention_mask, offset, q_len, kv_len)
            if rd == d_head and not adj:
                q = _h(self.hook_rot_q, _rotate_half_roll(q, cos_q, sin_q))
                k = _h(self.hook_rot_k, _rotate_half_roll(k, cos_k, sin_k))
            else:
                q = _h(self.hook_rot_q, _rotate(q, cos_q, sin_q, rd, adj))
                k = _h(self.hook_rot_k, _rotate(k, cos_k, sin_k, rd, adj))

        # --- attention, with the GQA group folded into the query axis (no K/V repeat)
        qf = q.reshape(batch, q_len, n_kv, group, d_head).permute(0, 2, 3, 1, 4)
        qf = qf.reshape(batch, n_kv, group * q_len, d_head)
        kf = k.transpose(1, 2)  # [batch, n_kv, kv, d_head]
        vf = v.transpose(1, 2)
        explicit = (
            softcap_enabled(cfg.attn_scores_soft_cap)
            or _live(self.hook_attn_scores)
            or _live(self.hook_pattern)
        )
        if explicit:
            scores = (qf @ kf.transpose(-1, -2)) / self.attn_scale
            scores = scores.view(batch, n_q, q_len, kv_len)
            scores = apply_softcap(scores, cfg.attn_scores_soft_cap)
            if memo["attend"] is not None:
                scores = torch.where(memo["attend"], scores, self.IGNORE)
            scores = _h(self.hook_attn_scores, scores)
            pattern = F.softmax(scores, dim=-1)
            pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
            pattern = _h(self.hook_pattern, pattern).to(device=v.device, dtype=v.dtype)
            zf = pattern.reshape(batch, n_kv, group * q_len, kv_len) @ vf
        else:
            sdpa_mask, rows_ok = _folded_masks(memo, group)
            zf = F.scaled_dot_product_attention(
                qf, kf, vf, attn_mask=sdpa_mask, scale=1.0 / self.attn_scale
            )
            if rows_ok is not None:
                zf = torch.where(rows_ok, zf, torch.zeros((), dtype=zf.dtype, device=zf.device))
        z = zf.view(batch, n_kv, group, q_len, d_head).permute(0, 3, 1, 2, 4)
        z = _h(self.hook_z, z.reshape(batch, q_len, n_q, d_head))

        # --- output projection: W_O [head, d_head, d_model] is already the [(head d_head), d_model] matrix
        w_o = self.W_O.reshape(n_q * d_head, -1)
        return _linear(z.reshape(batch, q_len, n_q * d_head).to(w_o.dtype), w_o, self.b_O)


_SHARED = {k: v for k, v in vars(_FastAttentionMethods).items() if k.startswith(("_czao_", "forward"))}


class FastAttention(Attention):
    """``Attention`` with the czao-lens fast path; falls back to the stock forward when unsupported."""

    locals().update(_SHARED)


class FastGroupedQueryAttention(GroupedQueryAttention):
    """``GroupedQueryAttention`` with the czao-lens fast path (no K/V head repetition)."""

    locals().update(_SHARED)


_FAST_ATTENTION = (FastAttention, FastGroupedQueryAttention)


class FastGatedMLP(GatedMLP):
    """``GatedMLP`` multiplying by the stored weights instead of copying ``W.T.contiguous()``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.load_in_4bit or cfg.is_layer_norm_activation() or _is_wrapped(x) or x.device != self.W_gate.device:
            return GatedMLP.forward(self, x)
        pre = _h(self.hook_pre, _linear(x, self.W_gate))
        pre_linear = _h(self.hook_pre_linear, _linear(x, self.W_in))
        post = _h(self.hook_post, torch.addcmul(self.b_in, self.act_fn(pre), pre_linear))
        return _linear(post, self.W_out, self.b_out)


class FastUnembed(Unembed):
    """``Unembed`` as one GEMM on the stored [d_model, d_vocab] matrix (no 113 MB copy per call)."""

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        if _is_wrapped(residual) or residual.device != self.W_U.device:
            return Unembed.forward(self, residual)
        residual = _h(self.hook_in, residual)
        return _h(self.hook_out, _linear(residual, self.W_U, self.b_U))


class FastRMSNormPre(RMSNormPre):
    """``RMSNormPre`` as one fused ``rms_norm`` call when its hook points are unhooked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.cfg.dtype not in _FLOAT_FULL
            or _is_wrapped(x)
            or _live(self.hook_scale)
            or _live(self.hook_normalized)
        ):
            return RMSNormPre.forward(self, x)
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps)


class FastRMSNorm(RMSNorm):
    """``RMSNorm`` as one fused ``rms_norm`` call when its hook points are unhooked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.cfg.dtype not in _FLOAT_FULL
            or _is_wrapped(x)
            or x.device != self.w.device
            or _live(self.hook_scale)
            or _live(self.hook_normalized)
        ):
            return RMSNorm.forward(self, x)
        return F.rms_norm(x, (x.shape[-1],), weight=self.w, eps=self.eps)


class FastTransformerBlock(TransformerBlock):
    """``TransformerBlock`` that normalises once (not three times) and skips unhooked hook points."""

    def _czao_static_ok(self) -> bool:
        return not _unsupported(self.cfg, _BLOCK_LIMITS)

    def forward(
        self,
        resid_pre: torch.Tensor,
        shortformer_pos_embed: Optional[torch.Tensor] = None,
        past_kv_cache_entry: Any = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if (
            not self._czao_static_ok()
            or shortformer_pos_embed is not None
            or _is_wrapped(resid_pre)
        ):
            return TransformerBlock.forward(
                self, resid_pre, shortformer_pos_embed, past_kv_cache_entry, attention_mask
            )
        resid_pre = _h(self.hook_resid_pre, resid_pre)
        ln1 = self.ln1
        if _module_live(ln1):  # TL normalises q, k and v inputs separately; hooks see all three
            q_in, k_in, v_in = ln1(resid_pre), ln1(resid_pre), ln1(resid_pre)
        else:
            q_in = k_in = v_in = ln1(resid_pre)
        attn_out = self.attn(
            query_input=q_in,
            key_input=k_in,
            value_input=v_in,
            past_kv_cache_entry=past_kv_cache_entry,
            attention_mask=attention_mask,
        )
        if self.cfg.use_normalization_before_and_after:  # Gemma: norm the output before hook_attn_out, as TL
            attn_out = self.ln1_post(attn_out)
        attn_out = _h(self.hook_attn_out, attn_out)
        if self.cfg.attn_only:
            return _h(self.hook_resid_post, resid_pre + attn_out)
        resid_mid = _h(self.hook_resid_mid, resid_pre + attn_out)
        mlp_in = resid_mid
        if self.cfg.use_hook_mlp_in and _live(self.hook_mlp_in):
            mlp_in = self.hook_mlp_in(resid_mid.clone())
        mlp_out = self.mlp(self.ln2(mlp_in))
        if self.cfg.use_normalization_before_and_after:
            mlp_out = self.ln2_post(mlp_out)
        mlp_out = _h(self.hook_mlp_out, mlp_out)
        return _h(self.hook_resid_post, resid_mid + mlp_out)


# Exact stock class -> fast subclass. Subclasses of these (unknown semantics) stay stock.
_FAST: dict[type, type] = {
    Attention: FastAttention,
    GroupedQueryAttention: FastGroupedQueryAttention,
    GatedMLP: FastGatedMLP,
    Unembed: FastUnembed,
    RMSNormPre: FastRMSNormPre,
    RMSNorm: FastRMSNorm,
    TransformerBlock: FastTransformerBlock,
}
_FAST_TYPES = frozenset(_FAST.values())


# ----------------------------------------------------------------------------- public API


def accelerate(model: nn.Module) -> nn.Module:
    """Install the fast hot path on ``model`` in place (idempotent) and return it.

    Only instances are changed: each supported component gets a fast subclass of its own class
    (``isinstance`` still holds), everything else stays stock. Hook names, hook values and outputs
    match stock TL; see the module docstring for the fast-path rule.
    """
    memo: Optional[_MaskMemo] = None
    for mod in model.modules():
        if isinstance(mod, _FAST_ATTENTION) and "_czao_memo" in mod.__dict__:
            memo = mod.__dict__["_czao_memo"]  # already accelerated: keep sharing the same memo
            break
    memo = memo or _MaskMemo()
    for mod in model.modules():
        fast = _FAST.get(type(mod))
        if fast is not None:
            mod.__dict__[_STOCK] = type(mod)
            mod.__class__ = fast
        if isinstance(mod, _FAST_ATTENTION):
            mod.__dict__["_czao_memo"] = memo  # one memo per model: masks are shared across layers
        if isinstance(mod, TransformerBlock):
            # The hook points inside each norm decide whether it may run once instead of three times.
            for name in ("ln1", "ln2"):
                ln = getattr(mod, name, None)
                if isinstance(ln, nn.Module):
                    ln.__dict__["_czao_hook_names"] = tuple(
                        n for n, c in ln.named_children() if isinstance(c, HookPoint)
                    )
    model.__dict__[_FLAG] = True
    stock = _stock_components(model)
    if stock:  # the notice the caller needs to read speed figures right
        warnings.warn(f"czao-lens runtime: {fast_path_report(model)}", stacklevel=2)
    return model


def _stock_components(model: nn.Module) -> dict[str, list[str]]:
    """Accelerated attention layers and blocks whose configuration keeps them on stock TL: kind -> reasons."""
    out: dict[str, list[str]] = {}
    for mod in model.modules():
        if isinstance(mod, _FAST_ATTENTION):
            kind, hits = "attention", _unsupported(mod.cfg, _ATTENTION_LIMITS)
        elif isinstance(mod, FastTransformerBlock):
            kind, hits = "block", _unsupported(mod.cfg, _BLOCK_LIMITS)
        else:
            continue
        for h in hits:
            if h not in out.setdefault(kind, []):
                out[kind].append(h)
    return out


def fast_path_report(model: nn.Module) -> str:
    """One line: how many components run the czao-lens fast path, and what stays stock TL and why.

    :func:`accelerate` warns with it when a configuration keeps attention or blocks stock; the decode
    benchmark prints it next to its speed figures. (Per-call fallbacks, e.g. for ``torch.func``
    inputs, are not counted here.)
    """
    if not is_accelerated(model):
        return "not accelerated: stock TransformerLens throughout"
    n_fast = sum(1 for m in model.modules() if type(m) in _FAST_TYPES)
    stock = _stock_components(model)
    if not stock:
        return f"all {n_fast} supported components on the fast path"
    why = "; ".join(f"{kind}: {', '.join(r)}" for kind, r in stock.items())
    return f"{n_fast} components accelerated, but these run stock TransformerLens ({why})"


def is_accelerated(model: nn.Module) -> bool:
    """Whether :func:`accelerate` is installed on ``model``."""
    return bool(model.__dict__.get(_FLAG, False))


def decelerate(model: nn.Module) -> nn.Module:
    """Restore the stock TransformerLens classes and drop every cached weight layout."""
    for mod in model.modules():
        stock = mod.__dict__.get(_STOCK)
        if stock is not None and type(mod) in _FAST_TYPES:
            mod.__class__ = stock
        for attr in _ATTRS:
            mod.__dict__.pop(attr, None)
    model.__dict__.pop(_FLAG, None)
    return model


def clear_weight_caches(model: nn.Module) -> None:
    """Drop cached fused weights (needed only after editing weights through ``.data``,
    which bypasses the version counters the caches are keyed on)."""
    for mod in model.modules():
        mod.__dict__.pop("_czao_qkv", None)
