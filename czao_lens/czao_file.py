"""CZAO over a prompt file: one row per prompt (text, verdict, telemetry summary), on any backend.

The prompt file is JSONL (``{"id"?: ..., "prompt": "..."}`` per line) or plain text (one prompt per
line). A bad line (invalid JSON, no or empty prompt) becomes a failure row with its error and the run
goes on; an empty file, a missing file or repeated ids fail before any model loads. Each prompt runs
with its own seed derived from the run seed and its key (:func:`czao_lens.distributed.item_seed`), so
a row does not depend on which worker ran it, or on what else ran there. Prompts run ``batch_size`` at
a time through one batched CZAO decode (:class:`czao_lens.czao.BatchedCZAO`: the candidate forwards of
all rows that need a search share one batch), which greedy decoding keeps row for row equal to a run
of the prompt alone.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from czao_lens.constraints import load_constraint
from czao_lens.czao import CZAOConfig, generate_czao
from czao_lens.distributed import ItemJob, item_seed
from czao_lens.errors import CzaoLensError


class PromptFileError(CzaoLensError, ValueError):
    """A prompt file that cannot be run (missing, empty, repeated ids) or one bad line of it."""


def read_prompt_file(path: str | Path) -> list[tuple[str, dict]]:
    """(key, payload) per non-blank line. Payload ``{"prompt": text}``, or ``{"error": why}`` for a bad line.

    JSONL when the file ends in ``.jsonl`` or its first non-blank line starts with ``{``; keys are the
    ``id`` field when given, else ``line00001`` (1-based line numbers)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if not lines:
        raise PromptFileError(f"prompt file {path} is empty: no prompts to run")
    jsonl = path.suffix.lower() == ".jsonl" or lines[0][1].lstrip().startswith("{")
    items: list[tuple[str, dict]] = []
    for i, line in lines:
        key = f"line{i:05d}"
        if not jsonl:
            items.append((key, {"prompt": line.strip()}))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            items.append((key, {"error": f"line {i}: invalid JSON ({exc})"}))
            continue
        if not isinstance(obj, dict):
            items.append((key, {"error": f"line {i}: expected an object with a 'prompt' field"}))
            continue
        if obj.get("id") is not None:
            key = str(obj["id"])
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            items.append((key, {"error": f"line {i}: missing or empty 'prompt'"}))
        else:
            items.append((key, {"prompt": prompt}))
    keys = [k for k, _ in items]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise PromptFileError(f"prompt file {path}: repeated id(s) {dup[:5]}; ids must be unique")
    return items


@dataclass
class CZAOFileJob(ItemJob):
    """CZAO on one prompt per item, with the same constraint, config and token budget for all."""

    model_name: str
    constraint: str  # the JSON spec (text, so a remote worker needs no file)
    config: CZAOConfig
    max_new_tokens: int = 32
    chat: bool = True
    seed: int = 0
    batch_size: int = 8  # prompts per decode batch (greedy CZAO: a row does not depend on its batch)

    def setup(self, model) -> Any:
        return load_constraint(self.constraint)

    def run(self, model, state: Any, key: str, payload: dict) -> dict:
        got = self.run_batch(model, state, [(key, payload)])[0]
        if isinstance(got, Exception):
            raise got
        return got

    def run_batch(self, model, state: Any, items) -> list[dict | Exception]:
        """The good prompts of ``items`` in one batched CZAO run (each with its own seed); bad lines
        are their errors."""
        out: list[dict | Exception] = [PromptFileError(p["error"]) if "error" in p else {} for _, p in items]
        good = [i for i, (_, p) in enumerate(items) if "error" not in p]
        if not good:
            return out
        seeds = [item_seed(self.seed, items[i][0]) for i in good]
        try:
            res = generate_czao(model, [items[i][1]["prompt"] for i in good], state, self.config, row_seeds=seeds,
                                max_new_tokens=self.max_new_tokens, chat=self.chat, batch_size=len(good))
        except Exception as exc:  # a batch-wide failure: each of its prompts alone, so one bad prompt fails alone
            if len(good) == 1:
                out[good[0]] = exc
                return out
            for i in good:
                out[i] = self.run_batch(model, state, [items[i]])[0]
            return out
        for i, s, r in zip(good, seeds, res):
            out[i] = {"prompt": items[i][1]["prompt"], "text": r.text, "satisfied": r.satisfied,
                      "unreachable": r.unreachable, "seed": s, "summary": r.summary()}
        return out

    def describe(self) -> dict:
        return {"job": "czao", "model": self.model_name, "constraint": json.loads(self.constraint),
                "config": asdict(self.config), "max_new_tokens": self.max_new_tokens, "chat": self.chat, "seed": self.seed}

    def summarise(self, rows: list[dict]) -> dict:
        good = [r for r in rows if "error" not in r]

        def share(field: str) -> float | None:
            return sum(bool(r[field]) for r in good) / len(good) if good else None

        return {
            **self.describe(), "prompts": len(rows), "failures": len(rows) - len(good),
            "satisfied": share("satisfied"), "unreachable": share("unreachable"),
            "passes_per_token": statistics.fmean(r["summary"]["passes_per_token"] for r in good) if good else None,
            "failed": {r["key"]: r["error"] for r in rows if "error" in r},
        }
