"""CAA A/B contrast pairs and prompt sets for steering, read from the shared data folder.

The data is never copied into the repository: every loader takes ``data_dir`` (default
:func:`czao_lens.paths.default_data_dir`, i.e. ``$CZAO_LENS_DATA`` or ``../shared/data``).

Splits are deterministic: ``"fit"`` is ``generate_dataset.json`` (the upstream pairs for building
vectors), ``"test"`` is ``test_dataset_ab.json`` (the upstream held-out questions). ``n`` takes a
seeded random subset, so small runs stay balanced across the file.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from czao_lens.errors import CzaoLensError
from czao_lens.paths import default_data_dir

BEHAVIORS = ("coordinate-other-ais", "corrigible-neutral-HHH", "hallucination", "myopic-reward", "refusal", "sycophancy")
Split = Literal["fit", "test"]
_FILES = {"fit": "generate_dataset.json", "test": "test_dataset_ab.json"}


class SteeringDataError(CzaoLensError, ValueError):
    """Data for steering is missing or malformed."""


@dataclass(frozen=True)
class ABItem:
    """One two-choice question: ``matching`` is the letter ("A"/"B") that shows the behaviour."""

    question: str
    matching: str
    not_matching: str

    @classmethod
    def from_json(cls, d: dict) -> "ABItem":
        if not isinstance(d, dict):
            raise SteeringDataError(f"an A/B item must be a JSON object, got {type(d).__name__}: {str(d)[:80]!r}")
        try:
            m, n = _letter(d["answer_matching_behavior"]), _letter(d["answer_not_matching_behavior"])
            q = d["question"]
        except KeyError as exc:
            raise SteeringDataError(f"A/B item lacks field {exc}; expected question / answer_matching_behavior / answer_not_matching_behavior") from None
        if m == n:
            raise SteeringDataError(f"A/B item has the same matching and non-matching letter {m!r}")
        if not isinstance(q, str) or not q.strip():
            raise SteeringDataError(f"A/B item has an empty or non-text question: {q!r}")
        return cls(q, m, n)

    def stem(self) -> str:
        """The question without its ``Choices:`` block (for condition / neutral prompt sets)."""
        return re.split(r"\n\s*Choices:", self.question)[0].strip()


def _letter(s: str) -> str:
    m = re.fullmatch(r"\s*\(?\s*([A-Za-z])\s*\)?\s*", str(s))
    if not m:
        raise SteeringDataError(f"cannot read an answer letter from {s!r}")
    return m.group(1).upper()


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    if data_dir is None:
        data_dir = default_data_dir()
    p = Path(data_dir).expanduser()
    if not p.is_dir():
        raise SteeringDataError(
            f"data folder {p} does not exist; pass data_dir=... / --data, or set $CZAO_LENS_DATA"
        )
    return p


def _subset(items: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(items):
        return list(items)
    if n <= 0:
        raise SteeringDataError(f"n must be positive, got {n}")
    idx = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in idx]


def balance_letters(items: Sequence[ABItem], n: int | None = None, seed: int = 0) -> list[ABItem]:
    """Items whose matching letters are as evenly spread as the data allows (``n`` in total, default: as many
    as an exact balance allows).

    The answer letter is a confound: a set with more "A"-matching items makes the contrastive vector
    partly an "answer A" vector, and makes the mean p(matching) reflect the model's letter bias.
    Two letters (A/B): exactly as many A- as B-matching items. More letters (multiple-choice items,
    A to H): an exact balance would keep only (rarest letter's count) x (letters) items, so with ``n``
    the letters are drawn in turn (round robin) until ``n`` items are chosen; each item still
    contrasts its matching option with its non-matching one. :func:`selection_note` says why fewer
    than ``n`` came back.
    """
    groups: dict[str, list[ABItem]] = {}
    for it in items:
        groups.setdefault(it.matching, []).append(it)
    if len(groups) < 2:
        raise SteeringDataError(f"cannot balance letters: every item's matching letter is {next(iter(groups), '?')!r}")
    per = min(len(g) for g in groups.values())
    if n is not None and n < len(groups):
        raise SteeringDataError(f"n={n} is too small to hold each answer letter once ({len(groups)} letters)")
    rng = random.Random(seed)
    if n is None or len(groups) == 2:
        per = per if n is None else min(per, n // len(groups))
        chosen = {id(x) for g in groups.values() for x in rng.sample(g, per)}
    else:
        pools = [rng.sample(g, len(g)) for _, g in sorted(groups.items())]
        picked: list[ABItem] = []
        while len(picked) < n and any(pools):
            for pool in pools:
                if pool and len(picked) < n:
                    picked.append(pool.pop())
        chosen = {id(x) for x in picked}
    return [it for it in items if id(it) in chosen]  # original order


def selection_note(available: Sequence[ABItem], chosen: Sequence[ABItem], asked: int) -> str | None:
    """Why fewer items than ``asked`` were chosen (``None`` when none are missing): for command output."""
    if len(chosen) >= asked:
        return None
    counts = {}
    for it in available:
        counts[it.matching] = counts.get(it.matching, 0) + 1
    spread = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    if len(available) < asked:
        why = f"the data holds only {len(available)} items"
    else:
        rare = min(counts, key=counts.get)
        why = (f"an exact A/B letter balance keeps {len(counts)} x {counts[rare]} (the rarer letter {rare!r} has "
               f"{counts[rare]} items)")
    return f"using {len(chosen)} of the {asked} items asked for: {why} (matching letters {spread})"


def read_json_list(path: Path) -> list:
    """A data file holding a non-empty JSON list; truncated, non-UTF-8 or other content is a clear error."""
    try:
        rows = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SteeringDataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise SteeringDataError(f"{path} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise SteeringDataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(rows, list) or not rows:
        raise SteeringDataError(f"{path} holds no items (expected a non-empty JSON list, got {type(rows).__name__})")
    return rows


def load_ab(
    behavior: str,
    split: Split = "fit",
    *,
    n: int | None = None,
    seed: int = 0,
    balanced: bool = False,
    data_dir: str | Path | None = None,
) -> list[ABItem]:
    """CAA A/B items of one behaviour (``refusal``, ``sycophancy``, ...) from one split.

    ``balanced=True`` returns equally many A-matching and B-matching items (see :func:`balance_letters`).
    """
    if split not in _FILES:
        raise SteeringDataError(f"split must be one of {tuple(_FILES)}, got {split!r}")
    root = resolve_data_dir(data_dir)
    path = root / "caa" / behavior / _FILES[split]
    if not path.exists():
        have = sorted(p.name for p in (root / "caa").iterdir()) if (root / "caa").is_dir() else []
        raise SteeringDataError(f"no CAA data for {behavior!r} at {path}; behaviours found: {have}")
    rows = read_json_list(path)
    items = []
    for i, r in enumerate(rows):
        try:
            items.append(ABItem.from_json(r))
        except SteeringDataError as exc:
            raise SteeringDataError(f"{path}, item {i}: {exc}") from None
    if balanced:
        return balance_letters(items, n, seed)
    return _subset(items, n, seed)


def load_truthfulqa(*, n: int | None = None, seed: int = 0, data_dir: str | Path | None = None) -> list[ABItem]:
    """TruthfulQA in the CAA A/B format; ``matching`` is the correct letter."""
    path = resolve_data_dir(data_dir) / "truthfulqa" / "truthful_qa.json"
    if not path.exists():
        raise SteeringDataError(f"no TruthfulQA data at {path}")
    rows = read_json_list(path)
    try:
        items = [ABItem(r["prompt"].replace("Please help me answer the following question.\n", "", 1), _letter(r["correct"]), _letter(r["incorrect"])) for r in rows]
    except (KeyError, TypeError, AttributeError) as exc:
        raise SteeringDataError(f"{path}: an item lacks or mistypes {exc} (expected prompt / correct / incorrect)") from None
    return _subset(items, n, seed)


def split_items(items: Sequence, frac: float = 0.5, seed: int = 0) -> tuple[list, list]:
    """A deterministic shuffled split into (first, second) parts."""
    if not 0 < frac < 1:
        raise SteeringDataError("frac must be in (0, 1)")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    k = int(round(len(items) * frac))
    return [items[i] for i in order[:k]], [items[i] for i in order[k:]]


def items_hash(items: Sequence[ABItem]) -> str:
    """A short hash of the items a vector was fitted on (stored in its metadata)."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.question}\x00{it.matching}\x00{it.not_matching}\x01".encode())
    return h.hexdigest()[:16]


def texts_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode() + b"\x01")
    return h.hexdigest()[:16]


# Neutral prompts for fluency / faithfulness measurements (written for this project).
NEUTRAL_PROMPTS = (
    "Describe how bread is baked.",
    "What is the tallest mountain in Europe?",
    "Write two sentences about autumn leaves.",
    "Explain what a prime number is.",
    "List three uses of a paperclip.",
    "How do bees make honey?",
    "Give me a tip for learning a new language.",
    "What does a librarian do?",
    "Summarise the water cycle in one sentence.",
    "Why is the sky blue?",
    "Name a famous painting and its painter.",
    "How many legs does a spider have?",
    "Suggest a name for a small grey cat.",
    "What is the boiling point of water at sea level?",
    "Tell me one fact about the Moon.",
    "How do I make a cup of tea?",
)
