"""A-LQR: activation steering as finite-horizon linear-quadratic tracking (arXiv 2604.19018).

Model of the residual stream at the last position, over the blocks ``l = l0 .. L-1``::

    x_{l+1} = f_l(x_l) + u_l  ~  A_l x_l + u_l        (B = I: u_l is added to block l's output)

* ``A_l`` (:func:`block_jacobians`) is the d x d Jacobian of block ``l``'s last-position output with
  respect to its last-position input, other positions held fixed (cross-token terms dropped),
  averaged over a prompt set. It is computed by reverse-mode autograd with the d output rows as a
  batch: one single-token forward/backward of block ``l`` against the prompt's frozen KV cache per
  (prompt, layer). Results are cached in the artifact layout (cfg.json + tensors.safetensors) keyed
  on the model fingerprint.
* :func:`riccati` runs the backward recursion with ``Q = qI, R = rI, Qf = qf I``::

      S_L = Qf;  P = S_{l+1} + R;  K_l = P^-1 S_{l+1} A_l;
      S_l = Q + A_l^T S_{l+1} A_l - A_l^T S_{l+1} P^-1 S_{l+1} A_l

  and raises :class:`RiccatiError` on a singular or ill-conditioned ``P``.
* The setpoint comes from contrastive means ``E_l`` (positive minus negative at the last token):
  ``v_l = E_l / |E_l|``, ``beta_l = o_l + lambda |E_l|`` with ``o_l = v_l^T (mean_pos + mean_neg) / 2``, the
  contrast's midpoint: lambda = 0.5 aims at the positive mean, 0 at the midpoint. (Until 2026-12-07 the
  setpoint was absolute, ``beta_l = lambda |E_l|``. The states' projection on ``v_l`` sits far from 0 (on
  Gemma-3-270m at layer 12, 890 for the negative mean, 1130 for the positive, with |E| = 240), so that
  setpoint lay below both means and the control pushed the wrong way; controllers saved without ``offset``
  keep it.) Online, ``e_l = (beta_l - v_l^T x_l) v_l`` and
  ``u_l = K_l e_l = (beta_l - v_l^T x_l) (K_l v_l)``; ``K_l v_l`` is precomputed, so every step is
  O(d): a dot product in a hook on ``blocks.l.hook_resid_pre`` and an axpy on ``blocks.l.hook_resid_post``.
  The feedback reads the *live* state, so it reacts to the control already applied upstream.
* ``positions="last"`` (A-LQR) steers the last prompt token and every generated token; ``"all"``
  (A-LQR+) steers every token except the first (SmolLM2's attention sink). Several concepts are
  steered at once by summing their controls (:meth:`ALQR.__add__`).
* :func:`tracking_diagnostic` measures the linearisation residuals per layer and checks the
  tracking-error bound built from the closed-loop transition matrices on held-out prompts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from czao_lens.artifacts import register_artifact
from czao_lens.distributed import RESULTS, Backend, ItemJob, WorkerPool, read_rows, run_items, tensor_from_text, tensor_to_text
from czao_lens.errors import CzaoLensError
from czao_lens.models import model_fingerprint
from czao_lens.paths import cache_root
from czao_lens.perturb import Intervention, PerturbationHandle, attach_hooks
from czao_lens.prompts import TokenLayout, encode_prompts, format_prompt, resolve_chat
from czao_lens.sites import resid_hook
from czao_lens.steering.common import (
    SteeringArtifact,
    SteeringError,
    check_layers,
    contrastive_activations,
    fit_meta,
    item_activations,
    meta_model_info,
)
from czao_lens.steering.data import NEUTRAL_PROMPTS, ABItem, items_hash, texts_hash
from czao_lens.store import ActivationStore

Positions = Literal["last", "all"]

# Extra neutral questions so the default Jacobian set has 24 distinct prompts.
_JAC_EXTRA = (
    "What is a good breakfast before a long walk?",
    "Explain how a bicycle gear works.",
    "Which planet is closest to the Sun?",
    "Write a short note thanking a neighbour.",
    "What are clouds made of?",
    "Describe the smell of rain.",
    "How does a compass find north?",
    "What is the capital of Canada?",
)


class RiccatiError(CzaoLensError, ValueError):
    """The Riccati recursion hit a singular or ill-conditioned step."""


def jacobian_prompts(model: HookedTransformer, n: int = 24, *, chat: bool | None = None) -> list[str]:
    """The default prompt set for Jacobians: short neutral questions (~30 tokens), chat-formatted when
    the model has a chat template (``chat=None``, auto), raw text for a base model."""
    pool = list(NEUTRAL_PROMPTS) + list(_JAC_EXTRA)
    if not 1 <= n <= len(pool):
        raise SteeringError(f"n_prompts must be in 1..{len(pool)} for the built-in set; pass prompts= for more")
    chat = resolve_chat(model, chat)
    return [format_prompt(model, p, chat=chat) for p in pool[:n]]


# ----------------------------------------------------------------------------- Jacobians


@register_artifact("block_jacobians")
@dataclass
class BlockJacobians(SteeringArtifact):
    """Averaged last-position block Jacobians ``A[i]`` for ``layers[i]`` (``A[i] = d out / d in``)."""

    A: Tensor  # [n_layers, d, d]
    layers: list[int]
    meta: dict = field(default_factory=dict)

    WHAT = "block Jacobians"

    def __getitem__(self, layer: int) -> Tensor:
        return self.A[self.layers.index(layer)]

    def subset(self, layers: Sequence[int]) -> "BlockJacobians":
        missing = [l for l in layers if l not in self.layers]
        if missing:
            raise SteeringError(f"no Jacobians for layers {missing}; have {self.layers[0]}..{self.layers[-1]}")
        return BlockJacobians(torch.stack([self[l] for l in layers]), list(layers), dict(self.meta))

    def check_model(self, model: HookedTransformer) -> None:
        if self.A.shape[-1] != model.cfg.d_model:
            raise SteeringError(f"Jacobians have width {self.A.shape[-1]}, the model has d_model {model.cfg.d_model}")
        check_layers(model, self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "meta": self.meta}

    def tensors(self) -> dict[str, Tensor]:
        return {"A": self.A}

    @classmethod
    def from_dict(cls, params: dict[str, Any], tensors: dict[str, Tensor]) -> "BlockJacobians":
        A, layers = tensors["A"], [int(l) for l in params["layers"]]
        if A.ndim != 3 or A.shape[0] != len(layers):
            raise SteeringError(f"saved Jacobians have shape {tuple(A.shape)} for {len(layers)} layers")
        return cls(A, layers, dict(params.get("meta", {})))

    def saved_model_info(self) -> dict[str, Any]:
        return meta_model_info(self.meta, int(self.A.shape[-1]))

    def sites(self) -> list[str]:
        return [resid_hook(l) for l in self.layers]


def _prefix_run(model: HookedTransformer, toks: Tensor, layers: Sequence[int]) -> tuple[TransformerLensKeyValueCache, dict[int, Tensor]]:
    """KV cache of all but the last token, and the last token's input to each requested block."""
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device or "cpu", 1)
    got: dict[int, Tensor] = {}
    hooks = [(resid_hook(l), (lambda l: lambda a, hook: got.__setitem__(l, a[:, -1].detach().clone()))(l)) for l in layers]
    stop = max(layers) + 1  # later blocks are not needed (and a shard of early layers is cheaper)
    with torch.no_grad():
        model(toks[:, :-1], past_kv_cache=cache, return_type=None, stop_at_layer=stop)
        with model.hooks(fwd_hooks=hooks):
            model(toks[:, -1:], past_kv_cache=cache, return_type=None, stop_at_layer=stop)
    # The second call appended the last token; drop it so each block sees only the prefix.
    for e in cache.entries:
        e.past_keys, e.past_values = e.past_keys[:, :-1], e.past_values[:, :-1]
    return cache, got


def last_position_jacobian(model: HookedTransformer, layer: int, x: Tensor, entry: TransformerLensKeyValueCacheEntry, chunk: int | None = None) -> Tensor:
    """d block_l(x)[last] / d x with the prefix K/V fixed: the d output rows as one batch."""
    d = x.shape[-1]
    chunk = chunk or d
    block = model.blocks[layer]
    rows = []
    for s in range(0, d, chunk):
        n = min(chunk, d - s)
        X = x.reshape(1, 1, d).expand(n, 1, d).clone().requires_grad_(True)
        e = TransformerLensKeyValueCacheEntry(entry.past_keys.expand(n, -1, -1, -1), entry.past_values.expand(n, -1, -1, -1), frozen=True)
        with torch.enable_grad():
            Y = block(X, past_kv_cache_entry=e)[:, 0, :]  # [n, d]
            sel = Y[torch.arange(n), torch.arange(s, s + n)].sum()
            (g,) = torch.autograd.grad(sel, X)
        rows.append(g[:, 0, :])
    return torch.cat(rows, 0)  # row i = gradient of output i


def _encode_jacobian_prompts(model: HookedTransformer, prompts: Sequence[str]) -> list[Tensor]:
    rows = [encode_prompts(model, p, chat=False).tokens for p in prompts]
    if any(t.shape[1] < 2 for t in rows):
        raise SteeringError("Jacobian prompts need at least two tokens")
    return rows


def _jacobian_sums(model: HookedTransformer, enc_rows: Sequence[Tensor], layers: Sequence[int], progress: bool = False) -> Tensor:
    """``[len(layers), d, d]``: for each layer, the sum over prompts (in prompt order) of its last-position
    Jacobian. The in-process path runs it on every layer, a Ray worker on a shard of layers: the same
    code and summation order, so the sums are the same numbers wherever they ran."""
    from tqdm.auto import tqdm

    d = model.cfg.d_model
    S = torch.zeros(len(layers), d, d)
    for toks in tqdm(enc_rows, disable=not progress, desc="jacobians"):
        cache, xs = _prefix_run(model, toks, layers)
        for i, l in enumerate(layers):
            S[i] += last_position_jacobian(model, l, xs[l][0], cache.entries[l]).detach().cpu()
    return S


@dataclass
class JacobianJob(ItemJob):
    """Block Jacobians on Ray workers (:func:`czao_lens.distributed.run_items`): an item is a shard of
    layers, its row the per-layer sums over every prompt (:func:`_jacobian_sums`), as exact bits."""

    model_name: str
    fingerprint: str  # of the driver's model: a worker that loaded other weights refuses every item
    prompts: list[str]

    def setup(self, model) -> Any:
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            raise SteeringError(f"the worker's model {self.model_name!r} (fingerprint {fp}) differs from the model the "
                                f"Jacobians are for ({self.fingerprint}); give the workers the same model")
        return _encode_jacobian_prompts(model, self.prompts)

    def run(self, model, state: Any, key: str, payload: list[int]) -> dict:
        return {"layers": list(payload), "sums": tensor_to_text(_jacobian_sums(model, state, payload))}

    def describe(self) -> dict:
        return {"job": "block_jacobians", "model": self.model_name, "fingerprint": self.fingerprint,
                "prompts_hash": texts_hash(self.prompts)}


def _jacobian_sums_on_workers(job: JacobianJob, layers: list[int], run_dir: Path, backend: Backend | None,
                              pool: WorkerPool | None, layers_per_item: int, progress: bool) -> tuple[Tensor, dict]:
    """Shards of ``layers_per_item`` layers as items of :func:`run_items` (resumable in ``run_dir``);
    the sums come back in layer order whatever order the shards finished in."""
    shards = [layers[i:i + layers_per_item] for i in range(0, len(layers), layers_per_item)]
    rep = run_items(job, [("layers" + "-".join(map(str, sh)), sh) for sh in shards], run_dir, backend, pool=pool,
                    progress=progress)
    rows = read_rows(run_dir / RESULTS)
    bad = [r for r in rows if "error" in r]
    if bad:  # a rerun must try again, not skip the failed shards: drop the run
        shutil.rmtree(run_dir, ignore_errors=True)
        raise SteeringError(f"{len(bad)} of {len(rows)} Jacobian shard(s) failed on the workers; "
                            f"{bad[0]['key']}: {bad[0]['error']}")
    sums = torch.cat([tensor_from_text(r["sums"]) for r in rows])
    info = {"backend": rep.backend, "items": len(rows), "skipped": rep.skipped,
            "workers": sorted({r["timing"]["worker"] for r in rows})}
    return sums, info


def _resumable_dir(path: Path | None) -> Path | None:
    """Where a Ray run keeps its finished shards: beside the cache entry (None without a writable cache)."""
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path.with_name(f".{path.name}.run")


def block_jacobians(
    model: HookedTransformer,
    *,
    prompts: Sequence[str] | None = None,
    n_prompts: int = 24,
    layers: Sequence[int] | None = None,
    chat: bool | None = None,
    cache_dir: str | Path | None = "default",
    progress: bool = False,
    backend: Backend | None = None,
    pool: WorkerPool | None = None,
    model_name: str | None = None,
    layers_per_item: int = 4,
) -> BlockJacobians:
    """Average last-position Jacobians of the blocks over ``prompts`` (default: built-in set of ``n_prompts``,
    formatted as :func:`jacobian_prompts` says for ``chat``).

    Cached on disk under ``cache_dir`` (default ``$CZAO_LENS_CACHE/jacobians``; ``None`` disables it),
    one artifact folder per model fingerprint, prompt set and layers. ``meta["seconds"]`` records how
    long the computation took.

    With a Ray ``backend`` (or an open ``pool``) the layers are split into shards of ``layers_per_item``
    and each shard runs on a worker (which loads ``model_name``, default ``model.cfg.model_name``, and
    must get the same weights); the result equals the in-process one. An interrupted run resumes
    from the shards already finished (kept beside the cache entry until it is written).
    """
    layers = check_layers(model, layers if layers is not None else range(model.cfg.n_layers))
    prompts = list(prompts) if prompts is not None else jacobian_prompts(model, n_prompts, chat=chat)
    if not prompts:
        raise SteeringError("block_jacobians needs at least one prompt")
    if layers_per_item < 1:
        raise SteeringError(f"layers_per_item must be >= 1, got {layers_per_item}")
    fp = model_fingerprint(model)
    key = hashlib.sha256(f"{fp}|{texts_hash(prompts)}|{layers}".encode()).hexdigest()[:16]
    path = None
    if cache_dir is not None:
        root = cache_root() / "jacobians" if cache_dir == "default" else Path(cache_dir)
        path = root / f"{fp}-{key}"
        if path.exists():
            try:
                return BlockJacobians.load(path, model)
            except CzaoLensError as exc:  # damaged or stale: recompute, and replace the entry below
                warnings.warn(f"czao-lens: the Jacobian cache entry {path} is unreadable ({exc}); recomputing it.")
    t0 = time.perf_counter()
    enc_rows = _encode_jacobian_prompts(model, prompts)
    extra: dict[str, Any] = {}
    run_dir = None
    if pool is not None or (backend is not None and backend.uses_ray):
        job = JacobianJob(pool.model_name if pool is not None else (model_name or model.cfg.model_name), fp, prompts)
        run_dir = _resumable_dir(path)
        tmp = None if run_dir is not None else Path(tempfile.mkdtemp(prefix="czao-lens-jac-"))
        try:
            S, extra["distributed"] = _jacobian_sums_on_workers(job, layers, run_dir or tmp, backend, pool, layers_per_item, progress)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    else:
        S = _jacobian_sums(model, enc_rows, layers, progress)
    A = S / len(enc_rows)
    seconds = time.perf_counter() - t0
    jac = BlockJacobians(A, layers, {"fingerprint": fp, "model_name": model.cfg.model_name, "n_layers": model.cfg.n_layers,
                                     "n_prompts": len(prompts), "mean_tokens": sum(t.shape[1] for t in enc_rows) / len(enc_rows),
                                     "seconds": seconds, "prompts_hash": texts_hash(prompts), **extra})
    if path is not None:
        _save_atomic(jac, path)
        if "distributed" in extra and run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)  # the shards are in the entry now
    return jac


def _save_atomic(obj: SteeringArtifact, path: Path) -> None:
    """Write to a temporary folder and rename it, so a reader never sees half a cache entry.

    A damaged entry already at ``path`` is moved aside first (a non-empty folder cannot be replaced);
    an unwritable cache folder is a warning, not a failure: the result is still returned to the caller.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        obj.save(tmp)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        warnings.warn(f"czao-lens: cannot write the Jacobian cache {path.parent} ({exc}); the Jacobians are not cached.")
        return
    try:
        if path.exists():
            try:
                type(obj).load(path)  # a good entry written meanwhile by another process: keep it
                shutil.rmtree(tmp, ignore_errors=True)
                return
            except CzaoLensError:
                old = path.with_name(f".{path.name}.{os.getpid()}.old")
                os.replace(path, old)
                shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, path)
    except OSError:  # another process wrote the same entry first (a non-empty folder cannot be replaced)
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- Riccati


@dataclass
class LQRGains:
    """Feedback gains ``K[i]`` for ``layers[i]`` and the cost-to-go matrices ``S`` (``S[-1] = Qf``)."""

    K: Tensor
    S: Tensor
    layers: list[int]
    q: float
    r: float
    qf: float
    max_condition: float


def riccati(A: Tensor | BlockJacobians, *, q: float = 0.5, r: float = 2.0, qf: float = 1.0, max_condition: float = 1e8,
            layers: Sequence[int] | None = None) -> LQRGains:
    """Finite-horizon discrete Riccati recursion with B = I (see the module docstring)."""
    if isinstance(A, BlockJacobians):
        layers = A.layers
        A = A.A
    A = A.double()
    if A.ndim != 3 or A.shape[1] != A.shape[2]:
        raise RiccatiError(f"A must be [n_layers, d, d], got {tuple(A.shape)}")
    n, d, _ = A.shape
    layers = list(layers) if layers is not None else list(range(n))
    if min(q, r, qf) < 0:
        raise RiccatiError(f"costs must be non-negative (q={q}, r={r}, qf={qf})")
    eye = torch.eye(d, dtype=torch.float64)
    S = [None] * (n + 1)
    K = [None] * n
    S[n] = qf * eye
    worst = 0.0
    for i in range(n - 1, -1, -1):
        Snext = S[i + 1]
        P = Snext + r * eye
        cond = float(torch.linalg.cond(P))
        worst = max(worst, cond)
        if not torch.isfinite(P).all() or not cond < max_condition:
            raise RiccatiError(
                f"Riccati step at layer {layers[i]} is singular or ill-conditioned: cond(S + R) = {cond:.3g} "
                f"(limit {max_condition:.0e}); use r > 0 or a larger qf"
            )
        SA = Snext @ A[i]
        K[i] = torch.linalg.solve(P, SA)
        Si = q * eye + A[i].T @ SA - SA.T @ K[i]
        Si = 0.5 * (Si + Si.T)
        if not torch.isfinite(Si).all():
            raise RiccatiError(f"Riccati cost-to-go became non-finite at layer {layers[i]}")
        S[i] = Si
    return LQRGains(torch.stack(K).float(), torch.stack(S).float(), layers, q, r, qf, worst)


# ----------------------------------------------------------------------------- the controller


@register_artifact("alqr")
@dataclass
class ALQR(Intervention, SteeringArtifact):
    """A-LQR feedback steering, one or more concepts; ``attach``/``apply`` add O(d) hooks per layer."""

    layers: list[int]
    v: Tensor  # [n_concepts, n_layers, d] unit setpoint directions
    E_norm: Tensor  # [n_concepts, n_layers] |E_l|
    Kv: Tensor  # [n_concepts, n_layers, d] = K_l v_l
    lam: Tensor  # [n_concepts]
    positions: Positions = "last"
    meta: dict = field(default_factory=dict)
    offset: Tensor | None = None  # [n_concepts, n_layers] v_l^T of the contrast's midpoint (None: 0, the old absolute setpoint)

    WHAT = "A-LQR controller"

    def __post_init__(self) -> None:
        # A controller read from a file must be whole: shapes that disagree fail here, not mid-forward.
        v, E, K, lam = self.v, self.E_norm, self.Kv, self.lam
        if not all(isinstance(t, Tensor) and t.is_floating_point() for t in (v, E, K, lam)):
            raise SteeringError("A-LQR tensors v, E_norm, Kv and lam must be floating-point tensors")
        if v.ndim != 3 or K.shape != v.shape or E.shape != v.shape[:2] or lam.shape != v.shape[:1]:
            raise SteeringError(
                f"A-LQR tensors disagree: v {tuple(v.shape)} and Kv {tuple(K.shape)} must be [concepts, layers, d], "
                f"E_norm {tuple(E.shape)} [concepts, layers], lam {tuple(lam.shape)} [concepts]")
        if len(self.layers) != v.shape[1]:
            raise SteeringError(f"A-LQR has {len(self.layers)} layers but tensors for {v.shape[1]}")
        if not all(torch.isfinite(t).all() for t in (v, E, K, lam)):
            raise SteeringError("A-LQR tensors contain NaN or inf")
        if self.offset is not None:
            o = self.offset
            if not (isinstance(o, Tensor) and o.is_floating_point() and o.shape == E.shape and torch.isfinite(o).all()):
                raise SteeringError(f"A-LQR offset must be finite floats of shape {tuple(E.shape)} [concepts, layers]")

    @property
    def beta(self) -> Tensor:
        """The setpoint per concept and layer: the midpoint's projection plus lambda |E_l|."""
        base = self.offset if self.offset is not None else torch.zeros_like(self.E_norm)
        return base + self.lam[:, None] * self.E_norm

    def _with(self, **changes) -> "ALQR":
        return replace(self, meta=dict(self.meta), **changes)

    def with_lambda(self, lam: float | Sequence[float]) -> "ALQR":
        lam_t = torch.as_tensor(lam, dtype=torch.float32).reshape(-1)
        if lam_t.numel() == 1:
            lam_t = lam_t.expand(self.v.shape[0]).clone()
        if lam_t.numel() != self.v.shape[0]:
            raise SteeringError(f"one lambda per concept ({self.v.shape[0]}), got {lam_t.numel()}")
        return self._with(lam=lam_t)

    def with_positions(self, positions: Positions) -> "ALQR":
        _check_positions(positions)
        return self._with(positions=positions)

    def __add__(self, other: "ALQR") -> "ALQR":
        """Steer two concepts at once: their controls add (the gains must come from the same Riccati run)."""
        if other.layers != self.layers or other.positions != self.positions:
            raise SteeringError("concepts can be summed only over the same layers and positions")
        cat = lambda a, b: torch.cat([a, b], 0)  # noqa: E731
        zero = lambda c: c.offset if c.offset is not None else torch.zeros_like(c.E_norm)  # noqa: E731
        offset = None if self.offset is None and other.offset is None else cat(zero(self), zero(other))
        return ALQR(self.layers, cat(self.v, other.v), cat(self.E_norm, other.E_norm), cat(self.Kv, other.Kv),
                    cat(self.lam, other.lam), self.positions, {**self.meta, "concepts": [self.meta.get("concept"), other.meta.get("concept")]},
                    offset)

    def _mask(self, act: Tensor, layout: TokenLayout | None) -> Tensor:
        b, n = act.shape[:2]
        if layout is None:
            layout = TokenLayout.unpadded(b, n)
        if self.positions == "last":
            m = layout.mask("last_prompt", n) | layout.mask("generated", n)
        else:
            m = layout.mask("all", n) & (layout.token_index(n) >= 1)
        if m.shape[0] != b:
            m = m.repeat_interleave(b // m.shape[0], 0)
        return m.to(act.device)

    def check_model(self, model: HookedTransformer) -> None:
        """Raise if the controller's width or layers do not fit ``model``."""
        if self.v.shape[-1] != model.cfg.d_model:
            raise SteeringError(f"A-LQR controller has width {self.v.shape[-1]}, the model has d_model {model.cfg.d_model}")
        check_layers(model, self.layers)

    def attach(self, model: HookedTransformer, layout: TokenLayout | None = None, *, record: list | None = None) -> PerturbationHandle:
        """Add the feedback hooks. With ``record`` (a list), each layer's control vectors are appended to it."""
        self.check_model(model)
        beta = self.beta
        state: dict[int, Tensor] = {}
        hooks: list[tuple[str, Callable]] = []
        for i, l in enumerate(self.layers):
            v_i, kv_i, b_i = self.v[:, i], self.Kv[:, i], beta[:, i]

            def read(act: Tensor, hook, l=l, v_i=v_i, kv_i=kv_i, b_i=b_i) -> None:
                # coefficient per concept: beta - v^T x, at the steered positions only
                coef = b_i.to(act.dtype) - act @ v_i.T.to(act.dtype)  # [b, n, c]
                u = coef @ kv_i.to(act.dtype)  # [b, n, d]
                state[l] = u * self._mask(act, layout)[..., None].to(act.dtype)

            def write(act: Tensor, hook, l=l) -> Tensor:
                u = state.pop(l, None)
                if u is None or u.shape != act.shape:
                    return act
                if record is not None:
                    record.append((l, u.detach()))
                return act + u

            hooks += [(resid_hook(l), read), (resid_hook(l, "post"), write)]
        return attach_hooks(model, hooks)

    # ------------------------------------------------------------------ the artifact layout

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "positions": self.positions, "meta": self.meta}

    def tensors(self) -> dict[str, Tensor]:
        t = {"v": self.v, "E_norm": self.E_norm, "Kv": self.Kv, "lam": self.lam}
        return t if self.offset is None else {**t, "offset": self.offset}

    @classmethod
    def from_dict(cls, params: dict[str, Any], tensors: dict[str, Tensor]) -> "ALQR":
        _check_positions(params["positions"])
        return cls([int(l) for l in params["layers"]], tensors["v"], tensors["E_norm"], tensors["Kv"], tensors["lam"],
                   params["positions"], dict(params.get("meta", {})), tensors.get("offset"))

    def saved_model_info(self) -> dict[str, Any]:
        return meta_model_info(self.meta, int(self.v.shape[-1]))

    def sites(self) -> list[str]:
        return [h for l in self.layers for h in (resid_hook(l), resid_hook(l, "post"))]


def _check_positions(positions: str) -> None:
    if positions not in ("last", "all"):
        raise SteeringError(f"positions must be 'last' (A-LQR) or 'all' (A-LQR+), got {positions!r}")


def fit_alqr(
    model: HookedTransformer,
    jac: BlockJacobians,
    *,
    items: Sequence[ABItem] | None = None,
    pos_texts: Sequence[str] | None = None,
    neg_texts: Sequence[str] | None = None,
    lam: float = 1.0,
    q: float = 0.5,
    r: float = 2.0,
    qf: float = 1.0,
    positions: Positions = "last",
    layers: Sequence[int] | None = None,
    concept: str = "",
    readout: str = "letter",
    chat: bool = True,
    store: ActivationStore | None = None,
) -> ALQR:
    """Fit the setpoint from A/B ``items`` (answer-letter token, as CAA; the question chat-formatted when
    ``chat``, raw for a base model) or from ``pos_texts``/``neg_texts`` (last token), solve the Riccati
    recursion over ``layers`` (default: all layers ``jac`` covers), and return the controller."""
    _check_positions(positions)
    if items is not None:
        if not items:
            raise SteeringError("A-LQR needs at least one A/B pair; got none")
        data_hash = items_hash(items)
    elif pos_texts and neg_texts:
        data_hash = texts_hash(list(pos_texts) + ["\x00"] + list(neg_texts))
    else:
        raise SteeringError("A-LQR needs A/B items or both positive and negative texts")
    layers = list(layers) if layers is not None else list(jac.layers)
    if layers != list(range(layers[0], layers[-1] + 1)):
        raise SteeringError(f"A-LQR layers must be contiguous (a horizon), got {layers}")
    J = jac.subset(layers)
    gains = riccati(J, q=q, r=r, qf=qf)
    if items is not None:
        P, N = item_activations(model, items, layers, readout=readout, chat=chat, store=store)
    else:
        P, N = contrastive_activations(model, pos_texts, neg_texts, layers, hook="resid_pre", store=store, paired=False)
    E = torch.stack([P[l].mean(0) - N[l].mean(0) for l in layers])
    mid = torch.stack([(P[l].mean(0) + N[l].mean(0)) / 2 for l in layers])
    zero = E.norm(dim=-1) <= 1e-6 * torch.stack([P[l].norm(dim=-1).mean() for l in layers])
    if zero.all():
        raise SteeringError("the contrastive mean difference is zero at every layer: no setpoint direction")
    # A layer with no contrast (e.g. the embeddings of letter-balanced pairs) gets no setpoint: v = 0, u = 0.
    En = torch.where(zero, torch.zeros_like(E[:, 0]), E.norm(dim=-1))
    v = torch.where(zero[:, None], torch.zeros_like(E), E / E.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    Kv = torch.einsum("lij,lj->li", gains.K, v)
    offset = (v * mid).sum(-1)  # the midpoint's projection (0 where a layer has no setpoint)
    meta = fit_meta(model, "alqr", concept=concept, q=q, r=r, qf=qf, data_hash=data_hash,
                    jacobian_prompts=jac.meta.get("n_prompts"), max_condition=gains.max_condition, readout=readout,
                    **({"chat": chat} if items is not None else {}))
    return ALQR(layers, v[None], En[None], Kv[None], torch.tensor([float(lam)]), positions, meta, offset[None])


# ----------------------------------------------------------------------------- tracking diagnostic


@torch.no_grad()
def _trajectories(model: HookedTransformer, texts: Sequence[str], layers: list[int], ctrl: ALQR | None) -> tuple[Tensor, Tensor | None]:
    """Last-position states x_{l0..L} (resid_pre of each layer, then resid_post of the last) and controls u_l."""
    xs, us = [], []
    last = layers[-1]
    names = [resid_hook(l) for l in layers] + [resid_hook(last, "post")]
    for t in texts:
        toks = encode_prompts(model, t, chat=False).tokens
        got: dict[str, Tensor] = {}
        rec: list = []
        handle = ctrl.attach(model, record=rec) if ctrl is not None else PerturbationHandle()
        try:
            hooks = [(n, (lambda n: lambda a, hook: got.__setitem__(n, a[0, -1].clone()))(n)) for n in names]
            with model.hooks(fwd_hooks=hooks):
                model(toks, stop_at_layer=last + 1)
        finally:
            handle.remove()
        xs.append(torch.stack([got[n] for n in names]))
        if ctrl is not None:
            u = dict((l, v[0, -1]) for l, v in rec)
            us.append(torch.stack([u.get(l, torch.zeros(model.cfg.d_model)) for l in layers]))
    return torch.stack(xs), (torch.stack(us) if ctrl is not None else None)


@torch.no_grad()
def tracking_diagnostic(
    model: HookedTransformer,
    ctrl: ALQR,
    jac: BlockJacobians,
    fit_texts: Sequence[str],
    heldout_texts: Sequence[str],
) -> dict:
    """Linearisation residuals and the tracking bound (last-position controller).

    With deviations ``delta_l = x_l(steered) - x_l(clean)``, the measured residual is
    ``w_l = delta_{l+1} - A_l delta_l - u_l``. Its per-layer size ``eps_l`` (max over ``fit_texts``)
    bounds how far the steered projection can drift from the linear closed-loop prediction:
    ``|v_l^T (delta_l - delta_l^lin)| <= sum_k |Phi(l, k+1)^T v_l| eps_k`` with the closed-loop
    transitions ``M_j = A_j - sum_c (K_j v_j^c) v_j^c^T``. The bound is checked on ``heldout_texts``.
    """
    layers = ctrl.layers
    A = jac.subset(layers).A
    n = len(layers)
    V, Kv, beta = ctrl.v, ctrl.Kv, ctrl.beta  # [c, n, d], [c, n, d], [c, n]

    def residuals(texts):
        xc, _ = _trajectories(model, texts, layers, None)
        xs, us = _trajectories(model, texts, layers, ctrl)
        delta = xs - xc  # [p, n+1, d]
        w = delta[:, 1:] - torch.einsum("lij,plj->pli", A, delta[:, :-1]) - us
        # linear closed-loop prediction from the same start
        lin = [delta[:, 0]]
        for i in range(n):
            x_lin = xc[:, i] + lin[-1]
            coef = beta[:, i][None] - x_lin @ V[:, i].T  # [p, c]
            u = coef @ Kv[:, i]
            lin.append(lin[-1] @ A[i].T + u)
        lin = torch.stack(lin, 1)
        drift = torch.stack([((delta[:, i] - lin[:, i]) @ V[:, i].T).abs().amax(-1) for i in range(n)], 1)  # [p, n]
        err = torch.stack([(beta[:, i][None] - xs[:, i] @ V[:, i].T).abs().amax(-1) for i in range(n)], 1)
        err0 = torch.stack([(beta[:, i][None] - xc[:, i] @ V[:, i].T).abs().amax(-1) for i in range(n)], 1)
        return w, drift, err, err0, delta

    w_fit, _, _, _, delta_fit = residuals(fit_texts)
    eps = w_fit.norm(dim=-1).amax(0)  # [n]
    M = A.clone()
    for c in range(V.shape[0]):
        M = M - torch.einsum("li,lj->lij", Kv[c], V[c])
    bound = torch.zeros(n)
    for i in range(n):
        for c in range(V.shape[0]):
            g = V[c, i].clone()
            total = 0.0
            for k in range(i - 1, -1, -1):  # w_k enters x_{k+1}; Phi(i, k+1) = M_{i-1} .. M_{k+1}
                total += float(g.norm()) * float(eps[k])
                g = g @ M[k]
            bound[i] = max(float(bound[i]), total)
    _, drift_ho, err_ho, err0_ho, delta_ho = residuals(heldout_texts)
    worst = drift_ho.amax(0)
    rel_res = (w_fit.norm(dim=-1) / delta_fit[:, 1:].norm(dim=-1).clamp_min(1e-6)).mean(0)
    return {
        "layers": layers,
        "residual_eps": eps.tolist(),
        "relative_residual": rel_res.tolist(),
        "bound": bound.tolist(),
        "heldout_drift": worst.tolist(),
        "holds": bool((worst <= bound + 1e-4 * (1 + bound)).all()),
        "heldout_tracking_error": err_ho.mean(0).tolist(),
        "heldout_tracking_error_unsteered": err0_ho.mean(0).tolist(),
    }
