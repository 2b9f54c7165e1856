"""EleutherAI's lm-evaluation-harness (`lm_eval`) on a loaded model: the published zero-shot numbers, base vs adapter.

Why a bridge: the EleutherAI numbers for a base (GPT-NeoX-20B zero-shot: LAMBADA 0.720, SciQ 0.928, PIQA 0.779,
ARC-Challenge 0.380, TriviaQA 0.259) are what users compare a fine-tune against, and the fair comparison is the same
harness, the same tasks and prompts, on the same weights with and without the adapter. Loading a 20B base twice (the
lm_eval CLI's `peft=` loads base + adapter, a second CLI run loads the base) costs minutes and twice the memory;
`python -m finetune.evaluate RUN harness=...` loads base + adapter once and calls run_tasks() twice, once inside
`with model.disable_adapter():` (the base) and once with the adapter active; table() puts both side by side.

    resolve_tasks(names, include_path)   before any weights are read: every name exists, every dataset is readable
    run_tasks(model, tokenizer, names)   lm_eval's HFLM around the in-memory model (transformers or peft), results
    table(base, adapter)                 markdown: | task | metric | base | adapter | Δ |, stderr as ±

Tasks are lm_eval's registered ones plus the local tasks shipped in finetune/evaluate/harness_tasks (tag `neo_ft_local`:
neo_ft_legal_mc, multiple choice; neo_ft_cloze, LAMBADA-style) plus any folder of task YAMLs given with
harness_include=DIR. Registered tasks read Hub datasets: offline, only what the datasets cache already holds
(resolve_tasks says which task, which dataset, and the two fixes).

Reproducing the published NeoX-20B numbers on one GPU (fp16 weights, ~41 GB), with the plain lm_eval CLI (checked with
0.4.13):

    lm_eval --model hf --model_args pretrained=EleutherAI/gpt-neox-20b,dtype=float16 \\
        --tasks lambada_openai,sciq,piqa,arc_challenge,triviaqa --num_fewshot 0 --batch_size auto

and with this bridge, the base and a run's adapter from one load (`harness_include=DIR` adds local task folders):

    python -m finetune.evaluate RUN harness=lambada_openai,sciq,piqa,arc_challenge,triviaqa

The shipped local tasks run with the plain CLI too (`lm_eval --model hf --model_args pretrained=MODEL --include_path
finetune/evaluate/harness_tasks --tasks neo_ft_local`). The paper used an older harness; today's task versions
(triviaqa is now generated and exact-matched) can move the last digit, which is why each result records its task
version.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import sys
from pathlib import Path

from finetune.errors import ConfigError, closest

LM_EVAL_REQUIREMENT = "lm_eval>=0.4.13,<0.5"  # TaskManager.load and Task objects in simple_evaluate(tasks=)
LM_EVAL_MINIMUM = "0.4.13"
LOCAL_TASKS = Path(__file__).resolve().parent / "harness_tasks"
LOCAL_TAG = "neo_ft_local"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
EXPECTED_WARNINGS = (  # lm_eval warnings that passing an in-memory model and our local tasks make expected, not news
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "Custom kwargs can be passed to `--metadata`",
)


def resolve_tasks(tasks: list[str], include_path: list[str | Path] | None = None) -> list[str]:
    """Check the task names before any model is loaded: each exists (else ConfigError with close matches) and its
    dataset can be read here (each task is built once, which reads its dataset; a Hub dataset that cannot be fetched
    is a ConfigError naming the task, the dataset and the fixes). Returns the names."""
    tasks = list(dict.fromkeys(tasks))
    manager = task_manager(_include_folders(include_path))
    _check_names(manager, tasks)
    build_tasks(manager, tasks)
    return tasks


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    *,
    include_path: list[str | Path] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 8,
    seed: int = 1234,
    bootstrap_iters: int = 100000,
    log_samples: bool = False,
) -> dict:
    """lm_eval's results for `tasks` on the model as it is now (a PeftModel inside disable_adapter() is the base).

    Returns plain JSON: {"lm_eval_version", "config", "tasks": {task: {"metrics": {metric: value,
    metric_stderr: value}, "higher_is_better", "n_samples", "version", "num_fewshot"}}}; with log_samples=True also
    "samples": {task: [{"doc_id", "target", "arguments", "responses"}]}, responses per request (for a
    log-likelihood request: [log-likelihood, is_greedy]). Metrics of a filter other than "none" keep lm_eval's
    "metric,filter" name (triviaqa: "exact_match,remove_whitespace").
    `seed` seeds python, numpy, torch and the few-shot sampler (the lm_eval CLI's defaults are 0,1234,1234,1234;
    zero-shot log-likelihood scoring uses none of them). bootstrap_iters: resamples for stderrs that lm_eval
    bootstraps (perplexity), 100000 as the CLI.
    """
    tasks = list(dict.fromkeys(tasks))
    manager = task_manager(_include_folders(include_path))
    _check_names(manager, tasks)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    built = build_tasks(manager, tasks)
    # lm_eval prints progress to stdout
    with _quiet_expected_warnings(), _no_bars_or_git_probe(), contextlib.redirect_stdout(sys.stderr):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)  # an instance: nothing is reloaded
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=built,
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    summary = {
        "lm_eval_version": lm_eval_version(),
        "config": {
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "seed": seed,
            "bootstrap_iters": bootstrap_iters,
        },
        "tasks": {name: _task_summary(results, name) for name in results["results"]},
    }
    if log_samples:
        summary["samples"] = {name: [_sample(s) for s in samples] for name, samples in results["samples"].items()}
    return summary


def table(base: dict, adapter: dict) -> list[str]:
    """Markdown lines comparing two run_tasks() results: | task | metric | base | adapter | Δ |, stderr as ±."""
    lines = ["| task | metric | base | adapter | Δ |", "|---|---|---:|---:|---:|"]
    for name in sorted(set(base["tasks"]) | set(adapter["tasks"])):
        base_metrics = base["tasks"].get(name, {}).get("metrics", {})
        adapter_metrics = adapter["tasks"].get(name, {}).get("metrics", {})
        for metric in _metric_names(base_metrics) + [
            m for m in _metric_names(adapter_metrics) if m not in base_metrics
        ]:
            before, after = base_metrics.get(metric), adapter_metrics.get(metric)
            delta = _number(after - before, "+") if before is not None and after is not None else "–"
            lines.append(
                f"| {name} | {metric} | {_with_stderr(base_metrics, metric)} | "
                f"{_with_stderr(adapter_metrics, metric)} | {delta} |"
            )
    return lines


def lm_eval_version() -> str:
    """The installed lm_eval's version; ConfigError with the install command when it is missing or too old."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        installed = version("lm_eval")
    except PackageNotFoundError:
        raise ConfigError(
            f"harness=: needs EleutherAI's lm-evaluation-harness: pip install '{LM_EVAL_REQUIREMENT}'"
        ) from None
    if Version(installed) < Version(LM_EVAL_MINIMUM):
        raise ConfigError(
            f"harness=: lm_eval {installed} is installed; this bridge needs pip install '{LM_EVAL_REQUIREMENT}'"
        )
    return installed


@functools.lru_cache(maxsize=4)
def task_manager(include_folders: tuple[str, ...]):
    """lm_eval's TaskManager over its registered tasks, our local tasks and `include_folders` (later folders win on
    a name). Kept per process: indexing lm_eval's thousands of task YAMLs takes seconds."""
    lm_eval_version()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(LOCAL_TASKS), *include_folders])


def build_tasks(manager, names: list[str]) -> list:
    """Fresh lm_eval Task / Group objects for `names` (a tag expands to its tasks); building reads the datasets.

    A Hub dataset that cannot be fetched (offline, no network) and is not in the datasets cache becomes a ConfigError
    naming the task, the dataset and the fixes, instead of lm_eval's traceback.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError

    built = []
    for name in names:
        try:
            with _quiet_expected_warnings(), contextlib.redirect_stdout(sys.stderr):
                loaded = manager.load([name])
        except (ConnectionError, TimeoutError, LocalEntryNotFoundError) as err:
            raise ConfigError(hub_unreachable_message(name, _hub_datasets(manager, name), err)) from None
        groups = loaded.get("groups") or {}
        built.extend([groups[name]] if name in groups else loaded["tasks"].values())
    return built


def hub_unreachable_message(task: str, datasets: list[str], err: Exception) -> str:
    """What to do when a task's Hub dataset is neither cached nor downloadable: fill and copy the cache, or go local."""
    offline = [
        f"{v}={os.environ[v]}" for v in OFFLINE_VARIABLES if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
    ]
    why = f"offline mode is on ({', '.join(offline)})" if offline else f"the Hub cannot be reached ({err})"
    named = (
        f"dataset{'s' if len(datasets) > 1 else ''} {', '.join(repr(d) for d in datasets)}" if datasets else "a dataset"
    )
    return (
        f"harness task '{task}' reads the Hugging Face Hub {named}, not in the datasets cache here and not "
        f"downloadable: {why}. Either run this task once on a machine with Hub access, which "
        "fills the Hugging Face datasets cache, and copy that cache here (set HF_DATASETS_CACHE to the copy, or "
        "HF_HOME to a copied ~/.cache/huggingface); or write a local task YAML whose dataset reads local files "
        "(as finetune/evaluate/harness_tasks does) and pass its folder with harness_include=DIR"
    )


def _check_names(manager, tasks: list[str]) -> None:
    if not tasks:
        raise ConfigError(
            "harness=: no task given; name lm_eval tasks, e.g. harness=lambada_openai,sciq, or "
            f"harness={LOCAL_TAG} for the local tasks"
        )
    known = set(manager.all_tasks)
    problems = []
    for name in tasks:
        if name in known:
            continue
        close = closest(name, manager.all_tasks, n=5)
        hint = f"close matches: {', '.join(close)}" if close else "no close match"
        problems.append(
            f"harness=: unknown task '{name}' ({hint}). `lm_eval ls tasks` lists the registered ones; "
            f"a folder of your own task YAMLs is added with harness_include=DIR"
        )
    if problems:
        raise ConfigError(problems)


def _include_folders(include_path: list[str | Path] | None) -> tuple[str, ...]:
    """Absolute folders, so the task index does not depend on the working directory."""
    folders = []
    for entry in include_path or []:
        folder = Path(entry).expanduser().resolve()
        if not folder.is_dir():
            raise ConfigError(f"harness_include={entry}: no such folder; give a folder of lm_eval task YAMLs")
        folders.append(str(folder))
    return tuple(folders)


def _hub_datasets(manager, name: str, seen: set | None = None) -> list[str]:
    """The Hub dataset ids behind a task, tag or group, from the task index (for the message; best effort)."""
    seen = set() if seen is None else seen
    entry = manager.task_index.get(name)
    if entry is None or name in seen:
        return []
    seen.add(name)
    cfg = entry.cfg or {}
    if name in manager.all_tags:
        members = sorted(entry.tags)
    elif name in manager.all_groups:
        members = _as_list(cfg.get("task"))
    else:
        path = cfg.get("dataset_path")
        return [path] if path and _is_hub_dataset(path) else []
    found = set()
    for member in members:
        if isinstance(member, dict):  # an inline task config in a group
            found.update([member["dataset_path"]] if _is_hub_dataset(member.get("dataset_path") or "") else [])
            member = member.get("task", "")
        found.update(_hub_datasets(manager, member, seen))
    return sorted(found)


def _is_hub_dataset(path: str) -> bool:
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return bool(path) and path not in _PACKAGED_DATASETS_MODULES and not Path(path).expanduser().exists()


def _as_list(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def _task_summary(results: dict, name: str) -> dict:
    metrics, higher_is_better = {}, {}
    for key, value in results["results"][name].items():
        metric, _, filter_name = key.partition(",")
        if not filter_name:  # name, alias, sample_len
            continue
        suffix = "" if filter_name == "none" else f",{filter_name}"
        metrics[metric + suffix] = _plain(value)
        base_metric = metric.removesuffix("_stderr")
        if base_metric in results.get("higher_is_better", {}).get(name, {}):
            higher_is_better[base_metric + suffix] = bool(results["higher_is_better"][name][base_metric])
    samples = results.get("n-samples", {}).get(name)
    return {
        "metrics": metrics,
        "higher_is_better": higher_is_better,
        "n_samples": _plain(samples["effective"]) if samples else None,
        "n_documents": _plain(samples["original"]) if samples else None,
        "version": _plain(results.get("versions", {}).get(name)),
        "num_fewshot": _plain(results.get("n-shot", {}).get(name)),
    }


def _sample(sample: dict) -> dict:
    return {
        "doc_id": _plain(sample["doc_id"]),
        "target": _plain(sample["target"]),
        "arguments": _plain(sample["arguments"]),
        "responses": _plain(sample["filtered_resps"]),
    }


def _plain(value):
    """JSON-safe: numpy and torch scalars to Python numbers, tuples to lists, NaN/inf and lm_eval's "N/A" to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value == "N/A":
        return None
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _metric_names(metrics: dict) -> list[str]:
    return [m for m in metrics if not _is_stderr(m)]


def _is_stderr(metric: str) -> bool:
    return metric.partition(",")[0].endswith("_stderr")


def _stderr_key(metric: str) -> str:
    name, comma, filter_name = metric.partition(",")
    return f"{name}_stderr{comma}{filter_name}"


def _with_stderr(metrics: dict, metric: str) -> str:
    value = metrics.get(metric)
    if value is None:
        return "–"
    stderr = metrics.get(_stderr_key(metric))
    return _number(value) + (f" ± {_number(stderr)}" if stderr is not None else "")


def _number(value: float, sign: str = "") -> str:
    """4 decimals; 4 significant digits for large values (an untrained model's perplexity)."""
    return f"{value:{sign}.4g}" if abs(value) >= 1000 else f"{value:{sign}.4f}"


class _ExpectedWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(expected in record.getMessage() for expected in EXPECTED_WARNINGS)


@contextlib.contextmanager
def _no_bars_or_git_probe():
    """Our progress style in a log, not lm_eval's: its tqdm bars (per task, per request kind, per bootstrap) are written
    to a buffer and only their non-bar lines passed on; and its `git describe` of the current directory (recorded in
    results we do not keep; not this project's or the model's commit) runs with git's stderr silenced, so a directory
    that is not a repository no longer prints "fatal: not a git repository"."""
    import io
    import subprocess

    from lm_eval import evaluator

    def quiet_git_hash():
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return None

    probe, evaluator.get_git_commit_hash = evaluator.get_git_commit_hash, quiet_git_hash
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        evaluator.get_git_commit_hash = probe
        for line in captured.getvalue().replace("\r", "\n").splitlines():
            if line.strip() and not _BAR.search(line):
                print(line, file=sys.stderr)


_BAR = re.compile(r"\d+%\||\d+/\d+ \[|it/s\]|s/it\]|^bootstrapping for stddev")


@contextlib.contextmanager
def _quiet_expected_warnings():
    """Drop the lm_eval warnings listed in EXPECTED_WARNINGS (other warnings and errors still show)."""
    loggers = [logging.getLogger(name) for name in ("lm_eval.models.huggingface", "lm_eval.api.task")]
    quiet = _ExpectedWarningFilter()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)
