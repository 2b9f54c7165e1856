"""Problems a user can fix end in one clear message and exit 2, never in a library's traceback (issue 19, item 5);
a library's own progress output does not break our one-line-per-event style."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from finetune.errors import EXIT_CONFIG, EXIT_OK


def tool(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_preview_of_a_hub_preset_offline_says_what_training_says_not_a_traceback(tmp_path):
    out = tool("finetune.preview", "conf=lora_neox20b", cwd=tmp_path)
    assert out.returncode == EXIT_CONFIG, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "model.name_or_path=DIR" in out.stderr and "HF_HUB_OFFLINE" in out.stderr


def test_harness_evaluation_prints_our_lines_only(tiny_run, tmp_path):
    """lm_eval's tqdm bars and its `git describe` of a working directory that is not a repository ("fatal: not a git
    repository") used to reach the log between our lines."""
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    elsewhere = tmp_path / "not-a-repository"
    elsewhere.mkdir()
    out = tool("finetune.evaluate", str(run_dir), "harness=neo_ft_cloze", "harness_limit=4", cwd=elsewhere)
    assert out.returncode == EXIT_OK, out.stderr[-3000:]
    assert "fatal:" not in out.stderr and "%|" not in out.stderr and "it/s]" not in out.stderr, out.stderr[-3000:]
    assert "neo_ft_cloze" in (run_dir / "eval_report.md").read_text()
    assert [line for line in out.stderr.splitlines() if line.strip()] == [
        line for line in out.stderr.splitlines() if line.startswith("[finetune] ")
    ]
