"""One on-disk layout for every fitted object (vector, controller, CAST condition, predictor, probe).

A saved object is a folder::

    cfg.json              {"type", "version", "model": {name, fingerprint, d_model, n_layers},
                           "sites": [hook names], "params": {hyperparameters and metadata}}
    tensors.safetensors   every tensor, by name

:func:`load` reads any of them back by dispatching on ``type`` through the registry that
:func:`register_artifact` fills. Nothing is unpickled: JSON and safetensors only. A file made for
another model is refused when a model is given.

A class takes part by subclassing :class:`Artifact` and implementing ``to_dict`` / ``tensors`` /
``from_dict``; ``save`` and ``load`` come with it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import Tensor

from czao_lens.errors import ArtifactError, CzaoLensError

FORMAT_VERSION = 1
CFG_FILE = "cfg.json"
TENSORS_FILE = "tensors.safetensors"

_REGISTRY: dict[str, type["Artifact"]] = {}
T = TypeVar("T", bound="Artifact")


def register_artifact(type_name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make ``type_name`` loadable by :func:`load`."""

    def deco(cls: type[T]) -> type[T]:
        if type_name in _REGISTRY and _REGISTRY[type_name] is not cls:
            raise ArtifactError(f"artifact type {type_name!r} is registered twice")
        cls.ARTIFACT_TYPE = type_name
        _REGISTRY[type_name] = cls
        return cls

    return deco


def artifact_types() -> list[str]:
    """The registered types, sorted."""
    return sorted(_REGISTRY)


def model_info(model: Any) -> dict[str, Any]:
    """What a saved object records about the model it was made for."""
    from czao_lens.models import model_fingerprint

    cfg = model.cfg
    return {"name": cfg.model_name, "fingerprint": model_fingerprint(model), "d_model": int(cfg.d_model),
            "n_layers": int(cfg.n_layers)}


def check_model(info: dict[str, Any] | None, model: Any, what: str, *, strict_fingerprint: bool = True) -> None:
    """Refuse ``model`` if ``info`` (from :func:`model_info`) says the object was made for another one."""
    if not info:
        return
    cfg = model.cfg
    for key, have in (("d_model", cfg.d_model), ("n_layers", cfg.n_layers)):
        want = info.get(key)
        if want is not None and int(want) != int(have):
            raise ArtifactError(
                f"{what} was made for {info.get('name', '?')} with {key} {want}; {cfg.model_name} has {key} {have}"
            )
    fp = info.get("fingerprint")
    if strict_fingerprint and fp is not None:
        from czao_lens.models import model_fingerprint

        if fp != model_fingerprint(model):
            raise ArtifactError(
                f"{what} was made for model {info.get('name', '?')} (fingerprint {fp}); this model's fingerprint is "
                f"{model_fingerprint(model)}. Pass strict_fingerprint=False to use it anyway."
            )


def _jsonable(obj: Any) -> Any:
    """JSON with NaN/inf written as strings, so cfg.json stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """Checksum of named tensors (names, dtypes, shapes, bytes): recorded in the safetensors metadata."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_artifact(
    path: str | Path,
    type_name: str,
    params: dict[str, Any],
    tensors: dict[str, Tensor],
    *,
    model: dict[str, Any] | None = None,
    sites: list[str] | None = None,
) -> Path:
    """Write one object as ``path/cfg.json`` + ``path/tensors.safetensors``; returns the folder."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{path} is a file; a saved object is a folder (cfg.json + tensors.safetensors)")
    path.mkdir(parents=True, exist_ok=True)
    cls = _REGISTRY.get(type_name)
    cfg = {"type": type_name, "version": FORMAT_VERSION, "module": cls.__module__ if cls else None,
           "model": model or {}, "sites": list(sites or []), "params": params}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path / TENSORS_FILE), metadata={"sha256": tensors_sha256(tensors)})
    (path / CFG_FILE).write_text(json.dumps(_jsonable(cfg), indent=1, allow_nan=False))
    return path


def read_artifact(path: str | Path, expect: str | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read ``cfg.json`` and the tensors of a saved object, checking the layout (and the type if given)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"nothing saved at {path}")
    if not path.is_dir():
        raise ArtifactError(f"{path} is a file; a saved object is a folder with {CFG_FILE} and {TENSORS_FILE}")
    try:
        cfg = json.loads((path / CFG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path} has no {CFG_FILE}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path / CFG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("type"), str) or not isinstance(cfg.get("params", {}), dict):
        raise ArtifactError(f"{path / CFG_FILE} has no 'type' / 'params'; it was not written by czao-lens")
    if cfg.get("version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {cfg.get('version')!r}; this czao-lens reads {FORMAT_VERSION}. Fit it again.")
    if expect is not None and cfg["type"] != expect:
        raise ArtifactError(f"{path} holds a {cfg['type']!r}, not a {expect!r}")
    tensors: dict[str, Tensor] = {}
    tpath = path / TENSORS_FILE
    if not tpath.exists():
        raise ArtifactError(f"{path} has no {TENSORS_FILE}")
    try:
        with safe_open(str(tpath), framework="pt") as f:
            want = (f.metadata() or {}).get("sha256")
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as exc:  # safetensors raises several types for a bad header
        raise ArtifactError(f"{tpath} is not a readable safetensors file: {exc}") from None
    if want is not None and want != tensors_sha256(tensors):  # files written before checksums have none
        raise ArtifactError(f"{tpath}: the tensors do not match their recorded checksum (edited or damaged); fit it again")
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ArtifactError(f"{tpath}: tensor {k!r} contains NaN or inf")
    return cfg, tensors


class Artifact:
    """Mixin for fitted objects saved in the one layout. Subclasses implement ``to_dict``,
    ``tensors`` and ``from_dict``, and may override ``model_info`` / ``sites``."""

    ARTIFACT_TYPE: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """Hyperparameters and metadata (JSON-able), everything but the tensors."""
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor]:
        """The tensors to save, by name."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[T], params: dict[str, Any], tensors: dict[str, Tensor]) -> T:
        """Rebuild from what :meth:`to_dict` and :meth:`tensors` returned; validate and raise on bad input."""
        raise NotImplementedError

    def saved_model_info(self) -> dict[str, Any]:
        """The model this object was fitted on (see :func:`model_info`); empty if unknown."""
        return {}

    def sites(self) -> list[str]:
        """The hook points this object writes to or reads from."""
        return []

    def restore_saved(self, model: dict[str, Any], sites: list[str]) -> None:
        """Called by :func:`load` with the file's model record and sites; objects that keep them
        (so a re-save keeps the fingerprint) override it."""

    def save(self, path: str | Path) -> Path:
        """Save as ``path/cfg.json`` + ``path/tensors.safetensors``."""
        if not self.ARTIFACT_TYPE:
            raise ArtifactError(f"{type(self).__name__} is not registered with register_artifact")
        return save_artifact(path, self.ARTIFACT_TYPE, self.to_dict(), self.tensors(),
                             model=self.saved_model_info(), sites=self.sites())

    @classmethod
    def load(cls: type[T], path: str | Path, model: Any = None, *, strict_fingerprint: bool = True) -> T:
        """Load a saved object of this class; with ``model``, refuse one made for another model."""
        return load(path, model, strict_fingerprint=strict_fingerprint, expect=cls)


def load(path: str | Path, model: Any = None, *, strict_fingerprint: bool = True, expect: type | None = None) -> Any:
    """Load any saved czao-lens object, dispatching on its ``type``; with ``model``, check it fits."""
    cfg, tensors = read_artifact(path)
    cls = _REGISTRY.get(cfg["type"])
    module = cfg.get("module")
    if cls is None and isinstance(module, str) and module.startswith("czao_lens."):
        # Types register when their module is imported; the file names that module (ours only).
        import importlib

        try:
            importlib.import_module(module)
        except ImportError:
            pass
        cls = _REGISTRY.get(cfg["type"])
    if cls is None:
        raise ArtifactError(f"{path} holds an unknown type {cfg['type']!r}; known: {artifact_types()}")
    if expect is not None and not issubclass(cls, expect):
        raise ArtifactError(f"{path} holds a {cfg['type']!r}, not a {getattr(expect, 'ARTIFACT_TYPE', '') or expect.__name__!r}")
    if model is not None:
        check_model(cfg.get("model"), model, f"{cfg['type']} at {path}", strict_fingerprint=strict_fingerprint)
    try:
        obj = cls.from_dict(cfg.get("params", {}), tensors)
        obj.restore_saved(cfg.get("model") or {}, list(cfg.get("sites") or []))
        return obj
    except CzaoLensError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ArtifactError(f"{path}: malformed {cfg['type']!r}: {exc!r}") from None
