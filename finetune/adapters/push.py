"""`python -m finetune.push <run_dir> repo_id=NAME/REPO [merged=true] [private=true] [dry_run=true]`: publish an
adapter (or the merged model) to the Hugging Face Hub in one commit.

Only an explicit allowlist of files is staged (weights in safetensors, their configs, the tokenizer with the
training chat template, the model card and serving.json): never optimizer state, checkpoints, logs, run records or
pickles. The card is rebuilt at staging time, so it carries the latest evaluation. `dry_run=true` stages exactly
the folder that would be uploaded and prints its files; nothing touches the network. `export=NAME` publishes an
export (finetune export, RUN/exports/NAME) instead: its runtime's files, export.json, serving.json, the tokenizer
and its card; one that failed its gate is never pushed. Secrets are looked for in every file's text (for a GGUF,
ONNX or CTranslate2 file: its first BINARY_TEXT_BYTES, where its metadata lies).

The folder pushed is verified against its MANIFEST.json first (finetune.checkpoints.check_final; exit 3 naming the
file that differs). The staging folder (staging=, default RUN/push_staging) is marked as push's (STAGING_MARKER):
push empties and reuses only a folder it marked, a new or empty one; an existing folder with other files is refused
(exit 2), never deleted.

The token comes only from the HF_TOKEN environment variable or the stored `hf auth login`, read by
huggingface_hub itself: it is never an argument (process lists and shell history show those), and a staged file
that contains it stops the push.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path

from finetune import console as cli
from finetune.adapters import card
from finetune.config import credentials
from finetune.console import Option
from finetune.errors import ConfigError, FinetuneError, IntegrityError
from finetune.models import shards
from finetune.runs import checkpoints, rundir

OPTIONS = [
    Option("repo_id", str, None, "Hub repository, NAME/REPO (created if missing)"),
    Option("merged", bool, False, "push RUN/merged (from python -m finetune.merge) instead of the adapter"),
    Option(
        "export",
        str,
        None,
        "push an export instead (finetune export): its folder under RUN/exports (e.g. gguf-q8_0) or its path",
    ),
    Option("private", bool, True, "create the repository private (an existing repository keeps its visibility)"),
    Option("dry_run", bool, False, "stage the upload folder and print its files; upload nothing"),
    Option("revision", str, "main", "branch to commit to"),
    Option("commit_message", str, None, "commit message (default: names the run and what is pushed)"),
    Option("staging", str, None, "folder to stage the upload in (default: RUN/push_staging)"),
]
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    rundir.BASE_RECORD,
    "serving.json",
    *TOKENIZER_FILES,
)
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    shards.SAFETENSORS_INDEX,
    "serving.json",
    *TOKENIZER_FILES,
)
SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# an export's files (finetune.export): its runtime's model files, their configs and the tokenizer
EXPORT_FILE = re.compile(
    r"^([\w.-]+\.gguf|Modelfile|model\.bin|config\.json|generation_config\.json|vocabulary\.(json|txt)"
    r"|[\w.-]+\.onnx|[\w.-]+\.onnx\.data|onnx_config\.json|export\.json|serving\.json)$"
)
BINARY_TEXT_BYTES = 64 * 2**20  # a GGUF's metadata (tokenizer, template) lies before its tensors: scanned for secrets
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
TOKEN_ARGS = ("token=", "hub_token=", "hf_token=", "--token")
STAGING_MARKER = ".neo-finetune-push-staging"  # in a staging folder push made: the only kind it ever empties


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith(TOKEN_ARGS) for a in args):
        print(
            "error: a token on the command line is visible in process lists and shell history; set HF_TOKEN in the "
            "environment or run `hf auth login` once",
            file=sys.stderr,
        )
        sys.exit(ConfigError.exit_code)
    cli.main(run, __doc__, OPTIONS, positional="target", argv=args)


def run(opts: dict) -> Path:
    repo_id = opts["repo_id"]
    if not repo_id and not opts["dry_run"]:
        raise ConfigError("repo_id=NAME/REPO is required (or dry_run=true to stage only)")
    if repo_id and not REPO_ID.match(repo_id):
        raise ConfigError(f"repo_id={repo_id}: expected NAME/REPO (letters, digits, '-', '_', '.')")
    if opts["export"] and opts["merged"]:
        raise ConfigError("export= and merged=true: choose one (an export is made from the merged model already)")
    target = rundir.locate(opts["target"], merged=opts["merged"])
    kind = "adapter" if target.kind == "adapter" else ("merged" if opts["merged"] else "model")
    if opts["export"]:
        target, kind = _export_target(target, opts["export"]), "export"
    default = (target.run_dir or target.weights.parent) / "push_staging"
    staging = Path(opts["staging"]).expanduser() if opts["staging"] else default
    files = stage(target, kind, staging, repo_id, legacy_default=staging == default)
    total = sum(p.stat().st_size for p in files)
    where = (
        f"{repo_id} ({'private' if opts['private'] else 'public'}, branch {opts['revision']})"
        if repo_id
        else "(no repo_id)"
    )
    print(
        f"{'would upload' if opts['dry_run'] else 'uploading'} {len(files)} files, {total / 2**20:.1f} MiB, in one "
        f"commit to {where}:"
    )
    for path in files:
        print(f"  {path.name:<40} {path.stat().st_size:>14,} bytes")
    if opts["dry_run"]:
        print(f"staged in {staging} (dry run: nothing uploaded)")
        return staging
    message = (
        opts["commit_message"]
        or f"Upload {kind} from neo-finetune run {target.run_dir.name if target.run_dir else target.weights.name}"
    )
    url = upload(staging, repo_id, opts["private"], opts["revision"], message)
    print(f"pushed: {url}")
    return staging


def stage(
    target: rundir.Target, kind: str, staging: Path, repo_id: str | None = None, legacy_default: bool = False
) -> list[Path]:
    """A fresh `staging` folder with exactly the allowlisted files (hard links where possible), checked."""
    source = target.weights
    allowed = ADAPTER_FILES if kind == "adapter" else MODEL_FILES
    checkpoints.check_final(source)  # what training or merge wrote: its MANIFEST.json, before anything is staged
    names = [n for n in allowed if (source / n).is_file()]
    if kind == "export":
        names = sorted(
            p.name for p in source.iterdir() if p.is_file() and (EXPORT_FILE.match(p.name) or p.name in TOKENIZER_FILES)
        )
    elif kind != "adapter":
        names += sorted(p.name for p in source.iterdir() if SHARD_NAME.match(p.name))
    _check_complete(source, kind, names)
    created = _prepare_staging(staging, source, legacy_default)
    for name in names:
        _link_or_copy(source / name, staging / name)
    config = target.config or {}
    extra = _read_json(source / "merge_report.json") if kind == "merged" else None
    if kind == "export":
        extra = {"export": _read_json(source / "export.json")}
    (staging / "README.md").write_text(card.render(target.run_dir, config, kind, extra, repo_id), encoding="utf-8")
    files = sorted(p for p in staging.iterdir() if p.name != STAGING_MARKER)
    try:
        _check_safe(staging, files, kind)
        _check_secrets(
            files,
            config.get("secret_env") or [],
            rundir.read_json(target.run_dir / "run.json") if target.run_dir else {},
        )
    except IntegrityError:  # what must not be published must not stay staged either: what push put there goes
        if created:
            shutil.rmtree(staging)
        else:  # a folder that was empty before this push: emptied again, kept
            for path in staging.iterdir():
                path.unlink()
        raise
    return files


def _prepare_staging(staging: Path, source: Path, legacy_default: bool) -> bool:
    """An empty staging folder marked as push's; True when push made the folder (now or by an earlier push). Emptied
    first only when push made it (its marker, or the default RUN/push_staging of an older push holding nothing but
    files push stages); a folder with anything else is refused: push never deletes files it did not write."""
    resolved = staging.resolve()
    if (
        resolved == source.resolve()
        or source.resolve().is_relative_to(resolved)
        or resolved.is_relative_to(source.resolve())
    ):
        raise ConfigError(
            f"staging={staging}: is, holds or lies inside {source}, the folder being pushed; choose another folder"
        )
    if staging.exists() and not staging.is_dir():
        raise ConfigError(f"staging={staging}: exists and is not a folder; choose a new or empty folder")
    if staging.is_dir() and any(staging.iterdir()):
        ours = (staging / STAGING_MARKER).is_file() or (legacy_default and _only_staged_files(staging))
        if not ours:
            raise ConfigError(
                f"staging={staging}: exists and holds files push did not stage (no {STAGING_MARKER}); push "
                "empties only a staging folder it made. Choose a new or empty folder"
            )
        shutil.rmtree(staging)
    created = not staging.is_dir()
    staging.mkdir(parents=True, exist_ok=True)
    (staging / STAGING_MARKER).write_text(
        "staged by python -m finetune.push; emptied by the next push\n", encoding="utf-8"
    )
    return created


def _only_staged_files(folder: Path) -> bool:
    """A staging folder of a push from before the marker: plain files, each one push stages."""
    names = {*ADAPTER_FILES, *MODEL_FILES, "README.md"}
    return all(
        p.is_file() and not p.is_symlink() and (p.name in names or SHARD_NAME.match(p.name)) for p in folder.iterdir()
    )


def _export_target(run: rundir.Target, export: str) -> rundir.Target:
    """The export folder named by export= (a name under RUN/exports, or a path) as what is pushed."""
    folder = Path(export).expanduser()
    if not folder.is_dir() and run.run_dir is not None:
        folder = run.run_dir / "exports" / export
    if not (folder / "export.json").is_file():
        found = sorted(p.parent.name for p in (run.run_dir or run.weights).glob("exports/*/export.json"))
        raise ConfigError(
            f"export={export}: no export there (no export.json in {folder}); "
            + (f"this run has: {', '.join(found)}" if found else "make one with finetune export RUN format=...")
        )
    return rundir.Target("export", folder, run.run_dir, run.config, run.base)


def _check_complete(source: Path, kind: str, names: list[str]) -> None:
    if kind == "export":
        record = json.loads((source / "export.json").read_text(encoding="utf-8"))
        if not record.get("valid"):
            raise IntegrityError(f"{source}: this export failed its gate (export.json valid: false); never published")
        missing = [f["name"] for f in record.get("files", []) if "/" not in f["name"] and f["name"] not in names]
        if missing:
            raise IntegrityError(f"{source}: missing {', '.join(missing)} (listed in export.json)")
        return
    if kind == "adapter":
        required = ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json")
    else:
        required = ("config.json", "tokenizer_config.json")
        if not any(n == shards.SAFETENSORS_SINGLE or SHARD_NAME.match(n) for n in names):
            raise IntegrityError(f"{source}: no safetensors weights to push (pickled weights are never pushed)")
    missing = [n for n in required if n not in names]
    if missing:
        raise IntegrityError(f"{source}: missing {', '.join(missing)}; this is not a complete {kind} folder")


def _check_safe(staging: Path, files: list[Path], kind: str) -> None:
    """Weights readable as safetensors, shard index inside the folder, no local base path, no token in any file."""
    for path in files:
        if path.suffix == ".safetensors":
            shards.ShardReader(path).close()
    if kind != "adapter" and (staging / shards.SAFETENSORS_INDEX).is_file():
        shards.weight_files(staging)
    if kind == "adapter":
        base = (
            json.loads((staging / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
            or ""
        )
        if base.startswith(("/", "~", "./", "../")) or Path(base).expanduser().is_absolute():
            raise IntegrityError(
                f"{staging / 'adapter_config.json'}: base_model_name_or_path is a local path ({base}); "
                "set model.hub_id when training, or fix the file"
            )
    token = _token()
    if token:
        leaked = [p.name for p in files if token.encode() in _text_part(p)]
        if leaked:
            raise IntegrityError(
                f"the Hub token appears in {', '.join(leaked)}; refusing to publish it. Remove it from "
                "those files and revoke the token"
            )


def _check_secrets(files: list[Path], extra: list[str], record: dict) -> None:
    """No file holds the value of a secret variable set here (finetune.credentials, plus the run's secret_env) or a
    token-shaped string, and the run was not given one through `${oc.env:SECRET}` (run.json's overrides; validation
    refuses that now, older runs hold the value wherever the key is written): the value of a variable that is not set
    here cannot be known, its name in the recorded overrides and its shape can."""
    interpolated = credentials.recorded_interpolations(record, extra)
    if interpolated:
        raise IntegrityError(
            f"the run's overrides (run.json) interpolate {', '.join('${oc.env:' + n + '}' for n in interpolated)}: "
            "its value is written into config.yaml and the model card; refusing to publish it. Train "
            "again without it (and revoke the secret if this run directory was shared)"
        )
    known = credentials.values(extra)
    for path in files:
        data = _safetensors_header(path) if path.suffix == ".safetensors" else _text_part(path)
        what = credentials.find(data, known=known)
        if what:
            raise IntegrityError(
                f"{path.name} holds {what}; refusing to publish it. Remove it from the run's config or "
                "that file, and revoke it if it was shared"
            )


def _safetensors_header(path: Path) -> bytes:
    """Text in a safetensors file lives in its JSON header; the rest is raw tensor bytes (checked by _check_safe)."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        return file.read(min(length, shards.MAX_HEADER_BYTES))


def _text_part(path: Path) -> bytes:
    """What of a file can hold text: all of it, except the tensor data after a large binary's first bytes."""
    with path.open("rb") as file:
        return file.read(BINARY_TEXT_BYTES if path.suffix in (".gguf", ".bin", ".onnx", ".data") else -1)


def upload(staging: Path, repo_id: str, private: bool, revision: str, message: str) -> str:
    """One commit with the staged folder; the token is whatever huggingface_hub finds (HF_TOKEN or the login)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if not _token():
        raise ConfigError("no Hub token: set HF_TOKEN in the environment or run `hf auth login` (a write token)")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(staging),
            repo_id=repo_id,
            revision=revision,
            commit_message=message,
            repo_type="model",
            ignore_patterns=[STAGING_MARKER],
        )
    except OfflineModeIsEnabled:
        raise ConfigError("HF_HUB_OFFLINE is set: unset it to push, or use dry_run=true") from None
    except (HfHubHTTPError, OSError) as err:
        raise FinetuneError(f"push to {repo_id} failed: {_without_token(str(err))}") from None
    return getattr(commit, "commit_url", str(commit))


def _token() -> str | None:
    """The token huggingface_hub would use (environment or stored login), only to check files and say if it is
    missing."""
    from huggingface_hub import get_token

    return get_token()


def _without_token(text: str) -> str:
    token = _token()
    return text.replace(token, "***") if token else text


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


if __name__ == "__main__":
    main()
