"""Tiny GPT-Neo / GPT-NeoX / GPT-J checkpoints and a byte-level BPE tokenizer, built offline.

They keep the real structure of each family (GPT-Neo's alternating global/local attention with a window
smaller than the demo's sequence length; NeoX's rotary and parallel residual with its `<|padding|>` token; GPT-J's
rotary and parallel block) at a size that trains on a laptop CPU in seconds. The demo, the tests and anyone without
Hub access use them through the normal `from_pretrained` path.

A randomly initialised base cannot be fine-tuned meaningfully with LoRA: its output embedding (frozen, tied on
GPT-Neo) has rows of norm ~0.2, so no logit can rise above ~2.5 and the loss stays near ln(vocab). Like a real
base, the demo checkpoint is therefore pretrained first (`ensure`, ~2 min on 2 cores, once): causal LM on general
English that ships with every Python (`pydoc_data.topics`, the Python reference's prose, PSF licence), one epoch,
mixed with domain-adaptive pretraining on the raw text of the demo's training file (questions and answers as plain
prose, no instruction template), 24 epochs, with dropout 0.1 against memorising it. The tokenizer (2,048 tokens:
most domain words whole) is trained on that training file too. None of it ever sees the held-out file, so the
demo's held-out loss and sample measure generalisation; what fine-tuning adds is the instruction format.
Tests build unpretrained checkpoints (pretrain_epochs=0) in seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from finetune.config.compose import DEMO_DATA_DIR

BUILDER_VERSION = 2  # 2: 2,048-token tokenizer, domain-adaptive pretraining, dropout while pretraining
DEFAULT_CORPUS = DEMO_DATA_DIR / "legal_medical_qa.jsonl"
EOS = "<|endoftext|>"
NEOX_PAD = "<|padding|>"
MARKER = "tiny_build.json"
DEMO_PRETRAIN_EPOCHS = 1  # ~213k tokens of general English
DEMO_DOMAIN_EPOCHS = 24  # x ~39k tokens of the demo's training file as raw text; with the above ~2 min on 2 cores
DEMO_VOCAB_SIZE = 2048
PRETRAIN_DROPOUT = 0.1  # on the embedding, attention and residual outputs, while pretraining only (saved models: 0)
TEXT_FIELDS = ("instruction", "input", "output")
# printed under the before/after samples of a run on a tiny model (finetune.train.run)
WHAT_IT_SHOWS = (
    "note: a tiny model can show that fine-tuning worked (lower held-out loss; answers in the domain's words "
    "and format), not knowledge: what it says is not fact, and not advice"
)


def build(
    arch: str,
    out: str | os.PathLike,
    corpus: str | os.PathLike = DEFAULT_CORPUS,
    vocab_size: int = 1024,
    hidden_size: int = 128,
    layers: int = 4,
    heads: int = 4,
    max_positions: int = 512,
    window_size: int = 32,
    seed: int = 0,
    pretrain_epochs: int = 0,
    model_vocab_size: int | None = None,
    domain_epochs: int = 0,
) -> Path:
    """Write a tiny `arch` checkpoint (safetensors) and its tokenizer to `out`, replacing what is there.

    model_vocab_size pads the embedding and LM head to that many rows (the tokenizer keeps its own size), as Pythia
    pads 50,277 tokens to 50,304: benchmarks use it to give a tiny body the family's real 50k-row head.

    pretrain_epochs of general English and domain_epochs of `corpus` (as raw text) are mixed into one shuffled pass.

    Written to a staging directory beside `out` and renamed into place, so a crash never leaves half a model.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out)
    texts = _corpus_texts(corpus)
    tokenizer = train_tokenizer(arch, texts, vocab_size, max_positions)
    ids = {
        "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if model_vocab_size is not None and model_vocab_size < len(tokenizer):
        raise ValueError(f"model_vocab_size={model_vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    config = model_config(
        arch, model_vocab_size or len(tokenizer), hidden_size, layers, heads, max_positions, window_size, **ids
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if pretrain_epochs or domain_epochs:
        pretrain(model, tokenizer, [(general_english(), pretrain_epochs), (texts, domain_epochs)], seed)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(
            json.dumps(
                _fingerprint(
                    arch,
                    corpus,
                    vocab_size,
                    hidden_size,
                    layers,
                    seed,
                    pretrain_epochs,
                    model_vocab_size,
                    domain_epochs,
                    window_size,
                    heads,
                ),
                indent=2,
            )
        )
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def ensure(
    arch: str,
    out: str | os.PathLike,
    corpus: str | os.PathLike = DEFAULT_CORPUS,
    pretrain_epochs: int = DEMO_PRETRAIN_EPOCHS,
    domain_epochs: int = DEMO_DOMAIN_EPOCHS,
) -> Path:
    """Build the (pretrained) tiny checkpoint unless `out` already holds one built the same way (is_current)."""
    out = Path(out)
    if is_current(arch, out, corpus, pretrain_epochs, domain_epochs):
        return out
    print(
        f"[finetune] building tiny {arch} checkpoint at {out} (once, then cached; ~2 min on 2 cores): tokenizer on the "
        f"demo's training file, pretraining on {pretrain_epochs} epoch(s) of general English and {domain_epochs} of "
        "the training file's raw text (never the held-out file)",
        file=sys.stderr,
        flush=True,
    )
    return build(
        arch,
        out,
        corpus=corpus,
        vocab_size=DEMO_VOCAB_SIZE,
        pretrain_epochs=pretrain_epochs,
        domain_epochs=domain_epochs,
    )


def is_current(
    arch: str,
    out: str | os.PathLike,
    corpus: str | os.PathLike = DEFAULT_CORPUS,
    pretrain_epochs: int = DEMO_PRETRAIN_EPOCHS,
    domain_epochs: int = DEMO_DOMAIN_EPOCHS,
) -> bool:
    """Whether `out` holds the checkpoint ensure() keeps: built from the same corpus the same way, by this
    BUILDER_VERSION (a cache from an older recipe is rebuilt) and this Python (pydoc_data, the pretraining text,
    changes with Python)."""
    marker = Path(out) / MARKER
    if not marker.exists():
        return False
    wanted = {
        "version": BUILDER_VERSION,
        "arch": arch,
        "corpus_sha256": _sha256(corpus),
        "pretrain_epochs": pretrain_epochs,
        "domain_epochs": domain_epochs,
        "vocab_size": DEMO_VOCAB_SIZE,
        "python": platform.python_version(),
    }
    built = json.loads(marker.read_text())
    return all(built.get(k) == v for k, v in wanted.items())


def general_english() -> list[str]:
    """Paragraphs of the Python reference bundled with CPython (pydoc_data): English prose available offline."""
    from pydoc_data.topics import topics

    return [p.strip() for text in topics.values() for p in text.split("\n\n") if len(p.strip()) > 40]


def pretrain(
    model,
    tokenizer,
    corpora: list[tuple[list[str], int]],
    seed: int,
    block: int = 128,
    batch: int = 16,
    lr: float = 3e-3,
    dropout: float = PRETRAIN_DROPOUT,
) -> None:
    """Causal-LM pretraining of the tiny base on raw text: each (texts, epochs) corpus packed into `block`-token rows
    (> the local window), repeated `epochs` times, all rows in one shuffled pass. Dropout (nn.Dropout modules set to
    `dropout`, restored afterwards) keeps the small, repeated domain corpus from being memorised.

    A plain loop on purpose: this builds a test fixture, it is not the product's fine-tuning path (which is trl's).
    """
    import math

    import torch

    rows = torch.cat(
        [_packed(tokenizer, texts, block).repeat(epochs, 1) for texts, epochs in corpora if epochs and texts]
    )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    total = math.ceil(len(rows) / batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=0.1)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    saved = [m.p for m in dropouts]
    for m in dropouts:
        m.p = dropout
    model.train()
    try:
        for start in range(0, len(rows), batch):
            chunk = rows[order[start : start + batch]]
            model(input_ids=chunk, labels=chunk).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for m, p in zip(dropouts, saved):
            m.p = p
        model.eval()


def _packed(tokenizer, texts: list[str], block: int):
    """The texts' tokens, each text followed by EOS, cut into rows of `block` tokens (the remainder dropped)."""
    import torch

    ids = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids[: len(ids) // block * block], dtype=torch.long).view(-1, block)


def train_tokenizer(arch: str, texts: list[str], vocab_size: int, max_length: int):
    """Byte-level BPE like the real GPT-2/NeoX tokenizers: any UTF-8 text encodes, nothing maps to <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS, NEOX_PAD] if arch == "neox" else [EOS]  # NeoX ships a pad token; Neo and GPT-J do not
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=NEOX_PAD if arch == "neox" else None,
        model_max_length=max_length,
    )


def model_config(
    arch: str,
    vocab_size: int = DEMO_VOCAB_SIZE,  # what ensure() builds (the planner reads this before the build)
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    positions: int = 512,
    window: int = 32,
    **token_ids,
):
    """A config of the real architecture class, scaled down (EOS, and BOS, is token 0 of our tokenizer)."""
    token_ids = {"bos_token_id": 0, "eos_token_id": 0, **token_ids}
    from transformers import GPTJConfig, GPTNeoConfig, GPTNeoXConfig

    if arch == "neo":
        return GPTNeoConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            intermediate_size=4 * hidden,
            attention_types=[[["global", "local"], layers // 2]],  # alternating, as in every GPT-Neo
            window_size=window,
            max_position_embeddings=positions,
            **token_ids,
        )
    if arch == "neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=positions,
            rotary_pct=0.25,  # as in NeoX-20B and Pythia
            use_parallel_residual=True,
            **token_ids,
        )
    if arch == "gptj":
        return GPTJConfig(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            rotary_dim=hidden // heads // 2,
            n_positions=positions,
            **token_ids,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; choose neo, neox or gptj")


def _corpus_texts(corpus: str | os.PathLike) -> list[str]:
    """One document per JSONL row (its text fields joined by newlines), or the lines of a text file."""
    path = Path(corpus)
    if path.suffix != ".jsonl":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts.append("\n".join(row[k] for k in TEXT_FIELDS if row.get(k)))
    return texts


def _sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fingerprint(
    arch: str,
    corpus,
    vocab_size: int,
    hidden_size: int,
    layers: int,
    seed: int,
    pretrain_epochs: int,
    model_vocab_size: int | None = None,
    domain_epochs: int = 0,
    window_size: int = 32,
    heads: int = 4,
) -> dict:
    # Each absent at its default, so caches built before the option stay valid.
    padded = {"model_vocab_size": model_vocab_size} if model_vocab_size else {}
    window = {"window_size": window_size} if window_size != 32 else {}
    heads_given = {"heads": heads} if heads != 4 else {}
    return {
        **padded,
        **window,
        **heads_given,
        "version": BUILDER_VERSION,
        "arch": arch,
        "corpus_sha256": _sha256(corpus),
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "layers": layers,
        "seed": seed,
        "pretrain_epochs": pretrain_epochs,
        "domain_epochs": domain_epochs,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", required=True, choices=["neo", "neox", "gptj"])
    parser.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="JSONL or text file to train the tokenizer on")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--window-size", type=int, default=32, help="GPT-Neo's local attention window")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model-vocab-size",
        type=int,
        default=None,
        help="pad the embedding and LM head to this many rows (default: the tokenizer's size)",
    )
    parser.add_argument(
        "--pretrain-epochs",
        type=int,
        default=0,
        help=f"causal-LM epochs on general English (the demo base uses {DEMO_PRETRAIN_EPOCHS})",
    )
    parser.add_argument(
        "--domain-epochs",
        type=int,
        default=0,
        help=f"causal-LM epochs on the corpus as raw text, mixed in (the demo base uses {DEMO_DOMAIN_EPOCHS})",
    )
    args = parser.parse_args(argv)
    out = build(
        args.arch,
        args.out,
        args.corpus,
        args.vocab_size,
        args.hidden_size,
        args.layers,
        seed=args.seed,
        pretrain_epochs=args.pretrain_epochs,
        model_vocab_size=args.model_vocab_size,
        domain_epochs=args.domain_epochs,
        window_size=args.window_size,
        heads=args.heads,
    )
    print(f"wrote tiny {args.arch} checkpoint to {out}")


if __name__ == "__main__":
    main()
