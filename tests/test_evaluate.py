"""finetune.evaluate on a real tiny LoRA run: the report's numbers equal direct computations with the model, batched
generation equals one-at-a-time, labelled rows are scored by option log-likelihood, the card picks the report up,
and bad input exits 2 naming the row; plus early stopping and perplexity during training."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from finetune.config.compose import compose
from finetune.errors import ConfigError, DataError
from finetune.evaluate import metrics, scoring
from finetune.evaluate import run as evaluate
from finetune.inference import generate
from finetune.train.run import run

from helpers import tiny_overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory):
    """A copy of the shared run that evaluate may write into (report, refreshed card)."""
    copy = tmp_path_factory.mktemp("evaluate") / "run"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    return copy


@pytest.fixture(scope="module")
def report(run_copy):
    evaluate.main(
        [
            str(run_copy),
            "generate_rows=6",
            "max_new_tokens=8",
            "samples=3",
            "batch_size=4",
            "harness=neo_ft_legal_mc",
            "harness_limit=6",
        ]
    )
    return json.loads((run_copy / "eval_report.json").read_text())


@pytest.fixture(scope="module")
def session(tiny_run):
    return generate.load(tiny_run, dtype="float32")


def test_report_files_metrics_and_card(report, run_copy):
    metric_names = set(report["metrics"])
    assert {"loss", "perplexity", "exact_match", "token_f1", "rougeL", "bleu"} <= metric_names
    loss = report["metrics"]["loss"]
    assert loss["base"] != loss["finetuned"]
    assert report["metrics"]["perplexity"]["finetuned"] == pytest.approx(math.exp(loss["finetuned"]))
    for name in ("exact_match", "token_f1", "rougeL"):
        assert 0 <= report["metrics"][name]["base"] <= 1 and 0 <= report["metrics"][name]["finetuned"] <= 1
    check = report["data"]["heldout_check"]  # the reproduced split is the one training held out
    assert check["matches"] is True and check["dataset_fingerprint_now"] == check["dataset_fingerprint_at_training"]
    assert {k: v for k, v in report["data"].items() if k != "heldout_check"} == {
        "source": "held-out split of the run",
        "rows": 32,
        "loss_samples": 32,
        "task": "generation",
        "generated_rows": 6,
    }
    assert len(report["samples"]) == 3 and all(s["reference"] for s in report["samples"])
    # the loss is the run's own held-out loss of the trained adapter (Trainer: mean of batch means; here: per token)
    recorded = json.loads((run_copy / "run.json").read_text())["eval_loss_after"]
    assert loss["finetuned"] == pytest.approx(recorded, rel=0.02)
    markdown = (run_copy / "eval_report.md").read_text()
    assert "| held-out perplexity |" in markdown and "## Answers side by side" in markdown
    assert (run_copy / "eval_report.png").read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    assert matplotlib.image.imread(run_copy / "eval_report.png").shape[0] > 100
    card = (run_copy / "adapter" / "README.md").read_text()
    assert "python -m finetune.evaluate" in card and "| held-out perplexity |" in card
    for side in ("base", "finetuned"):  # the harness bridge ran on both models (its own tests check the numbers)
        task = report["harness"][side]["tasks"]["neo_ft_legal_mc"]
        assert task["n_samples"] == 6 and 0 <= task["metrics"]["acc"] <= 1
    assert "## lm-evaluation-harness" in markdown and "| neo_ft_legal_mc | acc |" in markdown
    assert "lm-evaluation-harness:" in card


def test_loss_equals_the_models_own_cross_entropy(session, tiny_run):
    """label_logprobs on a padded batch = transformers' loss on each sequence alone (padding and shift are right)."""
    import torch
    from omegaconf import OmegaConf

    from finetune.data import templates
    from finetune.data.tokenize import prepare

    config = generate.rundir.locate(tiny_run).config
    data = prepare(
        OmegaConf.create(config["data"]),
        session.tokenizer,
        templates.load(str(tiny_run / "data_template.yaml")),
        config["seed"],
    )
    sequences = [(s.input_ids, s.labels) for s in data.eval[:3]]
    scored = scoring.label_logprobs(session.model, sequences, batch_size=3, pad_id=session.tokenizer.pad_token_id)
    for (ids, labels), result in zip(sequences, scored):
        with torch.no_grad():
            out = session.model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        assert result.tokens == sum(1 for label in labels[1:] if label != -100)
        assert -result.logprob / result.tokens == pytest.approx(out.loss.item(), abs=1e-4)


@pytest.mark.parametrize("arch", ["neo", "neox"])
def test_batched_greedy_answers_equal_one_at_a_time(tiny_models, arch):
    """Left padding must not change a greedy answer (GPT-Neo's learned positions, NeoX's rotary)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[arch])
    prompts = [
        "What is a tort?",
        "Explain the duty of care owed by a landlord to tenants in two sentences.",
        "Define",
        "Is a verbal contract binding?",
    ]
    batched = scoring.greedy_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    alone = [scoring.greedy_answers(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == alone


def test_text_metrics_use_squad_normalisation():
    perfect = metrics.text_metrics(["The tenant pays rent."], ["tenant pays rent"])
    assert perfect["exact_match"] == 1.0 and perfect["token_f1"] == 1.0
    assert metrics.text_metrics(["a b c d"], ["a b c d"])["bleu"] == pytest.approx(100.0)
    none = metrics.text_metrics(["zebra"], ["the tenant pays rent"])
    assert none["exact_match"] == none["token_f1"] == none["rougeL"] == 0.0
    half = metrics.text_metrics(["tenant pays"], ["tenant pays rent monthly"])
    assert half["token_f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def _labelled_file(path, answers):
    rows = [
        {"instruction": f"Is clause {i} enforceable? Answer Yes or No.", "input": "", "output": answer}
        for i, answer in enumerate(answers)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_multiple_choice_accuracy_matches_direct_scoring(session, tiny_run, tmp_path):
    """Accuracy from option log-likelihoods = an independent argmax over log p(option + EOS | prompt) per row."""
    import torch

    data = _labelled_file(tmp_path / "yes_no.jsonl", ["Yes", "No", "No", "Yes", "No", "Yes"])
    opts = _opts(tiny_run, data=[str(data)], options=["Yes", "No"], out=str(tmp_path))
    evalset = evaluate.build_evalset(generate.rundir.locate(tiny_run), session.tokenizer, opts)
    result, answers = evaluate.measure(session.model, session.tokenizer, evalset, opts)
    right = 0
    for i, row in enumerate(evalset.rows):
        scores = []
        for option in ("Yes", "No"):
            prompt_ids = session.tokenizer(evalset.prompts[i], add_special_tokens=False)["input_ids"]
            answer_ids = session.tokenizer(option + session.tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + answer_ids])
            with torch.no_grad():
                logp = torch.log_softmax(session.model(input_ids=ids).logits.float()[0, :-1], -1)
            scores.append(sum(logp[len(prompt_ids) - 1 + k, t].item() for k, t in enumerate(answer_ids)))
        choice = ("Yes", "No")[max(range(2), key=lambda k: scores[k])]
        assert answers[i] == choice
        right += choice == row["output"]
    assert result["mc_accuracy"] == pytest.approx(right / len(evalset.rows))
    with session.model.disable_adapter():
        base, _ = evaluate.measure(session.model, session.tokenizer, evalset, opts)
    assert base["loss"] != result["loss"]


def test_labelled_row_outside_the_options_names_the_line(session, tiny_run, tmp_path):
    data = _labelled_file(tmp_path / "bad.jsonl", ["Yes", "Maybe", "No"])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: the answer 'Maybe' is not one of the options"):
        evaluate.build_evalset(
            generate.rundir.locate(tiny_run),
            session.tokenizer,
            _opts(tiny_run, data=[str(data)], options=["Yes", "No"]),
        )


def test_bad_options_exit_2_before_loading(tiny_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(tiny_run), "generate_rows=-1"])
    assert exit_info.value.code == 2 and "generate_rows=-1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="template= and columns= describe data=FILE"):
        evaluate.run(_opts(tiny_run, template="dolly"))


def test_early_stopping_keeps_the_best_checkpoint_as_the_result(tiny_models, tmp_path):
    """threshold=100 makes every evaluation after the first 'no better': patience 1 stops at the second one."""
    from safetensors.torch import load_file

    out = tmp_path / "es"
    run_dir = run(
        compose(
            "demo",
            tiny_overrides(
                "neox",
                tiny_models["neox"],
                out,
                "trainer.max_steps=12",
                "sample_generations=0",
                "eval_before_training=false",
                "trainer.eval_strategy=steps",
                "trainer.eval_steps=2",
                "trainer.save_strategy=steps",
                "trainer.save_steps=2",
                "early_stopping_patience=1",
                "early_stopping_threshold=100",
            ),
        )
    )
    record = json.loads((run_dir / "run.json").read_text())
    assert record["stopped_early"] is True and record["global_steps"] == 4
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    evals = [h for h in history if "eval_loss" in h][:2]  # the two evaluations during training (then the final one)
    assert [h["step"] for h in evals] == [2, 4]
    assert all(h["eval_perplexity"] == pytest.approx(math.exp(h["eval_loss"])) for h in evals)
    lowest = min(evals, key=lambda h: h["eval_loss"])  # the threshold decides stopping; the best is the lowest loss
    assert record["best_checkpoint"] == f"checkpoint-{lowest['step']}"
    assert record["eval_loss_after"] == pytest.approx(lowest["eval_loss"], abs=1e-6)
    best = load_file(run_dir / "checkpoints" / record["best_checkpoint"] / "adapter_model.safetensors")
    final = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert best.keys() == final.keys() and all((best[k] == final[k]).all() for k in best)


def test_early_stopping_without_matching_checkpoints_is_a_config_error(tiny_models, tmp_path):
    from finetune.config.validate import validate

    cfg = compose(
        "demo",
        tiny_overrides(
            "neox",
            tiny_models["neox"],
            tmp_path / "x",
            "early_stopping_patience=2",
            "trainer.eval_strategy=steps",
            "trainer.eval_steps=5",
            "trainer.save_strategy=epoch",
        ),
    )
    with pytest.raises(ConfigError, match="trainer.save_strategy=steps"):
        validate(cfg)


def _opts(target, **overrides) -> dict:
    from finetune import console as cli

    opts = cli.parse([str(target)], evaluate.OPTIONS, positional="target")
    opts.update(overrides)
    return opts


def test_template_options_fixed_and_per_row(session, tiny_run, tmp_path):
    """A template's `options: [..]` or `options: {field: F}` makes evaluate score choices (the brief's LegalBench
    case)."""
    import yaml

    from finetune.data import templates

    spec = yaml.safe_load((tiny_run / "data_template.yaml").read_text())
    fixed = tmp_path / "yes_no.yaml"
    fixed.write_text(yaml.safe_dump({**spec, "options": ["Yes", "No"]}))
    data = _labelled_file(tmp_path / "rows.jsonl", ["No", "Yes"])
    target = generate.rundir.locate(tiny_run)
    evalset = evaluate.build_evalset(target, session.tokenizer, _opts(tiny_run, data=[str(data)], template=str(fixed)))
    assert evalset.options == [["Yes", "No"], ["Yes", "No"]] and evalset.gold == [1, 0]

    per_row = tmp_path / "per_row.yaml"
    per_row.write_text(yaml.safe_dump({**spec, "options": {"field": "choices"}}))
    rows = tmp_path / "choices.jsonl"
    rows.write_text(
        json.dumps(
            {
                "instruction": "Which court?",
                "input": "",
                "output": "High Court",
                "choices": ["County Court", "High Court", "Tribunal"],
            }
        )
        + "\n"
    )
    evalset = evaluate.build_evalset(
        target, session.tokenizer, _opts(tiny_run, data=[str(rows)], template=str(per_row))
    )
    assert evalset.options == [["County Court", "High Court", "Tribunal"]] and evalset.gold == [1]
    assert len(evalset.option_sequences[0]) == 3

    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({**spec, "options": ["Only one"]}))
    with pytest.raises(ConfigError, match="'options' is a list of at least two answers"):
        templates.load(str(broken))
