"""Sparse SAEs trained once per (model fingerprint, hook, recipe) and cached, like the model conversion.

A :class:`SAERecipe` says everything that decides an SAE: the architecture (TopK through SAELens, or
JumpReLU with a target L0), width, k, the corpus (how many of the model's own generations, whether
the data folder's texts join them: every bench pool left out), the training tokens and the
optimiser. :func:`cached_sae` returns the SAE for ``(model, hook, recipe)``: from
``<cache root>/sae/<model>-<fingerprint>/<hook>-<recipe key>/`` when that folder verifies (every
file's SHA-256 against ``manifest.json``), else it trains one under an exclusive lock (so two
processes train once), writes it to a temporary folder and moves it in atomically. A folder that
is truncated or corrupted is rebuilt; :func:`load_cached_sae` refuses it (and an SAE made for
another model or hook) with :class:`~czao_lens.sae.SAEError`.

The folder is SAELens' own (``cfg.json`` + ``sae_weights.safetensors``, so ``SAE.load_from_disk``
reads it) plus ``quality.json`` (the held-out report of :func:`czao_lens.sae.sae_quality`, with the
corpus and training numbers), ``recipe.json`` and ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from transformer_lens import HookedTransformer

from czao_lens.models import cache_lock, file_sha256, model_fingerprint, publish_folder
from czao_lens.paths import cache_root, default_data_dir
from czao_lens.sae import (
    ARCHITECTURES, SAEError, check_sae_fits, check_sae_hook, collect_activations, pack_windows, sae_quality,
    sparse_corpus, train_sparse_sae,
)

MANIFEST = "manifest.json"
SAE_FILES = ("cfg.json", "sae_weights.safetensors", "quality.json", "recipe.json")
CACHE_FORMAT = 1


@dataclass(frozen=True)
class SAERecipe:
    """Everything that decides a sparse SAE apart from the model and the hook."""

    architecture: str = "topk"
    width: int = 2304  # 4 x d_model of SmolLM2-135M (8x doubles a training that already takes most of an hour here)
    k: int = 48  # TopK: active latents per token; JumpReLU: the target L0
    training_tokens: int = 2_000_000
    batch_tokens: int = 4096
    lr: float = 4e-4
    context_size: int = 128
    n_generations: int = 32
    max_new_tokens: int = 96
    generation_batch: int = 32
    include_data: bool = True
    eval_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAEError(f"unknown SAE architecture {self.architecture!r}; choose from {', '.join(ARCHITECTURES)}")
        for name in ("width", "k", "batch_tokens", "max_new_tokens", "generation_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SAEError(f"recipe {name} must be a positive integer, got {v!r}")
        if self.k > self.width:
            raise SAEError(f"recipe k ({self.k}) must not exceed width ({self.width})")
        if self.training_tokens < self.batch_tokens:
            raise SAEError(f"recipe training_tokens ({self.training_tokens}) must be >= batch_tokens ({self.batch_tokens})")
        if self.context_size < 2:
            raise SAEError("recipe context_size must be >= 2")
        if self.n_generations < 0:
            raise SAEError("recipe n_generations must be >= 0")
        if not 0.0 < self.eval_fraction < 0.5:
            raise SAEError("recipe eval_fraction must be in (0, 0.5)")
        if not self.lr > 0:
            raise SAEError("recipe lr must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAERecipe":
        if not isinstance(d, dict):
            raise SAEError("an SAE recipe must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SAEError(f"unknown SAE recipe field(s) {unknown}; known: {', '.join(sorted(known))}")
        try:
            return cls(**d)
        except TypeError as exc:
            raise SAEError(f"bad SAE recipe: {exc}") from None

    def key(self) -> str:
        """A short stable id of the recipe (part of the cache folder name)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


# Named recipes: "default" is the measured one (docs/sae.md); "tiny" is for tests and CI (seconds).
RECIPES: dict[str, SAERecipe] = {
    "default": SAERecipe(),
    # The default at 15% of its tokens: for bench runs on a budget (two models in one sitting on 2 cores).
    "short": SAERecipe(training_tokens=300_000),
    "tiny": SAERecipe(width=64, k=4, training_tokens=2048, batch_tokens=64, lr=2e-3, context_size=16,
                      n_generations=8, max_new_tokens=16, generation_batch=8, include_data=False, eval_fraction=0.25),
}


def recipe_from(name_or_path: str | Path) -> SAERecipe:
    """A named recipe (:data:`RECIPES`) or a JSON file holding a recipe's fields."""
    if str(name_or_path) in RECIPES:
        return RECIPES[str(name_or_path)]
    p = Path(name_or_path)
    if not p.exists():
        raise SAEError(f"unknown SAE recipe {str(name_or_path)!r}: not one of {', '.join(RECIPES)} and not a file")
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise SAEError(f"could not read the SAE recipe {p}: {exc}") from None
    return SAERecipe.from_dict(d)


def sae_cache_folder(model: HookedTransformer, hook_name: str, recipe: SAERecipe, root: str | Path | None = None) -> Path:
    base = Path(root) if root is not None else cache_root() / "sae"
    name = str(model.cfg.model_name).replace("/", "_")
    return base / f"{name}-{model_fingerprint(model)}" / f"{hook_name}-{recipe.key()}"


def verify_folder(folder: str | Path) -> dict[str, Any]:
    """Check a cached SAE folder against its manifest; return the manifest or raise :class:`SAEError`."""
    folder = Path(folder)
    try:
        man = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        raise SAEError(f"{folder} is not a cached czao-lens SAE (no readable {MANIFEST})") from None
    if man.get("format") != CACHE_FORMAT:
        raise SAEError(f"{folder}: unknown SAE cache format {man.get('format')!r}")
    for name, want in man.get("files", {}).items():
        p = folder / name
        if not p.exists():
            raise SAEError(f"{folder} is incomplete: {name} is missing")
        if p.stat().st_size != want["size"]:
            raise SAEError(f"{folder}/{name} is truncated or altered ({p.stat().st_size} bytes, expected {want['size']})")
        if file_sha256(p) != want["sha256"]:
            raise SAEError(f"{folder}/{name} is corrupted (SHA-256 does not match the manifest)")
    return man


def load_cached_sae(folder: str | Path, model: HookedTransformer | None = None, hook_name: str | None = None, *,
                    device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """Load a verified cached SAE; refuse it if it was made for another model or another hook.

    Returns ``(sae, quality)``. Checks run before the weights are read.
    """
    from sae_lens import SAE

    folder = Path(folder)
    man = verify_folder(folder)
    if model is not None:
        check_made_for(man, model, hook_name)
    elif hook_name is not None and man.get("hook_name") != hook_name:
        raise SAEError(f"the SAE in {folder} reads {man.get('hook_name')}, not {hook_name}")
    try:
        sae = SAE.load_from_disk(str(folder), device=device)
    except Exception as exc:
        raise SAEError(f"could not load the SAE in {folder}: {exc}") from exc
    if model is not None:
        check_sae_fits(model, sae)
    return sae, json.loads((folder / "quality.json").read_text())


def open_sae(path: str | Path, *, device: str = "cpu") -> tuple[Any, dict[str, Any] | None]:
    """An SAE folder given by a user: a cached one is verified against its manifest first (truncated or
    corrupted files refused); a plain SAELens folder is loaded as is. Returns ``(sae, manifest or None)``;
    pass the manifest to :func:`check_made_for` once the model is loaded."""
    from czao_lens.sae import load_sae

    p = Path(path).expanduser()
    if (p / MANIFEST).exists():
        man = verify_folder(p)
        sae, _ = load_cached_sae(p, device=device)
        return sae, man
    return load_sae(p, device=device), None


def check_made_for(manifest: dict[str, Any] | None, model: HookedTransformer, hook_name: str | None = None) -> None:
    """Refuse a cached SAE (its manifest) made for another model or another hook."""
    if manifest is None:
        return
    fp = model_fingerprint(model)
    if manifest.get("model_fingerprint") != fp:
        raise SAEError(f"the SAE was trained on {manifest.get('model_name')} (fingerprint {manifest.get('model_fingerprint')}), "
                       f"not on {model.cfg.model_name} (fingerprint {fp})")
    if hook_name is not None and manifest.get("hook_name") != hook_name:
        raise SAEError(f"the SAE reads {manifest.get('hook_name')}, not {hook_name}")


def _valid(folder: Path) -> bool:
    try:
        verify_folder(folder)
        return True
    except SAEError:
        return False


def build_sae(model: HookedTransformer, hook_name: str, recipe: SAERecipe, out_dir: str | Path, *,
              data_dir: str | Path | None = None, progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Corpus, activations, SAELens training and the held-out quality report, written to ``out_dir``.

    The corpus texts are split (seeded) into training and held-out texts before packing, so the report
    reads text the SAE never trained on. Returns ``(sae, quality)``.
    """
    check_sae_hook(model, hook_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    texts, corpus = sparse_corpus(model, data_dir, n_generations=recipe.n_generations, max_new_tokens=recipe.max_new_tokens,
                                  batch_size=recipe.generation_batch, include_data=recipe.include_data, seed=recipe.seed,
                                  progress=progress)
    n_eval = max(1, int(round(len(texts) * recipe.eval_fraction)))
    if len(texts) - n_eval < 1:
        raise SAEError(f"the corpus has {len(texts)} texts: too few to hold {n_eval} out")
    train_w = pack_windows(model, texts[n_eval:], recipe.context_size)
    eval_w = pack_windows(model, texts[:n_eval], recipe.context_size)
    t1 = time.perf_counter()
    acts = collect_activations(model, train_w, hook_name, progress=progress)
    act_seconds = time.perf_counter() - t1
    sae, train_info = train_sparse_sae(model, hook_name, acts, architecture=recipe.architecture, width=recipe.width,
                                       k=recipe.k, training_tokens=recipe.training_tokens, batch_tokens=recipe.batch_tokens,
                                       lr=recipe.lr, seed=recipe.seed, out_dir=out, progress=progress)
    del acts
    quality = sae_quality(model, sae, eval_w, hook_name=hook_name, progress=progress)
    quality.update({
        "model_name": model.cfg.model_name, "model_fingerprint": model_fingerprint(model), "recipe": recipe.to_dict(),
        "corpus": {**corpus, "data_dir": str(data_dir or default_data_dir()) if recipe.include_data else None,
                   "train_windows": int(train_w.shape[0]), "eval_windows": int(eval_w.shape[0]),
                   "eval_texts": n_eval, "activation_seconds": round(act_seconds, 1)},
        "training": train_info, "total_seconds": round(time.perf_counter() - t0, 1),
        "excluded_positions": "position 0 of every window (attention sink) and special tokens",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    (out / "quality.json").write_text(json.dumps(quality, indent=1))
    (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1))
    files = {n: {"size": (out / n).stat().st_size, "sha256": file_sha256(out / n)} for n in SAE_FILES}
    (out / MANIFEST).write_text(json.dumps({
        "format": CACHE_FORMAT, "model_name": model.cfg.model_name, "model_fingerprint": model_fingerprint(model),
        "hook_name": hook_name, "recipe": recipe.to_dict(), "recipe_key": recipe.key(), "files": files}, indent=1))
    return sae, quality


def cached_sae(model: HookedTransformer, hook_name: str, recipe: SAERecipe | str = "default", *,
               data_dir: str | Path | None = None, root: str | Path | None = None, rebuild: bool = False,
               train: bool = True, progress: bool = True) -> tuple[Any, dict[str, Any], Path]:
    """The SAE for ``(model, hook, recipe)``: loaded from the cache when it verifies, else trained once.

    Returns ``(sae, quality, folder)``. A corrupted or truncated cache folder is rebuilt (with a
    warning); two processes asking at once train once (the second waits on the lock). With
    ``train=False`` a missing SAE is an :class:`SAEError` instead.
    """
    import warnings

    rec = recipe_from(recipe) if isinstance(recipe, (str, Path)) else recipe
    check_sae_hook(model, hook_name)
    folder = sae_cache_folder(model, hook_name, rec, root)
    dev = str(model.cfg.device or "cpu")
    if not rebuild and _valid(folder):
        sae, q = load_cached_sae(folder, model, hook_name, device=dev)
        return sae, q, folder
    if not train:
        raise SAEError(f"no cached SAE for {model.cfg.model_name} at {hook_name} with this recipe ({folder}); "
                       "train it once with `czao-lens sae train`")
    with cache_lock(folder):
        if not rebuild and _valid(folder):  # another process trained it while this one waited
            sae, q = load_cached_sae(folder, model, hook_name, device=dev)
            return sae, q, folder
        if folder.exists():
            warnings.warn(f"czao-lens: the cached SAE {folder} is incomplete or corrupted; training it again.")
        for stale in folder.parent.glob(folder.name + ".*"):  # a killed run's temporary folder: only lock holders write one
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        try:
            build_sae(model, hook_name, rec, tmp, data_dir=data_dir, progress=progress)
            publish_folder(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    sae, q = load_cached_sae(folder, model, hook_name, device=dev)
    return sae, q, folder
