"""Best-fit packing of tokenized samples into rows of `max_length`, with samples isolated from each other.

Isolation uses transformers' own packed-sequence support: when a batch has `position_ids` that restart at 0 for
every sample and no `attention_mask`, `masking_utils.create_causal_mask` builds a block-diagonal causal mask
(eager and SDPA). GPT-Neo's local layers keep their window inside each sample, because the window is a relative
distance applied by the layer itself. Verified for GPT-Neo, GPT-J and GPT-NeoX (eager and SDPA) in
tests/test_packing.py: per-token losses of a packed batch equal the unpacked ones. The detection is skipped when a
2-D `attention_mask` or a KV cache is present, so the collator never emits a mask and training runs with
`use_cache=False` (trl sets it); `verify_isolation` checks the loaded model once before training, so a library
change that breaks this fails loudly instead of training samples that see each other.

trl's own padding-free packing is not used: it flattens a batch into one row longer than GPT-Neo's positions.
"""

from __future__ import annotations

import bisect
import gc
import random
from contextlib import contextmanager
from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    lengths: list[int]


@contextmanager
def gc_paused():
    """Pause CPython's cyclic garbage collector while data preparation builds token lists (it restores the state).

    Why: tens of thousands of samples are millions of list slots; every full collection walks all of them again, which
    cost two thirds of pack() on 50k rows (measured). Token lists hold ints only, so they cannot form cycles: nothing
    is left for the collector to find that reference counting does not free.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def pack(samples: list, max_length: int) -> list[PackedRow]:
    """Best-fit decreasing: longest samples first, each into the fullest row it still fits (deterministic)."""
    with gc_paused():
        return _pack(samples, max_length)


def _pack(samples: list, max_length: int) -> list[PackedRow]:
    lengths = [len(s.input_ids) for s in samples]
    # longest first; sorted() is stable: ties keep sample order
    order = sorted(range(len(samples)), key=[-n for n in lengths].__getitem__)
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted: bisect finds the tightest fit
    for i in order:
        need = lengths[i]
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(i)
            if space - need > 0:
                bisect.insort(free, (space - need, row))
        else:
            rows.append([i])
            if max_length - need > 0:
                bisect.insort(free, (max_length - need, len(rows) - 1))
    positions = list(range(max(lengths, default=0)))
    return [_join([samples[i] for i in members], positions) for members in rows]


def _join(members: list, positions: list[int]) -> PackedRow:
    row = PackedRow([], [], [], [])
    for sample in members:
        n = len(sample.input_ids)
        row.input_ids += sample.input_ids
        row.labels += sample.labels
        row.position_ids += positions[:n]
        row.lengths.append(n)
    return row


def efficiency(rows: list[PackedRow], max_length: int) -> float:
    """Real tokens / row tokens."""
    return sum(len(r.input_ids) for r in rows) / (len(rows) * max_length) if rows else 0.0


# data.packing=auto packs when packed batches compute at least this much less padding than padded ones: packing
# changes what a step holds (fewer, fuller rows), so a few points of padding are not worth it.
AUTO_MIN_GAIN = 1.1


def batch_efficiency(lengths: list[int], batch_size: int, seed: int) -> float:
    """Real tokens / computed tokens when batches in a seeded random order are padded to their longest member.

    Both collators pad that way (trl's for samples, PackedCollator for packed rows), so this compares the two
    batchings of the same data on the same terms."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    computed = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    return sum(lengths) / computed if computed else 0.0


def choose(samples: list, max_length: int, setting, batch_size: int, seed: int) -> tuple[list[PackedRow] | None, dict]:
    """The packed rows (None: batches of padded samples) and both batchings' efficiency, for data.packing = true |
    false | auto. Both are always measured (packing costs ~1 s per 50k samples) so the log can say what the other
    choice would have computed."""
    rows = pack(samples, max_length)
    padded = batch_efficiency([len(s.input_ids) for s in samples], batch_size, seed)
    packed = batch_efficiency([len(r.input_ids) for r in rows], batch_size, seed)
    use = setting is True or (setting == "auto" and packed >= AUTO_MIN_GAIN * padded)
    choice = {
        "setting": setting,
        "packed": use,
        "batch_size": batch_size,
        "max_length": max_length,
        "padded_efficiency": round(padded, 4),
        "packed_rows": len(rows),
        "packed_efficiency": round(packed, 4),
    }
    return (rows if use else None), choice


class PackedCollator:
    """Pads packed rows to the longest row in the batch; the padding is a sample of its own (positions restart).

    Rows without `position_ids` (the unpacked eval set) are one sample each and get 0..n-1.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "labels": [], "position_ids": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            batch["input_ids"].append(list(r["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(r["labels"]) + [IGNORE_INDEX] * pad)
            positions = list(r["position_ids"]) if "position_ids" in r else list(range(len(r["input_ids"])))
            batch["position_ids"].append(positions + list(range(pad)))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


class IsolationError(RuntimeError):
    pass


def verify_isolation(model, vocab_size: int, max_length: int, tolerance: float = 1e-3) -> float:
    """Pack [A, B] twice with different A and check B's logits do not move: packed samples must not see each other.

    With isolation, B's logits do not depend on A at all (its attention weights on A are exactly zero), so the
    difference is 0 up to kernel noise; a leak moves them by ~0.1-1 (measured). Returns the max abs difference.
    """
    import torch

    n = max(2, min(24, max_length // 2))  # two samples of n tokens fit in one row
    generator = torch.Generator().manual_seed(0)
    a1, a2, b = (torch.randint(0, vocab_size, (n,), generator=generator) for _ in range(3))
    positions = torch.cat([torch.arange(n), torch.arange(n)]).unsqueeze(0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = [
            model(
                input_ids=torch.cat([a, b]).unsqueeze(0).to(device), position_ids=positions.to(device), use_cache=False
            )
            .logits[0, n:]
            .float()
            for a in (a1, a2)
        ]
    model.train(was_training)
    difference = (logits[0] - logits[1]).abs().max().item()
    if not difference <= tolerance * (1 + logits[0].abs().max().item()):
        raise IsolationError(
            "packed samples see each other with this model/attention backend (logits of a sample moved by "
            f"{difference:.3g} "
            f"when the sample before it changed); turn off data.packing or use attn_implementation=eager/sdpa"
        )
    return difference
