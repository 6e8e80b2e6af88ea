"""TopK vs JumpReLU sparse SAEs at one training budget, through the `czao-lens sae train` path.

For each architecture this trains (or reuses, when its folder verifies) the SAE of the ``default``
recipe with only ``architecture`` and ``training_tokens`` changed: the same corpus (data folder minus
the bench pools, plus the model's own answers; seeded, so identical for both), width, k (JumpReLU:
SAELens' quadratic target L0 = k), learning rate, batch and seed, at the same hook. It goes through
``cached_sae`` with a separate cache root (``--root``), so the default cached SAE is never touched,
and prints both held-out quality reports as ``name=value`` lines, then the JumpReLU / TopK ratios.

Architectures can be trained in separate processes (``--architecture topk`` in one,
``--architecture jumprelu`` in another, same ``--root``); a last call with both reuses the folders
and prints the comparison. Times are from each SAE's own ``quality.json``; ``load`` is the 1-minute
load average when this script prints.

    CZAO_LENS_DATA=/work/shared/data python benchmarks/sae_architectures.py --tokens 500000 --root runs/sae_arch
"""

from __future__ import annotations

import argparse
import dataclasses
import os

KEYS = ("l0", "explained_variance", "explained_variance_typical", "ce_loss_recovered", "loss_with_sae",
        "dead_fraction", "dense_fraction", "n_tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--architecture", action="append", choices=("topk", "jumprelu"), help="Repeatable; default both.")
    ap.add_argument("--tokens", type=int, default=500_000, help="Training tokens for every architecture.")
    ap.add_argument("--hook", default="blocks.11.hook_resid_post")
    ap.add_argument("--root", default="runs/sae_arch", help="Cache root for these SAEs (not the default cache).")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()

    from czao_lens import load_model
    from czao_lens.sae_cache import RECIPES, cached_sae

    archs = args.architecture or ["topk", "jumprelu"]
    model = load_model(args.model, progress=False)
    reports = {}
    for arch in archs:
        recipe = dataclasses.replace(RECIPES["default"], architecture=arch, training_tokens=args.tokens)
        _, q, folder = cached_sae(model, args.hook, recipe, root=args.root)
        reports[arch] = q
        t, c = q["training"], q["corpus"]
        print(f"{arch}_folder={folder}")
        for k in KEYS:
            print(f"{arch}_{k}={q[k]:.4g}")
        print(f"{arch}_steps={t['steps']}")
        print(f"{arch}_training_tokens={t['training_tokens']}")
        print(f"{arch}_unique_tokens={t['unique_tokens']}")
        print(f"{arch}_epochs={t['epochs']}")
        print(f"{arch}_train_seconds={t['train_seconds']}")
        print(f"{arch}_activation_seconds={c['activation_seconds']}")
        print(f"{arch}_generation_seconds={c['generation_seconds']}")
        print(f"{arch}_total_seconds={q['total_seconds']}")
    if {"topk", "jumprelu"} <= set(reports):
        tk, jr = reports["topk"], reports["jumprelu"]
        print(f"jumprelu_over_topk_l0={jr['l0'] / tk['l0']:.3f}")
        print(f"jumprelu_minus_topk_explained_variance={jr['explained_variance'] - tk['explained_variance']:.4f}")
        print(f"jumprelu_minus_topk_ce_loss_recovered={jr['ce_loss_recovered'] - tk['ce_loss_recovered']:.4f}")
        print(f"jumprelu_over_topk_train_seconds={jr['training']['train_seconds'] / tk['training']['train_seconds']:.3f}")
    print(f"load={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
