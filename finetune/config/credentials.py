"""Secrets are never written: not in config.yaml, run.json, the card, training_args.json or the tracking logs.

Every file of a run is derived from the resolved config, so a secret is stopped where it enters it: validation
refuses `${oc.env:NAME}` of a secret variable in any key (by name, whether or not it is set), any value that holds
the value of a secret variable set in this environment, and token-shaped strings. `python -m finetune.push` scans
the staged files for the same. A value that is not in the environment at push time cannot be known; push then
catches only the token shapes below (Hugging Face, AWS access key ids, W&B keys next to their name, private keys).
"""

from __future__ import annotations

import os
import re

# Environment variables whose values are credentials (`secret_env=[NAME,...]` adds a run's own).
KNOWN = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HUGGINGFACE_TOKEN",
    "WANDB_API_KEY",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
    "AZURE_CLIENT_SECRET",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_OPENAI_API_KEY",
    "GOOGLE_API_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "OPENAI_API_KEY",
    "GITHUB_TOKEN",
    "COMET_API_KEY",
    "NEPTUNE_API_TOKEN",
    "HUGGINGFACEHUB_API_TOKEN",
    "HF_API_TOKEN",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    "GCP_SERVICE_ACCOUNT_KEY",
)
# Any other variable named like a credential (MY_SERVICE_TOKEN, DB_PASSWORD, STRIPE_API_KEY, ...) counts too;
# HF_HUB_DISABLE_*, TOKENIZERS_PARALLELISM, MAX_TOKENS do not match.
SECRET_NAME = re.compile(
    r"(?:^|_)(?:TOKEN|SECRET|SECRET_KEY|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)(?:$|_)"
)
SHAPES = {
    "a Hugging Face token": re.compile(rb"hf_[A-Za-z0-9]{30,}"),
    "an AWS access key id": re.compile(rb"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a W&B API key": re.compile(rb"(?i)(?:wandb|api[_-]?key)[^\n]{0,20}?\b[0-9a-f]{40}\b"),
    "an Azure storage key": re.compile(rb"AccountKey=[A-Za-z0-9+/]{40,}"),
    "a private key": re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"),
}
ENV_REFERENCE = re.compile(r"\$\{\s*oc\.env\s*:\s*['\"]?([A-Za-z_][A-Za-z0-9_]*)")
MIN_VALUE = 8  # shorter values ("1", "true") are not credentials and would match everywhere


def names(extra=()) -> list[str]:
    """The secret variable names: the known ones and the user's `secret_env` (see also is_secret)."""
    return [*KNOWN, *(n for n in extra or () if n not in KNOWN)]


def is_secret(name: str, extra=()) -> bool:
    """A known secret variable, one of the user's `secret_env`, or one named like a credential."""
    return name in names(extra) or bool(SECRET_NAME.search(name.upper()))


def values(extra=()) -> dict[str, str]:
    """name -> value of each secret variable set in this environment (long enough to be a credential)."""
    return {n: v for n, v in os.environ.items() if len(v) >= MIN_VALUE and is_secret(n, extra)}


def redact(messages: list[str], extra=()) -> list[str]:
    """Messages with every set secret's value and every token shape replaced by a placeholder: a problem that
    quotes a value ("must be a positive number, got '...'") must not print the secret it is about."""
    known = values(extra)
    cleaned = []
    for message in messages:
        for name, value in sorted(known.items(), key=lambda item: -len(item[1])):
            message = message.replace(value, f"<the value of ${name}>")
        for what, shape in SHAPES.items():
            message = re.sub(shape.pattern.decode(), f"<{what}>", message)
        cleaned.append(message)
    return cleaned


def find(data: bytes | str, extra=(), known: dict[str, str] | None = None) -> str | None:
    """What secret `data` holds, in words that never repeat it ("the value of $WANDB_API_KEY"), or None."""
    raw = data.encode() if isinstance(data, str) else data
    for name, value in (values(extra) if known is None else known).items():
        if value.encode() in raw:
            return f"the value of ${name}"
    return next((what for what, shape in SHAPES.items() if shape.search(raw)), None)


def interpolations(raw: dict) -> list[str]:
    """Keys of the unresolved config that interpolate a secret variable (set or not: the name is enough)."""
    extra = [str(n) for n in raw.get("secret_env")] if isinstance(raw.get("secret_env"), list) else []
    return [
        f"{key}: interpolates ${{oc.env:{name}}}, a secret; it would be written to config.yaml, run.json, the model "
        "card and the logs. Remove it (credentials are read from the environment by the libraries that need them)"
        for key, value in _leaves(raw)
        for name in ENV_REFERENCE.findall(value)
        if is_secret(name, extra)
    ]


def recorded_interpolations(record: dict, extra=()) -> list[str]:
    """Secret variables a run's recorded command-line overrides (run.json `overrides`) interpolate: a run trained
    before validation refused them holds their values, which push cannot recognise once the variable is unset."""
    overrides = record.get("overrides") if isinstance(record.get("overrides"), list) else []
    return sorted(
        {name for override in overrides for name in ENV_REFERENCE.findall(str(override)) if is_secret(name, extra)}
    )


def held(resolved: dict, skip=()) -> list[str]:
    """Keys of the resolved config whose value holds a secret (a set variable's value, or a token shape)."""
    extra = resolved.get("secret_env") if isinstance(resolved.get("secret_env"), list) else []
    known = values(str(n) for n in extra)
    found = ((key, find(value, known=known)) for key, value in _leaves(resolved) if key not in skip)
    return [
        f"{key}: holds {what}; it would be written to config.yaml, run.json, the model card and the logs. Remove it "
        "from the config (and revoke it if it was shared)"
        for key, what in found
        if what
    ]


def _leaves(value, path: str = ""):
    """(dotted key, string) for every string in a nested config."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{path}{k}.")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path[:-1]}[{i}].")
    elif isinstance(value, str):
        yield path[:-1], value
