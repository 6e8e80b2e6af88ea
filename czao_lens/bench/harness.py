"""``run_bench``: every method on every task, same prompts, seeds, token budget and evaluators.

Per task: load and split the data; fit each method on the fit split (a failure there marks the
method failed for that task, the run goes on); then loop over test items and, for each item, run
every fitted method in turn (interleaving keeps load drift out of the wall-clock ratios). A method
that raises on one item records that item as a failure with the error, and the loop goes on.
Each task is one item of :func:`czao_lens.distributed.run_items` (in this process or on a Ray worker):
its rows go to ``tasks/stream.jsonl`` when the task is done, so a rerun into the same ``out`` skips
finished tasks; ``results.jsonl``, ``summary.json``, ``report.md`` and ``report.html`` are written at
the end, in task order.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from czao_lens.bench.methods import (
    GENERATE_ONLY,
    METHODS,
    SAMPLED,
    STEERING,
    BenchSettings,
    Fitted,
    TaskFit,
    bestofn_run,
    check,
    choice_scores,
    czao_run,
    guided_run,
    matched_n,
    neutral_kl,
    neutral_reference,
    prompting_run,
    sampled_run,
    settings_chat,
    static_run,
    strength_grid,
    tune_choice,
    tune_generate,
)
from czao_lens.bench.metrics import bootstrap_ci, distinct_n, fluency, mean, paired_diff_ci, unsteered_logprobs
from czao_lens.bench.tasks import TASK_NAMES, BenchError, Task, load_tasks
from czao_lens.czao import CZAOConfig
from czao_lens.distributed import RESULTS, Backend, ItemJob, WorkerPool, read_rows, run_items
from czao_lens.prompts import PromptError, resolve_chat
from czao_lens.sites import check_layers, resid_hook
from czao_lens.store import ActivationStore

QUICK = dict(n_fit=6, n_test=2, settings=BenchSettings(
    max_new_tokens=8, samples_per_fit_prompt=4, n_tune=2, caa_grid=(1.0,), choice_caa_grid=(1.0,), sae_grid=(1.0,),
    lqr_grid=(2.0,), czao_eps_grid=(1.5,), sae_features=4, jac_prompts=2, jac_layers=(12, 13, 14, 15)))


def check_methods(methods: Sequence[str]) -> list[str]:
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise BenchError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    if not methods:
        raise BenchError("no methods given")
    if "unsteered" not in methods:
        raise BenchError("the unsteered method is the reference for every ratio; keep it in the method list")
    # CZAO before best-of-n: best-of-n's n is matched to CZAO's measured compute.
    return sorted(dict.fromkeys(methods), key=METHODS.index)


def bench_jacobians(model: HookedTransformer, s: BenchSettings, *, progress: bool = False,
                    pool: WorkerPool | None = None) -> tuple[Any, dict]:
    """A-LQR's Jacobians for the bench (in this process, or sharded over ``pool``'s workers: the same
    numbers) and what to report about them."""
    from czao_lens.steering.lqr import block_jacobians

    t0 = time.perf_counter()
    if s.jac_layers is None:  # all layers: shares the cache with `czao-lens steer --method lqr`
        jac = block_jacobians(model, n_prompts=s.jac_prompts, chat=s.chat, progress=progress,
                              pool=pool).subset(range(s.layer, model.cfg.n_layers))
    else:
        jac = block_jacobians(model, n_prompts=s.jac_prompts, layers=s.jac_layers, chat=s.chat, progress=progress, pool=pool)
    info = {"layers": list(jac.layers), "prompts": s.jac_prompts, "seconds": time.perf_counter() - t0}
    if pool is not None:
        info["backend"] = pool.where
    return jac, info


class _Resources:
    """Lazily built things several tasks share: A-LQR's Jacobians (unless given) and the SAE."""

    def __init__(self, model: HookedTransformer, s: BenchSettings, data: Path, sae: Any, sae_recipe: str,
                 exclude: set[str], progress: bool, jacobians: tuple[Any, dict] | None = None):
        self.model, self.s, self.data, self._sae, self.sae_recipe = model, s, data, sae, sae_recipe
        self.exclude, self.progress, self._jac, self.info = exclude, progress, jacobians, {}

    def jacobians(self):
        if self._jac is None:
            self._jac = bench_jacobians(self.model, self.s, progress=self.progress)
        self.info["jacobians"] = self._jac[1]
        return self._jac[0]

    def sae(self):
        if self._sae is None:
            from czao_lens.sae import bench_pool_texts, overlaps_pool
            from czao_lens.sae_cache import cached_sae

            # The SAE corpus leaves out whole bench pools; check that they still cover this run's test items.
            pool = bench_pool_texts(self.data)
            loose = [t for t in self.exclude if not overlaps_pool(t, pool)]
            if loose:
                raise BenchError(f"{len(loose)} test item(s) are outside the pools the SAE corpus leaves out "
                                 f"(e.g. {loose[0][:60]!r}); update czao_lens.sae.bench_pool_texts")
            t0 = time.perf_counter()
            self._sae, quality, folder = cached_sae(self.model, resid_hook(self.s.layer - 1, "post"), self.sae_recipe,
                                                    data_dir=self.data, progress=self.progress)
            self.info["sae"] = {"recipe": self.sae_recipe, "folder": str(folder), "seconds": time.perf_counter() - t0,
                                **{k: quality.get(k) for k in ("explained_variance", "l0", "ce_loss_recovered", "dead_fraction")}}
        return self._sae


def fit_generate(model: HookedTransformer, task: Task, methods: list[str], s: BenchSettings, store: ActivationStore,
                 res: _Resources, bar) -> tuple[dict[str, Fitted], dict[str, str], dict]:
    """Fit every method on a generation task's fit split."""
    info: dict[str, Any] = {}
    base = static_run(model, None, s)
    _, base_rows = tune_generate(model, task, {"unsteered": base}, s, None)
    info["tune_unsteered"] = base_tune = base_rows[0]
    shared = TaskFit(model, task, s, store, res, info)

    def unsteered() -> Fitted:
        return Fitted("unsteered", {}, run=base)

    def prompting() -> Fitted:
        return Fitted("prompting", {"instruction": task.instruction}, run=prompting_run(model, task, s))

    def czao() -> Fitted:
        cfgs = {f"eps={e:g}": CZAOConfig(layers=(s.layer,), kl_eps=e, seed=s.seed) for e in s.czao_eps_grid}
        runs = {k: czao_run(model, task, c, s, store) for k, c in cfgs.items()}
        key, rows = tune_generate(model, task, runs, s, base_tune)
        info["czao_tune_passes"] = next(r["passes_per_token"] for r in rows if r["setting"] == key)
        return Fitted("czao", {"config": asdict(cfgs[key]), "setting": key}, run=runs[key], sweep=rows)

    def czao_sae() -> Fitted:
        # As many SAE features as the activation basis has directions, so both CZAO arms search a
        # subspace of the same size; the same eps grid and tuning.
        rank = CZAOConfig().rank
        fb = shared.sae_basis(rank)
        dirs = fb.directions_by_layer()
        cfgs = {f"eps={e:g}": CZAOConfig(layers=(s.layer,), kl_eps=e, seed=s.seed) for e in s.czao_eps_grid}
        runs = {k: czao_run(model, task, c, s, store, basis_directions=dirs) for k, c in cfgs.items()}
        key, rows = tune_generate(model, task, runs, s, base_tune)
        # The config's own basis field is not what ran: the SAE decoder rows replaced it.
        return Fitted("czao-sae", {"config": {**asdict(cfgs[key]), "basis": "sae"}, "setting": key, "features": fb.indices,
                                   "dim": len(fb.indices)}, run=runs[key], sweep=rows)

    def bestofn() -> Fitted:
        # Per item, n is matched to CZAO's passes/token on the same item (see the test loop);
        # this n (from the tune prompts) is the fallback when CZAO did not run on it.
        n = matched_n(info.get("czao_tune_passes", 4.0))
        return Fitted("bestofn", {"n": "matched to CZAO per item" if "czao" in methods else n, "top_p": s.bestofn_top_p},
                      run=bestofn_run(model, task, n, s))

    def steering(m: str) -> Fitted:
        runs = {k: static_run(model, iv, s) for k, iv in strength_grid(m, shared.fit(m), s, task.kind).items()}
        key, rows = tune_generate(model, task, runs, s, base_tune)
        return Fitted(m, {"setting": key}, run=runs[key], sweep=rows)

    fits = {"unsteered": unsteered, "prompting": prompting, "czao": czao, "czao-sae": czao_sae, "bestofn": bestofn,
            "probe-guided": lambda: Fitted("probe-guided", {"top_k": s.guided_top_k}, run=guided_run(model, task, s)),
            "unsteered-sampled": lambda: Fitted("unsteered-sampled", {"top_p": s.bestofn_top_p}, run=sampled_run(model, s))}
    fitted, errors = _fit_each(methods, fits, steering, bar)
    return fitted, errors, info


def fit_choice(model: HookedTransformer, task: Task, methods: list[str], s: BenchSettings, store: ActivationStore,
               res: _Resources, reference: torch.Tensor, bar) -> tuple[dict[str, Fitted], dict[str, str], dict]:
    """Fit every method that applies on a choice task's fit split."""
    info: dict[str, Any] = {}
    shared = TaskFit(model, task, s, store, res, info)

    def steering(m: str) -> Fitted:
        ivs = strength_grid(m, shared.fit(m), s, task.kind)
        key, rows = tune_choice(model, task, ivs, s, reference)
        return Fitted(m, {"setting": key}, intervention=ivs[key], sweep=rows)

    fits = {"unsteered": lambda: Fitted("unsteered", {}),
            "prompting": lambda: Fitted("prompting", {"instruction": task.instruction}, system_prompt=task.instruction)}
    fitted, errors = _fit_each([m for m in methods if m not in GENERATE_ONLY], fits, steering, bar)
    return fitted, errors, info


def _fit_each(methods: list[str], references: dict[str, Callable[[], Fitted]], steering: Callable[[str], Fitted],
              bar) -> tuple[dict[str, Fitted], dict[str, str]]:
    """Fit each method in turn (registry methods through ``steering``), timing each; a method that
    cannot be fitted on this task is reported, not fatal."""
    fitted: dict[str, Fitted] = {}
    errors: dict[str, str] = {}
    for m in methods:
        bar.set_postfix_str(f"fit {m}")
        t0 = time.perf_counter()
        try:
            f = steering(m) if m in STEERING else references[m]()
            f.fit_seconds = time.perf_counter() - t0
            fitted[m] = f
        except Exception as exc:
            errors[m] = f"{type(exc).__name__}: {exc}"
    return fitted, errors


def _row_generate(model, task: Task, i: int, prompt: str, f: Fitted, **kw) -> dict:
    row: dict[str, Any] = {"task": task.name, "method": f.name, "item": i, "prompt": prompt}
    try:
        out = f.run(prompt, **kw)
        base_lp = unsteered_logprobs(model, prompt, out.tokens)
        row.update(text=out.text, tokens=len(out.tokens), ok=check(task, model, prompt, out.text),
                   second_ok=bool(task.second(out.text)), passes_per_token=out.passes_per_token, seconds=out.seconds,
                   **fluency(base_lp, out.tokens, out.steered_lp), **out.extra)
    except Exception as exc:
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    return row


def _rows_choice(model, task: Task, f: Fitted, reference: torch.Tensor, chat: bool) -> list[dict]:
    rows = []
    kl = neutral_kl(model, f.intervention, f.system_prompt, reference, chat=chat)
    t0 = time.perf_counter()
    try:
        sc = choice_scores(model, task.test, f.intervention, f.system_prompt, chat=chat)
        per = [(float(sc["p_text"][i]), float(sc["p_letter"][i]), None) for i in range(len(task.test))]
    except Exception:  # isolate the failing item(s): score one at a time
        per = []
        for it in task.test:
            try:
                sc = choice_scores(model, [it], f.intervention, f.system_prompt, chat=chat)
                per.append((float(sc["p_text"][0]), float(sc["p_letter"][0]), None))
            except Exception as exc:
                per.append((None, None, f"{type(exc).__name__}: {exc}"))
    sec = (time.perf_counter() - t0) / max(len(task.test), 1)
    for i, (it, (pt, pl, err)) in enumerate(zip(task.test, per)):
        row = {"task": task.name, "method": f.name, "item": i, "prompt": it.question}
        if err is not None:
            row.update(ok=False, error=err)
        else:
            row.update(p_text=pt, p_letter=pl, ok=pt > 0.5, second_ok=pl > 0.5, kl=kl, passes_per_token=1.0,
                       seconds=sec, tokens=1)
        rows.append(row)
    return rows


def summarise(task: Task, rows: list[dict], fitted: dict[str, Fitted], errors: dict[str, str], seed: int) -> dict:
    """Per-method metrics of one task, with bootstrap intervals over test items."""
    by = {m: [r for r in rows if r["method"] == m] for m in fitted}
    base = by.get("unsteered", [])
    base_ok = [float(r["ok"]) for r in base]

    def per_token_seconds(rs):
        return sum(r.get("seconds", 0.0) for r in rs) / max(sum(r.get("tokens", 0) for r in rs), 1)

    out: dict[str, Any] = {}
    for m, rs in by.items():
        good = [r for r in rs if "error" not in r]
        ok = [float(r["ok"]) for r in rs]
        lo, hi = bootstrap_ci(ok, seed=seed)
        d = paired_diff_ci(ok, base_ok, seed=seed) if len(ok) == len(base_ok) and base_ok else (math.nan,) * 3
        yes = [r for r in good if r["ok"]]
        s: dict[str, Any] = {
            "n": len(rs), "errors": len(rs) - len(good), "satisfaction": mean(ok), "ci": [lo, hi],
            "delta_vs_unsteered": d[0], "delta_ci": [d[1], d[2]],
            "second_agreement": mean([float(r["ok"] == r["second_ok"]) for r in good]),
            "gaming": mean([float(not r["second_ok"]) for r in yes]) if yes else math.nan,
            "kl": mean([r["kl"] for r in good]), "passes_per_token": mean([r["passes_per_token"] for r in good]),
            "wall_ratio": per_token_seconds(good) / per_token_seconds(base) if base and per_token_seconds(base) > 0 else math.nan,
            "setting": fitted[m].setting, "fit_seconds": fitted[m].fit_seconds, "sweep": fitted[m].sweep,
        }
        if task.kind == "generate":
            s["ppl"] = statistics.median([r["ppl"] for r in good]) if good else math.nan
            s["kl_steered"] = mean([r["kl_steered"] for r in good])
            s["distinct2"] = distinct_n([r["text"] for r in good])
        else:
            s["p_text"] = mean([r["p_text"] for r in good])
            s["p_text_ci"] = list(bootstrap_ci([r["p_text"] for r in good], seed=seed)) if good else [math.nan, math.nan]
            s["p_letter"] = mean([r["p_letter"] for r in good])
        if m in ("czao", "czao-sae"):
            steps = [x for r in good for x in r.get("steps", [])]
            s["unreachable_share"] = mean([float(r.get("unreachable", False)) for r in good])
            s["median_steps"] = statistics.median(steps) if steps else 0
            s["max_steps"] = max(steps) if steps else 0
            s["optimized_tokens_per_item"] = mean([r.get("optimized_tokens", 0) for r in good])
        out[m] = s
    compare_methods(task.kind, out)
    for m, e in errors.items():
        out[m] = {"failed": e}
    return out


def compare_methods(kind: str, out: dict[str, dict]) -> None:
    """The summary fields that compare one method's entry with another's (set in place; failed
    methods skipped): the perplexity ratios of generation tasks."""
    base = out.get("unsteered", {})
    if kind != "generate" or "ppl" not in base:
        return
    for m, s in out.items():
        if "failed" in s:
            continue
        s["ppl_ratio"] = s["ppl"] / base["ppl"] if base["ppl"] else math.nan
        # Fluency against the unsteered model with the same decoding: sampled methods against a
        # sample of the unsteered model (when it ran), greedy ones against greedy.
        ref = out.get("unsteered-sampled") if m in SAMPLED else base
        s["ppl_ratio_same_decoding"] = s["ppl"] / ref["ppl"] if ref and ref.get("ppl") else math.nan


def check_bench_layers(model: HookedTransformer, s: BenchSettings) -> None:
    """The steering and condition layers must exist; the SAE reads block ``layer - 1`` (so ``layer >= 1``)
    and CAST decides at or before the steering layer."""
    try:
        check_layers(model.cfg.n_layers, [s.layer, s.condition_layer], error=BenchError)
        why = None
    except BenchError as exc:
        why = str(exc)
    if why is None and s.layer < 1:
        why = "the steering layer must be at least 1 (the SAE reads the block before it)"
    if why is None and s.condition_layer > s.layer:
        why = "CAST's condition layer must be at or before the steering layer"
    if why is not None:
        raise BenchError(f"layer {s.layer} / condition layer {s.condition_layer} do not fit a {model.cfg.n_layers}-layer model: {why}")


def run_task(model: HookedTransformer, task: Task, methods: list[str], s: BenchSettings, store: ActivationStore,
             res: _Resources, reference: torch.Tensor, *, progress: bool = True) -> tuple[list[dict], dict]:
    """One task: fit every method on its fit split, score every fitted method on its test items.
    Returns the rows and the task's summary entry."""
    bar = tqdm(total=len(task.test), desc=task.name, unit="item", disable=not progress)
    rows: list[dict] = []
    if task.kind == "generate":
        fitted, errors, info = fit_generate(model, task, methods, s, store, res, bar)
        for i, prompt in enumerate(task.test):
            czao_passes = None
            for f in fitted.values():
                bar.set_postfix_str(f.name)
                kw = {"n": matched_n(czao_passes)} if f.name == "bestofn" and czao_passes else {}
                rows.append(_row_generate(model, task, i, prompt, f, **kw))
                if f.name == "czao" and "error" not in rows[-1]:
                    czao_passes = rows[-1]["passes_per_token"]
            bar.update(1)
    else:
        fitted, errors, info = fit_choice(model, task, methods, s, store, res, reference, bar)
        for f in fitted.values():
            bar.set_postfix_str(f.name)
            rows += _rows_choice(model, task, f, reference, settings_chat(s))
        bar.update(len(task.test))
    bar.close()
    for m, e in errors.items():
        tqdm.write(f"[{task.name}] {m} could not be fitted: {e}")
    entry = {
        "kind": task.kind, "description": task.description, "source": task.source, "n_fit": len(task.fit),
        "n_test": len(task.test), "second_evaluator": task.second_name,
        "not_applicable": _not_applicable(task.kind, methods),
        "fit_info": info, "methods": summarise(task, rows, fitted, errors, s.seed),
    }
    return rows, entry


def _not_applicable(kind: str, methods: Sequence[str]) -> dict[str, str]:
    return {m: "scores fixed answers: nothing is generated to select or constrain"
            for m in methods if kind == "choice" and m in GENERATE_ONLY}


def method_groups(kind: str, methods: Sequence[str]) -> list[list[str]]:
    """The bench items of one task when items are (task, method group): the unsteered reference alone,
    then each other method with the unsteered model beside it (so its wall-clock ratio is timed
    against the unsteered model on the same worker, interleaved item by item as in a whole task);
    best-of-n goes with CZAO, whose passes per token on each item set its n."""
    rest = [m for m in methods if m != "unsteered" and not (kind == "choice" and m in GENERATE_ONLY)]
    groups = [["unsteered"]]
    for m in rest:
        if m == "bestofn" and "czao" in rest:
            continue
        groups.append(["unsteered", m] + (["bestofn"] if m == "czao" and "bestofn" in rest else []))
    return groups


def merge_groups(task: Task, methods: Sequence[str], parts: Sequence[tuple[list[str], list[dict], dict]]) -> tuple[list[dict], dict]:
    """One task's rows and summary entry from its (method group) items: ``parts`` holds each group's
    methods, rows and entry, the unsteered group first. Rows come in the order of a whole-task run
    (generation: item by item, methods in turn; choice: method by method) and the fields that compare
    methods are recomputed over the merged entry."""
    order = {m: i for i, m in enumerate(METHODS)}
    rows = [r for group, rs, _ in parts for r in rs if r["method"] in group and (r["method"] != "unsteered" or group == ["unsteered"])]
    if task.kind == "generate":
        rows.sort(key=lambda r: (r["item"], order[r["method"]]))
    else:
        rows.sort(key=lambda r: (order[r["method"]], r["item"]))
    entry = dict(parts[0][2])
    info: dict[str, Any] = {}
    got: dict[str, dict] = {}
    for group, _, e in parts:
        for k, v in e["fit_info"].items():
            info.setdefault(k, v)
        for m in group:
            if m in e["methods"] and (m != "unsteered" or group == ["unsteered"]):
                got[m] = e["methods"][m]
    compare_methods(task.kind, got)
    entry.update(fit_info=info, not_applicable=_not_applicable(task.kind, methods),
                 methods={m: got[m] for m in sorted(got, key=order.__getitem__)})
    return rows, entry


def _test_prompts(task_list: Sequence[Task]) -> set[str]:
    """Every task's test prompts: the SAE trained here never sees them."""
    return {p if isinstance(p, str) else p.question for t in task_list for p in t.test}


@dataclass
class BenchTaskJob(ItemJob):
    """One bench task per item (:func:`run_task`: its fits, then its test items through every method),
    in this process or on a Ray worker; the SAE and A-LQR Jacobians are built once per process and
    shared by the tasks it runs."""

    model_name: str
    data: str
    tasks: list[str]
    methods: list[str]
    n_fit: int
    n_test: int
    settings: BenchSettings
    sae: Any
    sae_recipe: str
    concept_threshold: float
    exclude: list[str]
    progress: bool = False  # per-task bars (in-process runs)
    jacobians: Any = None  # (BlockJacobians, info) computed once by the driver for every worker
    items: str = "task"  # or "method": one item per (task, method group), see method_groups

    def setup(self, model) -> Any:
        s, data = self.settings, Path(self.data)
        tasks = {t.name: t for t in load_tasks(self.tasks, data, n_fit=self.n_fit, n_test=self.n_test, seed=s.seed,
                                                  concept_threshold=self.concept_threshold)}
        res = _Resources(model, s, data, self.sae, self.sae_recipe, set(self.exclude), progress=self.progress,
                         jacobians=self.jacobians)
        reference = neutral_reference(model, chat=settings_chat(s))
        return tasks, ActivationStore(model), res, reference

    def run(self, model, state: Any, key: str, payload: Any) -> dict:
        """``payload``: None for a whole task (``key`` is its name), else ``{"task", "methods"}``."""
        tasks, store, res, reference = state
        task, methods = (key, self.methods) if payload is None else (payload["task"], payload["methods"])
        rows, entry = run_task(model, tasks[task], methods, self.settings, store, res, reference, progress=self.progress)
        return {"rows": rows, "summary": entry, "resources": dict(res.info)}

    def work(self, task_list: Sequence[Task]) -> list[tuple[str, Any]]:
        """The run's items: one per task, or one per (task, method group) in task order."""
        if self.items == "task":
            return [(t.name, None) for t in task_list]
        return [(f"{t.name}/{'+'.join(g)}", {"task": t.name, "methods": g}) for t in task_list
                for g in method_groups(t.kind, self.methods)]

    def describe(self) -> dict:
        # The task list is not a setting: a task's rows do not depend on the others, so a rerun with more
        # --task adds them to a finished run.
        return {"job": "bench", "model": self.model_name, "data": self.data, "methods": self.methods, "n_fit": self.n_fit,
                "n_test": self.n_test, "settings": asdict(self.settings), "sae_recipe": self.sae_recipe,
                "sae": "given" if self.sae is not None else "cached recipe", "concept_threshold": self.concept_threshold,
                "items": self.items}


def _run_tasks(model: HookedTransformer, task_list: list[Task], job: BenchTaskJob, out: Path, pool: WorkerPool | None,
               progress: bool) -> tuple[list[dict], dict, dict]:
    """The job's items through :func:`run_items` (resumable in ``out/tasks``), on ``pool`` or in this
    process; rows and summaries in task order (method-group items merged per task by :func:`merge_groups`).
    The resources (SAE, Jacobians) are reported per item and, merged, at the top."""
    work = job.work(task_list)
    rep = run_items(job, work, out / "tasks", pool=pool, model=model, progress=progress)
    rows: list[dict] = []
    entries: dict[str, Any] = {}
    info: dict[str, Any] = {"distributed": {k: v for k, v in rep.to_dict().items() if k != "keys_run"}}
    by_key = {r["key"]: r for r in read_rows(out / "tasks" / RESULTS)}
    # The items' own wall time, over every invocation that ran them (a resumed run only merges).
    info["item_seconds"] = sum(r.get("timing", {}).get("seconds", 0.0) for r in by_key.values())
    for r in by_key.values():
        info.setdefault("per_item", {})[r["key"]] = r.get("resources", {})
        for k, v in r.get("resources", {}).items():
            info.setdefault(k, v)
    for t in task_list:
        mine = [(key, payload, by_key[key]) for key, payload in work if key.split("/")[0] == t.name]
        bad = {key: r["error"] for key, _, r in mine if "error" in r}
        if bad and (job.items == "task" or mine[0][0] in bad):  # no unsteered reference: the task failed
            info.setdefault("failed_tasks", {}).update(bad)
            continue
        if job.items == "task":
            task_rows, entries[t.name] = mine[0][2]["rows"], mine[0][2]["summary"]
        else:  # a failed group: its methods are reported failed, the task's other methods stand
            task_rows, entries[t.name] = merge_groups(t, job.methods, [(p["methods"], r["rows"], r["summary"]) for _, p, r in mine if "error" not in r])
            entries[t.name]["methods"].update({m: {"failed": r["error"]} for _, p, r in mine if "error" in r
                                               for m in p["methods"] if m != "unsteered"})
        rows += task_rows
    return rows, entries, info


def run_bench(
    model: HookedTransformer,
    *,
    data: str | Path,
    out: str | Path,
    tasks: Sequence[str] = TASK_NAMES,
    methods: Sequence[str] = METHODS,
    n_fit: int = 24,
    n_test: int = 40,
    settings: BenchSettings | None = None,
    sae: Any = None,
    sae_recipe: str = "default",
    concept_threshold: float = 0.3,
    progress: bool = True,
    backend: Backend | None = None,
    pool: WorkerPool | None = None,
    model_name: str | None = None,
    items: str = "task",
) -> dict:
    """Run the benchmark and write results.jsonl, summary.json, report.md and report.html to ``out``.

    ``sae`` is an SAELens SAE at ``blocks.{layer-1}.hook_resid_post``; when None, the cached sparse SAE
    of ``sae_recipe`` (:func:`czao_lens.sae_cache.cached_sae`; trained once if absent, its corpus
    leaving every bench pool out) is used. Each task is an item of :func:`run_items`
    (:class:`BenchTaskJob`): rows are kept per task in ``out/tasks`` and a rerun into the same ``out``
    (after Ctrl-C or a crash) skips the finished tasks. With a Ray ``backend`` (or an open ``pool``)
    each task runs on a worker and the files are the same as in-process apart from timings; ``model``
    is then used only for the layer check, and workers load ``model_name`` (default:
    ``model.cfg.model_name``, right for the embedded models). ``items="method"`` splits each task into
    (task, method group) items (:func:`method_groups`) so more workers are busy; rows and summaries
    are the same apart from timings.
    """
    from czao_lens.bench.report import write_report

    s = settings or BenchSettings()
    try:  # auto picks the template when the tokenizer has one; the resolved choice travels to Ray workers
        s = replace(s, chat=resolve_chat(model, s.chat))
    except PromptError as exc:
        raise BenchError(str(exc)) from None
    methods = check_methods(methods)
    if items not in ("task", "method"):
        raise BenchError(f"items must be 'task' or 'method', got {items!r}")
    check_bench_layers(model, s)
    data, out = Path(data), Path(out)
    task_list = load_tasks(list(tasks), data, n_fit=n_fit, n_test=n_test, seed=s.seed, concept_threshold=concept_threshold)
    out.mkdir(parents=True, exist_ok=True)
    exclude = _test_prompts(task_list)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t_start = time.perf_counter()
    summary: dict[str, Any] = {"tasks": {}, "fit": {}}
    on_ray = pool is not None or (backend is not None and backend.uses_ray)
    name = pool.model_name if pool is not None else (model_name or model.cfg.model_name)
    own = WorkerPool(backend, name) if on_ray and pool is None else None  # one pool for the Jacobians and the tasks
    pool = pool or own
    try:
        # On Ray, A-LQR's Jacobians are computed once, sharded over the workers, and shipped with the job.
        jac = bench_jacobians(model, s, progress=progress, pool=pool) if on_ray and "lqr" in methods else None
        job = BenchTaskJob(name, str(data), [t.name for t in task_list], methods, n_fit, n_test, s, sae, sae_recipe,
                           concept_threshold, sorted(exclude), progress=progress and not on_ray, jacobians=jac, items=items)
        rows, summary["tasks"], resources = _run_tasks(model, task_list, job, out, pool, progress)
    finally:
        if own is not None:
            own.close()
    with open(out / "results.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    threads = pool.backend.threads if on_ray else torch.get_num_threads()
    summary["run"] = {
        "started": started, "seconds": time.perf_counter() - t_start, "item_seconds": resources.pop("item_seconds"),
        "model": model.cfg.model_name,
        "n_fit": n_fit, "n_test": n_test, "methods": methods, "settings": asdict(s), "chat": s.chat, "data": str(data),
        "threads": threads, "resources": resources, "concept_threshold": concept_threshold,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    write_report(summary, out)
    return summary
