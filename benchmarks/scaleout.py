"""The same CZAO prompt file in this process and on a local Ray of 2 workers (1 torch thread each), in one run.

Both arms run :func:`czao_lens.distributed.run_items` on the same 16 prompts (banned-word prompts whose
likeliest continuation is the banned word, so CZAO optimises most tokens), same seeds and token budget.
Prints, as name=value lines:

- ``inprocess_seconds`` (model load + items, 1 torch thread), ``ray_seconds`` (``ray.init`` + actors
  loading their model copies + items), ``ray_startup_seconds`` (``ray.init`` + every actor ready);
- ``scaleout_speedup`` = in-process wall / Ray wall, both end to end; ``scaleout_speedup_warm`` = the
  same for the items alone (model loads and Ray start-up left out: what a long run tends to);
- ``item_seconds`` (in-process mean per item), ``scaleout_identical`` (every row equal apart from timings);
- ``batched_speedup``: the same items in-process one prompt per decode over ``--batch-size`` prompts per
  batched CZAO decode (items only), and ``batched_same_text`` (texts, verdicts and seeds equal).

    python benchmarks/scaleout.py [--n 16] [--max-new-tokens 12] [--workers 2] [--batch-size 8] [--out runs/bench_scaleout]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import replace
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from czao_lens import load_model  # noqa: E402
from czao_lens.czao import CZAOConfig  # noqa: E402
from czao_lens.czao_file import CZAOFileJob, read_prompt_file  # noqa: E402
from czao_lens.distributed import RESULTS, Backend, WorkerPool, run_items, without_timings  # noqa: E402

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    ("My favorite color is", "blue"), ("Roses are red, violets are", "blue"), ("The capital of France is", "Paris"),
    ("Once upon a", "time"), ("The first president of the United States was George", "Washington"),
    ("Twinkle, twinkle, little", "star"), ("The opposite of hot is", "cold"),
    ("The largest planet in our solar system is", "Jupiter"), ("Water is made of hydrogen and", "oxygen"),
    ("The color of grass is", "green"), ("Bread is made from", "flour"), ("The Eiffel Tower is in", "Paris"),
    ("The sky on a clear day is", "blue"), ("A week has seven", "days"), ("Cats chase", "mice"),
    ("The sun rises in the", "east"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_scaleout"))
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per batched CZAO decode in both arms")
    a = ap.parse_args()
    words = sorted({w for _, w in PROMPTS})
    # Beyond 16 the prompts repeat, as distinct items (own key, own seed): a longer run, same kind of work.
    prompts = [PROMPTS[i % len(PROMPTS)][0] for i in range(a.n)]
    a.out.mkdir(parents=True, exist_ok=True)
    pfile = a.out / "prompts.jsonl"
    pfile.write_text("".join(json.dumps({"id": f"p{i:02d}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    job = CZAOFileJob(MODEL, json.dumps({"type": "avoid_tokens", "words": words}), CZAOConfig(layers=(12,)),
                      max_new_tokens=a.max_new_tokens, chat=False, seed=0, batch_size=a.batch_size)
    items = read_prompt_file(pfile)
    for arm in ("inprocess", "ray", "unbatched"):
        shutil.rmtree(a.out / arm, ignore_errors=True)
    print(f"load before: {os.getloadavg()[0]:.2f} (1-min load average, {os.cpu_count()} cores)", flush=True)

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = load_model(MODEL, progress=False)
    t_load = time.perf_counter() - t0
    rep_in = run_items(job, items, a.out / "inprocess", model=model, progress=False)
    t_in = time.perf_counter() - t0
    # The same items one prompt per decode (the runner's behaviour before prompts were batched).
    rep_one = run_items(replace(job, batch_size=1), items, a.out / "unbatched", model=model, progress=False)
    del model

    t0 = time.perf_counter()
    with WorkerPool(Backend(workers=a.workers, threads=1), MODEL) as pool:
        pool.wait_ready()
        t_start = time.perf_counter() - t0
        rep_ray = run_items(job, items, a.out / "ray", pool=pool, progress=False)
    t_ray = time.perf_counter() - t0

    rows = {arm: [without_timings(json.loads(x)) for x in (a.out / arm / RESULTS).read_text().splitlines()]
            for arm in ("inprocess", "ray", "unbatched")}
    identical = rows["inprocess"] == rows["ray"]
    print(f"load after: {os.getloadavg()[0]:.2f}")
    print(f"items={len(items)} max_new_tokens={a.max_new_tokens} workers={a.workers} failures={rep_in.failures + rep_ray.failures}")
    print(f"inprocess_model_load_seconds={t_load:.2f}")
    print(f"inprocess_seconds={t_in:.2f}")
    print(f"ray_seconds={t_ray:.2f}")
    print(f"ray_startup_seconds={t_start:.2f}")
    print(f"ray_init_seconds={pool.init_seconds:.2f}")
    print(f"item_seconds={rep_in.wall_seconds / len(items):.2f}")
    print(f"scaleout_speedup_warm={rep_in.wall_seconds / rep_ray.wall_seconds:.2f}")
    print(f"scaleout_speedup={t_in / t_ray:.2f}")
    print(f"scaleout_identical={str(identical).lower()}")
    print(f"unbatched_seconds={rep_one.wall_seconds:.2f}")
    print(f"batched_speedup={rep_one.wall_seconds / rep_in.wall_seconds:.2f}  (in-process, batch {a.batch_size} vs 1, items only)")
    print(f"batched_same_text={str(texts(rows['unbatched']) == texts(rows['inprocess'])).lower()}")


def texts(rows: list[dict]) -> list:
    """What batching must not change: each prompt's text, verdict and seed (floats such as KL may
    differ in their last bits, left padding changes the reduction order)."""
    return [(r["key"], r.get("text"), r.get("satisfied"), r.get("seed")) for r in rows]


if __name__ == "__main__":
    main()
