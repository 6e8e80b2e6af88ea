"""Decode speed of steered vs unsteered generation: CAA (static vector) and A-LQR (feedback hooks).

SmolLM2-135M-Instruct (fp32, CPU, czao-lens runtime), greedy, one prompt, ``--new-tokens`` tokens,
``stop_at_eos`` off so every run decodes the same number of tokens. Rounds are interleaved
(unsteered, CAA, A-LQR, unsteered, ...) so load from other processes hits all three alike; the
median round of each is reported. The vectors are fitted on a few CAA refusal pairs; A-LQR uses
Jacobians from ``--jac-prompts`` prompts (cached under ``$CZAO_LENS_CACHE/jacobians``), over all
layers. Speed does not depend on how good the controller is, only on its hooks.

The last line is ``steering_overhead_min_ratio=<min(CAA ratio, A-LQR ratio)>`` (goal >= 0.9).

    python benchmarks/steering_overhead.py [--rounds 3] [--new-tokens 48] [--jac-prompts 2]
"""

from __future__ import annotations

import argparse
import statistics
import warnings

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--jac-prompts", type=int, default=2)
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--prompt", default="Write a short paragraph about the history of tea.")
    args = ap.parse_args()

    from czao_lens import load_model
    from czao_lens.generate import generate
    from czao_lens.steering import caa_vector, load_ab
    from czao_lens.steering.evaluate import generate_steered
    from czao_lens.steering.lqr import block_jacobians, fit_alqr

    model = load_model("smollm2-135m-instruct", progress=False)
    fit = load_ab("refusal", "fit", n=8)
    vec = caa_vector(model, fit, [args.layer])
    jac = block_jacobians(model, n_prompts=args.jac_prompts)
    ctrl = fit_alqr(model, jac, items=fit, lam=1.0)
    n = args.new_tokens
    kw = dict(max_new_tokens=n, greedy=True, stop_at_eos=False)

    runs = {
        "unsteered": lambda: generate(model, args.prompt, chat=True, **kw),
        "caa": lambda: generate(model, args.prompt, chat=True, perturbations=vec.to_perturbations(), **kw),
        "alqr": lambda: generate_steered(model, args.prompt, ctrl, **kw),
    }
    for f in runs.values():  # warm-up
        f()
    speeds: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, f in runs.items():
            res = f()
            speeds[k].append(sum(len(t) for t in res.new_tokens) / res.seconds)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    for k in runs:
        print(f"{k:10s} {med[k]:6.2f} tok/s  (rounds: {', '.join(f'{s:.2f}' for s in speeds[k])})")
    r_caa = med["caa"] / med["unsteered"]
    r_lqr = med["alqr"] / med["unsteered"]
    print(f"caa_ratio={r_caa:.3f}")
    print(f"alqr_ratio={r_lqr:.3f}")
    print(f"steering_overhead_min_ratio={min(r_caa, r_lqr):.3f}")


if __name__ == "__main__":
    main()
