"""The `finetune` command: every subcommand answers --help, a typo gets a suggestion, and `finetune train --help`
documents every config key that conf/ sets or the schema defines (issue 21 item 2), without importing torch.

Most checks call finetune.cli.main in this process (capsys); two go through a subprocess, end to end.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import typing
from types import SimpleNamespace

import pytest
import yaml

from finetune import cli
from finetune.config import keys, schema
from finetune.config.compose import CONF_DIR

from helpers import PROJECT

GROUPS = ("model", "strategy", "objective", "data", "trainer", "distributed")  # conf/GROUP/*.yaml: Hydra config groups
NOT_GROUPS = ("accelerate",)  # conf/accelerate/: configs for `accelerate launch`, not Hydra's
SECTIONS = ("model", "data", "strategy", "objective", "trainer", "distributed", "card", "tracking")
HYDRA_INTERNALS = ("defaults", "hydra", "_target_")


def help_output(capsys, *args: str) -> str:
    cli.main(["train", "--help", *args])
    return capsys.readouterr().out


def documented_keys(help_text: str) -> dict[str, str]:
    """KEY -> its doc, from the key listing after `config keys:` (lines `  KEY[=VALUE]  doc`)."""
    listing = help_text.split("\nconfig keys:", 1)[1]
    docs = {}
    for line in listing.splitlines():
        match = re.match(r"^  (?P<key>[A-Za-z_][\w.]*)(?P<value>=.*?)?(?:\s{2,}(?P<doc>\S.*))?$", line)
        if match:
            docs[match["key"]] = (match["doc"] or "").strip()
    return docs


def keys_set_in_conf() -> dict[str, str]:
    """Every key some conf/**/*.yaml sets -> the file, walked here independently of finetune.config.keys."""
    found = {}
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        relative = path.relative_to(CONF_DIR)
        if relative.parts[0] in NOT_GROUPS:
            continue
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        group = relative.parts[0] if len(relative.parts) > 1 else None
        for key, value in data.items():
            if key in HYDRA_INTERNALS:
                continue
            if group:
                found[f"{group}.{key}"] = str(relative)
            elif key in SECTIONS and isinstance(value, dict):  # a preset's trainer:, model:, card:, tracking: ...
                found.update({f"{key}.{sub}": str(relative) for sub in value if sub not in HYDRA_INTERNALS})
            else:
                found[key] = str(relative)
    return found


def schema_keys() -> list[str]:
    """Every key our schema defines: RunConfig's own, each group dataclass's as GROUP.KEY, and strategy.* of ours."""
    hints = typing.get_type_hints(schema.RunConfig)
    found = []
    for field in dataclasses.fields(schema.RunConfig):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            found += [f"{field.name}.{f.name}" for f in dataclasses.fields(kind)]
        elif field.name not in ("strategy", "trainer", "objective"):  # peft's and trl's, plus ours beside them
            found.append(field.name)
    ours = [f"strategy.{f.name}" for f in dataclasses.fields(schema.StrategyKeys)]
    return found + ours + [f"objective.{f.name}" for f in dataclasses.fields(schema.ObjectiveKeys)]


def test_conf_has_no_directory_the_walk_would_miss():
    assert {p.name for p in CONF_DIR.iterdir() if p.is_dir()} == set(GROUPS) | set(NOT_GROUPS)


def test_every_key_set_in_conf_has_a_doc_in_train_help(capsys):
    conf = keys_set_in_conf()
    assert {"model.dtype", "trainer.learning_rate", "strategy.r", "card.domain", "distributed.deepspeed"} <= conf.keys()
    docs = documented_keys(help_output(capsys))
    undocumented = {key: where for key, where in conf.items() if not docs.get(key)}
    assert not undocumented, f"keys set in conf/ with no doc in `finetune train --help`: {undocumented}"


def test_every_schema_key_has_a_doc_in_train_help(capsys):
    docs = documented_keys(help_output(capsys))
    undocumented = [key for key in schema_keys() if not docs.get(key)]
    assert not undocumented, f"schema fields without a docstring (finetune/config/schema.py): {undocumented}"
    assert docs["model.dtype"].startswith("Weight dtype while loading")  # ours, from the docstring
    assert docs["trainer.learning_rate"] == "The initial learning rate for AdamW."  # trl's metadata
    assert docs["strategy.r"] == "Lora attention dimension"  # peft's metadata


def test_every_schema_field_has_a_docstring():
    """The sections' own fields (model, data, ...) head their part of the listing; they need a docstring too."""
    classes = keys._schema_classes()
    missing = [f"{cls}.{name}" for cls, fields in classes.items() for name, _, doc in fields if not doc.strip()]
    assert not missing


def test_our_strategy_keys_are_the_ones_the_strategy_code_owns():
    from finetune.models.strategy import OUR_KEYS

    assert {f.name for f in dataclasses.fields(schema.StrategyKeys)} == set(OUR_KEYS)


def test_a_key_added_to_conf_without_a_doc_is_caught(tmp_path, monkeypatch):
    asked = []  # a trainer key trl's source files lack is looked up on the imported class (stubbed: ~10 s)
    monkeypatch.setattr(keys, "_imported_fields", lambda section: asked.append(section) or {})
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    with open(conf / "model" / "tiny_neo.yaml", "a", encoding="utf-8") as f:
        f.write("made_up_key: 1\n")
    with open(conf / "trainer" / "default.yaml", "a", encoding="utf-8") as f:
        f.write("made_up_trainer_key: 1\n")
    listed = {key.name: key.doc for key in keys.keys(conf_dir=conf)}
    assert listed["model.made_up_key"] == "" and listed["trainer.made_up_trainer_key"] == ""
    assert listed["model.dtype"] and listed["trainer.learning_rate"]
    assert asked == ["trainer"]


def test_help_shows_the_named_presets_values(capsys):
    out = help_output(capsys, "conf=lora_neox20b")
    lines = [line for line in out.splitlines() if line.startswith("  model.name_or_path")]
    assert lines and lines[0].startswith("  model.name_or_path=EleutherAI/gpt-neox-20b ")
    cli.main(["conf=lora_neox20b", "--help"])  # `python -m finetune conf=X --help`: the same screen
    assert "  trainer.bf16=auto " in capsys.readouterr().out
    out = help_output(capsys)  # the default preset, demo
    assert "  trainer.bf16=false " in out and "conf=demo composes it" in out


def test_help_keeps_usage_presets_groups_examples_and_exit_codes_first(capsys):
    out = help_output(capsys)
    head = out.split("\nconfig keys:", 1)[0]
    for part in (
        "usage: finetune",
        "presets (conf=NAME)",
        "config groups",
        "examples:",
        "finetune preview",
        "finetune merge RUN_DIR",
        "exit codes: 0 done",
        "75 preempted",
    ):
        assert part in head
    assert "python -m finetune." not in head  # the subcommand forms, not the old module forms


def test_help_all_lists_every_field_of_trl_and_peft_with_its_doc(capsys):
    """`--help all`: every init field of trl.SFTConfig and peft.LoraConfig; the docs read from their source files
    with ast are exactly the classes' metadata (the import is what makes plain `--help` fast to avoid)."""
    from peft import LoraConfig
    from trl import SFTConfig

    docs = documented_keys(help_output(capsys, "all"))
    for section, cls in (("trainer", SFTConfig), ("strategy", LoraConfig)):
        metadata = {f.name: f.metadata.get("help") for f in dataclasses.fields(cls) if f.init}
        assert keys._library_fields(section) == metadata
        assert {f"{section}.{name}" for name in metadata} <= set(docs)
    assert docs["trainer.max_steps"] and docs["strategy.init_lora_weights"]
    assert "seed=N" in docs["trainer.seed"]  # a trl field another key of ours owns


def test_train_help_imports_nothing_heavy():
    code = (
        "import sys\nfrom finetune.cli import main\nmain(['train', '--help'])\n"
        "print('HEAVY:', [m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY: []" in out.stdout and "trainer.learning_rate=" in out.stdout


def test_top_help_lists_every_command(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.split("commands:", 1)[1].split("\n\n", 1)[0].splitlines() if line.strip()}
    assert listed == set(cli.COMMANDS)


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_answers_help_with_exit_0(name, capsys):
    try:
        cli.main([name, "--help"])
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip()


def test_help_command_and_help_flag_agree(capsys):
    cli.main(["help", "merge"])
    via_help = capsys.readouterr().out
    cli.main(["merge", "--help"])
    assert via_help == capsys.readouterr().out


@pytest.mark.parametrize("typo, meant", [("trian", "train"), ("merg", "merge"), ("evalute", "evaluate")])
def test_misspelled_command_exits_2_with_a_suggestion(typo, meant, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([typo, "x=1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"unknown command '{typo}'" in err and f"did you mean '{meant}'" in err


def test_chat_is_generate_with_chat_true(monkeypatch):
    calls = []
    real_import = cli.importlib.import_module

    def fake_import(module):
        if module == cli.COMMANDS["generate"].module:
            return SimpleNamespace(main=lambda argv: calls.append((module, argv)))
        return real_import(module)

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    cli.main(["chat", "runs/demo", "temperature=0"])
    assert calls == [("finetune.inference.generate", ["runs/demo", "temperature=0", "chat=true"])]


def test_default_subcommand_still_composes_with_cfg_job():
    """`python -m finetune conf=demo --cfg job`: no subcommand is train, and Hydra's --cfg prints the config."""
    out = subprocess.run(
        [sys.executable, "-m", "finetune", "conf=demo", "--cfg", "job"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    assert config["output_dir"] == "runs/${hydra:job.config_name}"  # --cfg job prints it unresolved
    assert config["strategy"]["name"] == "lora" and config["model"]["tiny"] == "neo"
    assert config["trainer"]["bf16"] is False


def test_checkpoints_verify_names_the_file_that_differs(tmp_path, capsys):
    """`finetune checkpoints seal|verify FOLDER`: verify passes on a sealed folder and exits 3 naming a changed file."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    cli.main(["checkpoints", "seal", str(folder)])
    cli.main(["checkpoints", "verify", str(folder)])
    assert "verified" in capsys.readouterr().out
    (folder / "adapter_model.safetensors").write_bytes(b"weightz")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["checkpoints", "verify", str(folder)])
    assert exit_.value.code == 3 and "adapter_model.safetensors" in capsys.readouterr().err
