"""Run a per-item job over a list of keyed items: in this process, on a local Ray, or on a Ray cluster.

One entry point, :func:`run_items`. A job (:class:`ItemJob`) says which model it needs and what to do
with one item; the runner loads the model once per worker (through :func:`czao_lens.models.load_model`,
so every worker reads the same conversion cache), feeds items to workers as they free up, and streams
one JSON row per finished item to ``out/stream.jsonl`` (whole lines, flushed), so a crash or Ctrl-C
leaves a file a rerun resumes from. When every item has a row, ``out/results.jsonl`` is written in
the item order given (independent of which worker finished first), with ``out/run.json``.

Backends (:class:`Backend`):

- in-process (``workers=0``, the default): no Ray import at all;
- a local Ray started here (``workers=N``): N actors, each ``num_cpus`` CPUs and ``threads`` torch threads;
- an existing cluster (``address=...`` or ``$RAY_ADDRESS``): the same actors, placed by Ray
  (``num_gpus=1`` puts one model copy on each GPU).

Ray is the engine (actors, ``ray.wait``, ``ray.kill``); this module only decides what a row is, which
items still need one, and what to do when an actor dies: its item goes back to the queue and runs on
another actor (at most ``max_retries`` times), and a replacement actor is started. An item whose job
raises is a failure row with the error (the run goes on); a rerun skips it like any finished item.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tqdm.auto import tqdm

from czao_lens.errors import CzaoLensError

STREAM = "stream.jsonl"
RESULTS = "results.jsonl"
RUN = "run.json"
JOB = "job.json"
# What differs between two runs of the same seeds: wall-clock fields (the bench's fit_seconds and wall_ratio too).
TIMING_KEYS = frozenset({"seconds", "timing", "fit_seconds", "wall_ratio"})


class DistributedError(CzaoLensError, RuntimeError):
    """Bad runner input, an unreachable Ray cluster, or an ``--out`` that holds another job's run."""


class ItemJob:
    """A job the runner can ship to workers: plain data (picklable), no model and no open files.

    ``setup(model)`` builds what every item of the job shares on a worker (once per worker);
    ``run(model, state, key, payload)`` returns the JSON-able row of one item (or raises: the item
    becomes a failure row). ``describe()`` identifies the run, so a rerun into the same ``--out``
    with other settings is refused instead of mixing rows; ``summarise(rows)`` is written as
    ``summary.json`` once all rows are in (None: no summary file).
    """

    model_name: str
    batch_size = 1  # items handed to run_batch at once (a job that batches its forward passes sets it)

    def setup(self, model) -> Any:
        return None

    def run(self, model, state: Any, key: str, payload: Any) -> dict:
        raise NotImplementedError

    def run_batch(self, model, state: Any, items: Sequence[tuple[str, Any]]) -> list[dict | Exception]:
        """Rows of several items at once, in their order; an item that fails is its exception (the
        others still count). The default runs them one by one; a job whose rows do not depend on the
        batch they ran in overrides it to share forward passes."""
        out: list[dict | Exception] = []
        for key, payload in items:
            try:
                out.append(self.run(model, state, key, payload))
            except Exception as exc:
                out.append(exc)
        return out

    def describe(self) -> dict:
        return {"job": type(self).__name__, "model": self.model_name}

    def summarise(self, rows: list[dict]) -> dict | None:
        return None


@dataclass
class Backend:
    """Where items run. ``workers=0`` and no ``address``: in this process."""

    workers: int = 0
    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    threads: int | None = 1  # torch threads per actor (CPU); None leaves torch's default
    max_retries: int = 2  # per item, after the actor running it died
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.workers < 0 or self.num_cpus < 0 or self.num_gpus < 0 or self.max_retries < 0:
            raise DistributedError("workers, num_cpus, num_gpus and max_retries must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise DistributedError("threads must be >= 1 (or None for torch's default)")

    @property
    def uses_ray(self) -> bool:
        return self.workers > 0 or bool(self.address)

    @classmethod
    def from_options(cls, workers: int = 0, address: str | None = None, **kw) -> "Backend":
        """The CLI's rule: ``--ray-address`` wins, else ``$RAY_ADDRESS``, else a local Ray when ``--workers`` > 0."""
        address = address or os.environ.get("RAY_ADDRESS") or None
        return cls(workers=workers, address=address, **kw)


@dataclass
class RunReport:
    """What a run did: counts, where, how long; saved as ``run.json``."""

    total: int
    skipped: int  # rows already in stream.jsonl (resumed)
    ran: int = 0
    failures: int = 0
    retried: int = 0  # items re-queued after their actor died
    workers_lost: int = 0
    backend: str = "in-process"
    workers: int = 0
    ray_init_seconds: float | None = None  # ray.init (0 when Ray was already up)
    first_row_seconds: float | None = None  # from the start to the first row: init + actors + model loads + one item
    wall_seconds: float = 0.0
    interrupted: bool = False
    keys_run: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def item_seed(seed: int, key: str) -> int:
    """A per-item seed from the run seed and the item key: the same wherever and in whatever order the item runs."""
    h = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


def without_timings(row: Any) -> Any:
    """The row with every timing field dropped (at any depth): what must match across backends."""
    if isinstance(row, dict):
        return {k: without_timings(v) for k, v in row.items() if k not in TIMING_KEYS}
    if isinstance(row, list):
        return [without_timings(v) for v in row]
    return row


def tensor_to_text(tensor) -> str:
    """A tensor as text for a JSON row (safetensors bytes, base64): exact bits, no pickle, so a row
    can carry a worker's numeric result (e.g. a shard of Jacobians) through the stream and resume."""
    import base64

    from safetensors.torch import save

    return base64.b64encode(save({"t": tensor.detach().cpu().contiguous()})).decode("ascii")


def tensor_from_text(text: str):
    """The tensor :func:`tensor_to_text` wrote."""
    import base64

    from safetensors.torch import load

    return load(base64.b64decode(text))["t"]


def read_rows(path: Path) -> list[dict]:
    """The complete rows of a JSONL file; a torn last line (a crash mid-write) is cut off the file."""
    if not path.exists():
        return []
    rows, good_bytes = [], 0
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("torn line")
                row = json.loads(raw)
                if not isinstance(row, dict) or "key" not in row:
                    raise ValueError("not a row")
            except ValueError:
                break  # everything from the first bad line on is discarded (it can only be the torn tail)
            rows.append(row)
            good_bytes += len(raw)
    if good_bytes < path.stat().st_size:
        with open(path, "r+b") as fh:
            fh.truncate(good_bytes)
    return rows


def _latest(rows: Iterable[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in rows:
        out[str(r["key"])] = r
    return out


def _failure(key: str, exc: BaseException) -> dict:
    return {"key": key, "error": f"{type(exc).__name__}: {exc}"}


def _run_chunk(job: ItemJob, model, state, chunk: Sequence[tuple[str, Any]], worker: str) -> list[dict]:
    """Rows of a chunk of items (one item unless the job batches); each row's seconds are the chunk's
    over its items."""
    t0 = time.perf_counter()
    try:
        got = job.run_batch(model, state, chunk) if len(chunk) > 1 else [job.run(model, state, *chunk[0])]
    except Exception as exc:  # a deterministic failure of these items: recorded, the run goes on
        got = [exc] * len(chunk)
    seconds = (time.perf_counter() - t0) / len(chunk)
    rows = []
    for (key, _), r in zip(chunk, got):
        row = _failure(key, r) if isinstance(r, BaseException) else {"key": key, **r}
        row["timing"] = {"seconds": seconds, "worker": worker}
        rows.append(row)
    return rows


def _chunks(todo: Sequence[tuple[str, Any]], size: int) -> list[list[tuple[str, Any]]]:
    size = max(1, int(size))
    return [list(todo[i: i + size]) for i in range(0, len(todo), size)]


class _Worker:
    """A Ray actor body: loads the model once, then runs items of any job on it one at a time
    (each job's ``setup`` runs once per actor, on its first item)."""

    def __init__(self, model_name: str, name: str, threads: int | None, device: str):
        import torch

        from czao_lens.models import load_model

        if threads is not None:
            torch.set_num_threads(threads)
        self.name = name
        self.model = load_model(model_name, device=device, progress=False)
        self.states: dict[str, Any] = {}

    def ready(self) -> str:
        """Answers once the constructor (the model load) is done."""
        return self.name

    def run(self, token: str, job: ItemJob, chunk: list[tuple[str, Any]]) -> list[dict]:
        if token not in self.states:
            try:
                self.states = {token: job.setup(self.model)}  # one job at a time: drop older states
            except Exception as exc:
                return [{**_failure(key, exc), "timing": {"seconds": 0.0, "worker": self.name}} for key, _ in chunk]
        return _run_chunk(job, self.model, self.states[token], chunk, self.name)


_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail within about ``timeout`` seconds when a ``host:port`` / ``ray://host:port`` address does not
    answer like a Ray head (whose GCS and client server speak gRPC, i.e. HTTP/2), instead of letting
    ``ray.init`` retry for a minute: the TCP connection must open and the server must answer the HTTP/2
    connection preface with its SETTINGS frame."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedError(f"Ray address {address!r} is not host:port, ray://host:port, auto or local")
    why = None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(_H2_PREFACE)
            head = conn.recv(9)
            if len(head) < 4 or head[3] != 0x04:
                why = "it does not speak gRPC"
    except socket.timeout:
        why = f"no answer within {timeout:g} s"
    except OSError as exc:
        why = str(exc)
    if why is not None:
        raise DistributedError(f"cannot reach the Ray cluster at {address} ({why}); start one with "
                               f"`ray start --head` or fix --ray-address / $RAY_ADDRESS")


class _Stream:
    """The append-only JSONL of finished rows: one write and one flush per row."""

    def __init__(self, path: Path):
        self.fh = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.fh.write(json.dumps(row, default=str) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _check_job_file(out: Path, job: ItemJob) -> None:
    desc = json.loads(json.dumps(job.describe(), default=str))
    path = out / JOB
    if path.exists() and (out / STREAM).exists():
        old = json.loads(path.read_text())
        if old != desc:
            diff = sorted(k for k in set(old) | set(desc) if old.get(k) != desc.get(k))
            raise DistributedError(f"{out} holds a run with other settings ({', '.join(diff)} differ); "
                                   f"use another --out or delete {out / STREAM}")
    path.write_text(json.dumps(desc, indent=1))


def run_items(
    job: ItemJob,
    items: Sequence[tuple[str, Any]],
    out: str | Path,
    backend: Backend | None = None,
    *,
    pool: "WorkerPool | None" = None,
    model=None,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
) -> RunReport:
    """Run ``job`` over ``items`` ((key, payload) pairs, keys unique) and write ``out/results.jsonl``.

    Items whose key already has a row in ``out/stream.jsonl`` are skipped (resume). ``pool`` runs the
    items on an open :class:`WorkerPool` (else one is opened and closed here when ``backend`` asks
    for Ray). ``model`` is used by the in-process backend (else it loads ``job.model_name``).
    ``on_row`` is called in this process after each row is written (progress hooks, tests). Ctrl-C stops the run with every
    finished row on disk and re-raises ``KeyboardInterrupt``; rerunning finishes the rest.
    """
    backend = backend or Backend()
    out = Path(out)
    keys = [str(k) for k, _ in items]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise DistributedError(f"item keys must be unique; repeated: {dup}")
    if not keys:
        raise DistributedError("no items to run")
    out.mkdir(parents=True, exist_ok=True)
    _check_job_file(out, job)
    stream_path = out / STREAM
    known = _latest(read_rows(stream_path))
    done = {k for k, r in known.items() if not r.get("lost")}
    todo = [(str(k), p) for k, p in items if str(k) not in done]
    report = RunReport(total=len(keys), skipped=len(keys) - len(todo))
    own = None
    if todo and pool is None and backend.uses_ray:  # joined before the bar starts: a bad address is one clean error
        pool = own = WorkerPool(backend, job.model_name)
    bar = tqdm(total=len(keys), initial=report.skipped, desc="items", unit="item", disable=not progress)
    stream = _Stream(stream_path)
    t0 = time.perf_counter()

    def emit(row: dict) -> None:
        stream.write(row)
        report.ran += 1
        report.keys_run.append(row["key"])
        report.failures += "error" in row
        bar.update(1)
        bar.set_postfix(failures=report.failures, refresh=False)
        if on_row is not None:
            on_row(row)

    try:
        if todo and pool is not None:
            _run_ray(job, todo, pool, emit, report)
        elif todo:
            if model is None:
                from czao_lens.models import load_model

                model = load_model(job.model_name, progress=False)
            try:
                state, why = job.setup(model), None
            except Exception as exc:  # as on a Ray worker: every item becomes a failure row with the reason
                state, why = None, exc
            for chunk in _chunks(todo, job.batch_size):
                for row in (_run_chunk(job, model, state, chunk, "local") if why is None else
                            [{**_failure(key, why), "timing": {"seconds": 0.0, "worker": "local"}} for key, _ in chunk]):
                    emit(row)
    except KeyboardInterrupt:
        report.interrupted = True
        raise
    finally:
        if own is not None:
            own.close()
        stream.close()
        bar.close()
        report.wall_seconds = time.perf_counter() - t0
        (out / RUN).write_text(json.dumps(report.to_dict(), indent=1))
    rows = _latest(read_rows(stream_path))
    ordered = [rows[k] for k in keys]  # the item order given: the same for every backend and schedule
    with open(out / RESULTS, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, default=str) + "\n" for r in ordered)
    summary = job.summarise(ordered)
    if summary is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return report


def _import_ray():
    try:
        import ray
    except ImportError:
        raise DistributedError("Ray is not installed: pip install 'czao-lens[ray]' (or run without --workers / --ray-address)") from None
    return ray


class WorkerPool:
    """Ray actors that each hold one copy of a model, reused by every :func:`run_items` call given the
    pool (a bench's tasks, a test module). Starts or joins Ray as the backend says; ``close()`` kills
    the actors and stops Ray if the pool started it. An actor that dies is replaced on the next call
    that finds it dead (at most ``workers x max_retries`` times over the pool's life)."""

    def __init__(self, backend: Backend, model_name: str):
        if not backend.uses_ray:
            raise DistributedError("a worker pool needs --workers N or a Ray address")
        if backend.address:  # before anything else: a wrong address must fail in seconds, not hang
            check_reachable(backend.address, backend.connect_timeout)
        ray = _import_ray()
        self.backend, self.model_name, self.started_here = backend, model_name, False
        t0 = time.perf_counter()
        if not ray.is_initialized():
            import logging

            kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            if backend.address:
                kw["address"] = backend.address
            else:  # a fresh local Ray sized for the actors, whatever $RAY_ADDRESS says
                kw.update(address="local", num_cpus=max(1, math.ceil(backend.workers * backend.num_cpus)),
                          num_gpus=math.ceil(backend.workers * backend.num_gpus) or None)
            try:
                ray.init(**kw)
            except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
                hint = " (a cluster with token auth also needs RAY_AUTH_MODE=token and its token here: docs/scaling.md)" if backend.address else ""
                raise DistributedError(f"could not start or join Ray ({backend.address or 'local'}): {exc}{hint}") from None
            self.started_here = True
        self.init_seconds = time.perf_counter() - t0
        n = backend.workers or self._room(ray.cluster_resources())
        self.where = "ray:" + (backend.address or ("local" if self.started_here else "running"))
        self._actor_cls = ray.remote(_Worker)
        self._run_id = hashlib.sha256(f"{os.getpid()}/{time.time()}".encode()).hexdigest()[:8]
        self._spawned, self.lost = 0, 0
        self._budget = n * max(1, backend.max_retries)
        self.actors = [self._spawn() for _ in range(n)]

    def _room(self, res: dict) -> int:
        """On a cluster without --workers: as many actors as its CPUs (or GPUs) hold."""
        b = self.backend
        per = [res.get("GPU", 0) / b.num_gpus] if b.num_gpus else []
        per += [res.get("CPU", 0) / b.num_cpus] if b.num_cpus else []
        return max(1, int(min(per))) if per else 1

    def _spawn(self):
        b = self.backend
        name = f"czao-lens-{self._run_id}-{self._spawned}"
        self._spawned += 1
        return self._actor_cls.options(name=name, num_cpus=b.num_cpus, num_gpus=b.num_gpus or None, max_restarts=0).remote(
            self.model_name, name, b.threads, "cuda" if b.num_gpus > 0 else "cpu")

    def replace(self, actor) -> None:
        """Drop a dead actor (once) and start a replacement while the budget lasts."""
        if any(x is actor for x in self.actors):
            self.actors[:] = [x for x in self.actors if x is not actor]
            self.lost += 1
            if self._budget > 0:
                self._budget -= 1
                self.actors.append(self._spawn())

    def wait_ready(self) -> float:
        """Block until every actor has loaded its model; returns the seconds waited."""
        t0 = time.perf_counter()
        _import_ray().get([a.ready.remote() for a in self.actors])
        return time.perf_counter() - t0

    def close(self) -> None:
        ray = _import_ray()
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.started_here:
            ray.shutdown()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _run_ray(job: ItemJob, todo: list[tuple[str, Any]], pool: WorkerPool, emit: Callable[[dict], None],
             report: RunReport) -> None:
    """Feed items to the pool's actors, one chunk (``job.batch_size`` items) in flight per actor
    (``ray.wait`` on the in-flight calls); the chunk of an actor that died (or could not start) is
    re-queued (bounded) and the actor replaced."""
    ray = _import_ray()
    from ray.exceptions import RayActorError, RayError

    if job.model_name != pool.model_name:
        raise DistributedError(f"the worker pool holds {pool.model_name!r}, the job needs {job.model_name!r}")
    t0 = time.perf_counter()
    report.backend, report.workers, report.ray_init_seconds = pool.where, len(pool.actors), pool.init_seconds
    token = hashlib.sha256(json.dumps(job.describe(), sort_keys=True, default=str).encode()).hexdigest()[:16]
    job_ref = ray.put(job)  # shipped once, not once per item
    lost_before = pool.lost
    queue = deque((c, 0) for c in _chunks(todo, job.batch_size))
    inflight: dict[Any, tuple[Any, str, Any, int]] = {}
    busy: set[int] = set()
    done: set[str] = set()
    last_death = "no worker answered"
    while queue or inflight:
        for a in pool.actors:
            if queue and id(a) not in busy:
                c, att = queue.popleft()
                inflight[a.run.remote(token, job_ref, c)] = (a, c, att)
                busy.add(id(a))
        if not inflight:
            raise DistributedError(f"every Ray worker died and the replacement budget is spent (last: {last_death})")
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
        if ready and report.first_row_seconds is None:
            report.first_row_seconds = time.perf_counter() - t0 + pool.init_seconds
        for ref in ready:
            a, c, att = inflight.pop(ref)
            busy.discard(id(a))
            try:
                rows = ray.get(ref)
            except RayActorError as exc:  # died mid-run, or could not start (e.g. out of memory loading the model)
                last_death = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                pool.replace(a)
                if att < pool.backend.max_retries:
                    report.retried += 1
                    queue.appendleft((c, att + 1))
                else:
                    for k, _ in c:
                        emit({"key": k, "error": f"the worker died {att + 1} times running this item: {exc}", "lost": True})
                continue
            except RayError as exc:  # Ray could not run or return the call (e.g. an unpicklable row)
                rows = [_failure(k, exc) for k, _ in c]
            for row in rows:
                if row["key"] not in done:
                    done.add(row["key"])
                    emit(row)
    report.workers_lost = pool.lost - lost_before
