"""A command line that answers at once, and stays quiet.

``--help`` (and every subcommand's) must not import torch, TransformerLens or SAELens; one sanity
bound on its wall-clock time (the speed itself is measured in benchmarks/cli_startup.py, not here).
Library chatter (TransformerLens' dtype/device prints, Hugging Face logging) is off unless --verbose.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import czao_lens
from czao_lens.cli import app

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
HEAVY = ("torch", "transformer_lens", "sae_lens", "transformers", "czao_lens.models")
runner = CliRunner()

CHILD = r"""
import sys
from typer.testing import CliRunner
import czao_lens.cli as cli
from czao_lens import CzaoLensError, DEFAULT_MODEL
r = CliRunner()
for cmd in ([], ["models"], ["generate"], ["trace"], ["lyapunov"], ["czao"], ["landscape"], ["steer"], ["demo"], ["bench"],
            ["probe"], ["probe", "train"], ["sae"], ["sae", "train"], ["sae", "features"]):
    res = r.invoke(cli.app, cmd + ["--help"])
    assert res.exit_code == 0 and "Usage" in res.output, (cmd, res.output)
heavy = [m for m in %r if m in sys.modules]
print("heavy:", ",".join(heavy) or "none")
"""


def test_help_imports_no_heavy_library():
    res = subprocess.run([sys.executable, "-c", CHILD % (HEAVY,)], env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("heavy: none"), res.stdout


def test_help_answers_within_a_sanity_bound():
    """Not a benchmark: a bound 5-10x above the quiet-machine time, catching a heavy import at start-up
    (which cost 5 s before; benchmarks/cli_startup.py measures the real figure)."""
    times = []
    for _ in range(2):
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "czao_lens.cli", "--help"], env=ENV, capture_output=True, text=True, timeout=120)
        times.append(time.perf_counter() - t)
        assert res.returncode == 0 and "Usage" in res.stdout, res.stderr[-1000:]
    assert min(times) < 3.0, f"czao-lens --help took {min(times):.1f} s"


def test_package_names_load_lazily():
    from czao_lens import CzaoLensError, ModelLoadError, load_model  # noqa: F401  (the public names still import)

    assert issubclass(ModelLoadError, CzaoLensError)
    assert callable(load_model) and {"load_model", "ModelLoadError"} <= set(dir(czao_lens))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        czao_lens.nope  # noqa: B018


def test_library_logging_is_quiet_unless_verbose(monkeypatch):
    logger = logging.getLogger("transformers")
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    assert runner.invoke(app, ["--verbose", "models"]).exit_code == 0
    assert logger.level == logging.NOTSET
    assert runner.invoke(app, ["models"]).exit_code == 0
    assert logger.level == logging.ERROR


@pytest.mark.real
def test_commands_print_no_library_chatter(smol, tmp_path):
    res = runner.invoke(app, ["generate", "-p", "Hi", "-n", "2", "--out", str(tmp_path / "g.json")])
    assert res.exit_code == 0, res.output
    for chatter in ("Moving model to device", "Changing model dtype"):
        assert chatter not in res.output
