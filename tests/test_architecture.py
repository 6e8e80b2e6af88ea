"""The architecture as checked properties: one error root, no upward imports, no cycles."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

from typer.testing import CliRunner

import czao_lens
from czao_lens import CzaoLensError
from czao_lens.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(czao_lens.__path__, "czao_lens."))


def test_every_error_class_derives_from_the_root():
    errors = []
    for name in _modules():
        mod = importlib.import_module(name)
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__.startswith("czao_lens"):
                errors.append(cls)
    assert len(set(errors)) >= 12  # the package defines at least the dozen error types it had
    bad = sorted({c.__qualname__ for c in errors if not issubclass(c, CzaoLensError)})
    assert not bad, f"error classes outside CzaoLensError: {bad}"


def test_layer_contract_names_every_top_level_module():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    top = next(c for c in cfg if c["type"] == "layers" and "containers" not in c)
    listed = {name.strip() for layer in top["layers"] for name in layer.split("|")}
    have = {".".join(m.split(".")[:2]) for m in _modules()}
    assert have == listed, f"missing from the contract: {sorted(have - listed)}; stale: {sorted(listed - have)}"


def test_import_graph_has_no_cycle():
    import grimp  # installed with import-linter, a dev dependency

    g = grimp.build_graph("czao_lens")
    mods = sorted(g.modules)
    adj = {m: g.find_modules_directly_imported_by(m) for m in mods}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(adj[m]):
            if state.get(n) == 1:
                return path + [m, n]
            if n not in state and (cyc := visit(n, path + [m])):
                return cyc
        state[m] = 2
        return None

    for m in mods:
        if m not in state:
            cyc = visit(m, [])
            assert cyc is None, "import cycle: " + " -> ".join(cyc[cyc.index(cyc[-1]):])


def test_import_contracts_are_kept():
    exe = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]


def test_cli_prints_a_package_error_as_one_line_with_exit_2():
    r = CliRunner().invoke(app, ["generate", "-p", "hi", "--model", "/no/such/model.gguf"])
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) <= 3 and "Unknown model" in r.output and "Traceback" not in r.output


def test_cli_debug_flag_shows_the_exception():
    r = CliRunner().invoke(app, ["--debug", "generate", "-p", "hi", "--model", "/no/such/model.gguf"])
    assert r.exit_code == 1 and isinstance(r.exception, CzaoLensError)


def test_package_contracts_name_every_submodule():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    inner = {c["containers"][0]: {n.strip() for layer in c["layers"] for n in layer.split("|")}
             for c in cfg if c["type"] == "layers" and "containers" in c}
    assert set(inner) == {"czao_lens.constraints", "czao_lens.diagnostics", "czao_lens.steering", "czao_lens.bench",
                          "czao_lens.studies"}
    for pkg, listed in inner.items():
        have = {m.split(".")[2] for m in _modules() if m.startswith(pkg + ".")}
        assert have == listed, f"{pkg}: missing {sorted(have - listed)}, stale {sorted(listed - have)}"
