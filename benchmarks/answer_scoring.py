"""A/B answer-text scoring: unembedding every position vs the answer positions only.

``answer_text_probability`` (the bench's choice-task evaluator) needs the log-probabilities of the
answer tokens only. It used to unembed every position of every question; now it stops at the last
block and unembeds the answer positions. This script times both on the same items of one embedded
model (``--model``, default SmolLM2-135M-Instruct; Gemma-3-270m's 262k-wide vocabulary is where it
matters), interleaved rounds, and checks that the scores agree.

Last lines: ``max_abs_diff=...`` and ``answer_scoring_speedup=<every-position seconds / answer-only seconds>``.

    python benchmarks/answer_scoring.py [--model gemma-3-270m] [--task sycophancy] [--n 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


@torch.no_grad()
def every_position(model, items) -> torch.Tensor:
    """The previous computation: full logits at every position, then the answer spans."""
    from czao_lens.prompts import encode_prompts, has_chat_template, text_ids
    from czao_lens.steering.common import answer_pair_texts

    chat = has_chat_template(model)
    pos, neg, pre_p, pre_n = answer_pair_texts(model, items, chat=chat)
    texts, spans = [], []
    for a, b, na, nb in zip(pos, neg, pre_p, pre_n):
        texts += [a, b]
        spans += [(na, len(text_ids(model, a)) - na), (nb, len(text_ids(model, b)) - nb)]
    scores = torch.zeros(len(texts))
    for k in range(0, len(texts), 8):
        idx = list(range(k, min(k + 8, len(texts))))
        enc = encode_prompts(model, [texts[i] for i in idx])
        lp = model(enc.tokens, attention_mask=enc.attention_mask).float().log_softmax(-1)
        for j, i in enumerate(idx):
            n_pre, n_ans = spans[i]
            pad = int(enc.pad[j])
            p = torch.arange(pad + n_pre - 1, pad + n_pre - 1 + n_ans)
            scores[i] = lp[j, p, enc.tokens[j, p + 1]].mean()
    s = scores.reshape(-1, 2)
    return torch.sigmoid(s[:, 0] - s[:, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="sycophancy", help="CAA behaviour whose test items are scored")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from czao_lens.models import load_model
    from czao_lens.prompts import has_chat_template
    from czao_lens.steering import load_ab
    from czao_lens.steering.evaluate import answer_text_probability

    model = load_model(args.model, progress=False)
    items = load_ab(args.task, "test", n=args.n, balanced=True, seed=0)
    chat = has_chat_template(model)
    t_full, t_ans, diff = [], [], 0.0
    for r in range(args.rounds):
        t = time.perf_counter()
        a = every_position(model, items)
        t_full.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = answer_text_probability(model, items, chat=chat)
        t_ans.append(time.perf_counter() - t)
        diff = max(diff, float((a - b).abs().max()))
        print(f"round={r} every_position_s={t_full[-1]:.2f} answer_only_s={t_ans[-1]:.2f}")
    print(f"model={args.model} items={len(items)} threads={torch.get_num_threads()}")
    print(f"max_abs_diff={diff:.2e}")
    print(f"answer_scoring_speedup={statistics.median(t_full) / statistics.median(t_ans):.2f}")


if __name__ == "__main__":
    main()
