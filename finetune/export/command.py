"""`finetune export RUN format=gguf|ctranslate2|onnx [quant=TYPE] [out=DIR]`: the model as a file for llama.cpp /
Ollama, CTranslate2 or ONNX Runtime, kept only if it answers as the transformers model does.

From a run with an adapter, the adapter is merged on the fly (the streaming merge, checked by the merge's own gate,
in float32 for a full-precision export) into `<out>.merging`, which is removed afterwards; a run's existing
merged/ (or a full fine-tune's model/, or any merged model folder) is exported as it is. The export is written into
`<out>.partial`, loaded in its real runtime and compared with transformers (finetune.export.gate) on the run's
held-out prompts rendered with its training template. Passed: export.json (what was measured), serving.json, the
model card (README.md), an Ollama Modelfile for GGUF and MANIFEST.json are added and the folder becomes `<out>`.
Failed: it is moved to `<out>.invalid` (an earlier export at `<out>` stays) and the command exits 3.
`verify=true` re-runs the gate on an existing export.

Refused before any model loads (exit 2): a format the architecture has no runtime for (naming the ones it has), an
unknown quant type, an out= that exists (overwrite=true replaces only an export this command wrote), an out= that
is, holds or lies inside the weights, the base or the run (inside a run only RUN/exports/NAME), and an adapter whose
base is not available (naming base=).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from pathlib import Path

from finetune import console as cli
from finetune.console import Option
from finetune.errors import ConfigError, DiskFullError, IntegrityError
from finetune.export import formats
from finetune.runs import artifacts, checkpoints, report, rundir

OPTIONS = [
    Option("format", str, None, "gguf (GPT-NeoX/Pythia) | ctranslate2 (GPT-J, GPT-NeoX) | onnx (all three)"),
    Option(
        "quant",
        str,
        None,
        "weights' type (default: full precision): gguf f32|f16|bf16|q8_0, ctranslate2 float32|float16|bfloat16|int8|"
        "int8_float16|int8_bfloat16, onnx fp32|int8",
    ),
    Option("out", str, None, "output folder (default: RUN/exports/FORMAT-QUANT)"),
    Option("base", str, None, "base model folder or Hub id when merging an adapter (default: the run's model)"),
    Option("overwrite", bool, False, "replace an existing export folder written by export"),
    Option("verify", bool, False, "only re-run the gate on an existing export (out=, or the default folder)"),
    Option("tokens", int, None, "greedy tokens compared with transformers per prompt (default 32)"),
    Option(
        "tolerance",
        float,
        None,
        "full precision: max abs logit difference (default x the largest logit, >= 10 units: gguf 1e-3, others 1e-4)",
    ),
    Option("min_top1", float, None, "quantized: minimum top-1 agreement (default: 16-bit 0.97, 8-bit 0.90)"),
    Option("max_logprob_gap", float, None, "quantized: max mean log-prob gap, nats (default: 16-bit 0.02, 8-bit 0.1)"),
    Option("threads", int, None, "CPU threads for the runtime under test (default: the runtime's own)"),
]
EXPORTS_DIR = "exports"  # RUN/exports/FORMAT-QUANT
RECORD = "export.json"  # marks a folder as export's: overwrite=true replaces only such a folder
PARTIAL_SUFFIX, MERGING_SUFFIX = ".partial", ".merging"
MARKER = ".neo-finetune-export"  # in <out>.partial / <out>.merging while export writes them


def main(argv: list[str] | None = None) -> Path | None:
    return cli.main(run, __doc__, OPTIONS, positional="target", argv=argv)


def run(opts: dict) -> Path:
    started = time.perf_counter()
    cli.quiet_libraries()
    if not opts["format"]:
        raise ConfigError(f"format= is required: {', '.join(formats.FORMATS)} ({formats.by_family()})")
    target = rundir.locate(opts["target"])
    family = _family(target)
    fmt = formats.choose(opts["format"], family)
    quant = formats.check_quant(fmt, opts["quant"])
    if target.checkpoint and not opts["out"]:
        raise ConfigError(
            f"{target.weights} is a training checkpoint, not the run's final weights: name a folder outside the run "
            f"for its export with out=DIR ({target.run_dir / EXPORTS_DIR} holds the final weights' exports)"
        )
    out = _out(opts["out"], target, fmt, quant)
    invalid = out.with_name(out.name + rundir.INVALID_SUFFIX)
    staging, merging = (out.with_name(out.name + s) for s in (PARTIAL_SUFFIX, MERGING_SUFFIX))
    _check_out(out, target)
    if opts["verify"]:
        return _verify(out, invalid, target, fmt, quant, opts)
    existing = next((folder for folder in (out, invalid) if folder.exists()), None)
    if existing is not None and not opts["overwrite"]:
        raise ConfigError(f"out={out}: {existing} already exists; choose another out= or pass overwrite=true")
    for folder in (out, invalid, staging, merging):
        _check_ours(folder, out)
    model_dir, source = _source_model(target, opts, merging, quant, fmt)  # loads nothing for a merged model
    cli.say(f"exporting {model_dir} to {fmt.name} {quant} -> {out}")
    module = formats.module(fmt)
    try:
        with _disk_full_explained(staging, out, model_dir):
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            _mark(staging)
            tokenizer = _tokenizer(model_dir)
            files = module.write(model_dir, staging, quant, tokenizer.chat_template)
            _mark(staging)  # a converter may have recreated the folder
            if fmt.name == "gguf":
                from finetune.export import modelfile

                eos, template = tokenizer.eos_token, _template(target)
                files.append(modelfile.write(staging, files[0].name, tokenizer.chat_template, eos, template))
            result = _gate(fmt, staging, model_dir, target, quant, opts)
            record = _record(fmt, quant, family, target, source, staging, files, result, started)
            _finish(staging, target, record)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if source.get("merged_on_the_fly"):
            shutil.rmtree(merging, ignore_errors=True)
    if record["valid"]:
        for stale in (out, invalid):
            shutil.rmtree(stale, ignore_errors=True)
    from finetune.adapters import card

    try:
        _conclude(staging, out, invalid, record)  # a failed export goes to <out>.invalid; an earlier good <out> stays
    finally:
        card.refresh(target.run_dir, target.config)  # the run's serving.json and card carry what was measured
        report.refresh(target.run_dir)  # and its report.html
    return out


def _verify(out: Path, invalid: Path, target, fmt, quant: str, opts: dict) -> Path:
    """Re-run the gate on an existing export (its manifest first): against the model it recorded as its source."""
    if not (out / RECORD).is_file():
        raise ConfigError(f"verify=true: no export in {out} (no {RECORD}); export first, or name it with out=DIR")
    checkpoints.check_final(out)
    record = json.loads((out / RECORD).read_text(encoding="utf-8"))
    if (record.get("format"), record.get("quant")) != (fmt.name, quant):
        raise ConfigError(
            f"out={out}: holds a {record.get('format')} {record.get('quant')} export; pass "
            f"format={record.get('format')} quant={record.get('quant')}"
        )
    model_dir = Path(record["source"]["model_dir"])
    if not (model_dir / "config.json").is_file():
        raise ConfigError(
            f"verify=true compares with the model the export came from, {model_dir}, which is gone "
            "(merged on the fly and removed): export again with overwrite=true instead"
        )
    record["gate"] = _gate(fmt, out, model_dir, target, quant, opts)
    record["valid"] = record["gate"]["passed"]
    artifacts.write_json(out / RECORD, record)
    from finetune.adapters import card

    card.write(out, target.run_dir, _card_config(target, record), "export", extra={"export": record})
    checkpoints.update_manifest(out, [RECORD, "README.md", "serving.json"])  # the card says what was measured now
    report.refresh(target.run_dir)  # the run's report.html too
    return _conclude(out, out, invalid, record)


def _gate(fmt, folder: Path, model_dir: Path, target, quant: str, opts: dict) -> dict:
    from finetune.export import gate

    prompts = gate.prompts_for(model_dir, target.run_dir)
    runtime = formats.module(fmt).load(folder, opts["threads"])
    try:
        return gate.check(
            model_dir,
            runtime,
            prompts,
            quant,
            opts["tokens"],
            opts["tolerance"],
            opts["min_top1"],
            opts["max_logprob_gap"],
            fmt.tolerance,
        )
    finally:
        runtime.close()


def _record(fmt, quant, family, target, source, folder, files, result, started) -> dict:
    return {
        "format": fmt.name,
        "quant": quant,
        "family": family,
        "engine": fmt.engine,
        "runs_with": fmt.runs_with,
        "source": source,
        "run": str(target.run_dir) if target.run_dir else None,
        "files": [
            {"name": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER
        ],
        "gate": result,
        "valid": result["passed"],
        "seconds": round(time.perf_counter() - started, 2),
        "versions": artifacts.versions() | _engine_versions(),
        "manifest": checkpoints.MANIFEST,  # promised: an export without it is refused (checkpoints.check_final)
    }


def _finish(staging: Path, target, record: dict) -> None:
    """export.json, serving.json and the card; then the marker goes and the manifest seals the folder."""
    from finetune.adapters import card

    artifacts.write_json(staging / RECORD, record)
    card.write(staging, target.run_dir, _card_config(target, record), "export", extra={"export": record})
    (staging / MARKER).unlink(missing_ok=True)
    checkpoints.seal(staging, "export")


def _card_config(target, record: dict) -> dict:
    """The run's config for the card, with the family known even for a model folder outside a run."""
    config = dict(target.config or {})
    config["model"] = {"family": record["family"], **(config.get("model") or {})}
    return config


def _conclude(folder: Path, out: Path, invalid: Path, record: dict) -> Path:
    """Passed: `folder` becomes `out`, said with the gate's numbers. Failed: it becomes `invalid` (nothing loads it
    by mistake; any earlier `out` is left as it was) and the command exits 3."""
    from finetune.export import gate

    line = gate.summary(record["gate"])
    if not record["gate"]["passed"]:
        shutil.rmtree(invalid, ignore_errors=True)
        os.replace(folder, invalid)
        raise IntegrityError(
            f"{line}: {'; '.join(record['gate']['reasons'])}. The export does not answer as the trained model does; "
            f"moved to {invalid} (see its {RECORD})"
        )
    if folder != out:
        os.replace(folder, out)
    cli.say(f"{line}: passed")
    size = sum(f["bytes"] for f in record["files"])
    cli.say(f"exported: {out} ({size / 2**20:.1f} MiB; load it with {record['runs_with']})")
    return out


def _family(target) -> str:
    """gpt_neo, gptj or gpt_neox: from the weights' config.json, else the run's config or the recorded base."""
    config = target.weights / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        if model_type:
            return model_type
    family = ((target.config or {}).get("model") or {}).get("family") or (target.base or {}).get("family")
    if not family:
        raise ConfigError(f"{target.weights}: cannot tell the architecture (no config.json, no recorded family)")
    return family


def _out(given: str | None, target, fmt, quant: str) -> Path:
    if given:
        return Path(given).expanduser()
    return (target.run_dir or target.weights.parent) / EXPORTS_DIR / f"{fmt.name}-{quant}"


def _check_out(out: Path, target) -> None:
    """out= never is, holds or lies inside the weights it exports or the run; inside a run only RUN/exports/NAME."""
    resolved = out.resolve()
    _check_apart(out, target.weights, "the weights it exports")
    if target.run_dir:
        run_dir = target.run_dir.resolve()
        if run_dir.is_relative_to(resolved) or (
            resolved.is_relative_to(run_dir) and resolved.parent != run_dir / EXPORTS_DIR
        ):
            raise ConfigError(
                f"out={out}: inside the run directory only {target.run_dir / EXPORTS_DIR}/NAME belongs to export "
                f"(default {_out(None, target, formats.FORMATS['gguf'], 'f32').parent}/FORMAT-QUANT); "
                "choose such a folder or one outside the run"
            )


def _check_apart(out: Path, folder: Path, what: str) -> None:
    """out= (and the folders beside it) must neither be, hold nor lie inside `folder`."""
    resolved, folder = out.resolve(), Path(folder).resolve()
    if resolved == folder or folder.is_relative_to(resolved) or resolved.is_relative_to(folder):
        raise ConfigError(f"out={out}: overlaps {what} ({folder}); choose a folder outside it")


def _check_ours(folder: Path, out: Path) -> None:
    """A folder export may replace: absent, empty, or one it wrote (its record or its in-progress marker)."""
    if not folder.exists():
        return
    if folder.is_dir() and ((folder / RECORD).is_file() or (folder / MARKER).is_file() or not any(folder.iterdir())):
        return
    raise ConfigError(
        f"out={out}: {folder} exists and was not written by export (no {RECORD}); it is never replaced. Move it "
        "away or choose another out="
    )


def _source_model(target, opts: dict, merging: Path, quant: str, fmt) -> tuple[Path, dict]:
    """The transformers model folder to export, and where it came from. An adapter is merged into `merging`."""
    if target.kind == "model":
        checkpoints.check_final(target.weights)
        return target.weights, {"model_dir": str(target.weights), "merged_on_the_fly": False}
    merged = target.run_dir / rundir.MERGED_DIR if target.run_dir and not target.checkpoint else None
    if merged is not None and (merged / "config.json").is_file():
        checkpoints.check_final(merged)
        cli.say(f"using the run's merged model {merged}")
        return merged, {"model_dir": str(merged), "merged_on_the_fly": False}
    from finetune.adapters import adapter_files, merge
    from finetune.adapters import gate as merge_gate

    checkpoints.check_final(target.weights)
    adapter = adapter_files.load_adapter(target.weights, False)
    base_dir = merge.base_folder(
        rundir.base_source(target, opts["base"]), ((target.config or {}).get("model") or {}).get("revision")
    )
    _check_apart(merging.with_name(merging.name.removesuffix(MERGING_SUFFIX)), base_dir, "the base model")
    merge.check_base(target, base_dir)
    dtype = "float32" if formats.full_precision(fmt) == quant else merge._training_dtype(target)
    cli.say(f"merging {target.weights} into {base_dir} ({dtype}) on the fly -> {merging} (removed afterwards)")
    shutil.rmtree(merging, ignore_errors=True)
    merging.mkdir(parents=True)
    _mark(merging)
    try:
        with _disk_full_explained(merging, merging, base_dir):
            merge.merge_weights(base_dir, adapter, merging, dtype, False)
            merge.write_model_files(base_dir, target.weights, merging, dtype)
        result = merge_gate.check(
            base_dir, adapter, merging, dtype, quantization=(target.base or {}).get("quantization")
        )
    except BaseException:
        shutil.rmtree(merging, ignore_errors=True)
        raise
    if not result["passed"]:
        shutil.rmtree(merging, ignore_errors=True)
        raise IntegrityError(
            f"merging {target.weights} into {base_dir} failed the merge's numerical gate (max abs difference "
            f"{result['max_abs_diff']:.2e}, tolerance {result['tolerance']:.2e}); nothing was exported"
        )
    return merging, {
        "model_dir": str(merging),
        "merged_on_the_fly": True,
        "adapter": str(target.weights),
        "base": str(base_dir),
        "dtype": dtype,
        "merge_gate": result,
    }


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _template(target) -> str | None:
    """The run's data template (its copy in the run directory), which decides whether prompts are raw text."""
    return str(target.template_path) if target.template_path else None


def _mark(folder: Path) -> None:
    (folder / MARKER).write_text("an export in progress; removed when it fails\n", encoding="utf-8")


def _engine_versions() -> dict:
    from importlib import metadata

    found = {}
    for package in ("gguf", "llama_cpp_python", "ctranslate2", "onnx", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


@contextlib.contextmanager
def _disk_full_explained(folder: Path, out: Path, model_dir: Path):
    """ENOSPC (or an OSError/RuntimeError while less than the model's size is free: converters report a full disk
    without an errno) becomes failed:disk_full naming the folder and the space; the half-written folder goes."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        free = shutil.disk_usage(folder.parent).free
        shutil.rmtree(folder, ignore_errors=True)
        needed = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
        if getattr(err, "errno", None) != errno.ENOSPC and free >= needed:
            raise
        raise DiskFullError(
            f"no space left on the device of {folder.parent} while writing {out} ({free / 2**20:.1f} MiB free; "
            f"the model's weights take {needed / 2**20:.1f} MiB); {folder.name} was removed. Free space or choose "
            f"another out=, then export again (the write failed with: {type(err).__name__}: {str(err)[:200]})"
        ) from err
