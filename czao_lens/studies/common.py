"""What every study shares: its result (a table, a figure, a two-sentence answer) saved in one layout,
rank correlation with a bootstrap interval, and the Pareto front of several objectives."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import plotly.graph_objects as go
import torch
from transformer_lens import HookedTransformer

from czao_lens.errors import CzaoLensError
from czao_lens.paths import default_data_dir
from czao_lens.prompts import encode_prompts
from czao_lens.plots import save_figure


class StudyError(CzaoLensError, ValueError):
    """A study asked for something it cannot do (unknown name, missing bench output, bad setting)."""


@dataclass
class StudySettings:
    """What a study run is given. ``quick`` shrinks every size to a harness check (CI); the rest are
    the full form's defaults. ``load`` turns a model name into a model (tests pass a tiny one)."""

    models: list[str] = field(default_factory=lambda: ["smollm2-135m-instruct"])
    quick: bool = False
    data: Path | None = None
    bench: list[Path] = field(default_factory=list)
    seed: int = 0
    layer: int | None = None
    layers_json: Path | None = None
    sizes: dict[str, Any] = field(default_factory=dict)  # overrides of the study's sizes, e.g. {"ranks": "4,16,64"}
    load: Callable[[str], HookedTransformer] | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise StudyError("a study needs at least one model")
        if self.layer is not None and self.layer < 0:
            raise StudyError(f"layer must be >= 0, got {self.layer}")

    def start(self, full: dict[str, Any], quick: dict[str, Any]) -> tuple[dict[str, Any], "Timer", Path]:
        """What every study starts with: its sizes (the quick form for a harness check, else the full
        one, with ``sizes`` laid over it), a wall-clock timer and the data folder. Called before any
        model loads, so a bad override fails at once."""
        return override_sizes(quick if self.quick else full, full, self.sizes), Timer(), self.data_dir()

    def data_dir(self) -> Path:
        return Path(self.data) if self.data is not None else default_data_dir()

    def layer_for(self, model: HookedTransformer) -> int:
        """The steering layer on ``model``: ``layer``, else 12 (the bench's), or the last one of a smaller model."""
        n = model.cfg.n_layers
        if self.layer is None:
            return min(12, n - 1)
        if self.layer >= n:
            raise StudyError(f"layer {self.layer} is out of range for a model with {n} layers")
        return self.layer

    def loaded(self) -> Iterator[tuple[str, HookedTransformer]]:
        """Each model by name, loaded one at a time (only one is held at once)."""
        for name in self.models:
            yield name, self.model(name)

    def model(self, name: str) -> HookedTransformer:
        if self.load is not None:
            return self.load(name)
        from czao_lens.models import load_model

        return load_model(name)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "load"}
        d["data"] = None if self.data is None else str(self.data)
        d["bench"] = [str(p) for p in self.bench]
        d["layers_json"] = None if self.layers_json is None else str(self.layers_json)
        return d


def override_sizes(base: dict[str, Any], full: dict[str, Any], sizes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``sizes`` laid over it. A value may be given as text (``"4,16,64"``, from the CLI)
    and is read as the type of the full form's value; counts must be >= 1, numbers finite and > 0, and names
    (constraint types, tasks, behaviours) ones the full form knows."""
    out = dict(base)
    for key, value in sizes.items():
        if key not in full:
            raise StudyError(f"unknown size {key!r} for this study; known: {', '.join(full)}")
        out[key] = _size_value(key, value, full[key])
    return out


def _size_value(key: str, value: Any, like: Any) -> Any:
    if isinstance(like, tuple):
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",")]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]  # one value for a list-valued size (Python: {"ranks": 4})
        if not items or any(v == "" for v in items):
            raise StudyError(f"size {key} needs a non-empty comma-separated list, got {value!r}")
        return tuple(_size_value(key, v, like[0]) for v in items) if not isinstance(like[0], str) else _names(key, items, like)
    kind = type(like)
    try:
        v = kind(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        v = None
    if v is None or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise StudyError(f"size {key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if kind is int and v < 1:
        raise StudyError(f"size {key} must be >= 1, got {v}")
    if kind is float and not (math.isfinite(v) and v > 0):  # budgets, multipliers: the studies apply signs themselves
        raise StudyError(f"size {key} must be a finite number > 0, got {v}")
    return v


def _names(key: str, items: list[Any], known: tuple[str, ...]) -> tuple[str, ...]:
    bad = [v for v in items if v not in known]
    if bad:
        raise StudyError(f"unknown {key} {', '.join(map(repr, bad))}; known: {', '.join(known)}")
    return tuple(items)


@dataclass
class StudyResult:
    """One study's outcome: rows of its table, summary statistics, the figure and the answer."""

    name: str
    question: str
    rows: list[dict[str, Any]]
    stats: dict[str, Any]
    answer: str
    settings: dict[str, Any]
    seconds: float
    figure: go.Figure | None = None
    columns: tuple[str, ...] = ()  # what the markdown table shows (all keys of the first row when empty)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "question": self.question, "answer": self.answer, "stats": self.stats,
                "rows": self.rows, "settings": self.settings, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudyResult":
        return cls(**{k: d[k] for k in ("name", "question", "rows", "stats", "answer", "settings", "seconds")})

    def markdown(self) -> str:
        """The rows as a markdown table (numbers to 2-3 significant places)."""
        # Prompts and texts stay out: they quote the data sets, which are not redistributed here.
        first = self.rows[0] if self.rows else {}
        cols = list(self.columns) or [k for k, v in first.items() if not isinstance(v, (list, dict)) and k not in ("prompt", "text")]
        return markdown_table(self.rows, cols)

    def save(self, out: str | Path, *, png: bool = True) -> Path:
        """``out/table.json``, ``out/table.md`` and ``out/figure.html`` (and ``figure.png`` where kaleido works)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.json").write_text(json.dumps(self.to_dict(), indent=1, default=_jsonable) + "\n")
        (out / "table.md").write_text(f"{self.question}\n\n{self.markdown()}\n\n{self.answer}\n")
        if self.figure is not None:
            save_figure(self.figure, out / "figure.html", png=png)
        return out / "table.json"


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON: {type(x).__name__}")


def _cell(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    if isinstance(v, list):
        return ", ".join(_cell(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of ``columns`` of ``rows`` (a missing key is left blank)."""
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
    return head + "".join("\n| " + " | ".join(_cell(r[c]) if c in r else "" for c in columns) + " |" for r in rows)


class Timer:
    """Wall time of a study, read when its result is built."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.t0, 1)


# ----------------------------------------------------------------------------- prompts and constraints


def confident_word_prompts(model, prompts: list[str], n: int, min_p: float = 0.3) -> list[tuple[str, str]]:
    """The first ``n`` prompts whose unsteered next token is a word the model is sure of (p >= ``min_p``,
    so banning it below 0.05 takes a real move), with that word."""
    out = []
    for p in prompts:
        enc = encode_prompts(model, p, chat=False)
        with torch.no_grad():
            probs = model(enc.tokens, attention_mask=enc.attention_mask)[0, -1].float().softmax(-1)
        tok = int(probs.argmax())
        word = model.tokenizer.decode([tok]).strip()
        if word.isalpha() and len(word) > 1 and float(probs[tok]) >= min_p:
            out.append((p, word))
        if len(out) == n:
            break
    return out


def word_pool(data: Path, seed: int = 0) -> list[str]:
    """Prompts to look for confident next words in: the sentiment task's fit prompts (negative RTP prefixes)."""
    from czao_lens.bench.tasks import load_task

    return load_task("sentiment", data, n_fit=80, n_test=1, seed=seed).fit


SUITE_TYPES = ("banned words", "sentiment", "profanity", "concept")  # the keys of constraint_suite


def constraint_suite(model: HookedTransformer, data: Path, n: int, seed: int = 0) -> dict[str, list[tuple[str, Any]]]:
    """``n`` (prompt, constraint) pairs per constraint type: banned words (the word the model is sure
    to say next), and the bench's sentiment, profanity and concept tasks on their fit prompts."""
    from czao_lens.bench.tasks import load_task
    from czao_lens.constraints import AvoidTokens

    tasks = {name: load_task(name, data, n_fit=max(n, 24), n_test=1, seed=seed) for name in ("sentiment", "profanity", "concept")}
    suite = {"banned words": [(p, AvoidTokens([w])) for p, w in confident_word_prompts(model, word_pool(data, seed), n)]}
    suite.update({name: [(p, t.constraint) for p in t.fit[:n]] for name, t in tasks.items()})
    return suite


# ----------------------------------------------------------------------------- statistics


def ranks(x: Sequence[float]) -> torch.Tensor:
    """Ranks from 1, ties sharing their mean rank (as Spearman's rho needs)."""
    v = torch.as_tensor(list(x), dtype=torch.float64)
    order = torch.argsort(v)
    r = torch.empty_like(v)
    r[order] = torch.arange(1, len(v) + 1, dtype=torch.float64)
    for u in torch.unique(v):
        tie = v == u
        if int(tie.sum()) > 1:
            r[tie] = r[tie].mean()
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation; NaN when either side is constant or there are under 3 points."""
    if len(x) != len(y):
        raise StudyError(f"rank correlation of {len(x)} against {len(y)} values")
    if len(x) < 3:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float((rx @ ry) / den) if den > 0 else math.nan


def spearman_ci(x: Sequence[float], y: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                level: float = 0.95) -> dict[str, Any]:
    """Spearman's rho with a percentile bootstrap interval over the points (resampled in pairs)."""
    rho = spearman(x, y)
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    boots = []
    for _ in range(n_boot if n >= 3 else 0):
        idx = torch.randint(0, n, (n,), generator=g).tolist()
        b = spearman([x[i] for i in idx], [y[i] for i in idx])
        if math.isfinite(b):
            boots.append(b)
    if boots:
        levels = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
        q = torch.tensor(boots, dtype=torch.float64).quantile(levels).tolist()
    else:
        q = [math.nan, math.nan]
    return {"rho": rho, "ci": q, "n": n}


def pareto_front(points: Sequence[Sequence[float]], maximise: Sequence[bool]) -> list[bool]:
    """Which points no other point dominates (at least as good on every objective, better on one).
    ``maximise[k]`` says the direction of objective k; a NaN objective is never on the front."""
    def better_eq(a: float, b: float, up: bool) -> bool:
        return a >= b if up else a <= b

    def better(a: float, b: float, up: bool) -> bool:
        return a > b if up else a < b

    out = []
    for i, p in enumerate(points):
        if any(not math.isfinite(v) for v in p):
            out.append(False)
            continue
        dominated = any(
            j != i and all(math.isfinite(v) for v in q)
            and all(better_eq(q[k], p[k], up) for k, up in enumerate(maximise))
            and any(better(q[k], p[k], up) for k, up in enumerate(maximise))
            for j, q in enumerate(points)
        )
        out.append(not dominated)
    return out


def cv_logistic_auroc(x: torch.Tensor, y: torch.Tensor, *, folds: int = 4, l2: float = 1.0, seed: int = 0) -> float:
    """Out-of-fold AUROC of an L2 logistic regression on standardised features (NaN when a class is
    missing or there are fewer examples than folds). For small predictors of a binary outcome."""
    from czao_lens.probes import auroc

    y = y.float()
    n = len(y)
    if n < folds or y.min() == y.max():
        return math.nan
    fold = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % folds
    scores = torch.zeros(n)
    for f in range(folds):
        tr, te = fold != f, fold == f
        if y[tr].min() == y[tr].max():
            scores[te] = float(y[tr][0])
            continue
        mu, sd = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)
        xt = (x[tr] - mu) / sd
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=100, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, y[tr]) + l2 * (w @ w) / len(xt)
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            scores[te] = ((x[te] - mu) / sd) @ w + b
    return auroc(scores, y)
