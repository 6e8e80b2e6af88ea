"""Determinism: the same command with the same seed gives byte-identical outputs across two processes.

Two fresh processes run ``generate`` (sampled, seeded), ``czao`` and a CAA ``steer`` fit on the real
model, side by side; their texts, JSON outputs (timings removed) and saved vectors must be identical
byte for byte. ``bench --quick`` takes minutes per run on a busy 2-core machine, so two of them do not
fit the test budget; docs/reliability.md gives the result of a two-process run of a bench subset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = '{"type": "avoid_tokens", "words": ["blue"]}'
CHILD = r"""
import functools, sys
from typer.testing import CliRunner
from czao_lens import cli
from czao_lens.cli import app
cli._load = functools.lru_cache(cli._load)  # one model load per process for the three commands
out, spec = sys.argv[1], sys.argv[2]
for args in (
    ["generate", "-p", "My favorite color is", "--no-chat", "--sample", "--seed", "3", "-n", "10", "--out", out + "/generate.json"],
    ["czao", "-p", "My favorite color is", "--no-chat", "--constraint", spec, "-n", "5", "--seed", "3", "--out", out + "/czao"],
    ["steer", "--method", "caa", "--layer", "10", "--n-fit", "8", "--out", out + "/steer"],
):
    res = CliRunner().invoke(app, args)
    if res.exit_code:
        sys.exit(f"{args[0]} failed ({res.exit_code}): {res.output[-2000:]}")
"""
TIMING = ("second", "tok_s", "elapsed", "wall")


def without_timings(obj):
    """The object with every timing field dropped (they are the only thing allowed to differ)."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if not any(t in k.lower() for t in TIMING)}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


@pytest.mark.real
def test_same_seed_same_bytes_across_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runs = [tmp_path / "a", tmp_path / "b"]
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(r), SPEC], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in runs]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    a, b = runs
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".gguf"))
    assert {str(f) for f in files} >= {"generate.json", "czao/czao.json", "steer/caa/tensors.safetensors",
                                        "steer/caa/cfg.json", "steer/caa/vector.gguf"}
    for f in files:
        if f.suffix == ".json":
            ja, jb = (without_timings(json.loads((r / f).read_text())) for r in runs)
            assert json.dumps(ja, sort_keys=True) == json.dumps(jb, sort_keys=True), f"{f} differs between processes"
        else:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f"{f} differs between processes"
    texts = json.loads((a / "generate.json").read_text())["texts"]
    assert texts[0].strip(), "the sampled generation is empty"


def test_timing_filter_keeps_everything_else():
    row = {"text": "x", "seconds": 1.0, "unsteered_seconds": 2, "tokens_per_second": 3, "records": [{"seconds": 1, "z": [1]}]}
    assert without_timings(row) == {"text": "x", "records": [{"z": [1]}]}
