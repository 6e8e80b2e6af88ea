"""The registry of studies: name -> the question it answers and the function that runs it.

Each study is one module with ``QUESTION`` and ``run(settings) -> StudyResult``; ``czao-lens study
NAME`` runs it and saves ``OUT/NAME/table.json`` and ``figure.html`` (docs/findings.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from czao_lens.studies import cast_transfer, conjunction, gaming, localization, pareto, reachability, sensitivity, steerability, steps
from czao_lens.studies.common import StudyError, StudyResult, StudySettings


@dataclass(frozen=True)
class Study:
    name: str
    question: str
    run: Callable[[StudySettings], StudyResult]
    needs: str  # "models" (loads each --model) or "bench" (reads --bench folders)
    sizes: tuple[str, ...] = ()  # what --size may set (the keys of the study's full form)


STUDIES: dict[str, Study] = {
    "steps": Study("steps", steps.QUESTION, steps.run, "models", tuple(steps.FULL)),
    "steerability": Study("steerability", steerability.QUESTION, steerability.run, "models", tuple(steerability.FULL)),
    "cast_transfer": Study("cast_transfer", cast_transfer.QUESTION, cast_transfer.run, "models", tuple(cast_transfer.FULL)),
    "pareto": Study("pareto", pareto.QUESTION, pareto.run, "bench"),
    "localization": Study("localization", localization.QUESTION, localization.run, "models", tuple(localization.FULL)),
    "reachability": Study("reachability", reachability.QUESTION, reachability.run, "models", tuple(reachability.FULL)),
    "gaming": Study("gaming", gaming.QUESTION, gaming.run, "models", tuple(gaming.FULL)),
    "conjunction": Study("conjunction", conjunction.QUESTION, conjunction.run, "models", tuple(conjunction.FULL)),
    "sensitivity": Study("sensitivity", sensitivity.QUESTION, sensitivity.run, "models", tuple(sensitivity.FULL)),
}


def get_study(name: str) -> Study:
    """The study called ``name``, or a :class:`StudyError` that lists the known ones."""
    try:
        return STUDIES[name]
    except KeyError:
        raise StudyError(f"unknown study {name!r}; known: {', '.join(STUDIES)}") from None


def run_study(name: str, settings: StudySettings, out: str | Path | None = None) -> StudyResult:
    """Run one study and, with ``out``, save it under ``out/name``."""
    study = get_study(name)
    if study.needs == "bench" and not settings.bench:
        raise StudyError(f"study {name} reads bench outputs: give --bench FOLDER")
    if settings.sizes and not study.sizes:
        raise StudyError(f"study {name} has no sizes to set")
    result = study.run(settings)
    if out is not None:
        result.save(Path(out) / name)
    return result
