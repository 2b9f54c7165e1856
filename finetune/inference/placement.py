"""Precision and placement of the weights generate (and the server) load: `quant=` and `device_map=`.

quant: 4bit (NF4 through bitsandbytes) | 8bit (LLM.int8) | none (full weights) | unset. Unset serves a QLoRA adapter
over the same 4-bit base it trained on (the run's own quant type, double quantization and compute dtype, as recorded
in base_model.json), since that is the model training optimised: full weights give slightly different outputs.
Anything else unset loads full weights. quant=none forces full weights for a QLoRA adapter, with a warning.
Quantizing a full or merged model for inference is allowed (less memory, slightly different outputs).

device_map: cpu | cuda | auto | unset (cuda when there is a GPU, else cpu). auto passes through to from_pretrained:
accelerate spreads the layers over every visible GPU, then CPU memory, for a model one GPU cannot hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune import console as cli
from finetune.errors import ConfigError

QUANTS = ("4bit", "8bit", "none")
DEVICE_MAPS = ("auto", "cpu", "cuda")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Precision:
    """What to load: quant ("4bit", "8bit" or None for full weights) and its BitsAndBytesConfig kwargs."""

    quant: str | None
    quantization: dict | None  # BitsAndBytesConfig kwargs (dtype names as strings), None for full weights
    source: str = "requested"  # "requested", or "the run" when a QLoRA run's own settings were taken


def check(quant: str | None, device_map: str | None) -> None:
    """Refuse unknown values before anything loads, naming the option and its choices (every problem at once)."""
    problems = []
    if quant is not None and quant not in QUANTS:
        problems.append(
            f"quant={quant}: choose one of {', '.join(QUANTS)} (unset: a QLoRA adapter's own 4-bit base, else full "
            "weights)"
        )
    if device_map is not None and device_map not in DEVICE_MAPS:
        problems.append(
            f"device_map={device_map}: choose one of {', '.join(DEVICE_MAPS)} (unset: cuda when there is a GPU, "
            "else cpu)"
        )
    if problems:
        raise ConfigError(problems)
    if device_map == "cuda" or quant in ("4bit", "8bit"):
        import torch

        cuda = torch.cuda.is_available()
        if device_map == "cuda" and not cuda:
            raise ConfigError("device_map=cuda: no CUDA GPU here; use device_map=cpu (or leave it unset)")
        if quant in ("4bit", "8bit"):
            _check_bitsandbytes(f"quant={quant}", cuda and device_map != "cpu")


def resolve(quant: str | None, recorded: dict | None, dtype: str, device_map: str | None) -> Precision:
    """The precision to load: `quant` as asked, else the QLoRA run's recorded 4-bit settings, else full weights.
    `recorded`: the adapter run's strategy.quantization (None when it did not train quantized)."""
    check(quant, device_map)
    trained_4bit = bool(recorded and recorded.get("load_in_4bit"))
    if quant == "none":
        if trained_4bit:
            cli.say(
                "warning: quant=none: this adapter trained over a 4-bit base; over full weights its outputs will "
                "differ from the model training optimised (unset quant= serves it 4-bit, as trained)"
            )
        return Precision(None, None)
    if quant is None and not trained_4bit:
        return Precision(None, None)
    if quant is None or (quant == "4bit" and trained_4bit):
        import torch

        _check_bitsandbytes("this QLoRA adapter's 4-bit base", torch.cuda.is_available() and device_map != "cpu")
        settings = dict(recorded)
        if quant is None:
            cli.say(
                f"serving over the 4-bit base this QLoRA adapter trained on ({describe(settings)}; quant=none: "
                "full weights)"
            )
        return Precision("4bit", settings, "the run")
    if quant == "8bit":
        if trained_4bit:
            cli.say(
                "warning: quant=8bit: this adapter trained over a 4-bit base; its outputs will differ from training"
            )
        return Precision("8bit", {"load_in_8bit": True})
    compute = dtype if dtype in COMPUTE_DTYPES else "bfloat16"
    return Precision(
        "4bit",
        {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": compute,
        },
    )


def describe(quantization: dict | None) -> str:
    """A short label: "4-bit nf4, double quant, bfloat16 compute", "8-bit", "full weights"."""
    if not quantization:
        return "full weights"
    if quantization.get("load_in_8bit"):
        return "8-bit"
    double = ", double quant" if quantization.get("bnb_4bit_use_double_quant") else ""
    kind = quantization.get("bnb_4bit_quant_type") or "fp4"
    return f"4-bit {kind}{double}, {quantization.get('bnb_4bit_compute_dtype') or 'bfloat16'} compute"


def device_map_for(device_map: str | None):
    """from_pretrained's device_map: unset is cuda when there is a GPU, else cpu."""
    if device_map is not None:
        return device_map
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_bitsandbytes(what: str, cuda: bool) -> None:
    from finetune.models.strategy import bitsandbytes_problem

    problem = bitsandbytes_problem(cuda)
    if problem:
        raise ConfigError(f"{what}: {problem}; or quant=none for full weights")
