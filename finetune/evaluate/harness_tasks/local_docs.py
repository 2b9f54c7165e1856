"""Documents of the shipped local tasks, read from the JSONL files beside this module.

The task YAMLs name it as `custom_dataset: !function local_docs.load`; lm_eval resolves `!function` against the
YAML's own folder, so the data is found from any working directory (a `dataset_path: json` task's `data_files`
would be resolved against the cwd). No datasets cache is written and nothing is fetched from the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(data_file: str, split: str = "test", **_metadata) -> dict:
    """{split: Dataset} of the JSONL file `data_file` (relative to this folder); lm_eval passes the task's
    metadata and dataset_kwargs as keywords."""
    import datasets

    path = HERE / data_file
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {split: datasets.Dataset.from_list(rows)}
