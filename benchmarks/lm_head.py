"""The fused LM head on CPU: trl's call (every position of the batch) vs finetune.lm_head's (trained positions only).

    python benchmarks/lm_head.py                 # tiny (128 x 1,024 vocab, 8 x 512) and GPT-Neo-125M
                                                 # (768 x 50,257, 4 x 512)
    python benchmarks/lm_head.py --trained 0.5   # another share of trained positions

Both sides run trl's own kernel (`trl.kernels.ChunkedLogProbFunction`, forward + backward, log-probs, entropy and
top-1 as SFTTrainer asks for them) on random hidden states and an fp32 head, best of 3 in one process. trl on a
device without Triton projects all batch x (seq - 1) positions; ours projects the positions whose label is trained.
`--trained` is that share: 0.31 by default, what instruction data trains per packed row (96 ChatDoctor rows in 61
packed rows of 512: 9,535 trained tokens, benchmarks/train.py). The entropy/top-1 column shows what those two metrics
cost on top of the log-probs (trl computes them every micro-batch).
"""

from __future__ import annotations

import argparse
import time

SHAPES = {"tiny 4x128 (vocab 1,024)": (8, 512, 128, 1024), "GPT-Neo-125M head (vocab 50,257)": (4, 512, 768, 50257)}


def timed(function, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trained", type=float, default=0.31, help="share of positions whose label is trained")
    args = parser.parse_args()
    import torch
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    torch.manual_seed(0)
    metrics = ("log_probs", "entropy", "is_top1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward + backward of the head, best of 3")
    print()
    print(
        "| head | positions | trl: all positions (s) | ours: trained only (s) | ratio | ours without entropy/top-1 (s) "
        "|"
    )
    print("|---|---|---:|---:|---:|---:|")
    for name, (batch, seq, hidden, vocab) in SHAPES.items():
        n = batch * (seq - 1)
        states = torch.randn(n, hidden, requires_grad=True)
        weight = torch.randn(vocab, hidden) * 0.02
        targets = torch.randint(0, vocab, (n,))
        trained = torch.rand(n) < args.trained

        def run(rows, outputs=metrics, states=states, weight=weight, targets=targets):
            log_probs, *_ = ChunkedLogProbFunction.apply(
                states[rows], weight, None, targets[rows], 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs
            )
            log_probs.sum().backward()

        everything = timed(lambda: run(slice(None)))
        ours = timed(lambda rows=trained: run(rows))
        bare = timed(lambda rows=trained: run(rows, ("log_probs",)))
        print(
            f"| {name} | {n:,} ({int(trained.sum()):,} trained) | {everything:.3f} | {ours:.3f} | "
            f"{everything / ours:.2f}x | {bare:.3f} |"
        )


if __name__ == "__main__":
    main()
