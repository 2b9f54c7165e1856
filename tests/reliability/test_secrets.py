"""A secret never reaches a run file: refused at validation (by variable name, by value, by shape), refused at push."""

from __future__ import annotations

import json
import shutil

import pytest

from finetune.adapters import push
from finetune.config import credentials
from finetune.config.compose import compose
from finetune.config.validate import validate
from finetune.errors import EXIT_CONFIG, ConfigError, IntegrityError
from finetune.runs import rundir

from helpers import run_cli

WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"
HF_SHAPED = "hf_" + "Ab3" * 12


def problems_of(overrides: list[str], tmp_path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate(compose("demo", [*overrides, f"output_dir={tmp_path}/run"]))
    return caught.value.problems


def test_oc_env_of_a_secret_variable_is_refused_by_name_set_or_not(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    problems = problems_of(
        ["card.description=${oc.env:HF_TOKEN}", "tracking.run_name=${oc.env:WANDB_API_KEY}"], tmp_path
    )
    assert len(problems) == 2, problems
    assert problems[0].startswith("card.description: interpolates ${oc.env:HF_TOKEN}, a secret")
    assert problems[1].startswith("tracking.run_name: interpolates ${oc.env:WANDB_API_KEY}, a secret")
    assert WANDB_KEY not in "\n".join(problems)
    # with a default, in a list, or through an intermediate key of the user's own
    problems = problems_of(
        [
            "card.tags=[a,'${oc.env:AWS_SECRET_ACCESS_KEY,none}']",
            "card.license=${oc.env:MLFLOW_TRACKING_TOKEN,x}",
            "card.model_name=${card.license}",
        ],
        tmp_path,
    )
    assert sorted(p.split(":")[0] for p in problems) == ["card.license", "card.tags[1]"], problems


def test_cli_exits_2_and_writes_nothing(tmp_path):
    out = run_cli(
        "tracking.run_name=${oc.env:WANDB_API_KEY}", f"output_dir={tmp_path}/run", env={"WANDB_API_KEY": WANDB_KEY}
    )
    assert out.returncode == EXIT_CONFIG, out.stderr[-2000:]
    assert "tracking.run_name: interpolates ${oc.env:WANDB_API_KEY}" in out.stderr
    assert WANDB_KEY not in out.stdout + out.stderr
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "run.json").exists()


def test_a_secret_value_or_token_shape_in_any_key_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_DB_PASSWORD", "s3cret-Value-42")
    problems = problems_of(
        [
            "secret_env=[MY_DB_PASSWORD]",
            "card.description=pw s3cret-Value-42",
            f"card.model_name=x{HF_SHAPED}",
            "tracking.project=${oc.env:MY_DB_PASSWORD}",
        ],
        tmp_path,
    )
    assert [p.split(":")[0] for p in problems] == ["tracking.project", "card.model_name", "card.description"], problems
    assert "card.description: holds the value of $MY_DB_PASSWORD" in problems[2]
    assert "card.model_name: holds a Hugging Face token" in problems[1]
    assert not any("s3cret-Value-42" in p or HF_SHAPED in p for p in problems)


def test_secret_env_is_a_schema_key():
    assert compose("demo").secret_env == []


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    return copy


def _stage(run_dir):
    target = rundir.locate(str(run_dir))
    return push.stage(target, "adapter", run_dir / "push_staging", "me/repo")


def test_push_scans_staged_files_for_every_set_secret_and_token_shapes(run_copy, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    config = run_copy / "config.yaml"
    original = config.read_text()
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    config.write_text(original.replace("description: null", f"description: key {WANDB_KEY[::-1]}"))
    assert _stage(run_copy)  # not a secret: nothing set holds it, and it has no token's shape
    for leak, what in (
        (WANDB_KEY, r"the value of \$WANDB_API_KEY"),
        (HF_SHAPED, "a Hugging Face token"),
        ("AKIA" + "Q" * 16, "an AWS access key id"),
    ):
        config.write_text(original.replace("description: null", f"description: key {leak}"))
        with pytest.raises(IntegrityError, match=f"README.md holds {what}") as caught:
            _stage(run_copy)
        assert leak not in str(caught.value)
        assert not (run_copy / "push_staging").exists()


def test_push_scans_for_the_runs_own_secret_env(run_copy, monkeypatch):
    monkeypatch.setenv("MY_DB_PASSWORD", "s3cret-Value-42")
    config = run_copy / "config.yaml"
    text = config.read_text()
    assert "secret_env: []" in text
    config.write_text(
        text.replace("description: null", "description: pw s3cret-Value-42").replace(
            "secret_env: []", "secret_env:\n- MY_DB_PASSWORD"
        )
    )
    with pytest.raises(IntegrityError, match=r"README.md holds the value of \$MY_DB_PASSWORD"):
        _stage(run_copy)


def test_token_shapes_leave_ordinary_run_files_alone():
    assert credentials.find("revision: 0123456789abcdef0123456789abcdef01234567") is None  # a commit id
    assert credentials.find(f"WANDB_API_KEY={WANDB_KEY}") == "a W&B API key"


def test_a_refused_value_is_never_quoted_back(tmp_path, monkeypatch):
    """A secret interpolated into a typed key also fails the type check, whose message quoted the value."""
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setenv("HF_TOKEN", HF_SHAPED)
    problems = problems_of(
        [
            "seed=${oc.env:WANDB_API_KEY}",
            "trainer.learning_rate=${oc.env:HF_TOKEN}",
            "data.path=${oc.env:WANDB_API_KEY}",
        ],
        tmp_path,
    )
    text = "\n".join(problems)
    assert "seed: interpolates ${oc.env:WANDB_API_KEY}" in text and "trainer.learning_rate: interpolates" in text
    assert WANDB_KEY not in text and HF_SHAPED not in text, text
    assert "<the value of $WANDB_API_KEY>" in text  # the type problem is still reported, without the value


def test_a_variable_named_like_a_credential_is_a_secret(tmp_path, monkeypatch):
    monkeypatch.delenv("ACME_SERVICE_TOKEN", raising=False)
    problems = problems_of(
        [
            "card.description=${oc.env:ACME_SERVICE_TOKEN,none}",
            "card.license=${oc.env:DB_PASSWORD,x}",
            "card.model_name=${oc.env:TOKENIZERS_PARALLELISM,n}",
        ],
        tmp_path,
    )
    assert sorted(p.split(":")[0] for p in problems) == ["card.description", "card.license"], problems
    assert credentials.is_secret("STRIPE_API_KEY") and not credentials.is_secret("HF_HUB_DISABLE_TELEMETRY")


def test_push_refuses_a_run_whose_overrides_interpolated_a_secret_unset_now(run_copy, monkeypatch):
    """A run trained before validation refused it holds the W&B key in config.yaml and its card; at push time the
    variable is unset and a 40-hex run name has no token shape: the recorded override names it."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    record_path = run_copy / "run.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "overrides": ["tracking.run_name=${oc.env:WANDB_API_KEY}"]}))
    config = run_copy / "config.yaml"
    config.write_text(config.read_text().replace("description: null", f"description: {WANDB_KEY}"))
    with pytest.raises(
        IntegrityError, match=r"run's overrides \(run.json\) interpolate \$\{oc.env:WANDB_API_KEY\}"
    ) as caught:
        _stage(run_copy)
    assert WANDB_KEY not in str(caught.value)
    assert not (run_copy / "push_staging").exists()
