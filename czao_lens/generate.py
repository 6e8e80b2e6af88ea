"""The generation loop every steering method and CZAO plug into.

One token at a time, with TransformerLens' KV cache. Static interventions (``perturbations``) are
hooks that know, through a :class:`~czao_lens.prompts.TokenLayout`, which real token each new
position is. A per-step ``controller`` sees a :class:`DecodeStep` at every new token: the residual
of the current position, its unperturbed logits, and :meth:`DecodeStep.evaluate`, which scores B
candidate perturbations of the current position in one batched forward that starts at the
controller's ``start_layer`` and reuses the prefix KV cache without changing it.

The current position of step ``t`` is the token whose output predicts new token ``t``: the last
prompt token at step 0, then each generated token.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from czao_lens.errors import CzaoLensError
from czao_lens.perturb import (
    Perturbation,
    PerturbationError,
    add_hook,
    attach,
    check_finite,
    check_hook_name,
    hook_layer,
)
from czao_lens.prompts import EncodedPrompts, TokenLayout, encode_prompts, pad_token_id

CandidateDeltas = dict[str, Float[Tensor, "batch n_cand *width"]]
StepDeltas = dict[str, Float[Tensor, "batch *width"]]


class GenerationError(CzaoLensError, ValueError):
    """Bad generation settings: token counts, temperature, nucleus mass."""


class Controller(Protocol):
    """A per-token intervention (CZAO, feedback steering, ...).

    ``start_layer`` is the earliest block whose input the controller may perturb; the loop splits
    each forward there. ``read_hooks`` are hook names whose current-position activations the
    controller wants in ``DecodeStep.activations``.
    """

    start_layer: int
    read_hooks: Sequence[str]

    def __call__(self, step: "DecodeStep") -> StepDeltas | None: ...


@dataclass
class StepCost:
    """Compute used at one step, in equivalent full forward passes of one position.

    ``passes`` counts a batched candidate call as one pass whatever its batch size (what a GPU
    pays); ``row_passes`` weighs every forward by its rows per prompt row x the share of layers it
    runs (what a CPU pays): 33 candidates from layer 12 of 30 cost 33 x 18/30 = 19.8 row passes.
    """

    passes: float = 0.0
    candidates: int = 0
    batched_calls: int = 0
    row_passes: float = 0.0


@dataclass
class DecodeStep:
    """Everything a controller may read or run at one generated token."""

    model: HookedTransformer
    index: int
    start_layer: int
    layout: TokenLayout
    tokens: Int[Tensor, "batch pos"]  # every token so far, left-padded
    resid: Float[Tensor, "batch d_model"]  # residual entering start_layer at the current position
    logits: Float[Tensor, "batch vocab"]  # unperturbed next-token logits
    activations: dict[str, Tensor]  # current position, [batch, *width], for the controller's read_hooks
    finished: Tensor  # [batch] bool: rows that already stopped
    cost: StepCost
    _cache: TransformerLensKeyValueCache
    _attention_mask: Tensor
    # A controller may set this [batch, vocab] additive bias, e.g. -inf on banned tokens (guided decoding).
    logit_bias: Tensor | None = None
    captured: Tensor | None = None

    @property
    def new_tokens(self) -> Int[Tensor, "batch n_new"]:
        """The tokens generated before this step (prompt and padding columns left out)."""
        return self.tokens[:, int(self.layout.pad[0] + self.layout.prompt_lens[0]):]

    def text_so_far(self, b: int = 0) -> str:
        """Row ``b``'s generated text before this step (special tokens left out)."""
        return self.model.tokenizer.decode(self.new_tokens[b].tolist(), skip_special_tokens=True)

    def row(self, b: int) -> "DecodeStep":
        """Row ``b`` alone, as a step of batch one with a cost of its own (cache and mask are views)."""
        sl = slice(b, b + 1)
        cache = TransformerLensKeyValueCache(
            [TransformerLensKeyValueCacheEntry(e.past_keys[sl], e.past_values[sl]) for e in self._cache.entries],
            self._cache.previous_attention_mask[sl])
        return DecodeStep(
            model=self.model, index=self.index, start_layer=self.start_layer,
            layout=TokenLayout(self.layout.prompt_lens[sl], self.layout.pad[sl], self.layout.offset),
            tokens=self.tokens[sl], resid=self.resid[sl], logits=self.logits[sl],
            activations={k: v[sl] for k, v in self.activations.items()}, finished=self.finished[sl],
            cost=StepCost(passes=1.0, row_passes=1.0), _cache=cache, _attention_mask=self._attention_mask[sl])

    def evaluate(
        self, deltas: CandidateDeltas, *, lookahead: int = 0, capture: str | None = None, rows: Tensor | None = None
    ) -> tuple[Float[Tensor, "batch n_cand vocab"], Int[Tensor, "batch n_cand lookahead"] | None]:
        """Next-token logits for candidate perturbations of the current position, in one forward.

        ``deltas[h]`` is ``[batch, n_cand, *width]`` for hook points at or after ``start_layer``.
        With ``lookahead > 0`` every candidate is also rolled out greedily for that many tokens with
        its delta kept at each new position; the tokens come back as the second value.
        ``capture`` names a hook whose current-position activation of every candidate is left in
        ``self.captured`` (``[batch, n_cand, *width]``), e.g. for a learned surrogate of V.
        ``rows`` (indices into the batch) runs only those rows: ``batch`` above is then ``len(rows)``.
        The prefix KV cache is read, never changed. Costs count per prompt row.
        """
        model, n_layers = self.model, self.model.cfg.n_layers
        if not deltas:
            raise PerturbationError("evaluate() needs at least one hook with candidate deltas")
        batch = self.resid.shape[0] if rows is None else len(rows)
        n_cand = None
        for name, d in deltas.items():
            check_hook_name(model, name)
            if hook_layer(model, name) < self.start_layer:
                raise PerturbationError(
                    f"{name} is before start_layer {self.start_layer}; candidates start there"
                )
            if d.shape[0] != batch:
                raise PerturbationError(f"candidate deltas for {name} have {d.shape[0]} rows, the batch has {batch}")
            n_cand = d.shape[1] if n_cand is None else n_cand
            if d.shape[1] != n_cand:
                raise PerturbationError("every hook must have the same number of candidates")
            check_finite(f"candidate deltas for {name}", d)
        assert n_cand is not None
        flat = {k: v.reshape(batch * n_cand, *v.shape[2:]) for k, v in deltas.items()}
        cache = _expanded_cache(self._cache, n_cand, drop_last_from=self.start_layer, rows=rows)
        mask = (self._attention_mask if rows is None else self._attention_mask[rows]).repeat_interleave(n_cand, 0)
        resid = self.resid if rows is None else self.resid[rows]
        base_offset, base_layout = self.layout.offset, (self.layout.prompt_lens, self.layout.pad)
        if rows is not None:  # static perturbations read the (shared) layout: show them these rows only
            self.layout.prompt_lens, self.layout.pad = self.layout.prompt_lens[rows], self.layout.pad[rows]
        removers = [add_hook(model.hook_dict[k], _add_last(v)) for k, v in flat.items()]
        grabbed: dict[str, Tensor] = {}
        if capture is not None:
            removers.append(add_hook(check_hook_name(model, capture), _capture(grabbed, capture)))
        try:
            x = resid.repeat_interleave(n_cand, 0)[:, None, :]
            logits = model(x, start_at_layer=self.start_layer, past_kv_cache=cache, attention_mask=mask)[:, -1]
            first = logits.reshape(batch, n_cand, -1)
            if capture is not None:
                self.captured = grabbed[capture].reshape(batch, n_cand, *grabbed[capture].shape[1:])
                removers.pop()()  # rollouts must not overwrite it
            self.cost.passes += (n_layers - self.start_layer) / n_layers
            self.cost.row_passes += n_cand * (n_layers - self.start_layer) / n_layers
            self.cost.candidates += n_cand * batch
            self.cost.batched_calls += 1
            rollout = None
            if lookahead > 0:
                cols = [logits.argmax(-1)]
                cache.previous_attention_mask = mask
                while len(cols) < lookahead:
                    self.layout.offset += 1  # static perturbations must see the rollout's positions
                    logits = model(cols[-1][:, None], past_kv_cache=cache, attention_mask=torch.ones_like(mask[:, :1]))[:, -1]
                    cols.append(logits.argmax(-1))
                    self.cost.passes += 1.0
                    self.cost.row_passes += n_cand
                    self.cost.batched_calls += 1
                rollout = torch.stack(cols, -1).reshape(batch, n_cand, lookahead)
        finally:
            self.layout.offset = base_offset
            self.layout.prompt_lens, self.layout.pad = base_layout
            for r in removers:
                r()
        return first, rollout

    def next_token_activations(
        self, candidates: Int[Tensor, "batch k"], capture: str
    ) -> Float[Tensor, "batch k *width"]:
        """The activation at ``capture`` of each candidate *next* token, fed one position past the
        current one on the frozen cache, all candidates in one batched forward that stops right
        after the captured block (FUDGE-style guidance scores next tokens this way).

        The current position must be in the cache as the loop put it (call this before returning
        deltas); the cache itself is never changed."""
        model, n_layers = self.model, self.model.cfg.n_layers
        batch, k = candidates.shape
        if batch != self.resid.shape[0] or k < 1:
            raise PerturbationError(f"candidates must be [batch={self.resid.shape[0]}, k>=1], got {tuple(candidates.shape)}")
        hp = check_hook_name(model, capture)
        stop = min(hook_layer(model, capture) + 1, n_layers)
        cache = _expanded_cache(self._cache, k, drop_last_from=n_layers)
        mask = self._attention_mask.repeat_interleave(k, 0)
        cache.previous_attention_mask = mask
        grabbed: dict[str, Tensor] = {}
        remove = add_hook(hp, _capture(grabbed, capture))
        base_offset = self.layout.offset
        try:
            self.layout.offset += 1  # static perturbations must see the next position
            model(candidates.reshape(-1, 1), past_kv_cache=cache, attention_mask=torch.ones_like(mask[:, :1]),
                  stop_at_layer=stop if stop < n_layers else None)
        finally:
            self.layout.offset = base_offset
            remove()
        self.cost.passes += stop / n_layers
        self.cost.row_passes += k * stop / n_layers
        self.cost.candidates += k * batch
        self.cost.batched_calls += 1
        return grabbed[capture].reshape(batch, k, *grabbed[capture].shape[1:])


def _add_last(delta: Tensor):
    """Hook adding a per-row delta to the last position only (the current token)."""

    def hook(act: Tensor, hook) -> Tensor:
        out = act.clone()
        out[:, -1] = out[:, -1] + delta.to(act.dtype)
        return out

    return hook


def _expanded_cache(
    cache: TransformerLensKeyValueCache, n: int, drop_last_from: int, rows: Tensor | None = None
) -> TransformerLensKeyValueCache:
    """A copy-on-append view of ``cache`` with every row (of ``rows``, default all) repeated ``n`` times.

    Entries from layer ``drop_last_from`` on leave out the current position, which the candidate
    forward appends again with its own perturbation. Appends rebind the new entries only, so
    ``cache`` itself is never changed.
    """

    def rep(t: Tensor) -> Tensor:
        t = t if rows is None else t[rows]
        if t.shape[0] == 1:
            return t.expand(n, *t.shape[1:])  # a view: no copy for single-prompt decoding
        return t.repeat_interleave(n, 0)

    entries = []
    for i, e in enumerate(cache.entries):
        k, v = (e.past_keys[:, :-1], e.past_values[:, :-1]) if i >= drop_last_from else (e.past_keys, e.past_values)
        entries.append(TransformerLensKeyValueCacheEntry(rep(k), rep(v)))
    return TransformerLensKeyValueCache(entries, rep(cache.previous_attention_mask))


@dataclass
class GenerationResult:
    """Texts and tokens of a generation run, plus per-step records from the controller."""

    prompts: list[str]
    texts: list[str]
    prompt_tokens: list[list[int]]
    new_tokens: list[list[int]]
    seconds: float
    steps: int
    cost: list[dict[str, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    # With keep_logprobs: per row, the log-probs each new token was drawn from, [n_new, vocab].
    step_logprobs: list[Tensor] | None = field(default=None, repr=False)
    # With keep_cache: the KV cache at the end (what was fed, steered K/V included), for continuing.
    cache: TransformerLensKeyValueCache | None = field(default=None, repr=False)

    @property
    def tokens_per_second(self) -> float:
        n = sum(len(t) for t in self.new_tokens)
        return n / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        # Tensors (log-probs, the cache) stay out of the JSON record, and are not deep-copied first.
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in ("step_logprobs", "cache")}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def stop_token_ids(model: HookedTransformer) -> set[int]:
    """EOS plus the end-of-turn tokens chat templates use."""
    tok = model.tokenizer
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for special in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
        tid = tok.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid >= 0:
            ids.add(tid)
    return ids


def sample_next(
    logits: Float[Tensor, "batch vocab"],
    *,
    greedy: bool,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> Int[Tensor, "batch"]:
    """Greedy, temperature or nucleus sampling of the next token."""
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _capture(store: dict[str, Tensor], name: str):
    def hook(act: Tensor, hook) -> None:
        store[name] = act[:, -1].detach()

    return hook


def check_sampling(max_new_tokens: int, *, greedy: bool, temperature: float, top_p: float) -> None:
    """Refuse generation settings the loop cannot honour (raises :class:`GenerationError`)."""
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not greedy and not (temperature > 0):
        raise GenerationError(f"temperature must be > 0 when sampling (use greedy=True for argmax), got {temperature}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate(
    model: HookedTransformer,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 64,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    chat: bool = False,
    system_prompt: str | None = None,
    perturbations: Sequence[Perturbation] = (),
    controller: Controller | None = None,
    stop_at_eos: bool = True,
    progress: bool = False,
    keep_logprobs: bool = False,
) -> GenerationResult:
    """Generate continuations with a KV cache, static perturbations and an optional controller.

    Sampling is reproducible: ``seed`` seeds a private generator (no global RNG state is touched).
    Hooks added here are removed on return and on any exception.
    """
    check_sampling(max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p)
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    enc = encode_prompts(model, prompt_list, chat=chat, system_prompt=system_prompt)
    return generate_tokens(
        model, enc, prompt_list, max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
        top_p=top_p, seed=seed, perturbations=perturbations, controller=controller,
        stop_at_eos=stop_at_eos, progress=progress, keep_logprobs=keep_logprobs,
        config={"chat": chat, "system_prompt": system_prompt},
    )


@torch.no_grad()
def generate_tokens(
    model: HookedTransformer,
    enc: EncodedPrompts,
    prompts: list[str],
    *,
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    perturbations: Sequence[Perturbation] = (),
    controller: Controller | None = None,
    stop_at_eos: bool = True,
    progress: bool = False,
    config: dict[str, Any] | None = None,
    keep_logprobs: bool = False,
    past: TransformerLensKeyValueCache | None = None,
    keep_cache: bool = False,
) -> GenerationResult:
    """:func:`generate` on already encoded prompts. ``keep_logprobs`` keeps the distribution each new
    token was drawn from (after interventions and logit bias), for KL and fluency measurements.

    ``past`` continues from a KV cache that already holds every token but the last (e.g. a prefix
    cut from an earlier run's ``keep_cache`` result, :func:`prefix_cache`): no prefill is run."""
    check_sampling(max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p)
    device = model.cfg.device or "cpu"
    n_layers = model.cfg.n_layers
    start_layer = n_layers
    if controller is not None:
        start_layer = int(controller.start_layer)
        if not 0 <= start_layer <= n_layers:
            raise PerturbationError(f"controller start_layer {start_layer} is outside 0..{n_layers}")
        for name in controller.read_hooks:
            check_hook_name(model, name)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    stops = stop_token_ids(model) if stop_at_eos else set()
    tokens = enc.tokens.to(device)
    batch = tokens.shape[0]
    if past is not None:
        have = past.previous_attention_mask.shape
        if have != (batch, tokens.shape[1] - 1):
            raise GenerationError(f"past cache covers {tuple(have)} (rows, positions); these tokens need "
                                  f"({batch}, {tokens.shape[1] - 1}): every token but the last")
    cache0 = past if past is not None else TransformerLensKeyValueCache.init_cache(model.cfg, device, batch)
    st = _DecodeState(model, cache0, enc.layout(), tokens, tokens[:, -1], torch.zeros(batch, dtype=torch.bool), {})
    finished = st.finished
    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    kept: list[list[Tensor]] = [[] for _ in range(batch)]
    costs: list[dict[str, float]] = []
    t0 = time.perf_counter()
    handle = attach(model, list(perturbations), st.layout)
    removers = []
    try:
        if controller is not None:
            removers = [add_hook(model.hook_dict[n], _capture(st.read_store, n)) for n in controller.read_hooks]
        # Prefill all but the last prompt token; the loop feeds the last one as step 0's current token.
        if tokens.shape[1] > 1 and past is None:
            model(tokens[:, :-1], attention_mask=enc.attention_mask[:, :-1].to(device), past_kv_cache=st.cache, return_type=None)
        st.layout.offset = tokens.shape[1] - 1
        bar = tqdm(range(max_new_tokens), disable=not progress, desc="generate", unit="tok")
        for t in bar:
            st.index = t
            logits, cost = _plain_step(st) if controller is None else _controlled_step(st, controller)
            nxt = sample_next(logits, greedy=greedy, temperature=temperature, top_p=top_p, generator=gen)
            nxt = torch.where(finished.to(nxt.device), torch.full_like(nxt, pad_token_id(model)), nxt)
            lps = logits.float().log_softmax(-1) if keep_logprobs else None
            for b in range(batch):
                if not finished[b]:
                    new_tokens[b].append(int(nxt[b]))
                    if lps is not None:
                        kept[b].append(lps[b])
                    if int(nxt[b]) in stops:
                        finished[b] = True
            costs.append(asdict(cost))
            st.advance(nxt)
            if bool(finished.all()):
                break
    finally:
        for r in removers:
            r()
        handle.remove()
    seconds = time.perf_counter() - t0
    tok = model.tokenizer
    texts = [tok.decode([i for i in row if i not in stops], skip_special_tokens=False) for row in new_tokens]
    prompt_tokens = [enc.tokens[b, enc.tokens.shape[1] - int(enc.prompt_lens[b]):].tolist() for b in range(batch)]
    return GenerationResult(
        prompts=prompts, texts=texts, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
        seconds=seconds, steps=len(costs), cost=costs,
        config={"max_new_tokens": max_new_tokens, "greedy": greedy, "temperature": temperature,
                "top_p": top_p, "seed": seed, **(config or {})},
        step_logprobs=[torch.stack(k) if k else torch.zeros(0, logits.shape[-1]) for k in kept] if keep_logprobs else None,
        cache=st.cache if keep_cache else None,
    )


def prefix_cache(
    cache: TransformerLensKeyValueCache, row: int, length: int, copies: int
) -> TransformerLensKeyValueCache:
    """Row ``row`` of ``cache`` cut to its first ``length`` positions, repeated ``copies`` times (views,
    no copy: the decode loop's appends rebind, so ``cache`` itself is never changed)."""
    if not 0 <= row < cache.previous_attention_mask.shape[0] or not 0 <= length <= cache.previous_attention_mask.shape[1]:
        raise GenerationError(f"no row {row} / length {length} in a cache of shape {tuple(cache.previous_attention_mask.shape)}")
    sl = slice(row, row + 1)

    def cut(t: Tensor) -> Tensor:
        t = t[sl, :length]
        return t.expand(copies, *t.shape[1:])

    entries = [TransformerLensKeyValueCacheEntry(cut(e.past_keys), cut(e.past_values)) for e in cache.entries]
    return TransformerLensKeyValueCache(entries, cut(cache.previous_attention_mask))


@dataclass
class _DecodeState:
    """What the decode loop carries from one token to the next."""

    model: HookedTransformer
    cache: TransformerLensKeyValueCache
    layout: TokenLayout
    tokens: Int[Tensor, "batch pos"]  # every token so far, left-padded
    current: Int[Tensor, "batch"]  # the token this step feeds (its output predicts the next one)
    finished: Bool[Tensor, "batch"]  # rows that already stopped
    read_store: dict[str, Tensor]  # the controller's read_hooks, captured at the current position
    index: int = 0  # the step: how many tokens were generated before it

    def ones(self) -> Int[Tensor, "batch 1"]:
        """The attention mask of the one new position."""
        return torch.ones(self.tokens.shape[0], 1, dtype=torch.long, device=self.tokens.device)

    def advance(self, nxt: Int[Tensor, "batch"]) -> None:
        """Append the sampled tokens; they are the next step's current tokens."""
        self.tokens = torch.cat([self.tokens, nxt[:, None]], 1)
        self.layout.offset += 1
        self.current = nxt


def _plain_step(st: _DecodeState) -> tuple[Float[Tensor, "batch vocab"], StepCost]:
    """One token without a controller: a single forward of the current position."""
    logits = st.model(st.current[:, None], attention_mask=st.ones(), past_kv_cache=st.cache)[:, -1]
    return logits, StepCost(passes=1.0, row_passes=1.0)


def _controlled_step(st: _DecodeState, controller: Controller) -> tuple[Float[Tensor, "batch vocab"], StepCost]:
    """One token with the forward split at ``start_layer`` so a controller can perturb and re-run."""
    model, cache, cost = st.model, st.cache, StepCost()
    n_layers = model.cfg.n_layers
    L = controller.start_layer
    st.read_store.clear()
    resid = model(st.current[:, None], attention_mask=st.ones(), past_kv_cache=cache, stop_at_layer=L)
    mask = cache.previous_attention_mask
    logits = model(resid, start_at_layer=L, past_kv_cache=cache, attention_mask=mask)[:, -1]
    cost.passes = cost.row_passes = 1.0
    step = DecodeStep(
        model=model, index=st.index, start_layer=L, layout=st.layout, tokens=st.tokens, resid=resid[:, -1],
        logits=logits, activations=dict(st.read_store), finished=st.finished.clone(), cost=cost,
        _cache=cache, _attention_mask=mask,
    )
    deltas = controller(step)
    bias = step.logit_bias if step.logit_bias is not None else 0.0
    if not deltas:
        return logits + bias, cost
    for name, d in deltas.items():
        check_hook_name(model, name)
        if hook_layer(model, name) < L:
            raise PerturbationError(f"controller returned a delta for {name}, before its start_layer {L}")
        check_finite(f"controller delta for {name}", d)
    # Re-run the upper layers of the current position with the chosen delta, replacing its K/V.
    for e in cache.entries[L:]:
        e.past_keys, e.past_values = e.past_keys[:, :-1], e.past_values[:, :-1]
    removers = [add_hook(model.hook_dict[k], _add_last(v)) for k, v in deltas.items()]
    try:
        logits = model(resid, start_at_layer=L, past_kv_cache=cache, attention_mask=mask)[:, -1]
    finally:
        for r in removers:
            r()
    cost.passes += (n_layers - L) / n_layers
    cost.row_passes += (n_layers - L) / n_layers
    return logits + bias, cost
