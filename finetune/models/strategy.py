"""Strategies: LoRA, DoRA and QLoRA become a peft.LoraConfig; full fine-tuning trains every weight.

Every strategy key except `name`, `quantization` and `loraplus_lr_ratio` is a peft.LoraConfig field, passed through
unchanged, so peft's documentation is ours. Wrapping itself is left to trl's SFTTrainer (`peft_config=`), which also
prepares k-bit models and gradient checkpointing the way peft expects. `loraplus_lr_ratio` goes to the trainer's
optimizer (peft.optimizers.create_loraplus_optimizer, finetune.trainer), not to the adapter.

Only the LoraConfig options whose adapter still sits on the untouched base are accepted: every later step (the
streaming merge and its gate, evaluate's base side, generate, the cards) reads the base files as they are and the
adapter beside them. What would rewrite the base under the adapter, train base modules beside it or change what
merging means is refused by validation with its reason (BASE_REWRITING_INITS, OTHER_INITS, REFUSED_FIELDS below).
"""

from __future__ import annotations

OUR_KEYS = ("name", "quantization", "loraplus_lr_ratio")
ADAPTER_STRATEGIES = ("lora", "dora", "qlora")

# init_lora_weights: B = 0 leaves the base untouched and the adapter a no-op until it trains
SUPPORTED_INITS = (True, "gaussian", "mica")
FIX_INIT = "use strategy.init_lora_weights=true (B = 0: the adapter starts as a no-op on the untouched base)"
# inits that rewrite the base weights under the adapter: how
BASE_REWRITING_INITS = {
    "pissa": "W - B·A, the base minus its principal singular components",
    "olora": "W - B·A, the base minus its QR components",
    "corda": "W - B·A, the base minus its context-oriented components",
    "lora_ga": "W - B·A, the base minus a gradient-aligned start",
    "loftq": "a quantized base plus a low-rank correction",
}
OTHER_INITS = {
    False: (
        "starts the adapter non-zero (random A and B; peft calls it a debugging setting), so before training the "
        "model is not the base: the before-training loss and samples in run.json, metrics.json and the card "
        "would not be the base's"
    ),
    "orthogonal": (
        "starts the adapter non-zero (orthogonal A and B), so before training the model is not the base: "
        "the before-training loss and samples in run.json, metrics.json and the card would not be the base's"
    ),
    "eva": (
        "initializes the adapter from the SVD of activations over the training data (peft.initialize_lora_eva_weights "
        "with a data loader), which trl's trainer never runs: the run would silently train plain LoRA"
    ),
}
_MERGE = "finetune.merge (W + scale·B·A, DoRA's magnitude, lora_bias)"
# LoraConfig fields refused whenever set (not None / false / empty): why
REFUSED_FIELDS = {
    "modules_to_save": (
        "trains and saves whole copies of these base modules, so the base under the adapter is no longer "
        "the checkpoint's: finetune.merge refuses such an adapter, and switching the adapter off for "
        "evaluate's base side would not give the base; adapt the layer with LoRA (strategy.target_modules) "
        "or use strategy=full"
    ),
    "trainable_token_indices": (
        "trains rows of the input embedding (tied to the output on GPT-Neo) outside LoRA, which "
        "changes the base under the adapter: finetune.merge refuses it; remove it (new tokens "
        "need strategy=full)"
    ),
    "layer_replication": (
        "stacks copies of base layers into a deeper model, so the model the adapter sits on is not the "
        "base checkpoint: finetune.merge refuses it; remove it"
    ),
    "target_parameters": (
        "wraps raw nn.Parameters (mixture-of-experts weights), which GPT-Neo/NeoX/J do not have, and "
        "finetune.merge refuses it; use strategy.target_modules"
    ),
    "alora_invocation_tokens": (
        "activated LoRA applies the adapter only after its invocation tokens, which no merged "
        "model reproduces (finetune.merge refuses it); remove it"
    ),
    "use_qalora": "QA-LoRA is for GPTQ-quantized bases and finetune.merge refuses it; use strategy=qlora for a 4-bit "
    "base",
    "use_bdlora": "block-diagonal LoRA is refused by finetune.merge; remove it",
    "kasa_config": (
        "KaSA truncates the smallest singular values of the base weights at init, so the base weights under "
        "the adapter are not the checkpoint's: finetune.merge's gate and evaluate's base side would be "
        "wrong; remove it"
    ),
    "velora_config": f"selects peft's VeLoRA variant, which {_MERGE} and its gate are not verified for; remove it",
    "monteclora_config": (
        f"samples random perturbations of A in every training forward (MonteCLoRA), which {_MERGE} "
        "and its gate are not verified for; remove it"
    ),
    "arrow_config": "routes each token between several adapters (Arrow); a run trains and merges one adapter; remove "
    "it",
    "megatron_config": "is for Megatron's parallel layers; GPT-Neo/NeoX/J load as plain transformers modules; remove "
    "it",
    "loftq_config": "configures init_lora_weights=loftq, which is refused (it rewrites the base weights); remove it",
    "eva_config": "configures init_lora_weights=eva, which is refused (trl's trainer never runs its data pass); remove "
    "it",
    "corda_config": "configures init_lora_weights=corda, which is refused (it rewrites the base weights); remove it",
    "lora_ga_config": "configures init_lora_weights=lora_ga, which is refused (it rewrites the base weights); remove "
    "it",
    "inference_mode": "freezes the adapter, so nothing would train; remove it",
    **dict.fromkeys(
        ("peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision"),
        "is written by peft when it saves the adapter, not an option (the base is model.name_or_path and "
        "model.revision); remove it",
    ),
}


def peft_config(strategy: dict):
    """A peft.LoraConfig for adapter strategies, None for full fine-tuning."""
    if strategy["name"] not in ADAPTER_STRATEGIES:
        return None
    from peft import LoraConfig

    kwargs = {k: v for k, v in strategy.items() if k not in OUR_KEYS}
    kwargs.pop("task_type", None)  # validation accepts only CAUSAL_LM, set here
    kwargs["use_dora"] = strategy["name"] == "dora" or kwargs.get("use_dora", False)
    return LoraConfig(task_type="CAUSAL_LM", **kwargs)


def quantization(strategy: dict) -> dict | None:
    """BitsAndBytesConfig kwargs for QLoRA, None otherwise."""
    return dict(strategy["quantization"]) if strategy["name"] == "qlora" else None


def bitsandbytes_problem(cuda: bool) -> str | None:
    """Why 4-bit NF4 cannot run here, or None. bitsandbytes >= 0.49 ships CPU kernels (checked on 0.50.2: load, LoRA
    training and merging all work on CPU); older releases and builds without its native CPU library are CUDA only."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return 'bitsandbytes is not installed; pip install -e ".[quant]"'
    if cuda:
        return None
    import bitsandbytes
    import bitsandbytes.cextension as native

    version = importlib.metadata.version("bitsandbytes")
    if "cpu" not in getattr(bitsandbytes, "supported_torch_devices", ()) or isinstance(
        native.lib, native.ErrorHandlerMockBNBNativeLibrary
    ):
        return (
            f"no CUDA GPU, and bitsandbytes {version} has no CPU 4-bit kernels here "
            "(0.49 or newer has them: pip install -U bitsandbytes)"
        )
    return None


def lora_fields() -> set[str]:
    """Keys peft.LoraConfig accepts (for validation)."""
    import dataclasses

    from peft import LoraConfig

    return {f.name for f in dataclasses.fields(LoraConfig) if f.init}


def init_problem(init, name: str) -> str | None:
    """Why `init_lora_weights=init` cannot run end to end under strategy `name`, or None."""
    head = f"strategy.init_lora_weights: {str(init).lower() if isinstance(init, bool) else init}"
    kind = init.split("_niter_")[0] if isinstance(init, str) and init.startswith("pissa_niter_") else init
    if isinstance(kind, str) and kind in BASE_REWRITING_INITS:
        return (
            f"{head} rewrites the base weights under the adapter ({BASE_REWRITING_INITS[kind]}), but a run saves only "
            "the adapter and every later step reads the untouched base files: finetune.merge's gate fails, "
            f"finetune.evaluate's base side and finetune.generate use the wrong base; {FIX_INIT}, gaussian or mica"
        )
    if init is True or init == "gaussian":
        return None
    if init is False or init in ("orthogonal", "eva"):
        return f"{head} {OTHER_INITS[init]}; {FIX_INIT}"
    if init != "mica":
        return (
            f"{head} is not one of true, gaussian, mica (supported) or peft's false, orthogonal, eva, pissa, "
            f"pissa_niter_N, olora, corda, loftq, lora_ga (refused, each with its reason); {FIX_INIT}"
        )
    if name == "dora":
        return (
            f"{head} does not combine with DoRA (peft: unsupported variant combination); "
            f"use strategy=lora, or {FIX_INIT[4:]}"
        )
    if name == "qlora":
        return (
            f"{head} takes the SVD of each base weight, which a 4-bit base does not hold in floating point (peft "
            f"raises a TypeError); use strategy=lora, or {FIX_INIT[4:]}"
        )
    return None


def field_problems(strategy: dict) -> list[str]:
    """The LoraConfig fields set in `strategy` that would change the base under the adapter or what merging means."""
    problems = [
        f"strategy.{key}: {why}"
        for key, why in REFUSED_FIELDS.items()
        if strategy.get(key) not in (None, False, [], {})
    ]
    bias = strategy.get("bias", "none")
    if bias != "none":
        problems.append(
            f"strategy.bias: {bias} trains the base's own biases in place, so switching the adapter off no longer "
            "gives the base (evaluate's base side would be wrong) and finetune.merge refuses the adapter; use "
            "strategy.lora_bias=true (a bias on the adapter's B, merged into the base's bias) with bias=none"
        )
    task = strategy.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        problems.append(
            f"strategy.task_type: {task}: these are causal language models (task_type CAUSAL_LM is set for "
            "you); remove it"
        )
    init = strategy.get("init_lora_weights", True)
    if strategy.get("lora_bias") and init is not True:
        problems.append(f"strategy.lora_bias: peft supports it only with strategy.init_lora_weights=true, not {init}")
    if strategy.get("lora_bias") and (strategy.get("name") == "dora" or strategy.get("use_dora")):
        problems.append("strategy.lora_bias: peft does not support it with DoRA; use strategy=lora")
    return problems
