"""Torn runs, half-written adapters, changed held-out data and the resume pickles (issue 20, degraded findings):
merge and generate on a run that did not finish exit 3 saying what is missing and what to do, and leave no
`<out>.partial`; a truncated adapter without a manifest is named, not a SafetensorError; evaluate records changed
held-out data in its report and the card, and lists bad rows once with options it takes; the checkpoint pickles are
exactly the documented ones and load with weights_only=True."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from finetune import console as cli
from finetune.adapters import merge
from finetune.errors import EXIT_INTEGRITY, ConfigError, DataError, IntegrityError
from finetune.evaluate import run as evaluate
from finetune.inference import generate
from finetune.runs import checkpoints

from harness import PROJECT


def _tool(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"finetune.{module}", *args], cwd=PROJECT, capture_output=True, text=True, timeout=600
    )


def _unseal(run_dir: Path) -> None:
    """As a run written before manifests: no adapter/MANIFEST.json, and run.json does not promise one."""
    (run_dir / "adapter" / checkpoints.MANIFEST).unlink()
    record = json.loads((run_dir / "run.json").read_text())
    record.pop("weights_manifest", None)
    (run_dir / "run.json").write_text(json.dumps(record))


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints")))


def test_merge_and_generate_on_a_torn_run_exit_3_with_status_newest_checkpoint_and_fixes(killed, tmp_path):
    assert json.loads((killed / "run.json").read_text())["status"] == "running" and not (killed / "adapter").exists()
    for module, args in (("merge", []), ("generate", ["prompt=hi"])):
        result = _tool(module, str(killed), *args)
        assert result.returncode == EXIT_INTEGRITY, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        for said in (
            "the run did not finish",
            "status: running",
            "no final adapter/",
            "resume=true",
            "checkpoint-6 (step 6)",
            f"finetune.merge {killed / 'checkpoints' / 'checkpoint-6'} out=DIR",
        ):
            assert said in result.stderr, (said, result.stderr[-2000:])
    # killed while the final adapter was written: adapter_config.json and half of the weights, no manifest
    adapter = killed / "adapter"
    adapter.mkdir()
    shutil.copy(killed / "checkpoints" / "checkpoint-6" / "adapter_config.json", adapter)
    weights = (killed / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    for module, args in (("merge", []), ("generate", ["prompt=hi"])):
        result = _tool(module, str(killed), *args)
        assert result.returncode == EXIT_INTEGRITY and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert f"{adapter} is incomplete (no MANIFEST.json" in result.stderr and "status: running" in result.stderr
    assert not (killed / "merged").exists() and not (killed / "merged.partial").exists()
    # the suggested fix works: the newest committed checkpoint, with the run's base and template
    newest = killed / "checkpoints" / "checkpoint-6"
    plan = generate.plan(newest, dtype="float32")
    assert list(plan.adapters) == ["checkpoint-6"] and plan.adapters["checkpoint-6"] == newest
    with pytest.raises(ConfigError, match="is a training checkpoint, not the run's final adapter: .* out=DIR"):
        merge.run(cli.parse([str(newest), "dtype=float32"], merge.OPTIONS, "target"))
    (killed / "checkpoints" / "checkpoint-3" / checkpoints.MANIFEST).unlink()
    with pytest.raises(IntegrityError, match="checkpoint-3: no MANIFEST.json: this checkpoint was never committed"):
        generate.plan(killed / "checkpoints" / "checkpoint-3")


def test_a_truncated_adapter_without_a_manifest_is_named_by_generate_not_a_safetensors_traceback(
    run_copy, tiny_models, tmp_path
):
    folder = Path(shutil.copytree(run_copy / "adapter", tmp_path / "adapter_copy"))  # given directly, no run
    (folder / checkpoints.MANIFEST).unlink()
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) - 4096])
    with pytest.raises(IntegrityError, match=r"adapter_copy/adapter_model.safetensors: .*the file is corrupt"):
        generate.plan(folder, base=str(tiny_models["neox"]))
    result = _tool("generate", str(folder), f"base={tiny_models['neox']}", "prompt=hi")
    assert result.returncode == EXIT_INTEGRITY and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "adapter_model.safetensors" in result.stderr and "SafetensorError" not in result.stderr
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(IntegrityError, match="no adapter_model.safetensors: the adapter was not completely written"):
        generate.plan(folder, base=str(tiny_models["neox"]))


def test_merge_removes_only_a_partial_folder_it_wrote_and_always_the_one_it_was_writing(run_copy, tmp_path):
    out = tmp_path / "merged"
    mine = tmp_path / "merged.partial"
    mine.mkdir()
    (mine / "thesis.tex").write_text("not merge's")
    with pytest.raises(ConfigError, match=r"merged.partial: exists and was not written by merge"):
        merge.run(cli.parse([str(run_copy), f"out={out}", "dtype=float32"], merge.OPTIONS, "target"))
    assert (mine / "thesis.tex").read_text() == "not merge's"
    shutil.rmtree(mine)
    _unseal(run_copy)  # a pre-manifest run whose tokenizer is damaged: the merge fails after it began writing
    (run_copy / "adapter" / "tokenizer_config.json").write_text("{not json")
    result = _tool("merge", str(run_copy), f"out={out}", "dtype=float32")
    assert result.returncode != 0
    assert not mine.exists() and not out.exists(), result.stderr[-2000:]


def _evaluate(run_dir: Path, *args: str) -> Path:
    return evaluate.run(
        cli.parse(
            [str(run_dir), "dtype=float32", "limit=2", "generate_rows=0", "samples=0", *args],
            evaluate.OPTIONS,
            "target",
        )
    )


def test_evaluate_records_changed_heldout_data_in_the_report_and_the_card(run_copy, tmp_path):
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    changed = tmp_path / "heldout_changed.jsonl"
    rows = Path(config["data"]["eval_path"]).read_text().splitlines()
    first = json.loads(rows[0])
    first["output"] = first["output"] + " (edited after training)"
    changed.write_text("\n".join([json.dumps(first), *rows[1:]]) + "\n")
    config["data"]["eval_path"] = str(changed)
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config))
    _evaluate(run_copy)
    report = json.loads((run_copy / "eval_report.json").read_text())
    check = report["data"]["heldout_check"]
    assert check["matches"] is False and check["dataset_fingerprint_at_training"] != check["dataset_fingerprint_now"]
    assert any("changed since training" in w for w in report["data"]["warnings"])
    assert (
        "**Warning:** the data named in the run's config.yaml changed since training"
        in (run_copy / "eval_report.md").read_text()
    )
    card = (run_copy / "adapter" / "README.md").read_text()
    assert "changed since training" in card and str(tmp_path) not in card
    assert checkpoints.verify(run_copy / "adapter") is None  # the refreshed card is recorded in the manifest


def test_evaluate_unchanged_heldout_data_is_recorded_as_matching(run_copy):
    _evaluate(run_copy)
    report = json.loads((run_copy / "eval_report.json").read_text())
    assert report["data"]["heldout_check"]["matches"] is True and "warnings" not in report["data"]
    assert "Warning" not in (run_copy / "adapter" / "README.md").read_text()


def test_evaluate_lists_each_bad_row_once_with_a_fix_evaluate_takes(run_copy, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\nnot json\n{"instruction": "d", "output": "e"}\n'
    )
    with pytest.raises(DataError) as caught:
        _evaluate(run_copy, f"data={bad}")
    message = str(caught.value)
    assert message.startswith("2 bad row(s):"), message
    assert message.count(f"{bad}:2:") == 1 and message.count(f"{bad}:3:") == 1
    assert "columns=[output=COLUMN]" in message and "skip_invalid" not in message and "data.columns" not in message


def _is_pickle(path: Path) -> bool:
    """torch.save's zip format (an archive holding data.pkl) or a bare pickle (protocol 2+ starts with 0x80)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    with path.open("rb") as f:
        return f.read(1) == b"\x80"


def test_checkpoint_pickles_are_exactly_the_documented_ones_and_load_with_weights_only(killed):
    import torch
    from transformers.trainer_pt_utils import safe_globals

    checkpoint = killed / "checkpoints" / "checkpoint-6"
    pickled = sorted(p.name for p in checkpoint.iterdir() if p.is_file() and _is_pickle(p))
    assert pickled == ["optimizer.pt", "rng_state.pth", "scheduler.pt"]
    assert not any(_is_pickle(p) for p in checkpoint.glob("*.safetensors"))
    for name in pickled:
        with safe_globals():  # as transformers' _load_rng_state does (numpy arrays in the RNG state)
            state = torch.load(checkpoint / name, map_location="cpu", weights_only=True)
        assert isinstance(state, dict) and state
    readme = (PROJECT / "README.md").read_text()
    assert "No pickles are written" not in readme
    assert all(f"`{name}`" in readme for name in pickled) and "torch.load(weights_only=True)" in readme
