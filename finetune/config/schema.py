"""The schema of our own config keys: one dataclass per group, each key with a one-line docstring.

Only `trainer:` (trl.SFTConfig's own fields) and most of `strategy:` (peft.LoraConfig's own fields) belong to
other libraries; they are checked against those classes in finetune.config.validate, never re-typed here.
`finetune train --help` prints these docstrings. Cheap to import: no torch, no Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FAMILIES = ("gpt_neo", "gpt_neox", "gptj")
OBJECTIVES = ("sft", "dpo", "orpo", "kto", "simpo")
UNPAIRED_OBJECTIVES = ("kto",)  # desirable / undesirable completions; the others read chosen / rejected pairs
STRATEGIES = ("lora", "dora", "qlora", "full")


@dataclass
class ModelConfig:
    """The base checkpoint and the facts of its family (conf/model/)."""

    name_or_path: str
    """Hub id (EleutherAI/gpt-neox-20b) or a local directory with config.json and safetensors weights."""
    family: str
    """gpt_neo | gpt_neox | gptj: decides attention backends, target modules and the pad-token policy."""
    lora_target_modules: list[str]
    """Linear layers LoRA wraps by default; never the output embedding."""
    hub_id: str | None = None
    """The base's Hub id, named in model cards and adapter configs (never a local path); null: name_or_path when that
    is a Hub id. Keep it set when name_or_path points at a local copy of a Hub model."""
    revision: str = "main"
    """Hub branch, tag or commit; pin a commit for reproducible runs."""
    dtype: str = "auto"
    """Weight dtype while loading: auto (bfloat16 where the hardware has native bf16, else float32:
    finetune.config.precision) | bfloat16 | float32 | float16."""
    attn_implementation: str | None = None
    """eager | sdpa | flash_attention_2 | flex_attention (NeoX); sdpa (finetune.models.neo_attention) | eager (GPT-Neo);
    eager | flash_attention_2 (GPT-J)."""
    trust_remote_code: bool = False
    """Never needed for this family; true runs Python shipped with the checkpoint."""
    pad_token: str | None = None
    """Pad token to use; null: pad with EOS and mask padding by attention mask, so EOS itself stays trained."""
    tiny: str | None = None
    """neo | neox | gptj: build a tiny offline checkpoint at name_or_path when it does not exist yet."""


@dataclass
class DataConfig:
    """Training data and how it becomes token ids (conf/data/)."""

    path: str | list[str]
    """A file (.jsonl .json .csv .tsv .parquet), a glob, a list of those, a dataset folder, or a Hub dataset id."""
    template: str
    """A name in data_templates/ (alpaca, dolly, chatml, ...) or a path to a template YAML."""
    columns: dict | None = None
    """Template field -> your column name, e.g. {instruction: question, output: answer}."""
    hub_config: str | None = None
    """Dataset configuration (subset) of a Hub dataset or dataset folder."""
    split: str = "train"
    """Split of a Hub dataset or dataset folder to train on."""
    revision: str | None = None
    """Hub dataset branch, tag or commit."""
    eval_path: str | list[str] | None = None
    """Held-out source (same forms as path); null: eval_split of path, or eval_fraction of path (seeded)."""
    eval_split: str | None = None
    """Held-out split of a Hub dataset or dataset folder (e.g. test)."""
    eval_fraction: float = 0.1
    """Share of path held out (seeded split) when there is no eval_path or eval_split; 0: no held-out rows."""
    max_length: int = 1024
    """Tokens per sample (prompt + response + EOS), and per packed row."""
    overlength: str = "drop"
    """drop | error | truncate_prompt_left (keeps the final response whole) | chunk (long texts -> max_length
    pieces)."""
    max_dropped_fraction: float = 0.01
    """Abort when more than this share of rows would not train (dropped or, with skip_invalid, rejected)."""
    train_on_inputs: bool = False
    """true: train on prompts and user turns too (default: assistant messages only)."""
    packing: bool | str = "auto"
    """Best-fit packing of samples into rows of max_length; samples never attend to each other. auto: pack when that
    computes at least 10% less padding than batches of padded samples (finetune.data.packing.choose)."""
    skip_invalid: bool = False
    """true: unreadable or invalid rows are dropped, counted and written to rejected_rows.jsonl instead of stopping."""
    max_row_bytes: int = 8 * 2**20
    """Largest JSONL line or CSV/TSV record read, in bytes (default 8 MiB, about 2M tokens); a larger one is a bad row
    (`file:line: line of N MiB exceeds data.max_row_bytes`), never read whole into memory (JSONL)."""


@dataclass
class DistributedConfig:
    """How training is spread over processes (conf/distributed/)."""

    backend: str = "none"
    """none (one process, or whatever the launcher starts) | ddp | deepspeed | fsdp. Processes come from the launcher
    (`accelerate launch`, torchrun); this picks how they share the work."""
    deepspeed: dict | None = None
    """DeepSpeed config dict, passed to TrainingArguments(deepspeed=...)."""
    fsdp_config: dict | None = None
    """FSDP config dict (version: 2 for FSDP2), passed to TrainingArguments(fsdp=True, fsdp_config=...)."""


@dataclass
class CardConfig:
    """The model card (README.md) written with every adapter, full model and merged model (finetune.adapters.card)."""

    model_name: str | None = None
    """Title of the card; null: the run directory's name."""
    description: str | None = None
    """One paragraph on what the model is for; null: a sentence built from the base, strategy and data."""
    domain: str = "general"
    """general | legal | medical: legal and medical cards carry the cautions those uses need."""
    license: str = "apache-2.0"
    """License of the published weights (the GPT-Neo family is Apache-2.0; your data may restrict it further)."""
    language: list[str] = field(default_factory=lambda: ["en"])
    """Language codes of the card's metadata (ISO 639-1, e.g. [en] or [en, de])."""
    tags: list[str] = field(default_factory=list)
    """Extra Hub tags (neo-finetune, the strategy and the architecture are always added)."""
    datasets: list[str] = field(default_factory=list)
    """Hub dataset ids the model was trained on (a Hub data.path is added by itself; local files never are)."""


@dataclass
class TrackingConfig:
    """Where `trainer.report_to` sends the training curves (finetune.train.tracking): TensorBoard always logs inside the
    run directory; W&B and MLflow log there too when offline."""

    project: str | None = None
    """W&B project / MLflow experiment; null: the preset's name, or neo-finetune."""
    run_name: str | None = None
    """Name of the run in W&B / MLflow; null: the run directory's name."""
    offline: bool | str = "auto"
    """true: W&B and MLflow write only inside the run directory (wandb sync / mlflow ui later) | false: online |
    auto: offline unless credentials are set (WANDB_API_KEY or a netrc login for api.wandb.ai; MLFLOW_TRACKING_URI)."""


@dataclass
class StrategyKeys:
    """Our keys under `strategy:`, beside peft.LoraConfig's fields (finetune.models.strategy.OUR_KEYS). The
    documentation of those keys, not a schema: validation checks strategy.* in finetune.models.strategy."""

    name: str = "lora"
    """lora | dora | qlora | full: the strategy (set by strategy=NAME; full trains every weight, without peft)."""
    quantization: dict | None = None
    """QLoRA's 4-bit base: a dict for transformers.BitsAndBytesConfig (load_in_4bit, bnb_4bit_quant_type, ...)."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: the B matrices train at trainer.learning_rate x this (2-16 is usual); null: off."""


@dataclass
class ObjectiveKeys:
    """Our keys under `objective:`, beside the fields of the objective's trl config (DPOConfig, KTOConfig, ORPOConfig,
    CPOConfig): validation checks objective.* against that class in finetune.config.validate."""

    name: str = "sft"
    """sft | dpo | orpo | kto | simpo: what the run optimises (objective=NAME, conf/objective/)."""
    init_from: str | None = None
    """A finished run directory to continue from: its adapter trains on (DPO/KTO: and is the frozen reference), with
    the same base and data template (checked); null: a fresh adapter on the base."""


@dataclass
class RunConfig:
    """The root of a composed config: our run-level keys plus the groups."""

    output_dir: str
    """The run directory (default runs/PRESET); refused if it holds a finished run, unless overwrite or resume."""
    model: ModelConfig
    """The base checkpoint and the facts of its family (model=OPTION, conf/model/)."""
    data: DataConfig
    """Training data and how it becomes token ids (data=OPTION, conf/data/)."""
    strategy: dict
    """How the model trains (strategy=lora|dora|qlora|full, conf/strategy/): peft.LoraConfig's fields, plus ours
    (StrategyKeys)."""
    trainer: dict
    """trl.SFTConfig's fields (transformers TrainingArguments), passed on unchanged (trainer=OPTION, conf/trainer/)."""
    objective: dict = field(default_factory=lambda: {"name": "sft"})
    """What the run optimises: sft, or a preference objective (dpo, orpo, kto, simpo) with trl's own keys for it
    (objective=NAME, conf/objective/): ObjectiveKeys plus the trl config's method fields (beta, loss_type, ...)."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """How training is spread over processes (distributed=OPTION, conf/distributed/)."""
    card: CardConfig = field(default_factory=CardConfig)
    """The model card (README.md) written with every adapter, full model and merged model."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Where trainer.report_to sends the training curves (TensorBoard, W&B, MLflow)."""
    overwrite: bool = False
    """true: replace the results (and checkpoints) of a previous run in output_dir."""
    allow_foreign_files: bool = False
    """true: train in an output_dir that also holds files no run wrote (left untouched; never under a name a run
    writes)."""
    resume: bool | str = False
    """true: continue from the newest complete checkpoint in output_dir; auto: the same, or start fresh if none."""
    resume_allow_drift: list[str] = field(default_factory=list)
    """Fields (fingerprint.RESUME_FIELDS) allowed to differ from the checkpoint when resuming, e.g. [max_steps]."""
    seed: int = 42
    """One seed for the held-out split, shuffling, LoRA init and dropout (also trainer.seed and trainer.data_seed)."""
    allow_fp16: bool = False
    """fp16 overflows on GPT-Neo/NeoX (bf16 or fp32 is the default); true accepts trainer.fp16=true anyway."""
    eval_before_training: bool = True
    """Held-out loss of the untouched base before training, for the before/after numbers (one extra eval pass)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without a lower eval loss (then the best checkpoint is the result)."""
    early_stopping_threshold: float = 0.0
    """How much lower the eval loss must be to count as better."""
    sample_generations: int = 1
    """The first N held-out rows (in the held-out file's order), generated before and after training, shown and saved
    in samples.json (0: none)."""
    max_new_tokens: int = 48
    """Length limit of those sample generations, in tokens."""
    sample_repetition_penalty: float = 1.0
    """Those generations are greedy; > 1 discourages repeated tokens (1: off; `finetune generate` takes the same)."""
    secret_env: list[str] = field(default_factory=list)
    """Your own secret environment variables, never to be written (finetune.credentials lists the known ones:
    HF_TOKEN, WANDB_API_KEY, AWS/Azure/GCP keys, ...): validation refuses them in the config, push in staged files."""
