"""Command-line start-up: how long ``czao-lens --help`` (and each subcommand's ``--help``) takes.

Each measurement is a fresh ``python -m czao_lens.cli ... --help`` process, median of ``--rounds``.
With ``--before REF`` the same is measured on a git ref's checkout (a temporary worktree) in
interleaved rounds, so both see the same machine load; the ratio is printed last.

    python benchmarks/cli_startup.py [--rounds 5] [--before main]

Lines: ``cli_help_seconds=`` (this checkout), ``cli_help_seconds_before=``, ``cli_subcommand_help_max_seconds=``,
``cli_help_ratio_before_over_after=``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["models", "generate", "trace", "lyapunov", "czao", "landscape", "steer", "demo", "bench",
               "probe train", "sae train", "sae features"]


def help_seconds(root: Path, args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # An explicit main call, so that checkouts without `if __name__ == "__main__"` in cli.py work too.
    code = "import sys; from czao_lens.cli import app; sys.argv[0] = 'czao-lens'; app()"
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, *args, "--help"], env=env, cwd=root, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if res.returncode != 0 or "Usage" not in res.stdout:
        raise SystemExit(f"--help failed in {root} for {args}: {res.stderr[-500:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--before", default=None, help="A git ref to compare with (e.g. main).")
    a = ap.parse_args()
    before = None
    if a.before:
        before = Path(tempfile.mkdtemp(prefix="cli-startup-"))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), a.before], check=True,
                       capture_output=True)
    try:
        now, old = [], []
        for _ in range(a.rounds):  # interleaved: both checkouts share the machine's load
            now.append(help_seconds(ROOT, []))
            if before:
                old.append(help_seconds(before, []))
        sub = [statistics.median(help_seconds(ROOT, c.split()) for _ in range(max(1, a.rounds // 2))) for c in SUBCOMMANDS]
    finally:
        if before:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], capture_output=True)
    print(f"load_average={os.getloadavg()[0]:.2f}")
    print(f"cli_help_seconds={statistics.median(now):.3f}")
    print(f"cli_subcommand_help_max_seconds={max(sub):.3f}")
    if before:
        print(f"cli_help_seconds_before={statistics.median(old):.3f}")
        print(f"cli_help_ratio_before_over_after={statistics.median(old) / statistics.median(now):.1f}")


if __name__ == "__main__":
    main()
