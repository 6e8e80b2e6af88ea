"""Causal tracing (ROME): which (layer, token) states carry the information behind an answer.

Recipe (Meng et al. 2022): run the prompt clean and ``n_samples`` times with Gaussian noise of
``noise_scale`` x (std of the token embeddings) added to the embeddings of a token span (the
subject). Then, for each (layer, position), copy the clean state into the corrupted runs and
measure how much of the target comes back. The residual stream is restored one state at a time;
MLP and attention outputs over a window of ~10 layers centred on the layer.

Target: the probability of an answer token, or the logit difference between a matching and a
non-matching answer (CAA A/B pairs: the prompt ends with ``(`` so the next token is the letter).

Speed: restoring position ``p`` at layer ``l`` leaves every position before ``p`` and every layer
before ``l`` equal to the corrupted run. So each restoration reuses the corrupted run's keys and
values for positions ``< p`` (a KV prefix) and runs only positions ``>= p`` from the earliest
restored layer on. All restorations of a position are batched: rows = (restoration, noise sample),
chunked into batched forwards that start at the chunk's lowest layer.

Clean activations come from the :class:`~czao_lens.store.ActivationStore`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from czao_lens.sites import hook_name, resid_hook
from czao_lens.diagnostics import DiagnosticError, check_layers, write_json
from czao_lens.distributed import ItemJob
from czao_lens.errors import CzaoLensError
from czao_lens.perturb import add_hook
from czao_lens.prompts import encode_prompts, format_prompt
from czao_lens.store import ActivationStore

KINDS = ("resid", "mlp", "attn")
_KIND_HOOK = {"resid": "resid_pre", "mlp": "mlp_out", "attn": "attn_out"}


# ----------------------------------------------------------------------------- inputs


def single_token_id(model: HookedTransformer, text: str) -> int:
    """The id of ``text`` if it is exactly one token, else a clear error."""
    if not isinstance(text, str) or text == "":
        raise DiagnosticError("the answer must be a non-empty string")
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        raise DiagnosticError(
            f"the answer {text!r} is not a single token (it is {len(ids)} tokens: {pieces}); "
            "use one token, e.g. with its leading space (' Paris')"
        )
    return int(ids[0])


@dataclass
class Target:
    """What tracing measures at the last position: p(answer), or logit[answer] - logit[other]."""

    answer: int
    other: int | None = None

    @property
    def name(self) -> str:
        return "p(answer)" if self.other is None else "logit diff"

    def __call__(self, logits: Float[Tensor, "n vocab"]) -> Float[Tensor, "n"]:
        logits = logits.float()
        if self.other is None:
            return logits.softmax(-1)[:, self.answer]
        return logits[:, self.answer] - logits[:, self.other]


@dataclass
class TracePrompt:
    """One prompt to trace: the exact model text, the corrupted token span and the target."""

    text: str
    span: tuple[int, int]  # token indices [start, end) of the corrupted span
    target: Target
    label: str = ""


def token_char_ends(model: HookedTransformer, ids: Sequence[int]) -> list[int]:
    """Character offset where each token ends in the decoded text (decoding prefixes)."""
    tok = model.tokenizer
    return [len(tok.decode(list(ids[: i + 1]), clean_up_tokenization_spaces=False)) for i in range(len(ids))]


def find_token_span(
    model: HookedTransformer, text: str, substring: str, *, occurrence: int = 0, ids: Sequence[int] | None = None
) -> tuple[int, int]:
    """Token span ``[start, end)`` covering the ``occurrence``-th occurrence of ``substring`` in ``text``.

    ``ids`` defaults to the text's tokens as the store encodes them (no chat template applied).
    """
    if not substring:
        raise DiagnosticError("the span substring is empty")
    if ids is None:
        ids = prompt_ids(model, text)
    start_char = -1
    for _ in range(occurrence + 1):
        start_char = text.find(substring, start_char + 1)
        if start_char < 0:
            raise DiagnosticError(f"{substring!r} does not occur (occurrence {occurrence}) in the prompt {text[:80]!r}")
    decoded = model.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)
    if not decoded.endswith(text):
        raise DiagnosticError("the tokenizer does not round-trip this prompt; pass the span as token indices")
    shift = len(decoded) - len(text)  # a BOS token the encoder prepended
    start_char += shift
    end_char = start_char + len(substring)
    ends = token_char_ends(model, ids)
    starts = [0] + ends[:-1]
    toks = [i for i in range(len(ids)) if starts[i] < end_char and ends[i] > start_char]
    return toks[0], toks[-1] + 1


def prompt_ids(model: HookedTransformer, text: str) -> list[int]:
    """Token ids of a model text, encoded exactly as the store and generation encode them."""
    enc = encode_prompts(model, [text])
    return enc.tokens[0, enc.tokens.shape[1] - int(enc.prompt_lens[0]):].tolist()


def make_prompt(model: HookedTransformer, prompt: str, subject: str, answer: str, other: str | None = None,
                *, chat: bool = False) -> TracePrompt:
    """A trace prompt from text: corrupt ``subject``, target ``answer`` (or ``answer`` - ``other``)."""
    text = format_prompt(model, prompt, chat=chat)
    span = find_token_span(model, text, subject, occurrence=0)
    a = single_token_id(model, answer)
    b = single_token_id(model, other) if other is not None else None
    return TracePrompt(text, span, Target(a, b), label=prompt[:60])


def caa_prompt(model: HookedTransformer, item: dict, *, chat: bool = True, corrupt: str = "question") -> TracePrompt:
    """A CAA A/B item as a trace prompt.

    The model text is the (chat-formatted) question followed by ``(``, so the next token is the
    answer letter. Target: logit[matching letter] - logit[non-matching letter]. ``corrupt`` picks the
    span: ``"question"`` (the whole user message, question and choices; cheap, the restored
    positions sit near the end) or ``"choices"`` (only the choices block).
    """
    q = item.get("question") or item.get("prompt")
    match = item.get("answer_matching_behavior") or item.get("correct")
    other = item.get("answer_not_matching_behavior") or item.get("incorrect")
    if not q or not match or not other:
        raise DiagnosticError("an A/B item needs 'question', 'answer_matching_behavior' and 'answer_not_matching_behavior'")
    text = format_prompt(model, q, chat=chat) + "("
    a = single_token_id(model, match.strip().strip("()"))
    b = single_token_id(model, other.strip().strip("()"))
    ids = prompt_ids(model, text)
    check = prompt_ids(model, text + model.tokenizer.decode([a]))
    if check[:-1] != ids or check[-1] != a:
        raise DiagnosticError("the answer letter does not tokenize as the token after '(' for this model")
    if corrupt == "question":
        sub = q
    elif corrupt == "choices":
        cut = q.find("Choices:")
        if cut < 0:
            raise DiagnosticError("this item has no 'Choices:' block")
        sub = q[cut:]
    else:
        raise DiagnosticError(f"corrupt must be 'question' or 'choices', got {corrupt!r}")
    span = find_token_span(model, text, sub, ids=ids)
    return TracePrompt(text, span, Target(a, b), label=q[:60])


def load_caa(data_dir: str | Path, behavior: str, *, split: str = "test", limit: int | None = None) -> list[dict]:
    """CAA A/B items from ``<data_dir>/caa/<behavior>/{test_dataset_ab,generate_dataset}.json``."""
    fname = {"test": "test_dataset_ab.json", "generate": "generate_dataset.json"}.get(split)
    if fname is None:
        raise DiagnosticError(f"split must be 'test' or 'generate', got {split!r}")
    path = Path(data_dir) / "caa" / behavior / fname
    if not path.exists():
        have = sorted(p.name for p in (Path(data_dir) / "caa").glob("*")) if (Path(data_dir) / "caa").exists() else []
        raise DiagnosticError(f"{path} not found; behaviours in {data_dir}: {have or 'none (set --data / CZAO_LENS_DATA)'}")
    from czao_lens.steering.data import ABItem, read_json_list

    items = read_json_list(path)[:limit] if limit is not None else read_json_list(path)
    for i, it in enumerate(items):  # fail here, naming the item, rather than deep inside tracing
        try:
            ABItem.from_json(it)
        except CzaoLensError as exc:
            raise DiagnosticError(f"{path}, item {i}: {exc}") from None
    return items


# ----------------------------------------------------------------------------- results


@dataclass
class PromptTrace:
    """Indirect effects of one prompt: ``effects[kind][i, l]`` for position ``positions[i]``, layer ``l``.

    effect = mean over noise samples of metric(restored) - metric(corrupted).
    """

    tokens: list[str]
    span: tuple[int, int]
    positions: list[int]
    n_layers: int
    metric: str
    clean: float
    corrupted: float
    effects: dict[str, Float[Tensor, "pos layer"]]
    window: int = 10
    n_samples: int = 5
    label: str = ""

    @property
    def total_effect(self) -> float:
        return self.clean - self.corrupted

    def effect_at(self, kind: str, position: int) -> Float[Tensor, "layer"]:
        if position < 0:
            position += len(self.tokens)
        if position not in self.positions:
            raise DiagnosticError(f"position {position} was not traced (traced: {self.positions})")
        return self.effects[kind][self.positions.index(position)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "tokens": self.tokens, "span": list(self.span), "positions": self.positions,
            "n_layers": self.n_layers, "metric": self.metric, "clean": self.clean, "corrupted": self.corrupted,
            "window": self.window, "n_samples": self.n_samples,
            "effects": {k: v.tolist() for k, v in self.effects.items()},
        }

    def save(self, path: str | Path) -> Path:
        return write_json(self.to_dict(), path)


@dataclass
class LayerRanking:
    """Per-layer scores aggregated over a prompt set (fraction of the total effect restored)."""

    model: str
    scores: dict[str, Float[Tensor, "layer"]]  # kind -> [n_layers]
    n_prompts: int
    position: str
    source: dict[str, Any] = field(default_factory=dict)
    traces: list[PromptTrace] = field(default_factory=list)

    def layers(self, kind: str = "resid") -> list[dict[str, float]]:
        s = self.scores[kind]
        order = torch.argsort(s, descending=True, stable=True).tolist()
        return [{"layer": int(i), "score": float(s[i])} for i in order]

    def top(self, k: int, kind: str = "resid") -> list[int]:
        return [r["layer"] for r in self.layers(kind)[:k]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "hook": "resid_pre",
            "layers": self.layers("resid") if "resid" in self.scores else [],
            "source": {**self.source, "n_prompts": self.n_prompts, "position": self.position,
                       "score": "sum_p sign(TE_p) IE_p(l) / sum_p |TE_p|"},
            "scores": {k: v.tolist() for k, v in self.scores.items()},
        }

    def save(self, path: str | Path) -> Path:
        return write_json(self.to_dict(), path)


def load_layers(path: str | Path, top_k: int | None = None) -> list[int]:
    """Best-first layers from a ``layers.json`` written by tracing (``top_k`` of them, or all)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        rows = data["layers"]
        layers = [int(r["layer"]) for r in rows]
    except FileNotFoundError:
        raise DiagnosticError(f"{path} does not exist; run `czao-lens trace` first") from None
    except OSError as exc:
        raise DiagnosticError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DiagnosticError(f"{path} is not a layers.json file ({exc})") from None
    if top_k is not None:
        if top_k < 1 or top_k > len(layers):
            raise DiagnosticError(f"top_k must be in 1..{len(layers)}, got {top_k}")
        layers = layers[:top_k]
    return layers


def topk_overlap(a: Sequence[int], b: Sequence[int], k: int) -> float:
    """|top-k(a) & top-k(b)| / k for two best-first layer lists."""
    return len(set(list(a)[:k]) & set(list(b)[:k])) / k


# ----------------------------------------------------------------------------- core


def embedding_noise(
    model: HookedTransformer, n_samples: int, span_len: int, *, noise_scale: float = 3.0, seed: int = 0
) -> Float[Tensor, "sample span d_model"]:
    """ROME's corruption: N(0, (noise_scale * std(W_E))^2) per embedding entry, from a fixed seed."""
    std = float(model.W_E.detach().float().std())
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_samples, span_len, model.cfg.d_model, generator=g) * (noise_scale * std)


def _window(layer: int, window: int, n_layers: int) -> list[int]:
    lo = max(0, layer - window // 2)
    hi = min(n_layers, lo + window)
    lo = max(0, min(lo, hi - window))
    return list(range(lo, hi))


def _final_logits(model: HookedTransformer, resid: Tensor) -> Tensor:
    """Logits of the last position from the residual after the last block."""
    return model.unembed(model.ln_final(resid[:, -1:]))[:, 0]


def _restore_hook(rows: Tensor, value: Tensor):
    def hook(act: Tensor, hook) -> Tensor:
        out = act.clone()
        out[rows, 0] = value.to(out.dtype)
        return out

    return hook


@torch.no_grad()
def trace_prompt(
    model: HookedTransformer,
    prompt: TracePrompt,
    *,
    store: ActivationStore | None = None,
    kinds: Sequence[str] = KINDS,
    positions: str | int | Sequence[int] = "all",
    layers: Sequence[int] | None = None,
    n_samples: int = 5,
    noise_scale: float = 3.0,
    window: int = 10,
    seed: int = 0,
    max_rows: int = 96,
    progress: bool = False,
) -> PromptTrace:
    """Causal tracing of one prompt.

    ``positions``: ``"all"`` (every token), ``"key"`` (last corrupted token and last token), an int
    ``n`` (the last ``n`` corrupted tokens and everything after the span), or explicit indices.
    Positions before the span are never affected (effect 0, not computed).
    """
    cfg = model.cfg
    L = cfg.n_layers
    kinds = list(kinds)
    for k in kinds:
        if k not in KINDS:
            raise DiagnosticError(f"unknown kind {k!r}; use {KINDS}")
    layer_list = check_layers(L, layers)
    if n_samples < 1:
        raise DiagnosticError("n_samples must be >= 1")
    store = store if store is not None else ActivationStore(model)
    ids = store.tokenize([prompt.text])[0]
    T = len(ids)
    if T > cfg.n_ctx:
        raise DiagnosticError(f"the prompt has {T} tokens; the model's context is {cfg.n_ctx}")
    s0, s1 = prompt.span
    if not 0 <= s0 < s1 <= T:
        raise DiagnosticError(f"span {prompt.span} is outside the prompt's {T} tokens")
    if positions == "all":
        pos = list(range(T))
    elif positions == "key":
        pos = sorted({s1 - 1, T - 1})
    elif isinstance(positions, int):
        pos = list(range(max(s0, s1 - positions), T))
    else:
        pos = sorted({int(p) % T for p in positions})
    device = cfg.device or "cpu"

    # Clean states (and clean logits) through the store.
    hooks = {hook_name(l, _KIND_HOOK[k]) for k in kinds for l in range(L)}
    hooks |= {resid_hook(l) for l in range(L)}
    clean_acts = store.get([ids], sorted(hooks) + ["ln_final.hook_normalized"])[0]
    target = prompt.target
    clean = float(target(model.unembed(clean_acts["ln_final.hook_normalized"][None, -1:].to(device))[:, 0])[0])

    # Corrupted runs: capture resid_pre of every layer and the KV cache of every position.
    S = n_samples
    noise = embedding_noise(model, S, s1 - s0, noise_scale=noise_scale, seed=seed).to(device)
    toks = torch.tensor([ids] * S, device=device)
    corr_resid: dict[int, Tensor] = {}

    def add_noise(act: Tensor, hook) -> Tensor:
        out = act.clone()
        out[:, s0:s1] = out[:, s0:s1] + noise.to(out.dtype)
        return out

    def grab(l: int):
        def hook(act: Tensor, hook) -> None:
            corr_resid[l] = act.detach()

        return hook

    cache = TransformerLensKeyValueCache.init_cache(cfg, device, S)
    removers = [add_hook(model.hook_dict["hook_embed"], add_noise)]
    removers += [add_hook(model.hook_dict[resid_hook(l)], grab(l)) for l in range(L)]
    try:
        final = model(toks, attention_mask=torch.ones_like(toks), past_kv_cache=cache, stop_at_layer=L)
    finally:
        for r in removers:
            r()
    corr_metric = target(_final_logits(model, final))
    corrupted = float(corr_metric.mean())
    keys = [e.past_keys for e in cache.entries]
    values = [e.past_values for e in cache.entries]

    effects = {k: torch.zeros(len(pos), L) for k in kinds}
    jobs = [(i, p, k) for i, p in enumerate(pos) if p >= s0 for k in kinds]
    for i, p, kind in tqdm(jobs, desc="causal tracing", disable=not progress, leave=False):
        # rows: (layer index into effects, start layer, hooks to restore at position p)
        plan = []
        for l in layer_list:
            if kind == "resid":
                plan.append((l, l, [resid_hook(l)]))
            else:
                win = _window(l, window, L)
                plan.append((l, win[0], [hook_name(j, _KIND_HOOK[kind]) for j in win]))
        plan.sort(key=lambda r: r[1])
        rows = [(l, start, hk, s) for (l, start, hk) in plan for s in range(S)]
        out = torch.zeros(len(layer_list), S)
        row_of_layer = {l: j for j, l in enumerate(layer_list)}
        for c in range(0, len(rows), max_rows):
            chunk = rows[c : c + max_rows]
            start = chunk[0][1]
            samp = torch.tensor([r[3] for r in chunk], device=device)
            x = corr_resid[start][samp, p:]
            n = len(chunk)
            entries = [
                TransformerLensKeyValueCacheEntry(keys[j][samp, :p], values[j][samp, :p]) for j in range(L)
            ]
            kv = TransformerLensKeyValueCache(entries, torch.ones(n, p, dtype=torch.long, device=device))
            by_hook: dict[str, list[int]] = {}
            for r_i, r in enumerate(chunk):
                for h in r[2]:
                    by_hook.setdefault(h, []).append(r_i)
            rm = [
                add_hook(model.hook_dict[h], _restore_hook(torch.tensor(rs, device=device), clean_acts[h][p].to(device)))
                for h, rs in by_hook.items()
            ]
            try:
                res = model(x, start_at_layer=start, stop_at_layer=L, past_kv_cache=kv,
                            attention_mask=torch.ones(n, T, dtype=torch.long, device=device))
            finally:
                for r in rm:
                    r()
            m = target(_final_logits(model, res)).cpu()
            for r_i, r in enumerate(chunk):
                out[row_of_layer[r[0]], r[3]] = m[r_i]
        eff = out.mean(1) - corrupted
        for j, l in enumerate(layer_list):
            effects[kind][i, l] = eff[j]

    tok = model.tokenizer
    return PromptTrace(
        tokens=[tok.decode([t]) for t in ids], span=(s0, s1), positions=pos, n_layers=L, metric=target.name,
        clean=clean, corrupted=corrupted, effects=effects, window=window, n_samples=S, label=prompt.label,
    )


def _scored_position(store: ActivationStore, pr: TracePrompt, position: str) -> int:
    return pr.span[1] - 1 if position == "subject_last" else len(store.tokenize([pr.text])[0]) - 1


def _check_position(position: str) -> None:
    if position not in ("subject_last", "last"):
        raise DiagnosticError(f"position must be 'subject_last' or 'last', got {position!r}")


def ranking_from_effects(model_name: str, n_layers: int, effects: Sequence[tuple[float, dict[str, Any]]], *,
                         kinds: Sequence[str], position: str, source: dict[str, Any] | None = None,
                         traces: list[PromptTrace] | None = None) -> LayerRanking:
    """Aggregate per-prompt (total effect, {kind: per-layer effect}) in prompt order into a ranking:
    score(l) = sum_p sign(TE_p) IE_p(l) / sum_p |TE_p|."""
    num = {k: torch.zeros(n_layers) for k in kinds}
    den = 0.0
    for te, eff in effects:
        sign = 1.0 if te >= 0 else -1.0
        for k in kinds:
            num[k] += sign * torch.as_tensor(eff[k], dtype=torch.float32)
        den += abs(te)
    if den == 0:
        raise DiagnosticError("the corruption changed nothing (total effect 0 on every prompt)")
    return LayerRanking(model=model_name, scores={k: v / den for k, v in num.items()}, n_prompts=len(effects),
                        position=position, source=dict(source or {}), traces=list(traces or []))


def rank_layers(
    model: HookedTransformer,
    prompts: Sequence[TracePrompt],
    *,
    store: ActivationStore | None = None,
    kinds: Sequence[str] = ("resid",),
    position: str = "subject_last",
    n_samples: int = 5,
    noise_scale: float = 3.0,
    window: int = 10,
    seed: int = 0,
    keep_traces: bool = False,
    source: dict[str, Any] | None = None,
    progress: bool = True,
) -> LayerRanking:
    """Trace every prompt at one position and rank layers by the restored fraction of the effect.

    ``position``: ``"subject_last"`` (ROME: the last corrupted token) or ``"last"`` (the last token).
    score(l) = sum_p sign(TE_p) IE_p(l) / sum_p |TE_p| with TE = clean - corrupted, so prompts with
    a tiny total effect weigh little and the sign of the effect does not matter.
    """
    prompts = list(prompts)
    if not prompts:
        raise DiagnosticError("empty prompt set: tracing needs at least one prompt")
    _check_position(position)
    store = store if store is not None else ActivationStore(model)
    effects, traces = [], []
    for pr in tqdm(prompts, desc="tracing prompts", disable=not progress):
        tr = trace_prompt(model, pr, store=store, kinds=kinds, positions=[_scored_position(store, pr, position)],
                          n_samples=n_samples, noise_scale=noise_scale, window=window, seed=seed)
        effects.append((tr.total_effect, {k: tr.effects[k][0] for k in kinds}))
        if keep_traces:
            traces.append(tr)
    name = getattr(model.cfg, "model_name", "model")
    return ranking_from_effects(name, model.cfg.n_layers, effects, kinds=kinds, position=position, source=source,
                                traces=traces)


def trace_item(model: HookedTransformer, item: dict, *, chat: bool = True, corrupt: str = "question") -> TracePrompt:
    """A trace prompt from one data item: a CAA A/B item, or ``{prompt, subject, answer[, other]}``."""
    if "question" in item or "correct" in item:
        return caa_prompt(model, item, chat=chat, corrupt=corrupt)
    if not all(k in item for k in ("prompt", "subject", "answer")):
        raise DiagnosticError("each prompt needs 'prompt', 'subject' and 'answer' (or CAA A/B fields)")
    return make_prompt(model, item["prompt"], item["subject"], item["answer"], item.get("other"), chat=chat)


@dataclass
class TraceJob(ItemJob):
    """Causal tracing of one data item per call (the per-prompt part of :func:`rank_layers`), for
    :func:`czao_lens.distributed.run_items`; :func:`ranking_from_effects` aggregates the rows."""

    model_name: str
    chat: bool = True
    corrupt: str = "question"
    position: str = "subject_last"
    kinds: tuple[str, ...] = ("resid",)
    n_samples: int = 5
    noise_scale: float = 3.0
    window: int = 10
    seed: int = 0

    def setup(self, model) -> Any:
        return ActivationStore(model)

    def run(self, model, state: Any, key: str, payload: dict) -> dict:
        pr = trace_item(model, payload, chat=self.chat, corrupt=self.corrupt)
        tr = trace_prompt(model, pr, store=state, kinds=self.kinds, positions=[_scored_position(state, pr, self.position)],
                          n_samples=self.n_samples, noise_scale=self.noise_scale, window=self.window, seed=self.seed)
        return {"label": pr.label, "total_effect": tr.total_effect, "effects": {k: tr.effects[k][0].tolist() for k in self.kinds},
                "n_layers": model.cfg.n_layers}

    def describe(self) -> dict:
        return {"job": "trace", "model": self.model_name, "chat": self.chat, "corrupt": self.corrupt,
                "position": self.position, "kinds": list(self.kinds), "n_samples": self.n_samples,
                "noise_scale": self.noise_scale, "window": self.window, "seed": self.seed}
