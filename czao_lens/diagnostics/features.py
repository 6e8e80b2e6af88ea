"""SAE feature selection for a behaviour or a constraint (FGAA-style contrastive selection).

Recipe: read the residuals of positive and negative examples at the SAE's hook through the
:class:`~czao_lens.store.ActivationStore` (positions > 0, or the last token only), encode them with
the SAE, and take the mean latent activation of the positives minus that of the negatives. Then

* drop **dense** features: those that fire on more than ``max_freq`` of the pooled tokens
  (positives and negatives together) — they carry no contrast, only bias;
* drop **BOS / position-0** features: those whose mean activation at position 0 (the attention
  sink of models without BOS) is more than ``bos_ratio`` times their mean at the other positions,
  and that fire on the sink at all — they react to the sink's huge norm, not to the text;
* rank the rest by mean difference and keep the top ``k``.

The result, :class:`FeatureBasis`, carries the decoder rows of the chosen features. ``basis()``
orthonormalises them; ``directions_by_layer()`` gives ``{layer: [k, d]}`` for
:func:`czao_lens.subspace.direction_basis` (layer = the block whose ``hook_resid_pre`` equals the
SAE's hook) and for SAE-feature steering.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from czao_lens.diagnostics import DiagnosticError, write_json
from czao_lens.store import ActivationStore

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|resid_mid|mlp_out|attn_out)$")


@dataclass
class FeatureBasis:
    """Top-k SAE features that separate positive from negative examples."""

    hook_name: str
    indices: list[int]
    scores: Float[Tensor, "k"]  # mean activation (positive) - mean activation (negative)
    directions: Float[Tensor, "k d_model"]  # decoder rows W_dec[indices]
    freq: Float[Tensor, "k"]  # firing frequency on the pooled examples
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.indices = [int(i) for i in self.indices]
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32)
        self.directions = torch.as_tensor(self.directions, dtype=torch.float32)
        self.freq = torch.as_tensor(self.freq, dtype=torch.float32)
        k = len(self.indices)
        if self.directions.ndim != 2 or self.directions.shape[0] != k or self.scores.shape != (k,) or self.freq.shape != (k,):
            raise DiagnosticError("FeatureBasis: indices, scores, freq and directions must agree in k")

    @property
    def k(self) -> int:
        return len(self.indices)

    @property
    def layer(self) -> int:
        """The block whose ``hook_resid_pre`` holds (or first sees) the SAE's activation."""
        m = _HOOK_RE.match(self.hook_name)
        if not m:
            raise DiagnosticError(f"{self.hook_name!r} is not a residual / mlp_out / attn_out hook; no layer to steer")
        l, kind = int(m.group(1)), m.group(2)
        return l if kind == "resid_pre" else l + 1

    def basis(self) -> Float[Tensor, "d_model k"]:
        """Orthonormal columns spanning the chosen decoder directions (QR, in score order)."""
        if self.k == 0:
            raise DiagnosticError("empty feature basis")
        q, r = torch.linalg.qr(self.directions.T.double())
        keep = r.diagonal().abs() > 1e-8 * max(1.0, float(r.diagonal().abs().max()))
        return q[:, keep].float()

    def directions_by_layer(self) -> dict[int, Float[Tensor, "k d_model"]]:
        """``{layer: directions}`` for :func:`czao_lens.subspace.direction_basis` (resid_pre of ``layer``)."""
        return {self.layer: self.directions.clone()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "hook_name": self.hook_name,
            "features": [
                {"index": i, "score": float(s), "freq": float(f)}
                for i, s, f in zip(self.indices, self.scores.tolist(), self.freq.tolist())
            ],
            "info": self.info,
        }

    def save(self, path: str | Path) -> dict[str, Path]:
        """Write ``<path>.json`` and ``<path>.safetensors`` (path given with or without a suffix)."""
        from safetensors.torch import save_file

        path = Path(path)
        base = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
        j = write_json(self.to_dict(), base.with_suffix(".json"))
        st = base.with_suffix(".safetensors")
        save_file({"directions": self.directions.contiguous(), "scores": self.scores.contiguous(),
                   "freq": self.freq.contiguous(), "indices": torch.tensor(self.indices, dtype=torch.int64)}, str(st))
        return {"json": j, "safetensors": st}

    @classmethod
    def load(cls, path: str | Path) -> "FeatureBasis":
        from safetensors.torch import load_file

        path = Path(path)
        base = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
        try:
            meta = json.loads(base.with_suffix(".json").read_text())
            t = load_file(str(base.with_suffix(".safetensors")))
        except (OSError, ValueError) as exc:
            raise DiagnosticError(f"cannot read a feature basis at {base}(.json/.safetensors): {exc}") from exc
        return cls(meta["hook_name"], t["indices"].tolist(), t["scores"], t["directions"], t["freq"], meta.get("info", {}))


# ----------------------------------------------------------------------------- selection


def _sae_parts(model: HookedTransformer, sae: Any, hook_name: str | None) -> str:
    from czao_lens.sae import SAEError, check_sae_fits

    try:
        return check_sae_fits(model, sae, hook_name)
    except SAEError as exc:
        raise DiagnosticError(str(exc)) from None


def _check_texts(texts: Sequence[str] | None, what: str) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    out = [t for t in (texts or []) if isinstance(t, str) and t.strip()]
    if not out:
        raise DiagnosticError(f"empty prompt set: no {what} examples")
    return out


@torch.no_grad()
def _encode(sae: Any, x: Tensor, batch: int = 4096) -> Tensor:
    dev = next(sae.parameters()).device
    return torch.cat([sae.encode(x[s : s + batch].to(dev)).float().cpu() for s in range(0, x.shape[0], batch)])


@torch.no_grad()
def select_features(
    model: HookedTransformer,
    sae: Any,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    k: int = 10,
    hook_name: str | None = None,
    store: ActivationStore | None = None,
    last_token_only: bool = False,
    max_freq: float = 0.5,
    bos_ratio: float = 10.0,
    chat: bool = False,
) -> FeatureBasis:
    """Top-``k`` SAE features by mean activation (positives) minus mean activation (negatives).

    Activations come from ``store`` (one is made if None) at the SAE's hook, at positions > 0
    (``last_token_only``: the last token of each example). Dense features (firing frequency on
    the pooled tokens above ``max_freq``) and BOS features (see the module doc) are dropped.
    """
    hook = _sae_parts(model, sae, hook_name)
    pos = _check_texts(positive, "positive")
    neg = _check_texts(negative, "negative")
    if k < 1:
        raise DiagnosticError("k must be >= 1")
    if not 0 < max_freq <= 1:
        raise DiagnosticError("max_freq must lie in (0, 1]")
    store = store or ActivationStore(model)
    acts = store.get(pos + neg, [hook], chat=chat)
    rows = [a[hook].float() for a in acts]
    if any(r.shape[0] < 2 for r in rows):
        raise DiagnosticError("every example needs at least two tokens (position 0 is excluded)")

    def pooled(rs: list[Tensor]) -> Tensor:
        return torch.cat([r[-1:] if last_token_only else r[1:] for r in rs])

    f_pos = _encode(sae, pooled(rows[: len(pos)]))
    f_neg = _encode(sae, pooled(rows[len(pos):]))
    f_bos = _encode(sae, torch.stack([r[0] for r in rows]))  # position 0 of every example
    diff = f_pos.mean(0) - f_neg.mean(0)
    f_all = torch.cat([f_pos, f_neg])
    freq = (f_all > 0).float().mean(0)
    dense = freq > max_freq
    rest_mean = f_all.mean(0)
    bos_mean = f_bos.mean(0)
    bos = (bos_mean > 0) & (bos_mean > bos_ratio * rest_mean)
    ok = ~(dense | bos) & (diff > 0)
    n_ok = int(ok.sum())
    if n_ok == 0:
        raise DiagnosticError("no feature is more active on the positives after dropping dense and BOS features")
    score = torch.where(ok, diff, torch.full_like(diff, -float("inf")))
    top = torch.topk(score, min(k, n_ok)).indices
    W = sae.W_dec.detach().float().cpu()
    info = {
        "n_positive": len(pos), "n_negative": len(neg), "tokens_positive": int(f_pos.shape[0]),
        "tokens_negative": int(f_neg.shape[0]), "last_token_only": last_token_only, "max_freq": max_freq,
        "bos_ratio": bos_ratio, "dropped_dense": int(dense.sum()), "dropped_bos": int((bos & ~dense).sum()),
        "dropped_dense_indices": torch.nonzero(dense).flatten().tolist()[:200],
        "dropped_bos_indices": torch.nonzero(bos & ~dense).flatten().tolist()[:200],
        "d_sae": int(W.shape[0]),
    }
    return FeatureBasis(hook, top.tolist(), diff[top], W[top], freq[top], info)


@dataclass
class TokenHit:
    """One place where a feature fires: the token, its context, the activation."""

    text_index: int
    position: int
    token: str
    context: str
    activation: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@torch.no_grad()
def top_activating_tokens(
    model: HookedTransformer,
    sae: Any,
    feature: int,
    texts: Sequence[str],
    k: int = 10,
    *,
    hook_name: str | None = None,
    store: ActivationStore | None = None,
    window: int = 8,
    dedupe: bool = True,
) -> list[TokenHit]:
    """The ``k`` (text, position > 0) where ``feature`` fires most, with ``window`` tokens of context.

    The context marks the token as ``[[token]]``. With ``dedupe`` a context already listed (the same
    words around the same token, e.g. a question repeated in a positive and a negative example) is
    skipped, so the ``k`` hits are ``k`` different places.
    """
    hook = _sae_parts(model, sae, hook_name)
    texts = _check_texts(texts, "text")
    check_feature_indices(sae, [feature])
    store = store or ActivationStore(model)
    toks = store.tokenize(texts)
    acts = store.get(toks, [hook])
    cands: list[tuple[float, int, int]] = []
    dev = next(sae.parameters()).device
    for i, a in enumerate(acts):
        x = a[hook][1:].float()
        if x.shape[0] == 0:
            continue
        f = sae.encode(x.to(dev))[:, int(feature)].float().cpu()
        for p in torch.nonzero(f > 0).flatten().tolist():
            cands.append((float(f[p]), i, p + 1))
    cands.sort(key=lambda c: -c[0])
    tok = model.tokenizer
    out: list[TokenHit] = []
    seen: set[str] = set()
    for act, i, p in cands:
        if len(out) >= k:
            break
        ids = toks[i]
        before = tok.decode(ids[max(0, p - window) : p])
        here = tok.decode([ids[p]])
        after = tok.decode(ids[p + 1 : p + 1 + max(1, window // 4)])
        context = f"{before}[[{here}]]{after}".replace("\n", "\\n")
        if dedupe and context in seen:
            continue
        seen.add(context)
        out.append(TokenHit(i, p, here, context, act))
    return out


def check_feature_indices(sae: Any, indices: Sequence[int]) -> list[int]:
    """Feature indices as ints, each in ``[0, d_sae)``; anything else is refused with a clear error."""
    d_sae = int(sae.cfg.d_sae)
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, (int, torch.Tensor)) and not str(i).lstrip("-").isdigit():
            raise DiagnosticError(f"feature index {i!r} is not an integer")
        j = int(i)
        if not 0 <= j < d_sae:
            raise DiagnosticError(f"feature {j} is out of range; the SAE has {d_sae} latents (0..{d_sae - 1})")
        out.append(j)
    if not out:
        raise DiagnosticError("no SAE features given")
    if len(set(out)) != len(out):
        raise DiagnosticError(f"feature indices repeat: {out}")
    return out


@torch.no_grad()
def feature_basis(model: HookedTransformer, sae: Any, indices: Sequence[int], *, hook_name: str | None = None) -> FeatureBasis:
    """A :class:`FeatureBasis` of hand-picked features (their decoder rows; scores and frequencies 0).

    For a CZAO subspace (``directions_by_layer()``) or SAE steering from features chosen by reading
    their labels rather than by a contrast.
    """
    hook = _sae_parts(model, sae, hook_name)
    idx = check_feature_indices(sae, indices)
    W = sae.W_dec.detach().float().cpu()[idx]
    return FeatureBasis(hook, idx, torch.zeros(len(idx)), W, torch.zeros(len(idx)), {"source": "chosen", "d_sae": int(sae.cfg.d_sae)})


@torch.no_grad()
def feature_contexts(
    model: HookedTransformer,
    sae: Any,
    features: Sequence[int],
    texts: Sequence[str],
    *,
    k: int = 8,
    window: int = 12,
    hook_name: str | None = None,
    store: ActivationStore | None = None,
) -> dict[int, list[dict[str, Any]]]:
    """Per feature, its ``k`` top-activating deduplicated contexts with every token's activation.

    Each context is ``{"tokens": [...], "acts": [...], "peak": index of the top token, "activation"}``
    over ``window`` tokens before and ``window // 3`` after the peak: what :func:`feature_labels_html`
    draws.
    """
    hook = _sae_parts(model, sae, hook_name)
    texts = _check_texts(texts, "text")
    feats = check_feature_indices(sae, features)
    store = store or ActivationStore(model)
    toks = store.tokenize(texts)
    acts = store.get(toks, [hook])
    dev = next(sae.parameters()).device
    per_text = []  # [positions, n_feats] activations at positions > 0
    for a in acts:
        x = a[hook][1:].float()
        per_text.append(sae.encode(x.to(dev))[:, feats].float().cpu() if x.shape[0] else torch.zeros(0, len(feats)))
    tok = model.tokenizer
    out: dict[int, list[dict[str, Any]]] = {}
    for j, f in enumerate(feats):
        cands = [(float(v), i, p + 1) for i, fa in enumerate(per_text) for p, v in enumerate(fa[:, j].tolist()) if v > 0]
        cands.sort(key=lambda c: -c[0])
        seen: set[str] = set()
        rows: list[dict[str, Any]] = []
        for v, i, p in cands:
            if len(rows) >= k:
                break
            lo, hi = max(1, p - window), min(len(toks[i]), p + 1 + max(1, window // 3))
            key = tok.decode(toks[i][lo:hi])
            if key in seen:
                continue
            seen.add(key)
            rows.append({"tokens": [tok.decode([t]) for t in toks[i][lo:hi]],
                         "acts": per_text[i][lo - 1 : hi - 1, j].tolist(), "peak": p - lo, "activation": v, "text_index": i})
        out[f] = rows
    return out


def feature_labels_html(contexts: dict[int, list[dict[str, Any]]], *, title: str = "SAE feature labels",
                        notes: dict[int, str] | None = None) -> str:
    """An HTML page: per feature, its top contexts with each token shaded by its activation."""
    from html import escape

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>"
             "body{font-family:sans-serif;margin:2em;max-width:70em}.ctx{font-family:monospace;margin:.2em 0;"
             "white-space:pre-wrap}.tok{border-radius:3px}.peak{outline:1px solid #c00}h2{margin-top:1.5em}"
             ".act{color:#666;font-size:.85em;margin-left:1em}</style></head><body>", f"<h1>{escape(title)}</h1>"]
    for f, rows in contexts.items():
        top = max((r["activation"] for r in rows), default=0.0) or 1.0
        note = f" &mdash; {escape(notes[f])}" if notes and f in notes else ""
        parts.append(f"<h2 id='f{f}'>feature {f}{note}</h2>")
        if not rows:
            parts.append("<p>never fires on these texts</p>")
        for r in rows:
            spans = []
            for n, (t, a) in enumerate(zip(r["tokens"], r["acts"])):
                alpha = max(0.0, min(1.0, a / top))
                cls = "tok peak" if n == r["peak"] else "tok"
                spans.append(f"<span class='{cls}' title='{a:.3f}' style='background:rgba(255,140,0,{alpha:.2f})'>"
                             f"{escape(t).replace(chr(10), '&#8629;')}</span>")
            parts.append(f"<div class='ctx'>{''.join(spans)}<span class='act'>{r['activation']:.2f}</span></div>")
    parts.append("</body></html>")
    return "".join(parts)


# ----------------------------------------------------------------------------- example sets


def caa_contrast(items: Sequence[dict]) -> tuple[list[str], list[str]]:
    """CAA A/B items -> (question + matching answer, question + non-matching answer) texts.

    The answer text after the letter is spelled out, so the contrast is in the content, not only in
    the letter: e.g. refusal positives end with the refusing answer.
    """
    pos, neg = [], []
    for it in items:
        q = it.get("question", "")
        a, b = it.get("answer_matching_behavior", ""), it.get("answer_not_matching_behavior", "")
        if not (q and a and b):
            continue
        pos.append(f"{q}\n\nAnswer: {a} {_choice_text(q, a)}".strip())
        neg.append(f"{q}\n\nAnswer: {b} {_choice_text(q, b)}".strip())
    if not pos:
        raise DiagnosticError("no usable CAA items (need question, answer_matching_behavior, answer_not_matching_behavior)")
    return pos, neg


def _choice_text(question: str, letter: str) -> str:
    m = re.search(re.escape(letter.strip()) + r"\s*(.+)", question)
    return m.group(1).strip() if m else ""
