"""Build constraints from small JSON specs, and let users register their own constraint types.

Spec format (JSON only)::

    {"type": "avoid_tokens", "words": ["blue"], "threshold": 0.05}   # a registered type + its params
    {"all": [spec, spec, ...]}                                        # And: sum of violations
    {"any": [spec, spec, ...]}                                        # Or: min of violations
    {"weight": 2.0, "constraint": spec}                               # Weighted
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Callable, TypeVar

from czao_lens.constraints.base import And, Constraint, ConstraintError, Or, Weighted

_REGISTRY: dict[str, type[Constraint]] = {}
_COMPOSITE_KEYS = ("all", "any", "weight")

C = TypeVar("C", bound=type)


def register(name: str) -> Callable[[C], C]:
    """Class decorator: make a Constraint subclass buildable from ``{"type": name, ...}``.

    Put it above ``@dataclass`` so it sees the finished class. Re-registering the same class name (e.g. a
    notebook cell run twice) replaces the entry; registering a different class under a taken name fails.
    """
    if not isinstance(name, str) or not name.strip() or name in _COMPOSITE_KEYS:
        raise ConstraintError(f"register: invalid constraint type name {name!r}.")

    def deco(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, Constraint)):
            raise ConstraintError(f"register('{name}') decorates Constraint subclasses, got {cls!r}.")
        old = _REGISTRY.get(name)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ConstraintError(f"The constraint type '{name}' is already registered to {old.__qualname__}.")
        cls.type_name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def known_types() -> list[str]:
    """All registered type names (built-ins and user types), sorted."""
    return sorted(_REGISTRY)


def constraint_from_spec(spec: dict[str, Any]) -> Constraint:
    """Turn a spec dict (see module docstring) into a Constraint; errors name the offending part."""
    if isinstance(spec, Constraint):
        return spec
    if not isinstance(spec, dict):
        raise ConstraintError(f"A constraint spec must be a JSON object, got {type(spec).__name__}: {spec!r}")
    if "all" in spec or "any" in spec:
        key = "all" if "all" in spec else "any"
        _no_extra_keys(spec, {key})
        items = spec[key]
        if not isinstance(items, list) or not items:
            raise ConstraintError(f'"{key}" needs a non-empty list of constraint specs, got {items!r}.')
        parts = [constraint_from_spec(s) for s in items]
        return And(*parts) if key == "all" else Or(*parts)
    if "weight" in spec:
        _no_extra_keys(spec, {"weight", "constraint"})
        if "constraint" not in spec:
            raise ConstraintError('A "weight" spec needs a "constraint": {"weight": 2.0, "constraint": {...}}.')
        return Weighted(constraint_from_spec(spec["constraint"]), spec["weight"])
    if "type" not in spec:
        raise ConstraintError(
            f'A constraint spec needs "type" (or "all" / "any" / "weight"), got keys {sorted(spec)}. '
            f"Known types: {', '.join(known_types())}."
        )
    name = spec["type"]
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ConstraintError(f"Unknown constraint type {name!r}. Known types: {', '.join(known_types())}.")
    params = {k: v for k, v in spec.items() if k != "type"}
    accepted = [p for p in inspect.signature(cls).parameters if not p.startswith("_")]
    unknown = [k for k in params if k not in accepted]
    if unknown:
        raise ConstraintError(f"{name}: unknown parameter(s) {unknown}; accepted: {accepted}.")
    try:
        return cls(**params)
    except TypeError as exc:  # e.g. a missing required parameter
        raise ConstraintError(f"{name}: {exc}; accepted parameters: {accepted}.") from exc


def load_constraint(source: str | Path) -> Constraint:
    """Build a constraint from a ``.json`` file path or an inline JSON string (JSON only, never pickle)."""
    if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith(("{", "["))):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConstraintError(f"{source!s} is neither an existing .json file nor an inline JSON object.")
        if path.suffix.lower() != ".json":
            raise ConstraintError(f"{path} is not a .json file; constraint specs are JSON only.")
        text, where = path.read_text(encoding="utf-8"), str(path)
    elif isinstance(source, str):
        text, where = source, "inline JSON"
    else:
        raise ConstraintError(f"load_constraint expects a path or a JSON string, got {type(source).__name__}.")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConstraintError(f"Invalid JSON in {where}: {exc}") from exc
    return constraint_from_spec(spec)


def _no_extra_keys(spec: dict, allowed: set[str]) -> None:
    extra = set(spec) - allowed
    if extra:
        raise ConstraintError(f"Unexpected key(s) {sorted(extra)} in composite spec {spec!r}.")
