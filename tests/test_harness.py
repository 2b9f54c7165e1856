"""The lm-evaluation-harness bridge on a real tiny run: base (disable_adapter) and adapter through lm_eval's HFLM.

Nothing of lm_eval, transformers or peft is mocked. The run's base and adapter are loaded once for the module;
lm_eval's task index is built once per process (finetune.harness.task_manager).
"""

from __future__ import annotations

import json
import time
from importlib.metadata import version

import pytest

from finetune.errors import EXIT_CONFIG, ConfigError
from finetune.evaluate import harness

LIMIT = 6  # documents per local task
BOOTSTRAP_ITERS = 100  # perplexity's stderr is bootstrapped; lm_eval's default 100000 is for real runs


@pytest.fixture(scope="module")
def session(tiny_run):
    from peft import PeftModel

    from finetune.inference import generate

    loaded = generate.load(tiny_run, dtype="float32")
    assert isinstance(loaded.model, PeftModel)  # base + adapter, so disable_adapter() is the base
    return loaded


@pytest.fixture(scope="module")
def results(session) -> dict:
    """run_tasks on the local tasks: the base inside disable_adapter(), then the adapter, as finetune.evaluate does."""
    run = {"limit": LIMIT, "bootstrap_iters": BOOTSTRAP_ITERS, "log_samples": True}
    assert harness.resolve_tasks([harness.LOCAL_TAG]) == [harness.LOCAL_TAG]
    with session.model.disable_adapter():
        base = harness.run_tasks(session.model, session.tokenizer, [harness.LOCAL_TAG], **run)
    adapter = harness.run_tasks(session.model, session.tokenizer, [harness.LOCAL_TAG], **run)
    return {"base": base, "adapter": adapter}


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context): the sum of the log-softmax of each continuation token, fp32, one forward pass."""
    import torch

    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context_ids + continuation_ids], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logprobs = torch.log_softmax(logits[len(context_ids) - 1 : -1], dim=-1)  # position i predicts token i + 1
    return logprobs.gather(1, torch.tensor(continuation_ids, device=model.device)[:, None]).sum().item()


def loglikelihoods(result: dict, task: str, doc_id: int = 0) -> list[float]:
    sample = next(s for s in result["samples"][task] if s["doc_id"] == doc_id)
    return [response[0] for response in sample["responses"]]


def test_local_tasks_run_end_to_end_on_base_and_adapter(results):
    for result in results.values():
        assert result["lm_eval_version"] == version("lm_eval")
        json.dumps(result, allow_nan=False)  # plain JSON
        assert set(result["tasks"]) == {"neo_ft_legal_mc", "neo_ft_cloze"}
        for task in result["tasks"].values():
            assert task["n_samples"] == LIMIT and task["n_documents"] == 20
            assert task["version"] == 1.0 and task["num_fewshot"] == 0
        choice, cloze = result["tasks"]["neo_ft_legal_mc"], result["tasks"]["neo_ft_cloze"]
        assert set(choice["metrics"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
        assert all(0 <= value <= 1 for value in choice["metrics"].values())
        assert set(cloze["metrics"]) == {"perplexity", "perplexity_stderr", "acc", "acc_stderr"}
        assert cloze["metrics"]["perplexity"] >= 1 and 0 <= cloze["metrics"]["acc"] <= 1
        assert cloze["higher_is_better"] == {"perplexity": False, "acc": True}
        assert len(result["samples"]["neo_ft_legal_mc"]) == LIMIT
    base, adapter = results["base"], results["adapter"]
    differs = [
        (task, doc)
        for task in ("neo_ft_legal_mc", "neo_ft_cloze")
        for doc in range(LIMIT)
        if loglikelihoods(base, task, doc) != loglikelihoods(adapter, task, doc)
    ]
    assert differs, "base and adapter gave identical log-likelihoods: the adapter was not applied, or not disabled"
    assert (
        base["tasks"]["neo_ft_cloze"]["metrics"]["perplexity"]
        != adapter["tasks"]["neo_ft_cloze"]["metrics"]["perplexity"]
    )


def test_lm_eval_loglikelihoods_equal_a_direct_computation_for_adapter_and_base(session, results):
    sample = next(s for s in results["adapter"]["samples"]["neo_ft_legal_mc"] if s["doc_id"] == 0)
    assert 2 <= len(sample["arguments"]) <= 4
    direct_adapter = [direct_loglikelihood(session.model, session.tokenizer, *pair) for pair in sample["arguments"]]
    with session.model.disable_adapter():
        direct_base = [direct_loglikelihood(session.model, session.tokenizer, *pair) for pair in sample["arguments"]]
    assert loglikelihoods(results["adapter"], "neo_ft_legal_mc") == pytest.approx(direct_adapter, abs=1e-4)
    assert loglikelihoods(results["base"], "neo_ft_legal_mc") == pytest.approx(direct_base, abs=1e-4)
    # the check has teeth: the adapter moves these log-likelihoods far more than the tolerance
    assert max(abs(a - b) for a, b in zip(direct_adapter, direct_base)) > 1e-2


def test_table_puts_base_and_adapter_side_by_side(results):
    lines = harness.table(results["base"], results["adapter"])
    assert lines[0] == "| task | metric | base | adapter | Δ |"
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line for line in lines[2:]}
    assert set(rows) == {
        ("neo_ft_cloze", "perplexity"),
        ("neo_ft_cloze", "acc"),
        ("neo_ft_legal_mc", "acc"),
        ("neo_ft_legal_mc", "acc_norm"),
    }
    acc = results["adapter"]["tasks"]["neo_ft_legal_mc"]["metrics"]
    assert f"{acc['acc']:.4f} ± {acc['acc_stderr']:.4f}" in rows[("neo_ft_legal_mc", "acc")]
    only_base = {"tasks": {"t": {"metrics": {"acc": 0.5, "acc_stderr": 0.1}}}}
    assert harness.table(only_base, {"tasks": {}})[2] == "| t | acc | 0.5000 ± 0.1000 | – | – |"
    both = {"tasks": {"t": {"metrics": {"acc": 0.75, "acc_stderr": None}}}}
    assert harness.table(only_base, both)[2] == "| t | acc | 0.5000 ± 0.1000 | 0.7500 | +0.2500 |"


def test_unknown_task_is_a_config_error_with_close_matches():
    with pytest.raises(ConfigError) as caught:
        harness.resolve_tasks(["neo_ft_cloze", "neo_ft_legal_mcq", "lambada_opnai"])
    assert caught.value.exit_code == EXIT_CONFIG
    assert len(caught.value.problems) == 2  # every unknown name at once; neo_ft_cloze is fine
    first, second = caught.value.problems
    assert "'neo_ft_legal_mcq'" in first and "neo_ft_legal_mc" in first and "harness_include=" in first
    assert "'lambada_opnai'" in second and "lambada_openai" in second
    with pytest.raises(ConfigError, match="no task given"):
        harness.resolve_tasks([])
    with pytest.raises(ConfigError, match="harness_include=no/such/folder: no such folder"):
        harness.resolve_tasks(["neo_ft_cloze"], include_path=["no/such/folder"])


@pytest.mark.parametrize("task, dataset", [("sciq", "allenai/sciq"), ("lambada_openai", "EleutherAI/lambada_openai")])
def test_hub_task_offline_fails_fast_naming_task_dataset_and_fixes(task, dataset, monkeypatch, tmp_path, capfd):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # an empty cache, whatever this machine holds
    harness.task_manager(())  # the task index (built once per process) is not what is timed
    start = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        harness.resolve_tasks([task])
    assert time.monotonic() - start < 20
    message = str(caught.value)
    assert f"'{task}'" in message and f"'{dataset}'" in message and "HF_HUB_OFFLINE=1" in message
    assert "HF_DATASETS_CACHE" in message and "harness_include=DIR" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert "Traceback" not in "".join(capfd.readouterr())


def test_local_and_included_tasks_from_another_working_directory(session, results, tmp_path, monkeypatch):
    """The shipped tasks find their data from any cwd; harness_include= adds a folder (relative to the cwd)."""
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    rows = [
        {"question": "Is a verbal agreement ever a contract?", "choices": ["no", "yes"], "answer": 1},
        {"question": "Is a fever a raised body temperature?", "choices": ["no", "yes"], "answer": 1},
    ]
    (folder / "yes_no.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "yes_no.yaml").write_text(
        "task: my_yes_no\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'yes_no.jsonl'}\n  cache_dir: {tmp_path / 'cache'}\n"
        'output_type: multiple_choice\ntest_split: test\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n"
        "    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 2.0\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    names = ["neo_ft_legal_mc", "my_yes_no"]
    assert harness.resolve_tasks(names, include_path=["my_tasks"]) == names
    result = harness.run_tasks(
        session.model,
        session.tokenizer,
        names,
        include_path=["my_tasks"],
        limit=2,
        bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=True,
    )
    assert result["tasks"]["my_yes_no"]["n_samples"] == 2 and result["tasks"]["my_yes_no"]["version"] == 2.0
    assert 0 <= result["tasks"]["my_yes_no"]["metrics"]["acc"] <= 1
    # the same documents and the same model as the module's adapter run: the same log-likelihoods
    assert loglikelihoods(result, "neo_ft_legal_mc") == pytest.approx(
        loglikelihoods(results["adapter"], "neo_ft_legal_mc"), abs=1e-4
    )


def test_missing_or_old_lm_eval_is_a_config_error_with_the_install_command(monkeypatch):
    import importlib.metadata

    installed = importlib.metadata.version

    def old_lm_eval(name):
        return "0.4.2" if name == "lm_eval" else installed(name)

    def no_lm_eval(name):
        if name == "lm_eval":
            raise importlib.metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setattr(importlib.metadata, "version", old_lm_eval)
    with pytest.raises(ConfigError, match=r"lm_eval 0.4.2 is installed.*pip install 'lm_eval>=0.4.13,<0.5'"):
        harness.lm_eval_version()
    monkeypatch.setattr(importlib.metadata, "version", no_lm_eval)
    with pytest.raises(ConfigError, match=r"needs EleutherAI's lm-evaluation-harness: pip install 'lm_eval>="):
        harness.lm_eval_version()
