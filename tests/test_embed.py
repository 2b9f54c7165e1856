"""finetune.embed on a real tiny LoRA run and tiny bases: vectors are deterministic and independent of their batch
(padding masked out, for both poolings, with pad = EOS too), last pooling is the final token's hidden state as the
model computes it, adapter=false is the base on its own, outputs and manifests are written atomically, and bad
options, layers and inputs exit 2 before any weights load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from finetune.inference import embed, generate
from finetune.runs import rundir

from helpers import PROJECT

TEXTS = [
    "A tort is a civil wrong.",
    "Consideration is something of value exchanged for a promise, and without it a promise is usually not binding.",
    "short",
    "Ends with the pad/EOS token<|endoftext|>",  # a real token equal to GPT-Neo's padding id (pad = EOS)
    "The tenant broke a window; the landlord sued for the repair and the court held the tenant liable. " * 3,
]
ATOL = 1e-5  # fp32


@pytest.fixture(scope="module")
def session(tiny_run):
    """The run's adapter over its tiny NeoX base, in fp32, loaded once."""
    return generate.load(tiny_run, dtype="float32")


@pytest.fixture(scope="module")
def bases(tiny_models):
    """Plain transformers models and tokenizers: the run's NeoX base, and GPT-Neo (no pad token: pads with EOS)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return {
        arch: (
            AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(tiny_models[arch]),
        )
        for arch in ("neox", "neo")
    }


def vectors_of(model, tokenizer, texts, **options) -> np.ndarray:
    return embed.embed_texts(model, tokenizer, texts, **options)


def test_shape_dtype_and_determinism(session):
    first = vectors_of(session, None, TEXTS)
    assert first.shape == (len(TEXTS), session.model.config.hidden_size)
    assert first.dtype == np.float32 and np.isfinite(first).all()
    assert np.array_equal(first, vectors_of(session, None, TEXTS))
    assert len({row.tobytes() for row in first}) == len(TEXTS)  # distinct texts, distinct vectors


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("model", ["run", "neo"])
def test_a_vector_does_not_depend_on_its_batch(session, bases, model, pooling):
    model, tokenizer = (session, None) if model == "run" else bases["neo"]
    alone = np.stack([vectors_of(model, tokenizer, [text], pooling=pooling)[0] for text in TEXTS])
    # short texts padded to the longest
    padded = vectors_of(model, tokenizer, TEXTS, pooling=pooling, batch_size=len(TEXTS))
    in_pairs = vectors_of(model, tokenizer, TEXTS, pooling=pooling, batch_size=2)
    np.testing.assert_allclose(padded, alone, atol=ATOL, rtol=0)
    np.testing.assert_allclose(in_pairs, alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["neox", "neo"])
def test_pooling_matches_the_model_computed_directly(bases, arch):
    import torch

    model, tokenizer = bases[arch]
    batch = [TEXTS[1], TEXTS[3], TEXTS[4], TEXTS[2]]  # padded among longer and shorter texts
    for index in (0, 1):  # TEXTS[3] ends with a real EOS token: the padding id on GPT-Neo, but not padding
        ids = tokenizer(batch[index], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            final = model.base_model(input_ids=ids).last_hidden_state[0]  # after the final layer norm, no mask
        for layer in (-1, model.config.num_hidden_layers):
            last = vectors_of(model, tokenizer, batch, layer=layer, pooling="last")[index]
            np.testing.assert_allclose(last, final[-1].numpy(), atol=ATOL, rtol=0)
        mean = vectors_of(model, tokenizer, batch, pooling="mean")[index]
        np.testing.assert_allclose(mean, final.mean(0).numpy(), atol=ATOL, rtol=0)


def test_layer_0_is_the_token_embeddings(bases):
    import torch

    model, tokenizer = bases["neox"]
    batch = [TEXTS[1], TEXTS[4]]
    with torch.no_grad():
        embedded = model.gpt_neox.embed_in(tokenizer(batch[0], return_tensors="pt")["input_ids"])[0]
    for layer in (0, -(model.config.num_hidden_layers + 1)):
        np.testing.assert_allclose(
            vectors_of(model, tokenizer, batch, layer=layer)[0], embedded.mean(0).numpy(), atol=ATOL, rtol=0
        )


def test_adapter_false_is_the_base_alone(session, bases):
    model, tokenizer = bases["neox"]
    with_adapter = vectors_of(session, None, TEXTS)
    without = vectors_of(session, None, TEXTS, adapter=False)
    assert not np.allclose(with_adapter, without, atol=1e-3)  # the trained adapter moves the vectors
    np.testing.assert_allclose(without, vectors_of(model, tokenizer, TEXTS), atol=ATOL, rtol=0)
    assert np.array_equal(vectors_of(session, None, TEXTS), with_adapter)  # the adapter is back on afterwards
    # no-op
    assert np.array_equal(vectors_of(model, tokenizer, TEXTS, adapter=False), vectors_of(model, tokenizer, TEXTS))


def test_normalize_gives_unit_vectors_in_the_same_direction(session):
    raw = vectors_of(session, None, TEXTS)
    unit = vectors_of(session, None, TEXTS, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)


def test_truncation_keeps_the_first_max_length_tokens(session):
    ids = session.tokenizer(TEXTS[4])["input_ids"]
    encoded = embed.encode(session.tokenizer, [TEXTS[4], TEXTS[2]], max_length=8)
    assert encoded.truncated == 1 and encoded.ids[0] == ids[:8]
    np.testing.assert_allclose(
        vectors_of(session, None, [TEXTS[4]], max_length=8),
        embed.embed_ids(session.model, [ids[:8]]),
        atol=ATOL,
        rtol=0,
    )


def test_cli_writes_parquet_and_manifest(session, tiny_run, tiny_models, tmp_path, capsys):
    import pyarrow.parquet as pq

    source = tmp_path / "notes.jsonl"
    source.write_text(
        "".join(json.dumps({"id": i, "body": text}) + "\n" for i, text in enumerate(TEXTS)), encoding="utf-8"
    )
    out = tmp_path / "vectors" / "notes.parquet"
    embed.main(
        [
            str(tiny_run),
            f"input={source}",
            "field=body",
            f"out={out}",
            "dtype=float32",
            "pooling=last",
            "max_length=16",
            "batch_size=2",
        ]
    )
    table = pq.read_table(out)
    assert table.column_names == ["row", "text", "embedding"]
    assert str(table.schema.field("embedding").type) == "list<element: float>"
    assert table.column("row").to_pylist() == list(range(len(TEXTS)))
    assert table.column("text").to_pylist() == TEXTS
    written = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(
        written, vectors_of(session, None, TEXTS, pooling="last", max_length=16), atol=ATOL, rtol=0
    )

    truncated = sum(len(ids) > 16 for ids in session.tokenizer(TEXTS)["input_ids"])
    assert truncated >= 2
    manifest = json.loads((tmp_path / "vectors" / "notes.parquet.json").read_text())
    assert manifest["adapter"] == session.active and Path(manifest["base"]).resolve() == tiny_models["neox"].resolve()
    assert {
        k: manifest[k]
        for k in ("layer", "pooling", "normalize", "dim", "count", "max_length", "dtype", "truncated", "field")
    } == {
        "layer": -1,
        "pooling": "last",
        "normalize": False,
        "dim": written.shape[1],
        "count": len(TEXTS),
        "max_length": 16,
        "dtype": "float32",
        "truncated": truncated,
        "field": "body",
    }
    err = capsys.readouterr().err
    assert f"{truncated} of {len(TEXTS)} texts are longer than max_length=16 tokens: truncated" in err
    assert sorted(p.name for p in out.parent.iterdir()) == ["notes.parquet", "notes.parquet.json"]  # no temporary files

    with pytest.raises(SystemExit) as exit_info:  # refused before loading: the file is kept
        embed.main([str(tiny_run), f"input={source}", "field=body", f"out={out}"])
    assert exit_info.value.code == 2
    assert "already exists; choose another out= or pass overwrite=true" in capsys.readouterr().err


def test_cli_end_to_end_in_a_subprocess(session, tiny_run, tmp_path):
    source = tmp_path / "notes.txt"
    source.write_text("\n".join(TEXTS[:3]) + "\n\n  \n" + TEXTS[4] + "\n", encoding="utf-8")  # blank lines are skipped
    out = tmp_path / "notes.npy"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune.embed",
            str(tiny_run),
            f"input={source}",
            f"out={out}",
            "dtype=float32",
            "adapter=false",
            "normalize=true",
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "(adapter run switched off)" in result.stderr
    texts = [*TEXTS[:3], TEXTS[4]]
    vectors = np.load(out)
    assert vectors.dtype == np.float32 and vectors.shape == (4, session.model.config.hidden_size)
    np.testing.assert_allclose(
        vectors, vectors_of(session, None, texts, adapter=False, normalize=True), atol=ATOL, rtol=0
    )
    manifest = json.loads(out.with_name("notes.npy.json").read_text())
    assert manifest["adapter"] is None and manifest["count"] == 4 and manifest["normalize"] is True
    assert manifest["field"] is None and manifest["format"] == "npy"


def test_failed_write_leaves_nothing_under_the_final_name(tmp_path):
    import pyarrow as pa

    vectors = np.ones((3, 4), dtype=np.float32)
    out = tmp_path / "v.parquet"
    embed.write(out, ["a", "b", "c"], vectors, {"count": 3})
    before = out.read_bytes()
    with pytest.raises(pa.ArrowInvalid):  # two texts for three vectors: the Parquet table cannot be built
        embed.write(out, ["a", "b"], vectors * 2, {"count": 3})
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.parquet", "v.parquet.json"]


def test_default_out_is_in_the_run_directory(tiny_run, tiny_models, tmp_path):
    source = tmp_path / "notes.jsonl"
    target = rundir.locate(tiny_run)
    assert embed.default_out(target, source, adapter=True, merged=False) == tiny_run / "embeddings" / "notes.parquet"
    assert (
        embed.default_out(target, source, adapter=False, merged=False) == tiny_run / "embeddings" / "notes.base.parquet"
    )
    with pytest.raises(embed.ConfigError, match="out=FILE.parquet"):
        embed.default_out(rundir.locate(tiny_models["neox"]), source, adapter=True, merged=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["layer=5"], "layer=5: this model has 4 layers, so layer= is 0 (embeddings) .. 4"),
        (["layer=-6"], "layer=-6"),
        (["pooling=max"], "pooling=max: choose one of mean, last"),
        (["max_length=100000"], "max_length=100000: the model's context is 512 tokens"),
        (["out={tmp}/v.csv"], "write a .parquet or .npy file"),
        (["lyer=2"], "did you mean 'layer'"),
    ],
)
def test_bad_options_exit_2_before_loading(tiny_run, tmp_path, capsys, args, message):
    source = tmp_path / "notes.txt"
    source.write_text("a text\n", encoding="utf-8")
    argv = [str(tiny_run), f"input={source}", f"out={tmp_path}/v.npy", *(a.format(tmp=tmp_path) for a in args)]
    with pytest.raises(SystemExit) as exit_info:
        embed.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "v.npy").exists()


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [
        (
            "rows.jsonl",
            '{"text": "fine"}\n{"body": "no text field"}\n{"text": 7}\n',
            ["rows.jsonl:2: no 'text' field", "rows.jsonl:3: 'text' is 7 (int)"],
        ),
        (
            "rows.csv",
            "id,body\n1,first\n2,second\n",
            ["rows.csv:2: no 'text' field (columns: id, body)", "rows.csv:3:"],
        ),
    ],
)
def test_missing_or_bad_field_names_file_line_and_option(tiny_run, tmp_path, capsys, name, content, where):
    source = tmp_path / name
    source.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        embed.main([str(tiny_run), f"input={source}", f"out={tmp_path}/v.npy"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(f"{tmp_path}/{w}" in err for w in where) and "field=" in err


def test_empty_input_is_an_error(tiny_run, tmp_path, capsys):
    source = tmp_path / "empty.txt"
    source.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        embed.main([str(tiny_run), f"input={source}", f"out={tmp_path}/v.npy"])
    assert exit_info.value.code == 2
    assert "no texts to embed" in capsys.readouterr().err


def test_help_lists_the_options_without_loading_torch():
    result = subprocess.run(
        [sys.executable, "-m", "finetune.embed", "--help"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert all(f"  {option.name}=" in result.stdout for option in embed.OPTIONS)
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, finetune.embed; print('torch' in sys.modules)"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert probe.stdout.strip() == "False"
