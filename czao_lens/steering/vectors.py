"""Contrastive steering vectors: CAA, ActAdd and PCA, with save/load and llama.cpp GGUF export.

A :class:`SteeringVector` is a small dataclass: one direction per layer at one kind of hook
(``resid_pre`` by default), plus metadata. ``apply()`` / ``attach()`` turn it into
:class:`czao_lens.perturb.Perturbation`s, so positions stay correct during KV-cached generation.

* **CAA** (Rimsky et al.): the mean over A/B pairs of activation(prompt + "(" + matching letter) minus
  activation(prompt + "(" + other letter), read at the answer-letter token (the last token).
* **ActAdd**: the same difference for a single prompt pair.
* **PCA**: the first principal component of the paired differences (uncentred by default, so the
  shared shift stays in; ``center=True`` for the textbook centred PCA), its sign aligned with the mean difference and its norm set to the norm of the mean difference
  projected on it, so multipliers are comparable with CAA.

All activations are read through :class:`czao_lens.store.ActivationStore`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from czao_lens import sites
from czao_lens.errors import CzaoLensError
from czao_lens.models import model_fingerprint
from czao_lens.perturb import Perturbation, PerturbationHandle, attach
from czao_lens.prompts import PositionSpec, TokenLayout, format_prompt
from czao_lens.steering.data import ABItem, items_hash, texts_hash
from czao_lens.store import ActivationStore

HOOK_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
FORMAT_VERSION = 1


class SteeringError(CzaoLensError, ValueError):
    """A steering method got bad inputs (no pairs, a zero difference, a mismatched model, ...)."""


# ----------------------------------------------------------------------------- shared helpers


def default_store(model: HookedTransformer) -> ActivationStore:
    """One activation store per model object, shared by every steering method that is not given one."""
    store = getattr(model, "_czao_steering_store", None)
    if store is None or store.model is not model:
        store = ActivationStore(model, max_bytes=256 * 2**20)
        model._czao_steering_store = store  # type: ignore[attr-defined]
    return store


def hook_name(layer: int, hook: str) -> str:
    """A steering site: ``hook`` must be one of ``HOOK_KINDS``."""
    if hook not in HOOK_KINDS:
        raise SteeringError(f"hook must be one of {HOOK_KINDS}, got {hook!r}")
    return sites.hook_name(layer, hook)


def check_layers(model: HookedTransformer, layers: Sequence[int]) -> list[int]:
    """The steering layers, sorted and deduplicated; raises :class:`SteeringError` when out of range."""
    return sorted(set(sites.check_layers(model.cfg.n_layers, layers, error=SteeringError)))


def ab_prefix(model: HookedTransformer, question: str, *, chat: bool = True, system_prompt: str | None = None) -> str:
    """The text before the answer letter: the (chat-formatted) question plus the assistant's "("."""
    return format_prompt(model, question, chat=chat, system_prompt=system_prompt) + "("


def ab_pair_texts(model: HookedTransformer, items: Sequence[ABItem], *, chat: bool = True) -> tuple[list[str], list[str]]:
    """(positive, negative) texts per item, each ending in the answer letter."""
    if not items:
        raise SteeringError("no A/B pairs given")
    pos, neg = [], []
    for it in items:
        pre = ab_prefix(model, it.question, chat=chat)
        pos.append(pre + it.matching)
        neg.append(pre + it.not_matching)
    return pos, neg


def answer_pair_texts(model: HookedTransformer, items: Sequence[ABItem], *, chat: bool = True,
                      max_answer_tokens: int = 24, system_prompt: str | None = None) -> tuple[list[str], list[str], list[int], list[int]]:
    """(positive, negative) texts: the bare question (no choices) answered with the matching / other
    option's text, plus each text's prefix length in tokens (where the answer starts)."""
    from czao_lens.steering.evaluate import option_texts

    if not items:
        raise SteeringError("no A/B pairs given")
    tok = model.tokenizer
    pos, neg, pre_p, pre_n = [], [], [], []
    for it in items:
        opts = option_texts(it)
        prefix = format_prompt(model, it.stem(), chat=chat, system_prompt=system_prompt)
        n_pre = len(tok(prefix, add_special_tokens=False)["input_ids"])
        for letter, texts, pres in ((it.matching, pos, pre_p), (it.not_matching, neg, pre_n)):
            ans = tok(opts[letter], add_special_tokens=False)["input_ids"][:max_answer_tokens]
            texts.append(prefix + tok.decode(ans))
            pres.append(n_pre)
    return pos, neg, pre_p, pre_n


def item_activations(
    model: HookedTransformer,
    items: Sequence[ABItem],
    layers: Sequence[int],
    *,
    hook: str = "resid_pre",
    readout: str = "letter",
    chat: bool = True,
    store: ActivationStore | None = None,
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Per-item activations of the behaviour-matching and the other answer, ``({layer: [n, d]}, ...)``.

    ``readout="letter"`` (CAA): the answer-letter token after the chat-formatted question with its
    choices. ``readout="answer"``: the bare question answered with the option's *text*, averaged over
    the answer tokens (for models that do not map behaviour to A/B letters).
    """
    if readout == "letter":
        pos, neg = ab_pair_texts(model, items, chat=chat)
        return contrastive_activations(model, pos, neg, layers, hook=hook, store=store)
    if readout != "answer":
        raise SteeringError(f"readout must be 'letter' or 'answer', got {readout!r}")
    layers = check_layers(model, layers)
    pos, neg, pre_p, pre_n = answer_pair_texts(model, items, chat=chat)
    store = store or default_store(model)
    names = [hook_name(l, hook) for l in layers]
    out = []
    for texts, pres in ((pos, pre_p), (neg, pre_n)):
        acts = store.get(texts, names)
        out.append({l: torch.stack([a[h][n:].float().mean(0) for a, n in zip(acts, pres)]) for l, h in zip(layers, names)})
    return out[0], out[1]


def contrastive_activations(
    model: HookedTransformer,
    pos_texts: Sequence[str],
    neg_texts: Sequence[str],
    layers: Sequence[int],
    *,
    hook: str = "resid_pre",
    position: int = -1,
    store: ActivationStore | None = None,
    paired: bool = True,
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Activations at one position of each text: ``({layer: [n_pos, d]}, {layer: [n_neg, d]})``."""
    if not pos_texts or not neg_texts:
        raise SteeringError("contrastive activations need at least one positive and one negative text")
    if paired and len(pos_texts) != len(neg_texts):
        raise SteeringError(f"paired texts differ in number: {len(pos_texts)} positive vs {len(neg_texts)} negative")
    layers = check_layers(model, layers)
    store = store or default_store(model)
    names = [hook_name(l, hook) for l in layers]
    p = store.last_token(list(pos_texts), names, position=position)
    n = store.last_token(list(neg_texts), names, position=position)
    return {l: p[h].float() for l, h in zip(layers, names)}, {l: n[h].float() for l, h in zip(layers, names)}


def _nonzero(direction: Tensor, layer: int, what: str, ref: Tensor | None = None) -> Tensor:
    scale = float(ref.norm(dim=-1).mean()) if ref is not None else 1.0
    if not torch.isfinite(direction).all():
        raise SteeringError(f"{what} at layer {layer} is not finite")
    if float(direction.norm()) <= 1e-6 * max(scale, 1e-12):
        raise SteeringError(
            f"{what} at layer {layer} is (numerically) zero: the positive and negative activations do not differ there"
        )
    return direction


# ----------------------------------------------------------------------------- the dataclass


@dataclass
class SteeringVector:
    """One direction per layer at ``blocks.{layer}.hook_{hook}``; ``multiplier`` scales all of them."""

    directions: dict[int, Tensor]
    hook: str = "resid_pre"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hook not in HOOK_KINDS:
            raise SteeringError(f"hook must be one of {HOOK_KINDS}, got {self.hook!r}")
        if not self.directions:
            raise SteeringError("a steering vector needs at least one layer")
        self.directions = {int(k): v.detach().float().reshape(-1) for k, v in self.directions.items()}
        widths = {v.shape[0] for v in self.directions.values()}
        if len(widths) != 1:
            raise SteeringError(f"directions have different widths {sorted(widths)}")

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    @property
    def d_model(self) -> int:
        return next(iter(self.directions.values())).shape[0]

    def check_model(self, model: HookedTransformer) -> None:
        if self.d_model != model.cfg.d_model:
            raise SteeringError(f"steering vector has width {self.d_model}, the model has d_model {model.cfg.d_model}")
        check_layers(model, self.layers)

    def to_perturbations(self, multiplier: float = 1.0, positions: PositionSpec = "all") -> list[Perturbation]:
        return [Perturbation(hook_name(l, self.hook), d, positions, float(multiplier)) for l, d in sorted(self.directions.items())]

    def attach(
        self, model: HookedTransformer, multiplier: float = 1.0, positions: PositionSpec = "all", layout: TokenLayout | None = None
    ) -> PerturbationHandle:
        """Add the hooks and return a handle (``handle.remove()`` or ``with handle:``)."""
        self.check_model(model)
        return attach(model, self.to_perturbations(multiplier, positions), layout)

    @contextmanager
    def apply(
        self, model: HookedTransformer, multiplier: float = 1.0, positions: PositionSpec = "all", layout: TokenLayout | None = None
    ) -> Iterator[PerturbationHandle]:
        """Context manager: the model is steered inside, and unsteered again afterwards."""
        handle = self.attach(model, multiplier, positions, layout)
        try:
            yield handle
        finally:
            handle.remove()

    def __add__(self, other: "SteeringVector") -> "SteeringVector":
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if other.hook != self.hook:
            raise SteeringError(f"cannot add vectors at different hooks ({self.hook} vs {other.hook}); apply both instead")
        if other.d_model != self.d_model:
            raise SteeringError(f"cannot add vectors of widths {self.d_model} and {other.d_model}")
        dirs = {l: d.clone() for l, d in self.directions.items()}
        for l, d in other.directions.items():
            dirs[l] = dirs[l] + d if l in dirs else d.clone()
        meta = {**self.meta, "method": "sum", "parts": [self.meta.get("method"), other.meta.get("method")]}
        return SteeringVector(dirs, self.hook, meta)

    def __mul__(self, k: float) -> "SteeringVector":
        return SteeringVector({l: d * float(k) for l, d in self.directions.items()}, self.hook, dict(self.meta))

    __rmul__ = __mul__

    def normalized(self) -> "SteeringVector":
        return SteeringVector({l: d / d.norm().clamp_min(1e-12) for l, d in self.directions.items()}, self.hook, dict(self.meta))

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> Path:
        """Safetensors with the directions and a JSON metadata header."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": str(FORMAT_VERSION), "hook": self.hook, "layers": json.dumps(self.layers),
                "d_model": str(self.d_model), "meta": json.dumps(self.meta, default=str)}
        save_file({f"layer.{l}": d.contiguous() for l, d in self.directions.items()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, model: HookedTransformer | None = None, *, strict_fingerprint: bool = True) -> "SteeringVector":
        """Load a saved vector; with ``model``, refuse a different d_model, layer count or fingerprint."""
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise SteeringError(f"no steering vector file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise SteeringError(f"{path} is not a readable safetensors steering vector: {exc}") from None
        if "hook" not in header or not tensors:
            raise SteeringError(f"{path} has no steering-vector metadata (hook/layers)")
        dirs = {int(k.split(".", 1)[1]): t for k, t in tensors.items() if k.startswith("layer.")}
        vec = cls(dirs, header["hook"], json.loads(header.get("meta", "{}")))
        if model is not None:
            vec.check_compatible(model, strict_fingerprint=strict_fingerprint)
        return vec

    def check_compatible(self, model: HookedTransformer, *, strict_fingerprint: bool = True) -> None:
        """Raise if this vector was made for another model (d_model, layers, fingerprint)."""
        want_d = self.meta.get("d_model", self.d_model)
        if int(want_d) != model.cfg.d_model or self.d_model != model.cfg.d_model:
            raise SteeringError(
                f"steering vector is for d_model {want_d} ({self.meta.get('model_name', '?')}), "
                f"but {model.cfg.model_name} has d_model {model.cfg.d_model}"
            )
        n_layers = self.meta.get("n_layers")
        if n_layers is not None and int(n_layers) != model.cfg.n_layers:
            raise SteeringError(f"steering vector is for a {n_layers}-layer model; {model.cfg.model_name} has {model.cfg.n_layers}")
        check_layers(model, self.layers)
        fp = self.meta.get("fingerprint")
        if strict_fingerprint and fp is not None and fp != model_fingerprint(model):
            raise SteeringError(
                f"steering vector was fitted on model {self.meta.get('model_name', '?')} (fingerprint {fp}); "
                f"this model's fingerprint is {model_fingerprint(model)}. Pass strict_fingerprint=False to use it anyway."
            )

    # ------------------------------------------------------------------ llama.cpp control vectors

    def to_gguf(self, path: str | Path, *, model_hint: str | None = None, n_layers: int | None = None) -> Path:
        """Write a llama.cpp control vector (arch ``controlvector``).

        llama.cpp adds tensor ``direction.k`` to the output of its block ``k`` (0-based; ``k = 0`` is
        rejected), i.e. to TL's ``blocks.k.hook_resid_post`` = ``blocks.(k+1).hook_resid_pre``. A
        ``resid_pre`` vector at TL layer ``l`` is therefore written as ``direction.(l-1)``.
        """
        import gguf
        import numpy as np

        out = {}
        for l, d in self.directions.items():
            k = _gguf_index(l, self.hook)
            out[k] = out.get(k, 0) + d.numpy().astype(np.float32)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        w = gguf.GGUFWriter(str(path), "controlvector")
        w.add_string("controlvector.model_hint", model_hint or str(self.meta.get("model_name", "unknown")))
        w.add_uint32("controlvector.layer_count", int(n_layers or self.meta.get("n_layers") or max(out) + 1))
        for k in sorted(out):
            w.add_tensor(f"direction.{k}", out[k])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    @classmethod
    def from_gguf(cls, path: str | Path, *, hook: str = "resid_post", model: HookedTransformer | None = None) -> "SteeringVector":
        """Read a llama.cpp control vector back (``direction.k`` -> ``blocks.k`` resid_post, or resid_pre k+1)."""
        import gguf

        path = Path(path)
        if not path.exists():
            raise SteeringError(f"no GGUF control vector at {path}")
        r = gguf.GGUFReader(str(path))
        arch = _gguf_str(r, "general.architecture")
        if arch != "controlvector":
            raise SteeringError(f"{path} is a GGUF of architecture {arch!r}, not a control vector")
        dirs: dict[int, Tensor] = {}
        for t in r.tensors:
            if not t.name.startswith("direction."):
                continue
            k = int(t.name.split(".", 1)[1])
            if k < 1:
                raise SteeringError(f"{path}: direction.{k} is not a valid llama.cpp layer index (they start at 1)")
            l = k if hook == "resid_post" else k + 1 if hook == "resid_pre" else None
            if l is None:
                raise SteeringError("GGUF control vectors live on the residual stream: use hook resid_post or resid_pre")
            dirs[l] = torch.tensor(t.data.copy()).float().reshape(-1)
        if not dirs:
            raise SteeringError(f"{path} holds no direction.* tensors")
        meta = {"method": "gguf", "model_hint": _gguf_str(r, "controlvector.model_hint"), "source": str(path)}
        vec = cls(dirs, hook, meta)
        if model is not None:
            vec.check_model(model)
        return vec


def _gguf_index(layer: int, hook: str) -> int:
    if hook == "resid_post":
        k = layer
    elif hook == "resid_pre":
        k = layer - 1
    else:
        raise SteeringError(f"llama.cpp control vectors act on the residual stream; a {hook} vector cannot be exported")
    if k < 1:
        raise SteeringError(
            f"TL {hook} layer {layer} would be llama.cpp direction.{k}; llama.cpp cannot steer the embeddings or block 0's output"
        )
    return k


def _gguf_str(reader, key: str) -> str | None:
    f = reader.fields.get(key)
    if f is None:
        return None
    return bytes(f.parts[f.data[0]]).decode()


def _meta(model: HookedTransformer, method: str, layers: Sequence[int], hook: str, data_hash: str, **extra) -> dict:
    return {"method": method, "model_name": model.cfg.model_name, "fingerprint": model_fingerprint(model),
            "d_model": model.cfg.d_model, "n_layers": model.cfg.n_layers, "layers": list(layers), "hook": hook,
            "data_hash": data_hash, **extra}


# ----------------------------------------------------------------------------- methods


def caa_vector(
    model: HookedTransformer,
    items: Sequence[ABItem],
    layers: Sequence[int],
    *,
    hook: str = "resid_pre",
    chat: bool = True,
    readout: str = "letter",
    store: ActivationStore | None = None,
) -> SteeringVector:
    """Contrastive activation addition: mean over pairs of (matching - non-matching) at the answer letter
    (``readout="answer"``: averaged over the tokens of the answer text instead, see :func:`item_activations`)."""
    if not items:
        raise SteeringError("CAA needs at least one A/B pair; got none")
    layers = check_layers(model, layers)
    P, N = item_activations(model, items, layers, hook=hook, readout=readout, chat=chat, store=store)
    dirs = {l: _nonzero((P[l] - N[l]).mean(0), l, "the CAA mean difference", P[l]) for l in layers}
    return SteeringVector(dirs, hook, _meta(model, "caa", layers, hook, items_hash(items), n_pairs=len(items), chat=chat, readout=readout))


def actadd_vector(
    model: HookedTransformer,
    positive: str,
    negative: str,
    layers: Sequence[int],
    *,
    hook: str = "resid_pre",
    position: int = -1,
    store: ActivationStore | None = None,
) -> SteeringVector:
    """ActAdd: activation(positive) - activation(negative) at one token (default: the last)."""
    layers = check_layers(model, layers)
    P, N = contrastive_activations(model, [positive], [negative], layers, hook=hook, position=position, store=store)
    dirs = {l: _nonzero(P[l][0] - N[l][0], l, "the ActAdd difference", P[l]) for l in layers}
    return SteeringVector(dirs, hook, _meta(model, "actadd", layers, hook, texts_hash([positive, negative]), position=position))


def pca_vector(
    model: HookedTransformer,
    items: Sequence[ABItem],
    layers: Sequence[int],
    *,
    hook: str = "resid_pre",
    chat: bool = True,
    center: bool = False,
    readout: str = "letter",
    store: ActivationStore | None = None,
) -> SteeringVector:
    """First principal component of the paired differences, sign-aligned with (and scaled to) the mean difference."""
    if len(items) < 2:
        raise SteeringError(f"PCA needs at least two A/B pairs; got {len(items)}")
    layers = check_layers(model, layers)
    P, N = item_activations(model, items, layers, hook=hook, readout=readout, chat=chat, store=store)
    dirs, explained = {}, {}
    for l in layers:
        diff = P[l] - N[l]
        mean = _nonzero(diff.mean(0), l, "the mean paired difference", P[l])
        # Uncentred by default: the mean direction is the signal, so keep it in.
        _, s, vh = torch.linalg.svd(diff - diff.mean(0) if center else diff, full_matrices=False)
        pc = vh[0]
        if float(pc @ mean) < 0:
            pc = -pc
        dirs[l] = pc * float(pc @ mean)
        explained[l] = float(s[0] ** 2 / (s**2).sum())
    return SteeringVector(dirs, hook, _meta(model, "pca", layers, hook, items_hash(items), n_pairs=len(items), chat=chat, center=center, readout=readout,
                                            explained_variance=explained))


def compose(*vectors: SteeringVector, multipliers: Sequence[float] | None = None,
            positions: PositionSpec = "all") -> list[Perturbation]:
    """Perturbations for applying several vectors at once (different hooks allowed)."""
    if not vectors:
        raise SteeringError("compose() needs at least one vector")
    multipliers = list(multipliers) if multipliers is not None else [1.0] * len(vectors)
    if len(multipliers) != len(vectors):
        raise SteeringError("one multiplier per vector")
    out: list[Perturbation] = []
    for v, m in zip(vectors, multipliers):
        out += v.to_perturbations(m, positions)
    return out
