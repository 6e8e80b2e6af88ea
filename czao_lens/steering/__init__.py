"""Steering methods: contrastive vectors (CAA / ActAdd / PCA), SAE features, CAST, activation
scaling and A-LQR, plus their shared data loading and evaluation. Submodules import lazily."""

from czao_lens.steering.data import ABItem, SteeringDataError, load_ab, load_truthfulqa
from czao_lens.steering.vectors import (
    SteeringError,
    SteeringVector,
    actadd_vector,
    caa_vector,
    compose,
    pca_vector,
)

__all__ = [
    "ABItem", "SteeringDataError", "SteeringError", "SteeringVector", "actadd_vector", "caa_vector",
    "compose", "load_ab", "load_truthfulqa", "pca_vector",
]

METHODS = ("caa", "actadd", "pca", "sae", "cast", "scaling", "lqr")


def fit_steering(
    method: str,
    model,
    *,
    behavior: str = "refusal",
    layers: list[int] | None = None,
    n_fit: int = 64,
    multiplier: float = 2.0,
    lam: float = 1.0,
    positive: str | None = None,
    negative: str | None = None,
    sae=None,
    features: list[int] | None = None,
    jac_prompts: int = 24,
    readout: str = "letter",
    data_dir=None,
    out=None,
):
    """Fit one steering method from the CAA data and save it; the engine of ``czao-lens steer``.

    Returns ``(object, intervention, info)``: the fitted vector / controller, a factory
    ``intervention(layout) -> context manager`` for :mod:`czao_lens.steering.evaluate`, and a dict
    with the saved file paths and a short summary.
    """
    from pathlib import Path

    from czao_lens.steering.data import balance_letters, load_ab, load_truthfulqa

    if method not in METHODS:
        raise SteeringError(f"unknown method {method!r}; choose one of {METHODS}")
    layers = layers or [10]
    out = Path(out) if out is not None else None
    info: dict = {"method": method, "layers": layers, "files": []}

    def save(obj, name):
        if out is not None:
            info["files"].append(str(obj.save(out / name)))

    def fit_items():
        return balance_letters(load_ab(behavior, "fit", data_dir=data_dir), n_fit)

    if method in ("caa", "pca", "actadd"):
        if method == "actadd":
            if not positive or not negative:
                raise SteeringError("actadd needs --positive and --negative texts")
            vec = actadd_vector(model, positive, negative, layers)
        else:
            vec = (caa_vector if method == "caa" else pca_vector)(model, fit_items(), layers, readout=readout)
        save(vec, "vector.safetensors")
        if out is not None:
            try:
                info["files"].append(str(vec.to_gguf(out / "vector.gguf")))
            except SteeringError as exc:
                info["gguf"] = str(exc)
        return vec, (lambda lay: vec.apply(model, multiplier, layout=lay)), info
    if method == "sae":
        from czao_lens.steering.sae import feature_vector

        if sae is None or not features:
            raise SteeringError("sae steering needs an SAE (--sae-path) and --features")
        vec = feature_vector(sae, features, multiplier)
        save(vec, "vector.safetensors")
        return vec, (lambda lay: vec.apply(model, 1.0, layout=lay)), info
    if method == "cast":
        from czao_lens.steering.cast import CAST, evaluate_condition, fit_condition
        from czao_lens.steering.data import split_items

        harmful = [it.stem() for it in load_ab("refusal", "fit", n=n_fit, data_dir=data_dir)]
        benign = [it.stem() for it in load_truthfulqa(n=2 * n_fit, data_dir=data_dir)]
        h_fit, h_test = split_items(harmful, 0.5)
        b_fit, b_test = split_items(benign, 0.5)
        # Decide about two thirds of the way to the steering layer (layer 8 for 12 was best on SmolLM2).
        cond = fit_condition(model, h_fit, b_fit, (2 * min(layers)) // 3)
        vec = caa_vector(model, fit_items(), layers, readout=readout)
        cast = CAST(cond, vec, multiplier)
        info["condition_heldout"] = evaluate_condition(model, cond, h_test, b_test)
        save(vec, "vector.safetensors")
        if out is not None:
            import json

            out.mkdir(parents=True, exist_ok=True)
            p = out / "condition.json"
            p.write_text(json.dumps({"layer": cond.layer, "hook": cond.hook, "threshold": cond.threshold,
                                     "direction": cond.direction.tolist(), "center": cond.center.tolist(), "meta": cond.meta}))
            info["files"].append(str(p))
        return cast, (lambda lay: cast.apply(model, lay)), info
    if method == "scaling":
        from czao_lens.steering.scaling import fit_scaling, layer_sites

        sc, hist = fit_scaling(model, fit_items(), layer_sites(layers), direction=1 if multiplier >= 0 else -1)
        info["history"] = hist[-1]
        if out is not None:
            import json

            out.mkdir(parents=True, exist_ok=True)
            p = out / "scaling.json"
            p.write_text(json.dumps({"sites": sc.sites, "alpha": sc.alpha.tolist(), "meta": sc.meta}))
            info["files"].append(str(p))
        return sc, (lambda lay: sc.apply(model, lay)), info
    # lqr
    from czao_lens.steering.lqr import block_jacobians, fit_alqr

    jac = block_jacobians(model, n_prompts=jac_prompts, progress=True)
    info["jacobian_seconds"] = jac.meta.get("seconds")
    ctrl = fit_alqr(model, jac, items=fit_items(), lam=lam, concept=behavior, readout=readout,
                    layers=list(range(min(layers), model.cfg.n_layers)))
    save(ctrl, "controller.safetensors")
    return ctrl, (lambda lay: ctrl.apply(model, lay)), info
