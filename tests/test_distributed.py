"""Scale-out: the same rows in-process and on Ray workers, a killed worker, Ctrl-C then resume, bad input.

One local Ray (2 CPUs) and one pool of 2 actors (each its own SmolLM2 copy, 1 torch thread) serve the
whole module; CZAO runs 4 tokens per prompt with a token-level constraint so items take about a second.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from czao_lens.bench import QUICK, run_bench
from czao_lens.cli import app
from czao_lens.czao import CZAOConfig
from czao_lens.czao_file import CZAOFileJob, read_prompt_file
from czao_lens.distributed import (
    RESULTS,
    STREAM,
    Backend,
    DistributedError,
    WorkerPool,
    check_reachable,
    read_rows,
    run_items,
    without_timings,
)
from czao_lens.diagnostics.tracing import TraceJob, load_caa, rank_layers, ranking_from_effects, trace_item
from czao_lens.paths import default_data_dir
from czao_lens.steering import SteeringError
from czao_lens.steering import lqr
from czao_lens.steering.lqr import block_jacobians, jacobian_prompts

pytestmark = pytest.mark.real

MODEL = "smollm2-135m-instruct"
SPEC = json.dumps({"type": "avoid_tokens", "words": ["blue"]})
PROMPTS = [
    {"id": "sky", "prompt": "What color is the sky on a clear day? Answer in one word."},
    {"id": "flag", "prompt": "What are the three colors of the American flag?"},
    {"prompt": "What color is the ocean?"},
    {"id": "jeans", "prompt": "What color are most jeans?"},
]


def _job(seed: int = 0, batch_size: int = 2) -> CZAOFileJob:
    """Two prompts per batched CZAO decode: two chunks, so both Ray actors get one."""
    return CZAOFileJob(MODEL, SPEC, CZAOConfig(layers=(12,)), max_new_tokens=4, chat=True, seed=seed,
                       batch_size=batch_size)


def _rows(folder) -> list[dict]:
    return [without_timings(json.loads(line)) for line in (folder / RESULTS).read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The Ray actors run one torch thread; the in-process arm must too, or float reductions split
    differently across threads and the rows differ in their last bits (CI runs with 2 threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def reference(smol, prompt_file, tmp_path_factory):
    """The in-process run every Ray run is compared with."""
    out = tmp_path_factory.mktemp("inproc")
    rep = run_items(_job(), read_prompt_file(prompt_file), out, model=smol, progress=False)
    assert rep.ran == 4 and rep.failures == 0
    return _rows(out)


def test_batched_prompts_give_the_rows_of_prompts_run_alone(smol, tmp_path):
    """Prompts whose likeliest next word is banned, so CZAO searches at once: all four in one batched
    decode (each with its own seed) against one at a time: the same rows apart from timings."""
    path = tmp_path / "p.txt"
    path.write_text("Roses are red, violets are\nThe capital of France is\nMy favorite color is\nThe sky is\n")
    items = read_prompt_file(path)
    spec = json.dumps({"type": "avoid_tokens", "words": ["blue", "Paris"]})
    rows = {}
    for size in (1, 4):
        job = CZAOFileJob(MODEL, spec, CZAOConfig(layers=(12,)), max_new_tokens=3, chat=False, seed=0, batch_size=size)
        run_items(job, items, tmp_path / f"b{size}", model=smol, progress=False)
        rows[size] = _rows(tmp_path / f"b{size}")
    # Equal rows; floats to float32 noise (left padding in the batch changes reduction order, not decisions).
    assert _close(rows[1], rows[4]), (rows[1], rows[4])
    assert sum(r["summary"]["optimized_tokens"] for r in rows[1]) >= 2  # steered rows, not plain decoding
    assert len({r["seed"] for r in rows[1]}) == 4  # each prompt kept its own seed inside the batch


def _close(a, b) -> bool:
    """Equal structures, with floats equal to a relative 1e-4."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-4 * max(abs(a), abs(b), 1e-6)
    return a == b


@pytest.fixture(scope="module")
def pool():
    import ray  # installed by `make test` ([ray] extra): a missing Ray fails here, it does not skip
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    p = WorkerPool(Backend(workers=2, threads=1), MODEL)
    yield p
    p.close()
    ray.shutdown()


def test_importing_czao_lens_never_imports_ray():
    mods = "czao_lens, czao_lens.distributed, czao_lens.czao_file, czao_lens.bench, czao_lens.cli"
    if "ray" not in sys.modules:  # nothing in this session imported Ray yet: check here (a subprocess costs ~15 s)
        exec(f"import {mods}")
        assert "ray" not in sys.modules
    else:
        code = f"import sys, {mods}; print('ray' in sys.modules)"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.stdout.strip() == "False", r.stderr[-2000:]


def test_ray_workers_give_the_in_process_rows(pool, prompt_file, reference, tmp_path):
    rep = run_items(_job(), read_prompt_file(prompt_file), tmp_path, pool=pool, progress=False)
    assert rep.backend.startswith("ray") and rep.ran == 4 and rep.failures == 0
    workers = {json.loads(line)["timing"]["worker"] for line in (tmp_path / STREAM).read_text().splitlines()}
    assert len(workers) == 2  # both actors ran items
    rows = _rows(tmp_path)
    assert [r["key"] for r in rows] == ["sky", "flag", "line00003", "jeans"]  # the file's order, not completion order
    assert rows == reference
    assert any(r["summary"]["tokens"] == 4 for r in rows) and all(r["text"] for r in rows)


def test_a_killed_worker_has_its_items_rerun_elsewhere_once(pool, prompt_file, reference, tmp_path):
    import ray

    killed = []

    def kill_one(row):
        if not killed:  # after the first row: kill an actor that still has items to run
            killed.append(pool.actors[0])
            ray.kill(pool.actors[0])

    # One prompt per chunk: after the first row three remain, so actors[0] either has one in flight or
    # gets the next one, and its death is seen either way (with two chunks of two, actors[0] may already
    # have finished its chunk when it is killed, and nothing is lost: the test then failed at random).
    rep = run_items(_job(batch_size=1), read_prompt_file(prompt_file), tmp_path, pool=pool, progress=False, on_row=kill_one)
    assert killed and rep.workers_lost >= 1 and rep.retried >= 1
    assert not any(a is killed[0] for a in pool.actors) and len(pool.actors) == 2  # replaced
    streamed = [json.loads(line)["key"] for line in (tmp_path / STREAM).read_text().splitlines()]
    assert sorted(streamed) == sorted(r["key"] for r in reference)  # every item exactly once
    assert _rows(tmp_path) == reference


def test_an_interrupted_run_resumes_with_only_the_missing_items(pool, prompt_file, reference, tmp_path):
    seen = []

    def ctrl_c_after_two(row):
        seen.append(row["key"])
        if len(seen) == 2:
            signal.raise_signal(signal.SIGINT)

    items = read_prompt_file(prompt_file)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal, whatever ran before
    try:
        with pytest.raises(KeyboardInterrupt):
            run_items(_job(), items, tmp_path, pool=pool, progress=False, on_row=ctrl_c_after_two)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert [r["key"] for r in read_rows(tmp_path / STREAM)] == seen
    assert not (tmp_path / RESULTS).exists()
    with open(tmp_path / STREAM, "a") as fh:  # a crash mid-write leaves a torn line: it is cut, not trusted
        fh.write('{"key": "jeans", "text": "Blu')
    rep = run_items(_job(), items, tmp_path, pool=pool, progress=False)
    assert rep.skipped == 2 and sorted(rep.keys_run) == sorted(set(r["key"] for r in reference) - set(seen))
    assert _rows(tmp_path) == reference
    assert len(read_rows(tmp_path / STREAM)) == 4


def test_a_bench_task_on_ray_gives_the_in_process_files(pool, smol, tmp_path, monkeypatch):
    """Fitting (A-LQR: contrast, setpoint, Jacobians) and scoring of a task on a worker: the same rows
    and summary as in-process; on Ray the driver computes the Jacobians on the workers once and ships
    them with the job."""
    kw = dict(data=default_data_dir(), tasks=["refusal"], methods=["unsteered", "lqr"],
              n_fit=QUICK["n_fit"], n_test=QUICK["n_test"], settings=QUICK["settings"], progress=False)
    monkeypatch.setenv("CZAO_LENS_CACHE", str(tmp_path / "cache-in"))  # each arm computes its Jacobians (no cache hit)
    local = run_bench(smol, out=tmp_path / "in", **kw)
    monkeypatch.setenv("CZAO_LENS_CACHE", str(tmp_path / "cache-ray"))
    remote = run_bench(smol, out=tmp_path / "ray", pool=pool, **kw)
    monkeypatch.undo()
    jac = remote["run"]["resources"]["jacobians"]
    assert jac["backend"].startswith("ray") and jac["layers"] == list(QUICK["settings"].jac_layers)
    assert "backend" not in local["run"]["resources"]["jacobians"]
    rows = {k: [without_timings(json.loads(x)) for x in (tmp_path / k / "results.jsonl").read_text().splitlines()]
            for k in ("in", "ray")}
    assert len(rows["in"]) == 2 * QUICK["n_test"] and rows["in"] == rows["ray"]
    same = [json.dumps(without_timings(x["tasks"]), sort_keys=True, default=str) for x in (local, remote)]  # NaN-safe
    assert same[0] == same[1]
    assert remote["run"]["resources"]["distributed"]["backend"].startswith("ray")
    assert "failed" not in local["tasks"]["refusal"]["methods"]["lqr"]  # a fitted method, not only references
    assert (tmp_path / "ray" / "report.md").read_text().count("|") > 10


def test_bench_items_of_task_x_method_on_ray_give_the_whole_task_files(pool, smol, tmp_path):
    """Items of (task, method group) on 2 workers (best-of-n with CZAO, the unsteered reference in every
    item) against a whole task in-process: the same rows, in the same order, and the same summary
    (the merge's order for choice tasks: tests/test_bench.py::test_method_groups_and_their_merge)."""
    kw = dict(data=default_data_dir(), tasks=["sentiment"], methods=["unsteered", "czao", "bestofn"],
              n_fit=QUICK["n_fit"], n_test=QUICK["n_test"], settings=QUICK["settings"], progress=False)
    local = run_bench(smol, out=tmp_path / "in", **kw)
    remote = run_bench(smol, out=tmp_path / "ray", pool=pool, items="method", **kw)
    stream = read_rows(tmp_path / "ray" / "tasks" / RESULTS)
    assert [r["key"] for r in stream] == ["sentiment/unsteered", "sentiment/unsteered+czao+bestofn"]
    assert len({r["timing"]["worker"] for r in stream}) == 2  # the task's items ran side by side
    rows = {k: [without_timings(json.loads(x)) for x in (tmp_path / k / "results.jsonl").read_text().splitlines()]
            for k in ("in", "ray")}
    assert len(rows["in"]) == 3 * QUICK["n_test"] and rows["in"] == rows["ray"]
    assert [r["method"] for r in rows["ray"][:3]] == ["unsteered", "czao", "bestofn"]  # item by item, as one task
    same = [json.dumps(without_timings(x["tasks"]), sort_keys=True, default=str) for x in (local, remote)]  # NaN-safe
    assert same[0] == same[1] and remote["tasks"]["sentiment"]["methods"]["czao"]["passes_per_token"] >= 1


def test_tracing_items_on_ray_ranks_layers_as_in_process(pool, smol, tmp_path):
    items = load_caa(default_data_dir(), "refusal", split="test", limit=2)
    local = rank_layers(smol, [trace_item(smol, it) for it in items], n_samples=1, progress=False)
    run_items(TraceJob(MODEL, n_samples=1), [(f"item{i:05d}", it) for i, it in enumerate(items)], tmp_path, pool=pool,
              progress=False)
    rows = read_rows(tmp_path / RESULTS)
    assert [r["key"] for r in rows] == ["item00000", "item00001"] and not any("error" in r for r in rows)
    remote = ranking_from_effects(MODEL, smol.cfg.n_layers, [(r["total_effect"], r["effects"]) for r in rows],
                                  kinds=("resid",), position="subject_last")
    assert torch.equal(local.scores["resid"], remote.scores["resid"]) and local.top(3) == remote.top(3)


def test_block_jacobians_on_ray_equal_the_in_process_ones(pool, smol, tiny, tmp_path):
    """Shards of layers on 2 workers, summed over the prompts there: the same Jacobians as in-process,
    cached per model as in-process, and the shards' run folder gone once the cache entry is written."""
    prompts, layers = jacobian_prompts(smol, 2), [12, 13, 14]
    local = block_jacobians(smol, prompts=prompts, layers=layers, cache_dir=None)
    remote = block_jacobians(smol, prompts=prompts, layers=layers, cache_dir=tmp_path, pool=pool, layers_per_item=2)
    assert remote.layers == layers and remote.A.shape == local.A.shape
    assert torch.equal(remote.A, local.A)  # same code, same summation order, one thread each
    info = remote.meta["distributed"]
    assert info["items"] == 2 and info["backend"].startswith("ray") and len(info["workers"]) == 2
    names = [p.name for p in tmp_path.iterdir()]
    assert len(names) == 1 and names[0].startswith(local.meta["fingerprint"])  # the cache entry, no run folder left
    hit = block_jacobians(smol, prompts=prompts, layers=layers, cache_dir=tmp_path, pool=pool)  # the per-model cache
    assert torch.equal(hit.A, local.A) and hit.meta["seconds"] == remote.meta["seconds"]
    with pytest.raises(SteeringError, match="differs from the model"):  # workers hold other weights: refused, not mixed
        block_jacobians(tiny, prompts=prompts, layers=[1], cache_dir=None, pool=pool)


def test_interrupted_jacobians_resume_from_the_finished_shards(pool, smol, tmp_path, monkeypatch):
    prompts, layers = jacobian_prompts(smol, 1), [20, 21]
    real = lqr.run_items

    def ctrl_c_after_one_shard(*args, **kw):
        def stop(row):
            raise KeyboardInterrupt
        return real(*args, on_row=stop, **kw)

    monkeypatch.setattr(lqr, "run_items", ctrl_c_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        block_jacobians(smol, prompts=prompts, layers=layers, cache_dir=tmp_path, pool=pool, layers_per_item=1)
    monkeypatch.undo()
    resumed = block_jacobians(smol, prompts=prompts, layers=layers, cache_dir=tmp_path, pool=pool, layers_per_item=1)
    assert resumed.meta["distributed"]["skipped"] == 1  # only the other layer ran
    assert torch.equal(resumed.A, block_jacobians(smol, prompts=prompts, layers=layers, cache_dir=None).A)


def test_a_rerun_with_other_settings_is_refused(prompt_file, tmp_path, smol):
    items = read_prompt_file(prompt_file)[:1]
    run_items(_job(seed=0), items, tmp_path, model=smol, progress=False)
    with pytest.raises(DistributedError, match="other settings.*seed"):
        run_items(_job(seed=1), items, tmp_path, model=smol, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_ray_address_fails_in_seconds(prompt_file, tmp_path, monkeypatch):
    port = _free_port()  # nothing listens there
    t0 = time.perf_counter()
    r = CliRunner().invoke(app, ["czao", "--prompts", str(prompt_file), "--constraint", SPEC,
                                 "--ray-address", f"127.0.0.1:{port}", "--out", str(tmp_path / "a")])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "cannot reach the Ray cluster" in r.output, r.output
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # the environment variable alone selects the cluster
    r = CliRunner().invoke(app, ["czao", "--prompts", str(prompt_file), "--constraint", SPEC, "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "cannot reach the Ray cluster" in r.output, r.output
    assert time.perf_counter() - t0 < 20
    with socket.socket() as silent:  # accepts the connection but never answers: bounded by the timeout, no hang
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        t0 = time.perf_counter()
        with pytest.raises(DistributedError, match="no answer within 1 s"):
            check_reachable(f"127.0.0.1:{silent.getsockname()[1]}", timeout=1.0)
        assert time.perf_counter() - t0 < 5


def test_a_bad_line_is_a_failure_row_and_the_run_goes_on(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "ok", "prompt": "What color is grass?"}\n{"prompt": "broken\n{"id": "e", "prompt": "  "}\n')
    r = CliRunner().invoke(app, ["czao", "--prompts", str(path), "--constraint", SPEC, "-n", "3", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    rows = {row["key"]: row for row in map(json.loads, (tmp_path / "o" / RESULTS).read_text().splitlines())}
    assert list(rows) == ["ok", "line00002", "e"]
    assert rows["ok"]["text"] and "error" not in rows["ok"] and rows["ok"]["summary"]["tokens"] == 3
    assert "invalid JSON" in rows["line00002"]["error"] and "empty 'prompt'" in rows["e"]["error"]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["prompts"] == 3 and summary["failures"] == 2


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_an_empty_prompt_file_is_one_line_and_exit_2_before_the_model_loads(tmp_path, text):
    path = tmp_path / "empty.txt"
    path.write_text(text)
    r = CliRunner().invoke(app, ["czao", "--prompts", str(path), "--constraint", SPEC, "--model", "/no/such/model.gguf",
                                 "--out", str(tmp_path / "o")])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "is empty" in r.output, r.output


def test_prompt_and_prompts_are_exclusive(prompt_file):
    r = CliRunner().invoke(app, ["czao", "-p", "hi", "--prompts", str(prompt_file), "--constraint", SPEC])
    assert r.exit_code == 2 and "not both" in r.output
