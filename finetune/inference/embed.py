"""`python -m finetune.embed <run_dir | adapter | model> input=FILE [out=FILE] [options]`: one vector per text.

Vectors for a vector database, from what finetune.generate loads: a run (its adapter over the base, or its full
model; merged=true: RUN/merged), an adapter folder or a model folder. adapter=false embeds with the base under the
adapter instead (the same load, the adapter switched off), to compare the fine-tune with where it started.

A text's vector is the hidden state at `layer` (0: the embeddings, -1: the last layer, after the final layer norm),
pooled over its tokens: mean (every token) or last (the final token, for a causal model the one that has read the
whole text). Texts longer than max_length tokens are truncated (counted on stderr and in the manifest). A vector
does not depend on the other texts in its batch: padding is masked out, not recognised by token id.

input: .txt (one text per non-empty line), or .jsonl / .json / .csv / .tsv / .parquet (the `field` column).
out: FILE.parquet (columns row: the text's index in the input, text, embedding: list<float32>) or FILE.npy (a
float32 matrix [texts, hidden size], in input order). Default: RUN/embeddings/<input stem>.parquet for a target in
a run directory (<stem>.base.parquet with adapter=false, <stem>.merged.parquet with merged=true); outside a run,
out= is required. Beside it, OUT.json records what made the vectors (target, adapter, base, layer, pooling, ...).
Both are written to a temporary file and renamed, so an interrupted run leaves no half file; an existing out is
refused unless overwrite=true. Everything that can be checked is checked before the weights load.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from finetune import console as cli
from finetune.console import Option
from finetune.data import sources
from finetune.errors import ConfigError, DataError
from finetune.inference import generate
from finetune.runs import artifacts, rundir

OPTIONS = [
    Option(
        "input", str, None, "texts: .txt (one per non-empty line) or .jsonl/.json/.csv/.tsv/.parquet (column field=)"
    ),
    Option(
        "out",
        str,
        None,
        "FILE.parquet or FILE.npy (default: RUN/embeddings/<input stem>.parquet; required outside a run)",
    ),
    Option("field", str, "text", "the column holding the text (not for .txt)"),
    Option(
        "layer", int, -1, "hidden state to pool: 0 embeddings, 1..N after layer N, -1 the last (after the final norm)"
    ),
    Option("pooling", str, "mean", "mean (over the text's tokens) | last (the text's final token)"),
    Option("adapter", bool, True, "false: embed with the base under the adapter (the adapter switched off)"),
    Option("normalize", bool, False, "scale each vector to unit L2 norm (for cosine similarity as a dot product)"),
    Option("batch_size", int, 16, "texts per forward pass (sorted by length, so batches pad little)"),
    Option("max_length", int, 512, "tokens per text; longer texts are truncated (and counted)"),
    Option("overwrite", bool, False, "replace an existing out"),
    Option("merged", bool, False, "use RUN/merged (python -m finetune.merge) instead of base + adapter"),
    Option("base", str, None, "base model folder or Hub id for an adapter (default: the run's model.name_or_path)"),
    Option(
        "dtype",
        str,
        None,
        "bfloat16 | float32 | float16 | auto (default: the run's model.dtype; float16 -> float32 on CPU)",
    ),
]
POOLINGS = ("mean", "last")
TEXT_SUFFIX = ".txt"
OUT_SUFFIXES = (".parquet", ".npy")
EMBEDDINGS_DIR = "embeddings"
MANIFEST_SUFFIX = ".json"  # OUT.json beside OUT
PARQUET_CHUNK = 8192  # rows per Parquet row group: list offsets stay small and memory bounded


@dataclass
class Encoded:
    """Token ids of each text (already cut to max_length) and how many texts were cut."""

    ids: list[list[int]]
    truncated: int


def encode(tokenizer, texts: list[str], max_length: int = 512) -> Encoded:
    """Tokenise `texts` (the tokenizer's own special tokens, no padding); longer than max_length: truncated, counted."""
    if max_length < 1:
        raise ConfigError(f"max_length={max_length}: must be at least 1")
    texts = list(texts)
    if not texts:
        raise DataError("no texts to embed")
    ids = tokenizer(texts, truncation=False)["input_ids"]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        shown = ", ".join(map(str, empty[: sources.MAX_REPORTED]))
        raise DataError(f"{len(empty)} text(s) have no tokens (empty strings): index {shown}; drop them from the input")
    truncated = sum(len(row) > max_length for row in ids)
    return Encoded([list(row[:max_length]) for row in ids], truncated)


def embed_texts(
    model,
    tokenizer,
    texts: list[str],
    *,
    layer: int = -1,
    pooling: str = "mean",
    batch_size: int = 16,
    max_length: int = 512,
    normalize: bool = False,
    adapter: bool = True,
    progress: bool = False,
):
    """Vectors for `texts` as a float32 numpy array [len(texts), hidden size], in the order given.

    `model` is a generate.Session (then `tokenizer` may be None) or a transformers / peft model. adapter=False runs
    a peft model with its adapter disabled (the base); on a plain model it changes nothing.
    """
    if isinstance(model, generate.Session):
        tokenizer = model.tokenizer if tokenizer is None else tokenizer
        model = model.model
    encoded = encode(tokenizer, texts, max_length)
    if encoded.truncated:
        cli.say(
            f"{encoded.truncated} of {len(encoded.ids)} texts are longer than max_length={max_length} tokens: truncated"
        )
    return embed_ids(
        model,
        encoded.ids,
        layer=layer,
        pooling=pooling,
        batch_size=batch_size,
        normalize=normalize,
        adapter=adapter,
        pad_id=pad_id(tokenizer),
        progress=progress,
    )


def embed_ids(
    model,
    ids: list[list[int]],
    *,
    layer: int = -1,
    pooling: str = "mean",
    batch_size: int = 16,
    normalize: bool = False,
    adapter: bool = True,
    pad_id: int = 0,
    progress: bool = False,
):
    """Vectors for already tokenised texts (see encode): batched longest first, right-padded, returned in input order.

    Padding is excluded through the attention mask, so `pad_id` may be any token (EOS included) and a text's vector
    does not depend on its batch.
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    problems = check_options(layer, pooling, batch_size, num_layers(model.config))
    if problems:
        raise ConfigError(problems)
    if not ids or any(not row for row in ids):
        raise DataError("no texts to embed" if not ids else "a text has no tokens; drop empty texts")
    device = _device(model)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)  # longest first: out-of-memory shows early
    vectors = None
    with (
        torch.inference_mode(),
        _adapter_state(model, adapter),
        tqdm(total=len(ids), desc="embedding", unit="text", file=sys.stderr, disable=not progress) as bar,
    ):
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            input_ids, mask = _right_padded([ids[i] for i in chosen], pad_id)
            input_ids, mask = input_ids.to(device), mask.to(device)
            # the LM head's logits are not needed: last position only
            output = model(
                input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False, logits_to_keep=1
            )
            pooled = pool(output.hidden_states[layer].float(), mask, pooling)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            if vectors is None:
                vectors = np.empty((len(ids), pooled.shape[-1]), dtype=np.float32)
            vectors[chosen] = pooled.cpu().numpy()
            bar.update(len(chosen))
    return vectors


def pool(states, mask, pooling: str):
    """[batch, tokens, hidden] -> [batch, hidden]: the mean over masked-in tokens, or the last masked-in token."""
    import torch

    if pooling == "mean":
        weights = mask.to(states.dtype).unsqueeze(-1)
        return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    if pooling == "last":  # right padding: the last real token is at length - 1
        last = mask.sum(dim=1) - 1
        return states[torch.arange(states.shape[0], device=states.device), last]
    raise ConfigError(f"pooling={pooling}: choose one of {', '.join(POOLINGS)}")


def _right_padded(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[index, : len(row)] = 1
    return input_ids, mask


def _adapter_state(model, adapter: bool):
    """peft's disable_adapter() for adapter=False on a peft model; nothing otherwise."""
    if adapter:
        return contextlib.nullcontext()
    from peft import PeftModel

    return model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()


def _device(model):
    import torch

    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def pad_id(tokenizer) -> int:
    """Any token serves as padding (it is masked out): the pad token, else EOS (GPT-Neo, GPT-J), else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def num_layers(config) -> int:
    """Transformer layers (GPT-Neo's num_layers and GPT-J's n_layer are mapped to num_hidden_layers)."""
    return int(config.num_hidden_layers)


def check_options(layer: int, pooling: str, batch_size: int, layers: int) -> list[str]:
    """One problem per bad value; `layers` is the model's layer count (hidden_states has layers + 1 entries)."""
    problems = []
    if not -(layers + 1) <= layer <= layers:
        problems.append(
            f"layer={layer}: this model has {layers} layers, so layer= is 0 (embeddings) .. {layers} (the last, "
            f"after the final layer norm), or counted from the end -1 .. -{layers + 1}"
        )
    if pooling not in POOLINGS:
        problems.append(f"pooling={pooling}: choose one of {', '.join(POOLINGS)}")
    if batch_size < 1:
        problems.append(f"batch_size={batch_size}: must be at least 1")
    return problems


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """The texts of `path`: the non-empty lines of a .txt file, else the `field` column of each row, in order.

    A row without the field, or with a value that is not a non-empty string, is a DataError naming file:line.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix != TEXT_SUFFIX and suffix not in sources.SUFFIXES:
        raise ConfigError(
            f"input={path}: unsupported file type '{suffix}'; use {TEXT_SUFFIX} (one text per line) or "
            f"{', '.join(sources.SUFFIXES)}"
        )
    if not path.is_file():
        raise ConfigError(f"input={path}: no such file{'' if path.is_absolute() else f' (relative to {Path.cwd()})'}")
    if suffix == TEXT_SUFFIX:
        text = sources._decode(str(path), path.read_bytes(), "input")  # a non-UTF-8 byte: named by line and column
        texts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    else:
        texts = _field_texts(sources.read_rows(str(path), key="input"), field)
    if not texts:
        raise DataError(f"{path}: no texts to embed (input=)")
    return texts


def _field_texts(result: sources.ReadResult, field: str) -> list[str]:
    problems = [(r.where, f"{r.where}: {r.reason}") for r in result.rejected]
    texts = []
    for row in result.rows:
        value, where = row.get(field), row["_where"]
        if field not in row:
            columns = ", ".join(k for k in row if k != "_where")
            problems.append(
                (where, f"{where}: no '{field}' field (columns: {columns}); name the text column with field=")
            )
        elif not isinstance(value, str):
            what = "null" if value is None else f"{str(value)[:40]} ({type(value).__name__})"
            problems.append((where, f"{where}: '{field}' is {what}, not a string (field={field})"))
        elif not value:
            problems.append((where, f"{where}: '{field}' is empty; drop the row (field={field})"))
        else:
            texts.append(value)
    if problems:
        problems = [message for _, message in sorted(problems, key=lambda p: _position(p[0]))]
        more = (
            f"\n  ... and {len(problems) - sources.MAX_REPORTED} more" if len(problems) > sources.MAX_REPORTED else ""
        )
        raise DataError(
            f"{len(problems)} row(s) of the input cannot be embedded:\n  "
            + "\n  ".join(problems[: sources.MAX_REPORTED])
            + more
        )
    return texts


def _position(where: str) -> int:
    """The line or row number at the end of a `_where` (file:7, file:[3], file:#5), to report problems in file order."""
    digits = re.search(r"(\d+)\]?$", where)
    return int(digits.group(1)) if digits else 0


def default_out(target: rundir.Target, input_path: Path, adapter: bool, merged: bool) -> Path:
    """RUN/embeddings/<input stem>[.base|.merged].parquet; outside a run directory there is no default."""
    if target.run_dir is None:
        raise ConfigError(
            f"out=: {target.weights} is not in a run directory, so there is no default place for the "
            "vectors; give out=FILE.parquet or out=FILE.npy"
        )
    variant = ".base" if not adapter and target.kind == "adapter" else (".merged" if merged else "")
    return target.run_dir / EMBEDDINGS_DIR / f"{input_path.stem}{variant}.parquet"


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + MANIFEST_SUFFIX)


def write(out: Path, texts: list[str], vectors, manifest: dict) -> None:
    """The vectors (.parquet or .npy) and OUT.json, each through a temporary file in out's folder and a rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    data_tmp = _temporary(out)
    try:
        if out.suffix == ".npy":
            _write_npy(data_tmp, vectors)
        else:
            _write_parquet(data_tmp, texts, vectors)
        # a crash between the renames leaves no stale manifest beside new data
        manifest_path(out).unlink(missing_ok=True)
        os.replace(data_tmp, out)
    finally:
        data_tmp.unlink(missing_ok=True)
    artifacts.write_json(manifest_path(out), manifest)


def _temporary(out: Path) -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}.tmp")


def _write_npy(path: Path, vectors) -> None:
    import numpy as np

    with open(path, "wb") as file:
        np.save(file, vectors)


def _write_parquet(path: Path, texts: list[str], vectors) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    count, dim = vectors.shape
    schema = pa.schema([("row", pa.int64()), ("text", pa.string()), ("embedding", pa.list_(pa.float32()))])
    with pq.ParquetWriter(str(path), schema) as writer:
        for start in range(0, count, PARQUET_CHUNK):
            stop = min(start + PARQUET_CHUNK, count)
            offsets = pa.array(np.arange(0, (stop - start) * dim + 1, dim, dtype=np.int32))
            embedding = pa.ListArray.from_arrays(offsets, pa.array(vectors[start:stop].reshape(-1), pa.float32()))
            writer.write_table(
                pa.table(
                    {
                        "row": pa.array(np.arange(start, stop, dtype=np.int64)),
                        "text": pa.array(texts[start:stop], pa.string()),
                        "embedding": embedding,
                    },
                    schema=schema,
                )
            )


def run(opts: dict) -> Path:
    """The CLI: check options, input, output and layer before loading weights; embed; write vectors and manifest."""
    started = time.monotonic()
    problems = (
        []
        if opts["input"]
        else ["input=FILE is required: the texts to embed (.txt, .jsonl, .json, .csv, .tsv, .parquet)"]
    )
    if opts["max_length"] < 1:
        problems.append(f"max_length={opts['max_length']}: must be at least 1")
    if opts["out"] and Path(opts["out"]).suffix.lower() not in OUT_SUFFIXES:
        problems.append(f"out={opts['out']}: write a {' or '.join(OUT_SUFFIXES)} file")
    if problems:
        raise ConfigError(problems)
    input_path = Path(opts["input"]).expanduser()
    target = rundir.locate(opts["target"], opts["merged"])
    out = (
        Path(opts["out"]).expanduser()
        if opts["out"]
        else default_out(target, input_path, opts["adapter"], opts["merged"])
    )
    if (out.exists() or manifest_path(out).exists()) and not opts["overwrite"]:
        raise ConfigError(f"out={out}: already exists; choose another out= or pass overwrite=true")
    loading = generate.plan(opts["target"], opts["merged"], base=opts["base"], dtype=opts["dtype"])
    config = _architecture(loading)
    problems = check_options(opts["layer"], opts["pooling"], opts["batch_size"], num_layers(config))
    context = getattr(config, "max_position_embeddings", None)
    if context and opts["max_length"] > context:
        problems.append(
            f"max_length={opts['max_length']}: the model's context is {context} tokens; use max_length={context} or "
            "less"
        )
    if problems:
        raise ConfigError(problems)
    cli.quiet_libraries()
    texts = read_texts(input_path, opts["field"])
    encoded = encode(loading.tokenizer, texts, opts["max_length"])
    if encoded.truncated:
        cli.say(
            f"{encoded.truncated} of {len(texts)} texts are longer than max_length={opts['max_length']} tokens: "
            "truncated"
        )
    adapter = loading.first if loading.adapters and opts["adapter"] else None
    if loading.adapters and not opts["adapter"]:
        what = f"base {loading.weights} (adapter {loading.first} switched off)"
    elif adapter:
        what = f"{loading.weights} with adapter {adapter}"
    else:
        what = str(loading.weights) + ("" if opts["adapter"] else " (full weights: adapter=false changes nothing)")
    cli.say(f"loading {what} ({loading.dtype})")
    session = loading.load()
    vectors = embed_ids(
        session.model,
        encoded.ids,
        layer=opts["layer"],
        pooling=opts["pooling"],
        batch_size=opts["batch_size"],
        normalize=opts["normalize"],
        adapter=opts["adapter"],
        pad_id=pad_id(loading.tokenizer),
        progress=True,
    )
    manifest = {
        "target": str(Path(opts["target"]).expanduser().resolve()),
        "weights": str(loading.weights),  # the model folder, or the base under the adapter
        "adapter": adapter,
        "adapter_path": str(loading.adapters[adapter]) if adapter else None,
        "base": str(loading.weights) if loading.adapters else None,
        "merged": opts["merged"],
        "input": str(input_path.resolve()),
        "field": None if input_path.suffix.lower() == TEXT_SUFFIX else opts["field"],
        "format": out.suffix.lstrip("."),
        "count": int(vectors.shape[0]),
        "dim": int(vectors.shape[1]),
        "layer": opts["layer"],
        "num_layers": num_layers(config),
        "pooling": opts["pooling"],
        "normalize": opts["normalize"],
        "max_length": opts["max_length"],
        "truncated": encoded.truncated,
        "dtype": _dtype_name(session.model),
        "device": str(_device(session.model)),
        "versions": artifacts.versions(),
    }
    write(out, texts, vectors, manifest)
    cli.say(
        f"wrote {vectors.shape[0]} vectors of {vectors.shape[1]} dimensions to {out} (manifest: "
        f"{manifest_path(out).name}) "
        f"in {time.monotonic() - started:.0f} s"
    )
    return out


def _architecture(loading: generate.Plan):
    """The model's config from its folder (no weights): layer count and context, for checks before loading."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(loading.weights), trust_remote_code=loading.trust_remote_code)


def _dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def main(argv: list[str] | None = None) -> None:
    cli.main(run, __doc__, OPTIONS, positional="target", argv=argv)


if __name__ == "__main__":
    main()
