"""The czao-lens command line: foundation and CZAO commands, and their clear errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from czao_lens.cli import app

runner = CliRunner()


def test_models_lists_embedded():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0, res.output
    assert "smollm2-135m-instruct" in res.output and "gemma-3-270m" in res.output


@pytest.mark.real
def test_generate_writes_json(smol, tmp_path):
    out = tmp_path / "g.json"
    res = runner.invoke(app, ["generate", "-p", "What is the capital of France?", "-n", "8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert "Paris" in data["texts"][0]


def test_generate_unknown_model_and_empty_prompt():
    res = runner.invoke(app, ["generate", "-p", "hi", "--model", "no-such-model"])
    assert res.exit_code == 2 and "Unknown model" in res.output


@pytest.mark.real
def test_czao_side_by_side(smol, tmp_path):
    spec = json.dumps({"type": "avoid_tokens", "words": ["blue"]})
    res = runner.invoke(app, ["czao", "-p", "My favorite color is", "--no-chat", "--constraint", spec,
                              "-n", "6", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "czao.json").read_text())
    assert rows[0]["unsteered_satisfied"] is False and rows[0]["czao"]["satisfied"] is True
    assert (tmp_path / "telemetry_0.html").exists()
    assert "unsteered [VIOLATES]" in res.output and "czao      [ok" in res.output


def test_czao_bad_inputs(tmp_path):
    res = runner.invoke(app, ["czao", "-p", "x", "--constraint", '{"type": "no_such_type"}', "--out", str(tmp_path)])
    assert res.exit_code == 2 and "bad constraint spec" in res.output
    res = runner.invoke(app, ["czao", "-p", "x", "--constraint", '{"type": "avoid_tokens", "words": ["a"]}',
                              "--kl-eps", "0", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "KL bound of 0" in res.output
    res = runner.invoke(app, ["czao", "-p", "x", "--constraint", '{"type": "avoid_tokens", "words": ["a"]}',
                              "--layers-json", str(tmp_path / "missing.json"), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "does not exist" in res.output


@pytest.mark.real
def test_landscape_writes_grids_and_html(smol, tmp_path):
    spec = json.dumps({"type": "avoid_tokens", "words": ["blue"]})
    res = runner.invoke(app, ["landscape", "-p", "My favorite color is", "--no-chat", "--constraint", spec,
                              "--layer", "12", "--n", "5", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    grids = load_file(str(tmp_path / "landscape.safetensors"))
    loss = grids["layer12.loss"]
    assert loss.shape == (5, 5)
    # The centre (z = 0) violates the constraint; some corner of the grid must be lower.
    assert loss[2, 2] > loss.min()
    assert (tmp_path / "landscape.html").stat().st_size > 10_000
