"""``czao-lens bench``: every steering method side by side on the same model, prompts and evaluators.

tasks.py (data, splits, evaluators) -> methods.py (fit + sweep + run) -> harness.py (the loop,
failures, summary) -> report.py (markdown, HTML, plots); metrics.py holds fluency, KL, diversity
and bootstrap intervals.
"""

from czao_lens.bench.harness import QUICK, check_methods, run_bench
from czao_lens.bench.methods import METHODS, BenchSettings
from czao_lens.bench.tasks import TASK_NAMES, BenchError, load_task

__all__ = ["METHODS", "QUICK", "TASK_NAMES", "BenchError", "BenchSettings", "check_methods", "load_task", "run_bench"]
