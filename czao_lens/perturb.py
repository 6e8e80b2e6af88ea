"""Perturbations as TransformerLens hook points.

A :class:`Perturbation` adds ``delta`` (or a low-rank ``A @ z``) to the activation at one hook point,
at the positions a :class:`~czao_lens.prompts.PositionSpec` selects. :func:`perturb` applies a list
of them as a context manager; :func:`attach` returns a handle. Both go through TL's own ``add_hook``
so ``model.reset_hooks()`` and the runtime's "is this hook point observed" checks see them, and both
always remove what they added, also when an exception flies through.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from czao_lens.errors import CzaoLensError
from czao_lens.prompts import PositionSpec, TokenLayout
from czao_lens.sites import layer_of, resid_hook  # noqa: F401  (resid_hook re-exported)


class PerturbationError(CzaoLensError, ValueError):
    """A perturbation does not fit the model: unknown hook, wrong shape, or non-finite values."""


def hook_layer(model: HookedTransformer, hook_name: str) -> int:
    """The block index a hook point belongs to (0 for embeddings, n_layers for the final norm)."""
    layer = layer_of(hook_name)
    if layer is not None:
        return layer
    if hook_name.startswith(("hook_embed", "hook_pos_embed", "hook_tokens")):
        return 0
    return model.cfg.n_layers


def check_hook_name(model: HookedTransformer, hook_name: str) -> HookPoint:
    """Return the hook point, or raise with the nearest valid names."""
    hp = model.hook_dict.get(hook_name)
    if hp is None:
        layer = layer_of(hook_name)
        if layer is not None and layer >= model.cfg.n_layers:
            raise PerturbationError(
                f"hook {hook_name!r}: layer {layer} is out of range; the model has {model.cfg.n_layers} layers (0..{model.cfg.n_layers - 1})"
            )
        suffix = hook_name.split(".")[-1]
        near = [n for n in model.hook_dict if n.endswith(suffix)][:3] or list(model.hook_dict)[:3]
        raise PerturbationError(f"unknown hook point {hook_name!r}; valid names look like {near}")
    return hp


def expected_width(model: HookedTransformer, hook_name: str) -> tuple[int, ...] | None:
    """Trailing activation shape at a hook, for the hooks whose shape is known from the config."""
    cfg = model.cfg
    last = hook_name.split(".")[-1]
    if last in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "hook_embed"):
        return (cfg.d_model,)
    if hook_name.endswith(("mlp.hook_pre", "mlp.hook_post", "mlp.hook_pre_linear")):
        return (cfg.d_mlp,)
    if hook_name.endswith(("attn.hook_z", "attn.hook_q")):
        return (cfg.n_heads, cfg.d_head)
    return None


def check_finite(name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        raise PerturbationError(f"{name} contains NaN or inf")


@dataclass
class Perturbation:
    """Add ``scale * delta`` to the activation at ``hook_name`` at the selected positions.

    ``delta`` is ``[*width]`` (the same for every row) or ``[batch, *width]`` (one per prompt row).
    """

    hook_name: str
    delta: Float[Tensor, "*shape"]
    positions: PositionSpec = "all"
    scale: float = 1.0

    @classmethod
    def low_rank(
        cls,
        hook_name: str,
        basis: Float[Tensor, "d r"],
        z: Float[Tensor, "*batch r"],
        positions: PositionSpec = "all",
    ) -> "Perturbation":
        """delta = A z for a basis ``A`` of shape [d, r] and coefficients ``z``."""
        if basis.ndim != 2:
            raise PerturbationError(f"basis must be [d, r], got shape {tuple(basis.shape)}")
        if z.shape[-1] != basis.shape[1]:
            raise PerturbationError(f"z has {z.shape[-1]} coefficients but the basis has rank {basis.shape[1]}")
        return cls(hook_name, z @ basis.T, positions)

    def validate(self, model: HookedTransformer) -> None:
        check_hook_name(model, self.hook_name)
        if not isinstance(self.delta, Tensor):
            raise PerturbationError(f"delta for {self.hook_name} must be a torch.Tensor")
        check_finite(f"delta for {self.hook_name}", self.delta)
        if not math.isfinite(self.scale):
            raise PerturbationError(f"scale for {self.hook_name} must be finite, got {self.scale}")
        width = expected_width(model, self.hook_name)
        if width is not None and tuple(self.delta.shape[-len(width):]) != width:
            raise PerturbationError(
                f"delta for {self.hook_name} has shape {tuple(self.delta.shape)}; the activation there has trailing shape {width}"
            )
        if self.delta.ndim > (len(width) + 1 if width else self.delta.ndim):
            raise PerturbationError(f"delta for {self.hook_name} must be [*width] or [batch, *width]")
        if not isinstance(self.positions, str):
            if len(self.positions) == 0:
                raise PerturbationError("explicit positions must not be empty")


def add_at_positions(
    act: Tensor, delta: Tensor, layout: TokenLayout | None, positions: PositionSpec, n_width_dims: int
) -> Tensor:
    """``act + delta`` at the selected positions; handles batch expansion for candidate batches."""
    batch, n_new = act.shape[0], act.shape[1]
    if layout is None:
        layout = TokenLayout.unpadded(batch, n_new)
    mask = layout.mask(positions, n_new).to(act.device)
    rows = mask.shape[0]
    if batch != rows:
        if batch % rows:
            raise PerturbationError(f"activation batch {batch} does not match the layout's {rows} rows")
        # Candidate batches are laid out row-major (row, candidate): repeat each row's mask.
        mask = mask.repeat_interleave(batch // rows, 0)
    if delta.ndim == n_width_dims + 1:  # per-row delta
        if delta.shape[0] != batch:
            if delta.shape[0] != rows:
                raise PerturbationError(f"per-row delta has {delta.shape[0]} rows; the batch has {rows}")
            delta = delta.repeat_interleave(batch // rows, 0)
        delta = delta.reshape(batch, 1, *delta.shape[1:])
    m = mask.reshape(batch, n_new, *([1] * n_width_dims)).to(act.dtype)
    return act + m * delta.to(act.dtype)


def _make_hook(p: Perturbation, layout: TokenLayout | None) -> Callable:
    def hook(act: Tensor, hook: HookPoint) -> Tensor:
        n_width = act.ndim - 2
        if tuple(act.shape[2:]) != tuple(p.delta.shape[p.delta.ndim - n_width:]):
            raise PerturbationError(
                f"delta for {p.hook_name} has shape {tuple(p.delta.shape)}, the activation is {tuple(act.shape)}"
            )
        return add_at_positions(act, p.scale * p.delta, layout, p.positions, n_width)

    return hook


def add_hook(hp: HookPoint, fn: Callable) -> Callable[[], None]:
    """Add a forward hook through TL and return a function that removes exactly that hook."""
    hp.add_hook(fn, dir="fwd")
    handle = hp.fwd_hooks[-1]

    def remove() -> None:
        handle.hook.remove()
        if handle in hp.fwd_hooks:
            hp.fwd_hooks.remove(handle)

    return remove


@dataclass
class PerturbationHandle:
    """Hooks added by :func:`attach`; ``remove()`` is idempotent."""

    removers: list[Callable[[], None]] = field(default_factory=list)

    def remove(self) -> None:
        while self.removers:
            self.removers.pop()()

    def __enter__(self) -> "PerturbationHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach_hooks(model: HookedTransformer, hooks: Iterable[tuple[str, Callable]]) -> PerturbationHandle:
    """Add ``(hook name, fn)`` pairs through TL; if any fails, remove those already added."""
    handle = PerturbationHandle()
    try:
        for name, fn in hooks:
            handle.removers.append(add_hook(check_hook_name(model, name), fn))
    except BaseException:
        handle.remove()
        raise
    return handle


class Intervention:
    """The protocol of everything that changes activations (steering vectors, CAST, A-LQR, activation
    scaling, SAE splicing): implement ``attach(model, layout) -> PerturbationHandle``, ideally through
    :func:`attach_hooks`, and get the ``apply`` context manager, which removes the hooks whatever
    happens inside. Evaluators take an ``Intervention | None`` and call ``apply`` themselves."""

    def attach(self, model: HookedTransformer, layout: TokenLayout | None = None) -> PerturbationHandle:
        raise NotImplementedError

    @contextmanager
    def apply(self, model: HookedTransformer, layout: TokenLayout | None = None) -> Iterator[PerturbationHandle]:
        handle = self.attach(model, layout)
        try:
            yield handle
        finally:
            handle.remove()


def attach(
    model: HookedTransformer,
    perturbations: Perturbation | Sequence[Perturbation],
    layout: TokenLayout | None = None,
) -> PerturbationHandle:
    """Add perturbation hooks to a model and return a handle that removes them.

    Everything is validated before any hook is added, so a bad perturbation leaves no hooks behind.
    """
    if isinstance(perturbations, Perturbation):
        perturbations = [perturbations]
    for p in perturbations:
        p.validate(model)
    return attach_hooks(model, [(p.hook_name, _make_hook(p, layout)) for p in perturbations])


@contextmanager
def perturb(
    model: HookedTransformer,
    perturbations: Perturbation | Sequence[Perturbation],
    layout: TokenLayout | None = None,
) -> Iterator[PerturbationHandle]:
    """Context manager form of :func:`attach`; hooks are removed on exit, whatever happens inside."""
    handle = attach(model, perturbations, layout)
    try:
        yield handle
    finally:
        handle.remove()
