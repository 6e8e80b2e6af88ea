"""Sparse autoencoders through SAELens: a training corpus, training, loading and quality numbers.

* :func:`build_corpus` — the model's own sampled generations from diverse prompts, plus the prompt
  data sets of the data folder (CAA questions, TruthfulQA prompts, RealToxicityPrompts lines), plus
  any text file or Hugging Face dataset (online users).
* :func:`train_sae` — SAELens' own ``LanguageModelSAETrainingRunner`` with ``override_model`` (the
  loaded ``HookedTransformer``) and ``override_dataset`` (an in-memory ``datasets.Dataset`` built
  from the texts). wandb is off. The SAE is saved with SAELens' inference format
  (``cfg.json`` + ``sae_weights.safetensors``) and read back with ``SAE.load_from_disk``.
* :func:`load_sae` — a local SAELens folder, or a registry release (``SAE.from_pretrained``).
* :func:`sae_stats` — explained variance, L0 and dead fraction on held-out text.

Position 0 (the attention sink of models without BOS, whose residual norm is ~100x the others) is
kept out everywhere: SAELens packs texts into ``context_size`` windows, and ``seqpos_slice=(1,
None)`` drops the first position of every window before activations reach the SAE. The separator
tokens between packed texts are dropped too (``exclude_special_tokens=True``). :func:`sae_stats`
also reads positions > 0 only.
"""

from __future__ import annotations

import json
import random
import signal
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from czao_lens.errors import DiagnosticError
from czao_lens.paths import default_data_dir
from czao_lens.prompts import resolve_chat
from czao_lens.sites import check_layers, layer_of
from czao_lens.perturb import PerturbationError, check_hook_name, expected_width


class SAEError(DiagnosticError):
    """Bad input to SAE training, loading or feature selection."""


# ----------------------------------------------------------------------------- corpus

# Diverse seed prompts for the model's own generations: facts, reasoning, code, stories, advice,
# opinions, refusals, emotions, lists. Written for this project.
CORPUS_PROMPTS: tuple[str, ...] = (
    "Explain how photosynthesis works in simple terms.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are three tips for learning a new language?",
    "Write a Python function that checks whether a string is a palindrome.",
    "Describe the water cycle to a ten-year-old.",
    "What is the capital of Australia, and why was it chosen?",
    "Give me a recipe for a quick vegetable soup.",
    "Summarize the causes of the French Revolution.",
    "How do I politely decline an invitation to a party?",
    "Write a haiku about autumn leaves.",
    "What is the difference between weather and climate?",
    "Explain what a black hole is.",
    "I feel anxious before exams. What can I do?",
    "Write an angry complaint letter about a late train.",
    "Write a cheerful birthday message for a friend.",
    "How do vaccines train the immune system?",
    "What happened during the Apollo 11 mission?",
    "Explain recursion with an example.",
    "What are the pros and cons of remote work?",
    "Tell me how to pick a lock.",
    "How can I make a bomb?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "List five animals that live in the Arctic.",
    "Why is the sky blue?",
    "Write a product review for a pair of noisy headphones.",
    "Describe your ideal weekend.",
    "What is 17 times 23? Show your work.",
    "Explain the rules of chess briefly.",
    "Write a sad poem about losing a pet.",
    "What is machine learning?",
    "Give me a workout plan for beginners.",
    "Describe the city of Tokyo.",
    "What should I do if my computer will not turn on?",
    "Write a dialogue between a cat and a dog.",
    "What are the health benefits of drinking water?",
    "Explain how a bill becomes a law in the United States.",
    "Insult me in the most creative way you can.",
    "Who wrote Romeo and Juliet, and what is it about?",
    "Write SQL to count the orders per customer.",
    "What is the meaning of life?",
    "Explain inflation to a teenager.",
    "Write a news headline about a new discovery on Mars.",
    "How do I bake sourdough bread?",
    "Describe the feeling of winning a race.",
    "What are the planets of the solar system?",
    "Is it ever okay to lie? Give your opinion.",
    "Write a formal email asking for a deadline extension.",
    "How does a car engine work?",
)


def data_texts(data_dir: str | Path) -> list[str]:
    """Prompt texts from a data folder: CAA questions, TruthfulQA prompts, RTP lines (whatever exists)."""
    root = Path(data_dir)
    texts: list[str] = []
    for f in sorted(root.glob("caa/*/*.json")):
        try:
            items = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for it in items if isinstance(items, list) else []:
            q = it.get("question") if isinstance(it, dict) else None
            if isinstance(q, str) and q.strip():
                texts.append(q)
    tqa = root / "truthfulqa" / "truthful_qa.json"
    if tqa.exists():
        for it in json.loads(tqa.read_text()):
            if isinstance(it, dict) and isinstance(it.get("prompt"), str):
                texts.append(it["prompt"])
    for f in sorted(root.glob("rtp/rtp_*.txt")):
        texts += [line.strip() for line in f.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return list(dict.fromkeys(texts))  # dedupe (test and generate splits share questions), keep order


def text_file_texts(path: str | Path) -> list[str]:
    """One text per paragraph (blank-line separated); a file without blank lines gives one per line."""
    path = Path(path)
    if not path.exists():
        raise SAEError(f"{path} does not exist")
    raw = path.read_text(encoding="utf-8", errors="replace")
    paras = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if len(paras) <= 1:
        paras = [line.strip() for line in raw.splitlines() if line.strip()]
    return paras


def hf_dataset_texts(name: str, *, split: str = "train", column: str = "text", limit: int = 10_000) -> list[str]:
    """Texts from a Hugging Face dataset (streamed; needs the hub, so online users only)."""
    try:
        from datasets import load_dataset

        ds = load_dataset(name, split=split, streaming=True)
        out = []
        for row in ds:
            t = row.get(column)
            if isinstance(t, str) and t.strip():
                out.append(t)
            if len(out) >= limit:
                break
    except Exception as exc:  # offline, unknown name, missing column...
        raise SAEError(
            f"could not read the Hugging Face dataset {name!r} (split {split!r}, column {column!r}): {exc}. "
            "Offline, pass a local text file instead."
        ) from exc
    if not out:
        raise SAEError(f"the Hugging Face dataset {name!r} has no text in column {column!r}")
    return out


def build_corpus(
    model: HookedTransformer,
    data_dir: str | Path | None = None,
    n_generations: int = 96,
    text_file: str | Path | None = None,
    hf_dataset: str | None = None,
    seed: int = 0,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    include_data: bool = True,
    chat: bool | None = None,
    hf_split: str = "train",
    hf_column: str = "text",
    hf_limit: int = 10_000,
    progress: bool = False,
) -> list[str]:
    """A shuffled training corpus: the model's sampled generations plus data-set and user texts.

    Generations: ``n_generations`` answers sampled (``greedy=False``, temperature 0.8, top-p 0.95) to
    :data:`CORPUS_PROMPTS` cycled, chat-formatted when the model has a chat template (``chat=None``;
    raw prompts on a base model such as Gemma-3-270m), in batches, each stored as
    ``prompt + "\\n" + answer``. ``data_dir`` (default: ``czao_lens.paths.default_data_dir()``) adds
    the CAA / TruthfulQA / RTP prompts when it exists; a ``data_dir`` given explicitly must exist.
    """
    from czao_lens.generate import generate

    texts: list[str] = []
    if n_generations < 0:
        raise SAEError("n_generations must be >= 0")
    chat = resolve_chat(model, chat) if n_generations else False
    for start in range(0, n_generations, batch_size):
        n = min(batch_size, n_generations - start)
        prompts = [CORPUS_PROMPTS[(start + i) % len(CORPUS_PROMPTS)] for i in range(n)]
        res = generate(model, prompts, max_new_tokens=max_new_tokens, greedy=False, temperature=0.8, top_p=0.95,
                       seed=seed + start, chat=chat, progress=progress)
        texts += [f"{p}\n{t.strip()}" for p, t in zip(prompts, res.texts)]
    if include_data:
        explicit = data_dir is not None
        root = Path(data_dir) if explicit else default_data_dir()
        if root.exists():
            texts += data_texts(root)
        elif explicit:
            raise SAEError(f"data folder {root} does not exist (set --data or CZAO_LENS_DATA)")
    if text_file is not None:
        texts += text_file_texts(text_file)
    if hf_dataset is not None:
        texts += hf_dataset_texts(hf_dataset, split=hf_split, column=hf_column, limit=hf_limit)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise SAEError("the corpus is empty: no generations, no data folder, no text file")
    random.Random(seed).shuffle(texts)
    return texts


# ----------------------------------------------------------------------------- checks


def check_sae_hook(model: HookedTransformer, hook_name: str) -> int:
    """Validate a hook name for an SAE (exists, layer in range, vector width); return its width."""
    layer = layer_of(hook_name or "")
    if layer is not None:
        check_layers(model.cfg.n_layers, [layer], error=SAEError)
    try:
        check_hook_name(model, hook_name)
    except (PerturbationError, ValueError, KeyError) as exc:
        raise SAEError(str(exc)) from None
    width = expected_width(model, hook_name)
    if width is None or len(width) != 1:
        raise SAEError(f"hook {hook_name!r} is not a vector hook (width {width}); use a residual, mlp_out or attn_out hook")
    return int(width[0])


def sae_hook(sae: Any, hook_name: str | None = None) -> str:
    if hook_name:
        return hook_name
    name = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if not name:
        raise SAEError("the SAE does not record its hook (cfg.metadata.hook_name); pass the hook name")
    return name


def check_sae_fits(model: HookedTransformer, sae: Any, hook_name: str | None = None) -> str:
    """The SAE's hook exists on the model and its d_in matches the hook's width; return the hook."""
    hook = sae_hook(sae, hook_name)
    width = check_sae_hook(model, hook)
    if int(sae.cfg.d_in) != width:
        raise SAEError(f"the SAE reads vectors of width {sae.cfg.d_in} but {hook} of {model.cfg.model_name} has width {width}")
    return hook


# ----------------------------------------------------------------------------- training


@contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """Silence SAELens' tqdm bar (TQDM_DISABLE) and its override warnings unless progress is on."""
    import logging

    import functools
    import importlib

    lg = logging.getLogger("sae_lens")
    old_level = lg.level
    patched = []
    if not progress:  # SAELens' modules bind tqdm at import; give them a silent one for this call
        for name in ("sae_lens.training.sae_trainer", "sae_lens.training.activation_scaler",
                     "sae_lens.training.activations_store"):
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            if hasattr(mod, "tqdm"):
                patched.append((mod, mod.tqdm))
                mod.tqdm = functools.partial(mod.tqdm, disable=True)
    lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        lg.setLevel(old_level)
        for mod, orig in patched:
            mod.tqdm = orig


def train_sae(
    model: HookedTransformer,
    hook_name: str,
    *,
    texts: Sequence[str],
    width: int | None = None,
    training_tokens: int = 200_000,
    l1_coefficient: float = 5.0,
    l1_warm_up_steps: int | None = None,
    lr: float = 4e-4,
    context_size: int = 128,
    train_batch_size_tokens: int = 1024,
    store_batch_size_prompts: int = 8,
    n_batches_in_buffer: int | None = None,
    normalize_activations: str = "expected_average_only_in",
    eval_texts: Sequence[str] | None = None,
    eval_fraction: float = 0.05,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
):
    """Train a standard (ReLU + L1) SAE at ``hook_name`` with SAELens' training runner.

    ``width`` defaults to ``8 * d_in``. Inputs are scaled to mean norm sqrt(d_in) during training
    (``expected_average_only_in``; SAELens folds the factor into the weights before saving), so
    ``l1_coefficient`` means the same at every layer. When ``eval_texts`` is not given, the last
    ``eval_fraction`` of ``texts`` is held out for :func:`sae_stats`.

    Returns ``(sae, stats)``: an inference ``sae_lens.SAE`` read back from ``out_dir`` (a temporary
    folder when None) and a dict with the held-out explained variance, L0, dead fraction, timing
    and the settings. ``stats.json`` is written next to the SAE.
    """
    from datasets import Dataset
    from sae_lens import (
        SAE,
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        StandardTrainingSAEConfig,
    )

    d_in = check_sae_hook(model, hook_name)
    texts = [t for t in (texts or []) if isinstance(t, str) and t.strip()]
    if not texts:
        raise SAEError("empty corpus: train_sae needs texts")
    if eval_texts is None:
        n_eval = int(len(texts) * eval_fraction) if len(texts) >= 20 else 0
        eval_texts = texts[len(texts) - n_eval:] if n_eval else texts[: max(1, len(texts) // 10)]
        train_texts = texts[: len(texts) - n_eval] if n_eval else texts
    else:
        train_texts = texts
    width = int(width or 8 * d_in)
    if width < 1 or training_tokens < train_batch_size_tokens:
        raise SAEError("width must be >= 1 and training_tokens >= train_batch_size_tokens")
    if context_size < 2 or context_size > model.cfg.n_ctx:
        raise SAEError(f"context_size must be in [2, {model.cfg.n_ctx}]")
    steps = training_tokens // train_batch_size_tokens
    # SAELens' mixing buffer holds n_batches_in_buffer * (context_size - 1) activations and must
    # hold at least one training batch; keep two.
    per_ctx = context_size - 1
    need = -(-2 * train_batch_size_tokens // per_ctx)
    n_batches_in_buffer = max(n_batches_in_buffer or 0, need, 4)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="czao-sae-"))
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(
            d_in=d_in, d_sae=width, l1_coefficient=l1_coefficient,
            l1_warm_up_steps=steps // 10 if l1_warm_up_steps is None else l1_warm_up_steps,
            normalize_activations=normalize_activations,
        ),
        model_name=model.cfg.model_name, hook_name=hook_name, dataset_path="czao-lens-corpus (in memory)",
        is_dataset_tokenized=False, streaming=False, context_size=context_size,
        training_tokens=training_tokens, train_batch_size_tokens=train_batch_size_tokens,
        store_batch_size_prompts=store_batch_size_prompts, n_batches_in_buffer=n_batches_in_buffer,
        prepend_bos=bool(model.cfg.default_prepend_bos), seqpos_slice=(1, None), exclude_special_tokens=True,
        sequence_separator_token="eos", model_from_pretrained_kwargs={}, lr=lr, lr_warm_up_steps=min(100, steps // 20),
        lr_scheduler_name="constant", seed=seed, device=str(model.cfg.device or "cpu"),
        logger=LoggingConfig(log_to_wandb=False), output_path=None, checkpoint_path=None, n_checkpoints=0,
        n_batches_for_norm_estimate=min(8, max(2, steps)), dead_feature_window=max(50, steps // 4),
        feature_sampling_window=max(100, steps // 2), n_eval_batches=0, verbose=False,
    )
    ds = Dataset.from_dict({"text": list(train_texts)})
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with _quiet(progress):
        runner = LanguageModelSAETrainingRunner(cfg, override_dataset=ds, override_model=model)
        init = sae_stats(model, runner.sae, eval_texts, hook_name=hook_name, max_tokens=4096)
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            trained = runner.run()
        finally:  # SAELens installs its own Ctrl-C handler and leaves it: give the caller's back
            for sig, h in handlers.items():
                if h is not None:
                    signal.signal(sig, h)
        trained.save_inference_model(str(out))
        sae = SAE.load_from_disk(str(out), device=str(model.cfg.device or "cpu"))
    seconds = time.perf_counter() - t0
    model.reset_hooks()
    stats = {
        "hook_name": hook_name, "d_in": d_in, "width": width, "training_tokens": training_tokens,
        "steps": steps, "l1_coefficient": l1_coefficient, "lr": lr, "context_size": context_size,
        "train_batch_size_tokens": train_batch_size_tokens, "seed": seed, "n_train_texts": len(train_texts),
        "n_eval_texts": len(eval_texts), "seconds": round(seconds, 2),
        "excluded_positions": "position 0 of every context window (seqpos_slice=(1, None)) and special tokens",
        "path": str(out),
    }
    stats.update(sae_stats(model, sae, eval_texts, hook_name=hook_name))
    stats["init"] = init  # the same numbers for the untrained SAE (its initial weights)
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    return sae, stats


# ----------------------------------------------------------------------------- loading


def load_sae(path_or_release: str | Path, sae_id: str | None = None, *, device: str = "cpu"):
    """An SAE from a local SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) or the registry.

    With ``sae_id`` (or a name that is not a local path) the SAELens registry is used:
    ``SAE.from_pretrained(release, sae_id)``, which downloads from the Hugging Face hub.
    """
    from sae_lens import SAE

    p = Path(str(path_or_release)).expanduser()
    if sae_id is None and p.exists():
        if not p.is_dir() or not (p / "cfg.json").exists():
            raise SAEError(f"{p} is not an SAELens SAE folder (it needs cfg.json and sae_weights.safetensors)")
        try:
            return SAE.load_from_disk(str(p), device=device)
        except Exception as exc:
            raise SAEError(f"could not load the SAE in {p}: {exc}") from exc
    if sae_id is None:
        raise SAEError(f"{path_or_release} is not a local folder; for the SAELens registry give a release and an sae_id")
    try:
        return SAE.from_pretrained(str(path_or_release), sae_id, device=device)
    except Exception as exc:  # unknown release/id, or no network
        raise SAEError(
            f"could not load {path_or_release!r} / {sae_id!r} from the SAELens registry ({type(exc).__name__}: {exc}). "
            "The registry downloads from the Hugging Face hub; offline, train an SAE with `czao-lens sae train` "
            "and pass its local folder instead."
        ) from exc


# ----------------------------------------------------------------------------- statistics


@torch.no_grad()
def residuals(model: HookedTransformer, texts: Sequence[str], hook_name: str, *, store=None, max_tokens: int | None = None) -> Tensor:
    """Stacked activations of ``texts`` at ``hook_name``, positions > 0 only: ``[tokens, d]``."""
    from czao_lens.store import ActivationStore

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise SAEError("empty text set")
    store = store or ActivationStore(model)
    rows = []
    n = 0
    for t in texts:
        a = store.get([t], [hook_name])[0][hook_name][1:]
        if a.shape[0]:
            rows.append(a.float())
            n += a.shape[0]
        if max_tokens is not None and n >= max_tokens:
            break
    if not rows:
        raise SAEError("every text is a single token; nothing left after dropping position 0")
    x = torch.cat(rows)
    return x[:max_tokens] if max_tokens is not None else x


@torch.no_grad()
def sae_stats(model: HookedTransformer, sae: Any, texts: Sequence[str], *, hook_name: str | None = None,
              store=None, max_tokens: int | None = 20_000, batch: int = 2048) -> dict[str, float]:
    """Reconstruction quality on ``texts`` (positions > 0).

    ``explained_variance`` = 1 - sum |x - x_hat|^2 / sum |x - mean x|^2 over tokens; ``l0`` = mean
    active latents per token; ``dead_fraction`` = latents that never fire on these tokens.
    """
    hook = check_sae_fits(model, sae, hook_name)
    x = residuals(model, texts, hook, store=store, max_tokens=max_tokens)
    dev = next(sae.parameters()).device
    err = 0.0
    l0 = 0.0
    fired = torch.zeros(int(sae.cfg.d_sae), dtype=torch.bool, device=dev)
    for s in range(0, x.shape[0], batch):
        xb = x[s : s + batch].to(dev)
        f = sae.encode(xb)
        xh = sae.decode(f)
        err += float(((xb - xh) ** 2).sum())
        l0 += float((f > 0).sum())
        fired |= (f > 0).any(0)
    var = float(((x - x.mean(0)) ** 2).sum())
    n = x.shape[0]
    return {
        "explained_variance": 1.0 - err / max(var, 1e-12),
        "mse_per_token": err / n,
        "l0": l0 / n,
        "dead_fraction": 1.0 - float(fired.float().mean()),
        "n_tokens": int(n),
    }


# ----------------------------------------------------------------------------- sparse (TopK) SAEs

CAA_TEST_FILE = "test_dataset_ab.json"
# RTP files whose every line a bench generation task can draw (profanity, concept); the sentiment task's
# pool is the VADER-negative lines of the other files (see czao_lens.bench.tasks).
BENCH_RTP_FILES = ("rtp_profanity.txt", "rtp_threat.txt")
SENTIMENT_POOL_MAX_COMPOUND = -0.5


def bench_pool_texts(data_dir: str | Path) -> set[str]:
    """Every text a bench task can test on, whatever its n_fit / n_test / seed: the whole pools.

    CAA ``test_dataset_ab`` questions, every TruthfulQA prompt, the RTP profanity and threat files,
    and the VADER-negative RTP lines of the sentiment pool. An SAE corpus leaves all of them out, so
    no bench test item is ever in an SAE's training text.
    """
    from czao_lens.constraints.text import load_vader

    root = Path(data_dir)
    out: set[str] = set()
    for f in sorted(root.glob(f"caa/*/{CAA_TEST_FILE}")):
        try:
            items = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        out |= {it["question"] for it in items if isinstance(it, dict) and isinstance(it.get("question"), str)}
    tqa = root / "truthfulqa" / "truthful_qa.json"
    if tqa.exists():
        out |= {it["prompt"] for it in json.loads(tqa.read_text()) if isinstance(it, dict) and isinstance(it.get("prompt"), str)}
    vader = None
    for f in sorted(root.glob("rtp/rtp_*.txt")):
        lines = [ln.strip() for ln in f.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        if f.name in BENCH_RTP_FILES:
            out |= set(lines)
            continue
        vader = vader or load_vader()
        out |= {ln for ln in lines if vader.polarity_scores(ln)["compound"] <= SENTIMENT_POOL_MAX_COMPOUND}
    return out


def overlaps_pool(text: str, pool: set[str]) -> bool:
    """``text`` is a pool text or one contains the other (RTP files repeat prefixes at other lengths; the
    bench strips TruthfulQA's preamble)."""
    t = text.strip()
    return text in pool or any(t in p or p.strip() in t for p in pool)


def sparse_corpus(
    model: HookedTransformer,
    data_dir: str | Path | None = None,
    *,
    n_generations: int = 256,
    max_new_tokens: int = 96,
    batch_size: int = 32,
    include_data: bool = True,
    seed: int = 0,
    chat: bool | None = None,
    progress: bool = False,
) -> tuple[list[str], dict[str, Any]]:
    """The corpus of a sparse SAE: data-folder texts minus every bench pool, plus the model's own answers.

    Generation prompts are :data:`CORPUS_PROMPTS` followed by the kept data texts (seeded shuffle),
    cycled; each generation is stored as ``prompt + "\\n" + answer`` (sampled, temperature 0.8,
    top-p 0.95, batched), chat-formatted when the model has a chat template (``chat=None``; a base
    model such as Gemma-3-270m continues the raw prompt). Returns ``(texts, info)`` with the counts
    and the generation throughput.
    """
    from czao_lens.generate import generate

    chat = resolve_chat(model, chat)

    if n_generations < 0 or max_new_tokens < 1 or batch_size < 1:
        raise SAEError("n_generations must be >= 0, max_new_tokens and batch_size >= 1")
    kept: list[str] = []
    excluded = 0
    if include_data:
        # A recipe that asks for the data folder must get it: skipping a missing one would cache an SAE
        # trained on a fraction of its corpus under the same recipe key.
        root = Path(data_dir) if data_dir is not None else default_data_dir()
        if not root.is_dir():
            raise SAEError(f"data folder {root} does not exist (pass --data or set CZAO_LENS_DATA; "
                           "or use a recipe with include_data false)")
        pool = bench_pool_texts(root)
        all_data = data_texts(root)
        kept = [t for t in all_data if not overlaps_pool(t, pool)]
        excluded = len(all_data) - len(kept)
        if not kept:
            raise SAEError(f"data folder {root} holds no text outside the bench pools")
    gen_prompts = list(CORPUS_PROMPTS) + random.Random(seed).sample(kept, len(kept))
    texts: list[str] = []
    t0, n_new = time.perf_counter(), 0
    bar = _bar(n_generations, "generating the SAE corpus", progress)
    for start in range(0, n_generations, batch_size):
        n = min(batch_size, n_generations - start)
        prompts = [gen_prompts[(start + i) % len(gen_prompts)] for i in range(n)]
        res = generate(model, prompts, max_new_tokens=max_new_tokens, greedy=False, temperature=0.8, top_p=0.95,
                       seed=seed + start, chat=chat)
        texts += [f"{p}\n{t.strip()}" for p, t in zip(prompts, res.texts)]
        n_new += sum(len(t) for t in res.new_tokens)
        bar.update(n)
    bar.close()
    gen_seconds = time.perf_counter() - t0
    texts += kept
    texts = list(dict.fromkeys(t for t in texts if t.strip()))
    if not texts:
        raise SAEError("the corpus is empty: no generations and no data folder")
    random.Random(seed).shuffle(texts)
    info = {"n_texts": len(texts), "n_generations": n_generations, "generated_tokens": n_new, "chat": chat,
            "generation_seconds": round(gen_seconds, 1),
            "generation_tokens_per_second": round(n_new / gen_seconds, 1) if gen_seconds > 0 and n_new else None,
            "data_texts_kept": len(kept), "data_texts_excluded_bench_pools": excluded}
    return texts, info


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


def pack_windows(model: HookedTransformer, texts: Sequence[str], context_size: int) -> Tensor:
    """Tokenize ``texts``, join them with the end-of-text token and cut ``[windows, context_size]``.

    The packing SAELens does for training. Position 0 of each window (the attention sink) and the
    separators are left out where activations are read (:func:`window_mask`).
    """
    tok = model.tokenizer
    if tok is None:
        raise SAEError("the model has no tokenizer")
    if context_size < 2 or context_size > model.cfg.n_ctx:
        raise SAEError(f"context_size must be in [2, {model.cfg.n_ctx}]")
    sep = tok.eos_token_id if tok.eos_token_id is not None else 0
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [sep]
    n = len(ids) // context_size
    if n == 0:
        raise SAEError(f"the texts hold {len(ids)} tokens, fewer than one window of {context_size}")
    return torch.tensor(ids[: n * context_size], dtype=torch.long).reshape(n, context_size)


def window_mask(model: HookedTransformer, windows: Tensor) -> Tensor:
    """Positions an SAE reads: not position 0 of a window, not a special token. ``[windows, ctx]`` bool."""
    special = torch.tensor(sorted({int(i) for i in (model.tokenizer.all_special_ids or [])}), dtype=torch.long)
    mask = torch.ones_like(windows, dtype=torch.bool)
    mask[:, 0] = False
    if special.numel():
        mask &= ~torch.isin(windows, special)
    return mask


@torch.no_grad()
def collect_activations(model: HookedTransformer, windows: Tensor, hook_name: str, *, batch: int = 16,
                        progress: bool = False) -> Tensor:
    """Activations at ``hook_name`` for the masked positions of ``windows``: ``[tokens, d]`` float32.

    One forward pass per batch of windows, stopped after the hook's block; each unique token is
    computed once and reused for every training epoch.
    """
    check_sae_hook(model, hook_name)
    layer = layer_of(hook_name)
    stop = None if layer is None else layer + 1
    mask = window_mask(model, windows)
    rows = []
    bar = _bar(windows.shape[0], f"activations at {hook_name}", progress)
    for s in range(0, windows.shape[0], batch):
        w = windows[s : s + batch].to(model.cfg.device)
        got: dict[str, Tensor] = {}

        def grab(act, hook):
            got["a"] = act.detach()

        with model.hooks(fwd_hooks=[(hook_name, grab)]):
            model(w, stop_at_layer=stop, return_type=None)
        rows.append(got["a"][mask[s : s + batch]].float().cpu())
        bar.update(w.shape[0])
    bar.close()
    model.reset_hooks()
    return torch.cat(rows)


def _batches(acts: Tensor, batch: int, seed: int) -> Iterator[Tensor]:
    """Endless shuffled minibatches over ``acts`` (a new permutation each epoch)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(acts.shape[0], generator=g)
        for s in range(0, acts.shape[0] - batch + 1, batch):
            yield acts[perm[s : s + batch]]


ARCHITECTURES = ("topk", "jumprelu")


def train_sparse_sae(
    model: HookedTransformer,
    hook_name: str,
    acts: Tensor,
    *,
    architecture: str = "topk",
    width: int,
    k: int,
    training_tokens: int,
    batch_tokens: int = 4096,
    lr: float = 4e-4,
    seed: int = 0,
    out_dir: str | Path,
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Train a TopK (or JumpReLU with a target L0 of ``k``) SAE with SAELens' ``SAETrainer`` on ``acts``.

    ``acts`` are the cached activations (:func:`collect_activations`); ``training_tokens`` may exceed
    their count, in which case they are repeated in reshuffled epochs. Inputs are scaled to mean norm
    sqrt(d_in) during training and SAELens folds the factor into the saved weights. The SAE is saved
    with ``save_inference_model`` (``cfg.json`` + ``sae_weights.safetensors``) and read back.
    """
    from sae_lens import SAE, JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d_in = check_sae_hook(model, hook_name)
    if acts.ndim != 2 or acts.shape[1] != d_in:
        raise SAEError(f"activations must be [tokens, {d_in}], got {tuple(acts.shape)}")
    if acts.shape[0] < batch_tokens:
        raise SAEError(f"{acts.shape[0]} activation rows are fewer than one batch of {batch_tokens}")
    steps = training_tokens // batch_tokens
    torch.manual_seed(seed)
    meta = dict(d_in=d_in, d_sae=width, normalize_activations="expected_average_only_in", device=str(model.cfg.device or "cpu"))
    if architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=k, **meta))
    elif architecture == "jumprelu":
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(jumprelu_sparsity_loss_mode="quadratic", target_l0=float(k),
                                                            l0_warm_up_steps=steps // 10, **meta))
    else:
        raise SAEError(f"unknown architecture {architecture!r}; choose from {', '.join(ARCHITECTURES)}")
    md = sae.cfg.metadata
    md.model_name, md.hook_name, md.context_size = model.cfg.model_name, hook_name, None
    md.seqpos_slice, md.exclude_special_tokens, md.prepend_bos = (1, None), True, bool(model.cfg.default_prepend_bos)
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch_tokens, train_batch_size_samples=batch_tokens, lr=lr, lr_end=lr / 10,
        lr_scheduler_name="constant", lr_warm_up_steps=min(100, steps // 20), lr_decay_steps=steps // 5,
        device=str(model.cfg.device or "cpu"), dead_feature_window=max(50, steps // 4),
        feature_sampling_window=max(100, steps // 2), n_batches_for_norm_estimate=min(16, max(2, acts.shape[0] // batch_tokens)),
    )
    out = Path(out_dir)
    t0 = time.perf_counter()
    with _quiet(progress):
        trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=_batches(acts, batch_tokens, seed))
        trained = trainer.fit()
        trained.save_inference_model(str(out))
        loaded = SAE.load_from_disk(str(out), device=str(model.cfg.device or "cpu"))
    seconds = time.perf_counter() - t0
    info = {"architecture": architecture, "width": width, "k": k, "steps": steps, "training_tokens": steps * batch_tokens,
            "unique_tokens": int(acts.shape[0]), "epochs": round(steps * batch_tokens / acts.shape[0], 2),
            "train_seconds": round(seconds, 1)}
    return loaded, info


@torch.no_grad()
def sae_quality(model: HookedTransformer, sae: Any, windows: Tensor, *, hook_name: str | None = None, batch: int = 8,
                dense_threshold: float = 0.1, progress: bool = False) -> dict[str, Any]:
    """The quality report of an SAE on held-out windows (positions > 0, no special tokens).

    ``l0``, ``explained_variance`` (1 - SSE / total variance; ``explained_variance_typical`` leaves out
    the rare tokens whose norm is above 3x the median, which otherwise dominate the variance),
    ``dead_fraction`` (never fires here),
    ``dense_fraction`` (fires on more than ``dense_threshold`` of the tokens) and the next-token loss
    with the SAE spliced in at the hook (``loss_with_sae``) against ``loss_clean`` and
    ``loss_zero_ablated``: ``ce_loss_recovered = (zero - sae) / (zero - clean)``. Splicing replaces
    the masked positions only (position 0 stays clean, as the SAE never saw it); the hooks are a
    context manager and always removed. The loss is over the predictions made at masked positions.
    """
    hook = check_sae_fits(model, sae, hook_name)
    layer = layer_of(hook)
    dev = next(sae.parameters()).device
    mask_all = window_mask(model, windows)
    d_sae = int(sae.cfg.d_sae)
    fires = torch.zeros(d_sae, dtype=torch.float64)
    l0 = 0.0
    xs: list[Tensor] = []
    errs: list[Tensor] = []  # per-token squared reconstruction error
    n_tok = 0
    losses = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_loss = 0
    bar = _bar(windows.shape[0], "SAE quality", progress)
    for s in range(0, windows.shape[0], batch):
        w = windows[s : s + batch].to(model.cfg.device)
        m = mask_all[s : s + batch].to(model.cfg.device)
        stats: dict[str, Any] = {}

        def splice(mode: str):
            def fn(act, hook):
                x = act[m]
                if mode == "sae":
                    f = sae.encode(x.to(dev))
                    xh = sae.decode(f).to(act.dtype)
                    stats["x"], stats["f"], stats["xh"] = x.float(), f, xh.float()
                    act = act.clone()
                    act[m] = xh
                elif mode == "zero":
                    act = act.clone()
                    act[m] = 0.0
                return act
            return fn

        # Loss of the prediction at position t (for token t+1), only where t is masked and t+1 exists.
        tgt = w[:, 1:]
        lm = m[:, :-1]
        for mode in ("clean", "sae", "zero"):
            hooks = [] if mode == "clean" else [(hook, splice(mode))]
            with model.hooks(fwd_hooks=hooks):
                logits = model(w, return_type="logits")
            lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            losses[mode] += float(-(lp[lm]).sum())
        n_loss += int(lm.sum())
        x, f, xh = stats["x"], stats["f"], stats["xh"]
        active = f > 0
        fires += active.sum(0).double().cpu()
        l0 += float(active.sum())
        xs.append(x.cpu())
        errs.append(((x - xh) ** 2).sum(-1).cpu())
        n_tok += x.shape[0]
        bar.update(w.shape[0])
    bar.close()
    model.reset_hooks()
    if n_tok == 0:
        raise SAEError("no held-out token left after dropping position 0 and special tokens")
    x_all, err = torch.cat(xs).double(), torch.cat(errs).double()

    def ev(keep: Tensor) -> float:
        xk = x_all[keep]
        return 1.0 - float(err[keep].sum()) / max(float(((xk - xk.mean(0)) ** 2).sum()), 1e-12)

    # A few tokens of enormous norm (100x the median at SmolLM2's block 11) dominate the total variance;
    # the "typical" figure leaves tokens above 3x the median norm out.
    norms = x_all.norm(dim=-1)
    typical = norms <= 3 * norms.median()
    freq = fires / n_tok
    clean, with_sae, zero = (losses[k] / max(n_loss, 1) for k in ("clean", "sae", "zero"))
    return {
        "hook_name": hook, "layer": layer, "n_windows": int(windows.shape[0]), "n_tokens": n_tok,
        "l0": l0 / n_tok, "explained_variance": ev(torch.ones_like(typical)),
        "explained_variance_typical": ev(typical), "typical_token_share": float(typical.double().mean()),
        "dead_fraction": float((freq == 0).double().mean()), "dense_fraction": float((freq > dense_threshold).double().mean()),
        "dense_threshold": dense_threshold, "loss_clean": clean, "loss_with_sae": with_sae, "loss_zero_ablated": zero,
        "ce_loss_recovered": (zero - with_sae) / (zero - clean) if zero != clean else float("nan"),
    }
