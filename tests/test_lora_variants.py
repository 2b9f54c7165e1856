"""LoRA options end to end: what validation accepts trains, merges through the gate and evaluates against the untouched
base; what would change the base under the adapter (PiSSA, OLoRA, modules_to_save, ...) is refused with the reason.
MiCA (B frozen to the base's minor singular vectors) leaves the base untouched and is supported for strategy=lora.
LoRA+ gives the B matrices lr * ratio through peft's own optimizer builder; NEFTune noises embeddings only while
training."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import TrainerCallback

from finetune import console as cli
from finetune.adapters import merge
from finetune.config.compose import compose
from finetune.config.validate import validate
from finetune.errors import EXIT_CONFIG, ConfigError
from finetune.evaluate import run as evaluate
from finetune.train.run import run

from helpers import run_cli, tiny_overrides


def problems_of(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate(compose("demo", list(overrides)))
    return caught.value.problems


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_inits_that_rewrite_the_base_are_refused(init):
    (problem,) = [
        p for p in problems_of(f"strategy.init_lora_weights={init}") if p.startswith("strategy.init_lora_weights")
    ]
    assert "base weights" in problem and "finetune.merge" in problem and "init_lora_weights=true" in problem


@pytest.mark.parametrize("init", ["false", "orthogonal", "eva", "kaiming"])
def test_other_inits_are_refused_with_their_reason(init):
    (problem,) = [
        p for p in problems_of(f"strategy.init_lora_weights={init}") if p.startswith("strategy.init_lora_weights")
    ]
    reason = {"false": "before training", "orthogonal": "before training", "eva": "data", "kaiming": "not one of"}[init]
    assert reason in problem and "init_lora_weights=true" in problem


def test_mica_is_refused_where_peft_cannot_run_it():
    (dora,) = problems_of("strategy=dora", "strategy.init_lora_weights=mica")
    assert dora.startswith("strategy.init_lora_weights: mica") and "DoRA" in dora
    (loraplus,) = problems_of("strategy.init_lora_weights=mica", "strategy.loraplus_lr_ratio=4")
    assert loraplus.startswith("strategy.loraplus_lr_ratio:") and "frozen" in loraplus
    (bias,) = problems_of(
        "strategy.init_lora_weights=mica", "strategy.lora_bias=true", "strategy.target_modules=[out_proj,c_fc]"
    )
    assert bias.startswith("strategy.lora_bias:") and "init_lora_weights=true" in bias


def test_lora_bias_needs_a_base_bias_and_the_default_init():
    (gaussian,) = problems_of(
        "strategy.init_lora_weights=gaussian", "strategy.lora_bias=true", "strategy.target_modules=[c_fc]"
    )
    assert gaussian.startswith("strategy.lora_bias:") and "init_lora_weights=true" in gaussian
    # the demo's GPT-Neo has no bias on q/k/v: the merge would have nowhere to add the adapter's bias
    (neo,) = problems_of("strategy.lora_bias=true")
    assert neo.startswith("strategy.lora_bias:") and "q_proj" in neo and "c_fc" not in neo
    validate(compose("demo", ["strategy.lora_bias=true", "strategy.target_modules=[out_proj,c_fc,c_proj]"]))


def test_fields_that_change_the_base_are_refused_exit_2(tmp_path):
    out = run_cli(
        "strategy.init_lora_weights=pissa",
        "strategy.modules_to_save=[embed_out]",
        "strategy.bias=all",
        "strategy.trainable_token_indices=[1,2]",
        "strategy.layer_replication=[[0,1]]",
        "strategy.task_type=SEQ_CLS",
        f"output_dir={tmp_path}/run",
    )
    assert out.returncode == EXIT_CONFIG, out.stderr
    for key in (
        "init_lora_weights",
        "modules_to_save",
        "bias",
        "trainable_token_indices",
        "layer_replication",
        "task_type",
    ):
        assert f"strategy.{key}:" in out.stderr
    assert "strategy.lora_bias=true" in out.stderr  # bias=all: the adapter's own bias is the supported way
    # refused by validation, before anything loads: at most Hydra's train.log is there, no run record, no weights
    assert not (tmp_path / "run" / "run.json").exists() and not (tmp_path / "run" / "adapter").exists()
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("init", ["true", "gaussian", "mica"])
def test_accepted_inits_start_as_a_no_op_on_the_untouched_base(init, tiny_models):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.models import strategy

    resolved, _ = validate(compose("demo", [f"strategy.init_lora_weights={init}"]))
    base = AutoModelForCausalLM.from_pretrained(tiny_models["neox"], dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ids = torch.arange(3, 19).view(2, 8)
    with torch.no_grad():
        plain = base(ids).logits
    lora = {**resolved["strategy"], "target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]}
    model = get_peft_model(base, strategy.peft_config(lora))
    with torch.no_grad():
        adapted = model(ids).logits
    assert torch.equal(adapted, plain)
    wrapped = {
        k.replace("base_layer.", ""): v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k
    }
    assert wrapped.keys() == before.keys() and all(torch.equal(wrapped[k], before[k]) for k in before)


def test_loraplus_and_neftune_values_are_checked():
    problems = problems_of("strategy.loraplus_lr_ratio=0", "trainer.neftune_noise_alpha=-1")
    assert any(p.startswith("strategy.loraplus_lr_ratio: must be a positive number") for p in problems)
    assert any(p.startswith("trainer.neftune_noise_alpha: must be a positive number") for p in problems)
    (galore,) = problems_of("strategy.loraplus_lr_ratio=16", "trainer.optim=galore_adamw")
    assert "trainer.optim" in galore and "galore_adamw" in galore
    (full,) = problems_of("strategy=full", "strategy.loraplus_lr_ratio=16")
    assert "strategy.loraplus_lr_ratio" in full
    (deepspeed,) = [
        p
        for p in problems_of(
            "strategy.loraplus_lr_ratio=16", "distributed=zero2", "+distributed.deepspeed.optimizer={type:AdamW}"
        )
        if "loraplus" in p
    ]
    assert "distributed.deepspeed.optimizer" in deepspeed


# Accepted fields that narrow or rescale the adapter without touching the base: one run through all of them
# (init_lora_weights=gaussian cannot join: peft takes lora_bias only with the default init; its no-op start is checked
# above).
ACCEPTED = (
    "strategy.layers_to_transform=[0]",
    "strategy.layers_pattern=layers",
    "strategy.use_rslora=true",
    "strategy.rank_pattern={dense:4}",
    "strategy.alpha_pattern={dense_4h_to_h:8}",
    "strategy.lora_bias=true",
    "strategy.exclude_modules=[dense_h_to_4h]",
    "strategy.loraplus_lr_ratio=4",
    "trainer.neftune_noise_alpha=5",
)
MICA = ("strategy.init_lora_weights=mica", "strategy.r=4")


def _train(tiny_models, tmp_path_factory, overrides):
    out = tmp_path_factory.mktemp("variants") / "run"
    return run(
        compose(
            "demo",
            tiny_overrides("neox", tiny_models["neox"], out, "trainer.max_steps=4", "sample_generations=0", *overrides),
        )
    )


@pytest.fixture(scope="module")
def variant_run(tiny_models, tmp_path_factory):
    return _train(tiny_models, tmp_path_factory, ACCEPTED)


@pytest.fixture(scope="module")
def mica_run(tiny_models, tmp_path_factory):
    return _train(tiny_models, tmp_path_factory, MICA)


def test_mica_trains_a_only_and_b_stays_the_base_minor_singular_vectors(mica_run):
    from safetensors.torch import load_file

    assert json.loads((mica_run / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] == "mica"
    tensors = load_file(mica_run / "adapter" / "adapter_model.safetensors")
    bs = [t.float() for k, t in tensors.items() if "lora_B" in k]
    assert bs and all(torch.allclose(b.T @ b, torch.eye(4), atol=1e-4) for b in bs)  # trained at lr 1e-2: B would move
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_A" in k)  # A started at zero and trained
    assert "| LoRA initialization | mica |" in (mica_run / "adapter" / "README.md").read_text()
    _merge_and_evaluate(mica_run)


def test_accepted_fields_train_merge_through_the_gate_and_evaluate_the_untouched_base(variant_run):
    from safetensors.torch import load_file

    config = json.loads((variant_run / "adapter" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [0] and "loraplus_lr_ratio" not in config and config["lora_bias"] is True
    tensors = load_file(variant_run / "adapter" / "adapter_model.safetensors")
    adapted = {k.split(".lora_")[0] for k in tensors}
    assert adapted and all(".layers.0." in k for k in adapted) and not any("dense_h_to_4h" in k for k in adapted)
    # the adapter's bias trained
    assert any(k.endswith("lora_B.bias") and t.abs().max() > 0 for k, t in tensors.items())
    _merge_and_evaluate(variant_run)


def _merge_and_evaluate(variant_run):
    merged = merge.run(cli.parse([str(variant_run)], merge.OPTIONS, "target"))
    assert json.loads((merged / "merge_report.json").read_text())["gate"]["passed"] is True
    sides = {}
    for name, extra in (("adapter", []), ("merged", ["merged=true"])):
        evaluate.main([str(variant_run), "generate_rows=0", "samples=0", f"out={variant_run / name}", *extra])
        sides[name] = json.loads((variant_run / name / "eval_report.json").read_text())["metrics"]["loss"]
    record = json.loads((variant_run / "run.json").read_text())
    # the base side is the untouched base however it is obtained: adapter switched off, or loaded beside the merge
    assert sides["adapter"]["base"] == pytest.approx(sides["merged"]["base"], abs=1e-5)
    assert sides["adapter"]["base"] == pytest.approx(record["eval_loss_before"], rel=0.02)
    assert sides["adapter"]["finetuned"] == pytest.approx(sides["merged"]["finetuned"], abs=1e-4)
    assert sides["adapter"]["finetuned"] != pytest.approx(sides["adapter"]["base"], abs=1e-3)


def test_loraplus_and_neftune_are_recorded_in_the_card_and_run_record(variant_run):
    card = (variant_run / "adapter" / "README.md").read_text()
    assert "| LoRA+ learning-rate ratio (B / A) | 4 |" in card and "| NEFTune noise alpha | 5 |" in card
    import dataclasses

    from trl import SFTConfig

    # trainer.optim unset: the default
    (default,) = [f.default for f in dataclasses.fields(SFTConfig) if f.name == "optim"]
    assert json.loads((variant_run / "run.json").read_text())["optimizer"] == {"name": default, "loraplus_lr_ratio": 4}


def _trainer(tiny_models, tmp_path, *overrides: str, callbacks=()):
    """The trainer train.run builds (same config, data, arguments and model), to look inside it."""
    from trl import SFTConfig

    from finetune.config import precision
    from finetune.data import templates
    from finetune.data.tokenize import prepare
    from finetune.models import load as models
    from finetune.models import strategy
    from finetune.train import run as train
    from finetune.train.guards import StepLog
    from finetune.train.trainer import GuardedSFTTrainer

    resolved, _ = validate(compose("demo", tiny_overrides("neox", tiny_models["neox"], tmp_path / "run", *overrides)))
    precision.resolve(resolved, False)
    cfg = OmegaConf.create(resolved)
    tokenizer = models.load_tokenizer(cfg.model)
    template = templates.load(cfg.data.template)
    train_set, eval_set = prepare(cfg.data, tokenizer, template, cfg.seed).as_datasets()
    args = SFTConfig(**train._training_arguments(cfg, tmp_path / "run", has_eval=eval_set is not None, cuda=False))
    return GuardedSFTTrainer(
        model=models.load_model(cfg.model, tokenizer, None),
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=strategy.peft_config(resolved["strategy"]),
        callbacks=list(callbacks),
        keep_checkpoints=None,
        run_facts={},
        after_save=lambda folder: None,
        step_log=StepLog(tmp_path / "steps.jsonl", 0, enabled=False),
        loraplus_lr_ratio=resolved["strategy"].get("loraplus_lr_ratio"),
    )


def test_loraplus_gives_lora_b_the_learning_rate_times_the_ratio(tiny_models, tmp_path):
    trainer = _trainer(
        tiny_models,
        tmp_path,
        "strategy.loraplus_lr_ratio=16",
        "trainer.max_steps=2",
        "trainer.learning_rate=1e-3",
        "trainer.weight_decay=0.01",
    )
    trainer.train()
    lr_of = {id(p): (g["initial_lr"], g["lr"]) for g in trainer.optimizer.param_groups for p in g["params"]}
    named = {n: lr_of[id(p)] for n, p in trainer.model.named_parameters() if p.requires_grad}
    a = [v for n, v in named.items() if "lora_A" in n]
    b = [v for n, v in named.items() if "lora_B" in n]
    assert a and b and len(a) + len(b) == len(named)
    assert {initial for initial, _ in a} == {1e-3} and all(initial == pytest.approx(16e-3) for initial, _ in b)
    (now_a,), (now_b,) = {lr for _, lr in a}, {lr for _, lr in b}  # the schedule moves both; the ratio stays
    assert now_b == pytest.approx(16 * now_a)
    decays = {g["weight_decay"] for g in trainer.optimizer.param_groups if g["params"]}
    assert decays == {0.01}  # trainer.weight_decay reaches peft's groups (its own default would be 0)


class EmbeddingProbe(TrainerCallback):
    """At each step: the input embedding's output in train and in eval mode, minus the plain lookup."""

    def __init__(self):
        self.noise = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        embedding = model.get_input_embeddings()
        ids = torch.arange(12).view(1, 12)
        was = embedding.training
        with torch.no_grad():
            embedding.train()
            train = embedding(ids) - embedding.weight[ids]
            embedding.eval()
            eval_ = embedding(ids) - embedding.weight[ids]
        embedding.train(was)
        self.noise.append((train.abs().max().item(), eval_.abs().max().item()))


@pytest.mark.parametrize("alpha", [None, 5.0])
def test_neftune_noises_embeddings_in_training_only(alpha, tiny_models, tmp_path):
    probe = EmbeddingProbe()
    extra = [f"trainer.neftune_noise_alpha={alpha}"] if alpha else []
    trainer = _trainer(tiny_models, tmp_path, "trainer.max_steps=2", *extra, callbacks=[probe])
    trainer.train()
    assert len(probe.noise) == 2 and all(eval_ == 0 for _, eval_ in probe.noise)
    hidden = trainer.model.config.hidden_size
    if alpha is None:
        assert all(train == 0 for train, _ in probe.noise)
    else:  # uniform in +-alpha / sqrt(length * hidden)
        bound = alpha / (12 * hidden) ** 0.5
        assert all(0.5 * bound < train <= bound * 1.0001 for train, _ in probe.noise)
    embedding = trainer.model.get_input_embeddings()
    embedding.train()
    ids = torch.arange(12).view(1, 12)
    assert torch.equal(embedding(ids), embedding.weight[ids])  # switched off again after training
