"""What merge, generate, evaluate and push use, and what they write over, is what the toolkit wrote (issue 20 items
3, 9, 10): final adapter/, model/ and merged/ folders carry a sha256 MANIFEST.json verified before use; merge's out=
never replaces the run; push empties only a staging folder it made."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune import console as cli
from finetune.adapters import merge, push
from finetune.errors import EXIT_INTEGRITY, ConfigError, IntegrityError
from finetune.inference import generate
from finetune.runs import checkpoints, rundir

from harness import PROJECT


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the shared trained run (LoRA on tiny NeoX), without its checkpoints."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints")))


def _flip_bit(path: Path, bit: int = 0) -> None:
    """One flipped bit in the last tensor byte of a safetensors file: the header stays valid, a weight changes."""
    data = bytearray(path.read_bytes())
    data[-2] ^= 1 << bit
    path.write_bytes(bytes(data))


def _merge(*args: str) -> Path:
    return merge.run(cli.parse([*args, "dtype=float32"], merge.OPTIONS, "target"))


def _push_dry_run(target: Path, *args: str) -> Path:
    return push.run(cli.parse([str(target), "dry_run=true", *args], push.OPTIONS, "target"))


# item 3: manifests of the final folders


def test_final_adapter_is_sealed_and_a_flipped_bit_is_refused_by_merge_generate_evaluate_and_push(run_copy):
    from finetune.evaluate import run as evaluate

    adapter = run_copy / "adapter"
    manifest = checkpoints.manifest_of(adapter)
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "base_model.json"} <= set(
        manifest["files"]
    )
    assert json.loads((run_copy / "run.json").read_text())["weights_manifest"] == "adapter/MANIFEST.json"
    assert checkpoints.verify(adapter) is None
    _flip_bit(adapter / "adapter_model.safetensors")  # a mantissa bit: finite, plausible, only the manifest sees it
    named = r"adapter/adapter_model.safetensors has sha256 .* \(corrupted\)"
    with pytest.raises(IntegrityError, match=named):
        generate.plan(run_copy)
    with pytest.raises(IntegrityError, match=named):
        evaluate.run(cli.parse([str(run_copy)], evaluate.OPTIONS, "target"))
    with pytest.raises(IntegrityError, match=named):
        _push_dry_run(run_copy)
    assert not (run_copy / "push_staging").exists()  # nothing staged from a corrupt folder
    result = subprocess.run(
        [sys.executable, "-m", "finetune.merge", str(run_copy)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == EXIT_INTEGRITY, result.stderr[-2000:]
    assert "adapter_model.safetensors has sha256" in result.stderr and "(corrupted)" in result.stderr
    assert not (run_copy / "merged").exists() and not (run_copy / "merged.partial").exists()


def test_merged_folder_is_sealed_verified_and_kept_valid_when_cards_are_refreshed(run_copy):
    from finetune.adapters import card

    merged = _merge(str(run_copy))
    assert json.loads((merged / "merge_report.json").read_text())["manifest"] == checkpoints.MANIFEST
    assert "model.safetensors" in checkpoints.manifest_of(merged)["files"] and checkpoints.verify(merged) is None
    generate.plan(run_copy, merged=True)  # verifies
    card.refresh(run_copy, rundir.locate(run_copy).config)  # evaluate and export rewrite the cards: manifests follow
    assert checkpoints.verify(merged) is None and checkpoints.verify(run_copy / "adapter") is None
    _merge(str(run_copy), "verify=true")  # the gate again, merge_report.json updated and recorded
    assert checkpoints.verify(merged) is None
    _flip_bit(merged / "model.safetensors", bit=3)
    with pytest.raises(IntegrityError, match=r"merged/model.safetensors has sha256 .* \(corrupted\)"):
        generate.plan(run_copy, merged=True)
    with pytest.raises(IntegrityError, match=r"merged/model.safetensors has sha256"):
        _push_dry_run(run_copy, "merged=true")
    with pytest.raises(IntegrityError, match=r"merged/model.safetensors has sha256"):
        _merge(str(run_copy), "verify=true")


def test_a_loadable_file_added_after_sealing_is_refused_a_stray_one_only_named(run_copy, capsys):
    adapter = run_copy / "adapter"
    (adapter / "notes.txt").write_text("mine")
    generate.plan(run_copy)
    assert "notes.txt not in MANIFEST.json; nothing reads it (ignored)" in capsys.readouterr().err
    (adapter / "adapter_model.bin").write_bytes(b"a second set of weights peft could pick")
    with pytest.raises(IntegrityError, match=r"adapter_model.bin is not in the manifest"):
        generate.plan(run_copy)


def test_a_run_from_before_manifests_warns_a_missing_promised_manifest_is_refused(run_copy, capsys):
    adapter, record_path = run_copy / "adapter", run_copy / "run.json"
    (adapter / checkpoints.MANIFEST).unlink()
    with pytest.raises(
        IntegrityError, match=r"adapter/MANIFEST.json is missing, but .*run.json records that it was written"
    ):
        generate.plan(run_copy)
    record = json.loads(record_path.read_text())
    del record["weights_manifest"]  # as a run written before manifests existed
    record_path.write_text(json.dumps(record))
    capsys.readouterr()
    generate.plan(run_copy)
    assert f"python -m finetune.checkpoints seal {adapter}" in capsys.readouterr().err
    checkpoints.main(["seal", str(adapter)])
    assert checkpoints.verify(adapter) is None


def test_full_fine_tune_model_folder_is_sealed(tiny_models, tmp_path):
    from finetune.config.compose import compose
    from finetune.train.run import run

    from helpers import tiny_overrides

    run_dir = run(
        compose(
            "demo",
            tiny_overrides(
                "neox",
                tiny_models["neox"],
                tmp_path / "full",
                "strategy=full",
                "trainer.max_steps=1",
                "sample_generations=0",
            ),
        )
    )
    model = run_dir / "model"
    assert "model.safetensors" in checkpoints.manifest_of(model)["files"] and checkpoints.verify(model) is None
    _flip_bit(model / "model.safetensors")
    with pytest.raises(IntegrityError, match=r"model/model.safetensors has sha256"):
        generate.plan(run_dir)


# item 9: merge's out= never replaces the run


@pytest.mark.parametrize("where", ["run", "adapter", "parent", "checkpoints", "inside_adapter"])
def test_merge_out_that_is_holds_or_lies_in_the_run_is_refused(run_copy, where):
    out = {
        "run": run_copy,
        "adapter": run_copy / "adapter",
        "parent": run_copy.parent,
        "checkpoints": run_copy / "checkpoints",
        "inside_adapter": run_copy / "adapter" / "merged",
    }[where]
    before = sorted(p.relative_to(run_copy.parent) for p in run_copy.parent.rglob("*"))
    with pytest.raises(ConfigError, match=rf"out={out}: (is|contains|is inside)"):
        _merge(str(run_copy), f"out={out}", "overwrite=true")
    assert sorted(p.relative_to(run_copy.parent) for p in run_copy.parent.rglob("*")) == before


def test_merge_overwrite_replaces_only_a_merged_model(run_copy, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("not a model")
    with pytest.raises(ConfigError, match="overwrite=true replaces only a merged model written by merge"):
        _merge(str(run_copy), f"out={mine}", "overwrite=true")
    assert (mine / "thesis.tex").read_text() == "not a model"
    out = tmp_path / "merged_elsewhere"
    _merge(str(run_copy), f"out={out}")
    assert _merge(str(run_copy), f"out={out}", "overwrite=true") == out  # its own output: replaced
    assert checkpoints.verify(out) is None


# item 10: push deletes only a staging folder it made


def test_push_never_empties_an_existing_folder_it_did_not_make(run_copy, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("my files")
    with pytest.raises(ConfigError, match=rf"staging={mine}: exists and holds files push did not stage"):
        _push_dry_run(run_copy, f"staging={mine}")
    assert [p.name for p in mine.iterdir()] == ["keep.txt"] and (mine / "keep.txt").read_text() == "my files"
    for folder in (run_copy, run_copy / "adapter"):  # the run itself, and the folder being pushed
        with pytest.raises(ConfigError, match="staging="):
            _push_dry_run(run_copy, f"staging={folder}")
    assert checkpoints.verify(run_copy / "adapter") is None and (run_copy / "run.json").is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    staged = _push_dry_run(run_copy, f"staging={empty}")
    assert (staged / push.STAGING_MARKER).is_file() and (staged / "adapter_model.safetensors").is_file()
    (staged / "stale.txt").write_text("left by an earlier push's user")
    _push_dry_run(run_copy, f"staging={empty}")  # marked as push's: emptied and staged again
    assert not (empty / "stale.txt").exists() and (empty / "adapter_model.safetensors").is_file()


def test_default_staging_of_an_older_push_is_still_reused(run_copy):
    old = run_copy / "push_staging"
    old.mkdir()
    for name in ("adapter_config.json", "README.md"):
        shutil.copy(run_copy / "adapter" / name, old / name)
    staged = _push_dry_run(run_copy)
    assert staged == old and (old / push.STAGING_MARKER).is_file()
