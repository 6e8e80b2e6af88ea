"""The registry of steering methods: each method's name, ``fit``, artifact class and strength knob.

A method is fitted from one :class:`FitInput`, which both consumers fill with what they have:
``czao-lens steer`` gives A/B items from the CAA data (:func:`caa_fit_input`), the benchmark gives
labelled samples (texts, token ids and prompt lengths). Where the two pool activations differently,
the input carries the pooling function (:data:`Aggregator`): :func:`pool_answer` reads CAA's answer
position, :func:`pool_continuation` averages the continuation tokens of sampled text.

Every fitted object is an :class:`~czao_lens.perturb.Intervention` and an
:class:`~czao_lens.artifacts.Artifact`: ``obj.save(folder)`` writes the one layout (cfg.json +
tensors.safetensors), ``czao_lens.artifacts.load(folder, model)`` reads any of them back.
``method.at(obj, g)`` gives the intervention at strength ``g`` (a vector times ``g``, CAST's
multiplier, A-LQR's lambda).

Adding a method::

    @register_method("mean_shift", artifact=SteeringVector, knob="multiplier", needs=("contrast",),
                     at=lambda vec, g: vec * g)
    def fit_mean_shift(model, inp: FitInput) -> SteeringVector:
        acts = inp.pool(model, inp, inp.layers, inp.hook)
        return SteeringVector({l: acts.pos[l].mean(0) for l in inp.layers}, inp.hook, {"method": "mean_shift"})
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from transformer_lens import HookedTransformer

from czao_lens.artifacts import Artifact
from czao_lens.distributed import Backend
from czao_lens.perturb import Intervention
from czao_lens.steering.cast import CAST, evaluate_condition, fit_condition
from czao_lens.steering.common import (
    Pooled,
    SteeringError,
    check_layers,
    contrastive_activations,
    fit_meta,
    item_activations,
    span_means,
    store_for,
)
from czao_lens.steering.data import ABItem, items_hash, texts_hash
from czao_lens.steering.lqr import ALQR, BlockJacobians, fit_alqr
from czao_lens.steering.sae import feature_vector
from czao_lens.steering.scaling import ActivationScaling, fit_scaling, layer_sites
from czao_lens.steering.vectors import SteeringVector, actadd_vector, pca_from_pooled, vector_from_pooled
from czao_lens.store import ActivationStore

Aggregator = Callable[[HookedTransformer, "FitInput", Sequence[int], str], Pooled]
"""How a method reads contrastive activations: ``(model, input, layers, hook) -> Pooled``."""


# ----------------------------------------------------------------------------- aggregators


def pool_answer(model: HookedTransformer, inp: "FitInput", layers: Sequence[int], hook: str) -> Pooled:
    """CAA's pooling of A/B items: the answer-letter token (``readout="letter"``) or the mean over the
    answer text's tokens (``readout="answer"``); rows are paired."""
    if not inp.items:
        raise SteeringError("this method needs A/B items (FitInput.items)")
    P, N = item_activations(model, inp.items, layers, hook=hook, readout=inp.readout, chat=inp.chat, store=inp.store)
    return Pooled(P, N, paired=True)


def pool_continuation(model: HookedTransformer, inp: "FitInput", layers: Sequence[int], hook: str) -> Pooled:
    """The bench's pooling of labelled samples: per sample, the mean over its continuation tokens
    (token ids from ``prompt_lens`` on); positives and negatives are unpaired."""
    if not inp.pos_ids or not inp.neg_ids:
        raise SteeringError("continuation pooling needs positive and negative token ids (FitInput.pos_ids / neg_ids)")
    if len(inp.prompt_lens_pos) != len(inp.pos_ids) or len(inp.prompt_lens_neg) != len(inp.neg_ids):
        raise SteeringError("continuation pooling needs one prompt length per sample")
    P = span_means(model, inp.pos_ids, inp.prompt_lens_pos, layers, hook=hook, store=inp.store)
    N = span_means(model, inp.neg_ids, inp.prompt_lens_neg, layers, hook=hook, store=inp.store)
    return Pooled(P, N, paired=False)


def pool_last_token(model: HookedTransformer, inp: "FitInput", layers: Sequence[int], hook: str) -> Pooled:
    """The last token of each positive and negative text; paired when they are equally many."""
    paired = len(inp.pos_texts) == len(inp.neg_texts)
    P, N = contrastive_activations(model, inp.pos_texts, inp.neg_texts, layers, hook=hook, store=inp.store, paired=paired)
    return Pooled(P, N, paired=paired)


# ----------------------------------------------------------------------------- the fit input


@dataclass
class FitInput:
    """Everything a steering method may be fitted from; each method reads the fields it needs.

    Data: A/B ``items``; contrastive ``pos_texts`` / ``neg_texts`` (ActAdd: one each; A-LQR reads
    their last token when there are no items); ``pos_ids`` / ``neg_ids`` token ids with
    ``prompt_lens_*`` (where each continuation starts); ``trigger`` / ``other`` prompts for CAST's
    condition (plus optional held-out ones to report its precision and recall).
    """

    layers: list[int]
    items: Sequence[ABItem] = ()
    pos_texts: Sequence[str] = ()
    neg_texts: Sequence[str] = ()
    pos_ids: Sequence[Sequence[int]] = ()
    neg_ids: Sequence[Sequence[int]] = ()
    prompt_lens_pos: Sequence[int] = ()
    prompt_lens_neg: Sequence[int] = ()
    trigger: Sequence[str] = ()
    other: Sequence[str] = ()
    heldout_trigger: Sequence[str] = ()
    heldout_other: Sequence[str] = ()
    # how to read the data
    pool: Aggregator = pool_answer
    hook: str = "resid_pre"
    readout: str = "letter"
    chat: bool = True
    concept: str = ""
    # hyperparameters
    multiplier: float = 1.0  # vector / CAST strength; its sign is activation scaling's direction
    coeffs: Sequence[float] | float = 1.0  # SAE feature coefficients
    lam: float = 1.0  # A-LQR setpoint strength
    q: float = 0.5
    r: float = 2.0
    qf: float = 1.0
    positions: str = "last"  # A-LQR: "last" (A-LQR) or "all" (A-LQR+)
    condition_layer: int | None = None  # CAST; default two thirds of the way to the first steering layer
    horizon: Sequence[int] | None = None  # A-LQR layers; default: the Jacobians' layers from min(layers) on
    # resources
    store: ActivationStore | None = None
    jacobians: BlockJacobians | None = None
    sae: Any = None
    features: Sequence[int] | None = None
    vector: SteeringVector | None = None  # CAST's steering vector; fitted with "caa" when None

    def has(self, need: str) -> bool:
        """Whether this input provides ``need`` (see :attr:`SteeringMethod.needs`)."""
        return {
            "items": bool(self.items),
            "contrast": bool(self.items) or bool(self.pos_ids and self.neg_ids) or bool(self.pos_texts and self.neg_texts),
            "texts": bool(self.pos_texts and self.neg_texts),
            "condition": bool(self.trigger and self.other),
            "sae": self.sae is not None and bool(self.features),
            "jacobians": self.jacobians is not None,
        }[need]

    def data_hash(self) -> str:
        """A short hash of the contrastive data (stored in the fitted object's metadata)."""
        if self.items:
            return items_hash(self.items)
        if self.pos_ids:
            return texts_hash([" ".join(map(str, t)) for t in self.pos_ids] + ["\x00"] + [" ".join(map(str, t)) for t in self.neg_ids])
        return texts_hash(list(self.pos_texts) + ["\x00"] + list(self.neg_texts))

    def with_store(self, model: HookedTransformer) -> "FitInput":
        """This input with a store, so the methods fitted from it share cached activations."""
        return self if self.store is not None else replace(self, store=store_for(model, None))


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class SteeringMethod:
    """A registered steering method.

    ``fit(model, inp)`` returns the fitted object (an Intervention and an Artifact of class
    ``artifact``); ``knob`` names the :class:`FitInput` field that sets its strength and ``at(obj, g)``
    returns the intervention at strength ``g`` (``None``: the object is used as fitted); ``needs``
    lists what the input must provide (:meth:`FitInput.has`); ``summary(obj)`` picks what is worth
    printing after a fit.
    """

    name: str
    fit: Callable[[HookedTransformer, FitInput], Any]
    artifact: type[Artifact]
    needs: tuple[str, ...] = ()
    knob: str | None = None
    at: Callable[[Any, float], Intervention] | None = None
    summary: Callable[[Any], dict[str, Any]] | None = None
    description: str = ""

    def can_fit(self, inp: FitInput) -> bool:
        """Whether ``inp`` provides everything this method needs."""
        return all(inp.has(n) for n in self.needs)

    def check_input(self, inp: FitInput) -> None:
        """Raise :class:`SteeringError` naming what the input lacks."""
        missing = [n for n in self.needs if not inp.has(n)]
        if missing:
            raise SteeringError(f"{self.name} needs {', '.join(_NEED_TEXT[n] for n in missing)}")

    def strength(self, obj: Any, inp: FitInput) -> Intervention:
        """The intervention at the strength the input asks for (its ``knob`` field)."""
        return self.at(obj, getattr(inp, self.knob)) if self.at is not None and self.knob else obj

    def report(self, obj: Any) -> dict[str, Any]:
        """A short summary of a fitted object (what ``czao-lens steer`` prints)."""
        return self.summary(obj) if self.summary is not None else {}


_NEED_TEXT = {
    "items": "A/B items", "contrast": "A/B items or positive and negative examples",
    "texts": "a positive and a negative text (--positive / --negative)", "condition": "trigger and other prompts",
    "sae": "an SAE and features (--sae-path / --features)", "jacobians": "block Jacobians",
}
_METHODS: dict[str, SteeringMethod] = {}


def register_method(
    name: str,
    *,
    artifact: type[Artifact],
    needs: Iterable[str] = (),
    knob: str | None = None,
    at: Callable[[Any, float], Intervention] | None = None,
    summary: Callable[[Any], dict[str, Any]] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator for ``fit(model, inp)``: register it as steering method ``name``.

    Re-registering the same function (a notebook cell run twice) replaces the entry; another
    function under a taken name raises.
    """
    unknown = [n for n in needs if n not in _NEED_TEXT]
    if unknown:
        raise SteeringError(f"unknown needs {unknown}; known: {sorted(_NEED_TEXT)}")

    def deco(fit: Callable) -> Callable:
        old = _METHODS.get(name)
        if old is not None and old.fit.__qualname__ != fit.__qualname__:
            raise SteeringError(f"steering method {name!r} is already registered to {old.fit.__qualname__}")
        doc = (fit.__doc__ or "").strip().split("\n")[0]
        _METHODS[name] = SteeringMethod(name, fit, artifact, tuple(needs), knob, at, summary, doc)
        return fit

    return deco


def steering_methods() -> list[SteeringMethod]:
    """The registered methods, in registration order."""
    return list(_METHODS.values())


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def get_method(name: str) -> SteeringMethod:
    """The method registered as ``name``; raises with the known names."""
    try:
        return _METHODS[name]
    except KeyError:
        raise SteeringError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}") from None


def fit_method(name: str, model: HookedTransformer, inp: FitInput) -> Any:
    """Fit the method ``name`` (checking that the input provides what it needs)."""
    m = get_method(name)
    m.check_input(inp)
    return m.fit(model, inp)


# ----------------------------------------------------------------------------- the built-in methods


def _scale(vec: SteeringVector, g: float) -> SteeringVector:
    return vec * g


@register_method("caa", artifact=SteeringVector, needs=("contrast",), knob="multiplier", at=_scale)
def fit_caa(model: HookedTransformer, inp: FitInput) -> SteeringVector:
    """Contrastive activation addition: the mean difference of the pooled activations."""
    layers = check_layers(model, inp.layers)
    acts = inp.pool(model, inp, layers, inp.hook)
    extra = {"n_pairs": len(inp.items), "chat": inp.chat, "readout": inp.readout} if inp.items else \
        {"n_pos": len(next(iter(acts.pos.values()))), "n_neg": len(next(iter(acts.neg.values())))}
    return vector_from_pooled(model, acts, layers, inp.hook, "caa", inp.data_hash(), **extra)


@register_method("actadd", artifact=SteeringVector, needs=("texts",), knob="multiplier", at=_scale)
def fit_actadd(model: HookedTransformer, inp: FitInput) -> SteeringVector:
    """ActAdd: the difference of one positive and one negative text at the last token."""
    if len(inp.pos_texts) != 1 or len(inp.neg_texts) != 1:
        raise SteeringError(f"actadd takes one positive and one negative text, got {len(inp.pos_texts)} and {len(inp.neg_texts)}")
    return actadd_vector(model, inp.pos_texts[0], inp.neg_texts[0], inp.layers, hook=inp.hook, store=inp.store)


@register_method("pca", artifact=SteeringVector, needs=("contrast",), knob="multiplier", at=_scale)
def fit_pca(model: HookedTransformer, inp: FitInput) -> SteeringVector:
    """First principal component of the paired differences, scaled to the mean difference."""
    if inp.items and len(inp.items) < 2:
        raise SteeringError(f"PCA needs at least two A/B pairs; got {len(inp.items)}")
    layers = check_layers(model, inp.layers)
    acts = inp.pool(model, inp, layers, inp.hook)
    return pca_from_pooled(model, acts, layers, inp.hook, inp.data_hash(), n_pairs=len(inp.items), chat=inp.chat,
                           readout=inp.readout)


@register_method("sae", artifact=SteeringVector, needs=("sae",), knob="multiplier", at=_scale)
def fit_sae(model: HookedTransformer, inp: FitInput) -> SteeringVector:
    """SAE features added as their decoder directions, ``sum_f c_f W_dec[f]``, at the SAE's hook."""
    vec = feature_vector(inp.sae, list(inp.features or []), inp.coeffs)
    vec.check_model(model)
    # The SAE was trained on this model's activations: record the model, so another one refuses the file.
    vec.meta = {**fit_meta(model, "sae", layers=vec.layers, hook=vec.hook), **vec.meta}
    return vec


@register_method("cast", artifact=CAST, needs=("contrast", "condition"), knob="multiplier",
                 at=lambda cast, g: replace(cast, multiplier=float(g)),
                 summary=lambda cast: {"condition_heldout": cast.condition.meta["heldout"]} if "heldout" in cast.condition.meta else {})
def fit_cast(model: HookedTransformer, inp: FitInput) -> CAST:
    """CAST: a condition read at ``condition_layer`` gates the CAA vector (or ``inp.vector``)."""
    inp = inp.with_store(model)
    layers = check_layers(model, inp.layers)
    # Decide about two thirds of the way to the steering layer (layer 8 for 12 was best on SmolLM2).
    layer = inp.condition_layer if inp.condition_layer is not None else (2 * min(layers)) // 3
    cond = fit_condition(model, inp.trigger, inp.other, layer, chat=inp.chat, store=inp.store)
    if inp.heldout_trigger and inp.heldout_other:
        cond.meta["heldout"] = evaluate_condition(model, cond, inp.heldout_trigger, inp.heldout_other, chat=inp.chat,
                                                  store=inp.store)
    vec = inp.vector if inp.vector is not None else fit_caa(model, inp)
    return CAST(cond, vec, inp.multiplier)


@register_method("scaling", artifact=ActivationScaling, needs=("items",), summary=lambda sc: {"history": sc.meta.get("final")})
def fit_activation_scaling(model: HookedTransformer, inp: FitInput) -> ActivationScaling:
    """Activation scaling: one learned scalar per attn_out / mlp_out site of the layers."""
    layers = check_layers(model, inp.layers)
    sc, hist = fit_scaling(model, inp.items, layer_sites(layers), direction=1 if inp.multiplier >= 0 else -1,
                           chat=inp.chat, store=inp.store)
    sc.meta["final"] = hist[-1] if hist else {}
    return sc


@register_method("lqr", artifact=ALQR, needs=("contrast", "jacobians"), knob="lam",
                 at=lambda ctrl, g: ctrl.with_lambda(g))
def fit_lqr(model: HookedTransformer, inp: FitInput) -> ALQR:
    """A-LQR: setpoint from the contrast (answer position for items, last token for texts), gains
    from the Riccati recursion over the horizon."""
    jac = inp.jacobians
    assert jac is not None  # check_input
    layers = check_layers(model, inp.layers)
    horizon = list(inp.horizon) if inp.horizon is not None else [l for l in jac.layers if l >= min(layers)]
    if not horizon:
        raise SteeringError(f"the Jacobians cover layers {jac.layers}, none at or after layer {min(layers)}")
    kw: dict[str, Any] = dict(lam=inp.lam, q=inp.q, r=inp.r, qf=inp.qf, positions=inp.positions, layers=horizon,
                              concept=inp.concept, readout=inp.readout, chat=inp.chat, store=inp.store)
    if inp.items:
        return fit_alqr(model, jac, items=inp.items, **kw)
    return fit_alqr(model, jac, pos_texts=inp.pos_texts, neg_texts=inp.neg_texts, **kw)


# ----------------------------------------------------------------------------- the CAA data as input


def caa_fit_input(
    model: HookedTransformer,
    needs: Iterable[str],
    *,
    layers: Sequence[int],
    behavior: str = "refusal",
    n_fit: int = 64,
    data_dir: str | Path | None = None,
    positive: str | None = None,
    negative: str | None = None,
    jac_prompts: int = 24,
    progress: bool = False,
    jacobian_backend: Backend | None = None,
    model_name: str | None = None,
    **hyper: Any,
) -> FitInput:
    """The input ``czao-lens steer`` fits from: letter-balanced A/B items of ``behavior``; for a CAST
    condition, refusal question stems against TruthfulQA stems (half to fit, half held out);
    ActAdd's two texts; Jacobians from ``jac_prompts`` prompts (on Ray workers that load ``model_name``
    when ``jacobian_backend`` asks for Ray). Only what ``needs`` asks for is loaded. ``hyper`` sets
    other :class:`FitInput` fields (multiplier, lam, readout, sae, features...).
    """
    from czao_lens.steering.data import balance_letters, load_ab, load_truthfulqa, split_items
    from czao_lens.steering.lqr import block_jacobians

    needs = set(needs)
    inp = FitInput(layers=list(layers), **hyper)
    if needs & {"items", "contrast"}:
        inp.items = balance_letters(load_ab(behavior, "fit", data_dir=data_dir), n_fit)
    if "texts" in needs and positive and negative:
        inp.pos_texts, inp.neg_texts = [positive], [negative]
    if "condition" in needs:
        harmful = [it.stem() for it in load_ab("refusal", "fit", n=n_fit, data_dir=data_dir)]
        benign = [it.stem() for it in load_truthfulqa(n=2 * n_fit, data_dir=data_dir)]
        inp.trigger, inp.heldout_trigger = split_items(harmful, 0.5)
        inp.other, inp.heldout_other = split_items(benign, 0.5)
    if "jacobians" in needs and inp.jacobians is None:
        inp.jacobians = block_jacobians(model, n_prompts=jac_prompts, progress=progress, backend=jacobian_backend,
                                        model_name=model_name)
    return inp
