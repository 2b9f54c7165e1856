"""`python -m finetune.merge <run_dir or adapter> [out=DIR] [dtype=bfloat16]`: merge a LoRA/DoRA adapter into its
base, shard by shard, straight from the base's safetensors files.

peft's `merge_and_unload` needs the whole model in memory (NeoX-20B: ~41 GB in bf16). Here each base tensor is read
at its file offset, the adapter's delta added in fp32 when the tensor is a LoRA target (NeoX's fused
`query_key_value` is one such tensor), the result written to the output shard and freed: peak memory is one tensor
plus the adapter, whatever the model size. Then, on every merge, a numerical gate (finetune.gate) checks that
the merged weights compute what base + adapter computed; a merge that fails it is left in `<out>.invalid/`
with its report and the command exits 3.

Refused before any work (exit 3): a base that is not the one the adapter was trained on (base_model.json, written
by training: config hash and weight fingerprint), pickled weights unless allow_pickle=true, shard indexes naming
files outside the model folder, and adapter tensors this merge does not understand.

Output (a plain transformers model): safetensors shards laid out as the base's + index, config.json,
generation_config.json, the tokenizer with the chat template used in training, merge_report.json, README.md
(model card) and serving.json.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import time
from pathlib import Path

from finetune import console as cli
from finetune.adapters.adapter_files import Adapter, load_adapter, module_of
from finetune.console import Option
from finetune.errors import ConfigError, DiskFullError, IntegrityError
from finetune.models import shards
from finetune.runs import artifacts, checkpoints, rundir

OPTIONS = [
    Option("out", str, None, "output folder (default: RUN/merged)"),
    Option("dtype", str, None, "bfloat16 | float32 | float16 (default: the dtype the run trained in)"),
    Option("base", str, None, "base model folder or Hub id (default: the run's model.name_or_path)"),
    Option(
        "gate",
        str,
        "auto",
        "auto | full (every probe through both models, streamed) | layers (a sample of merged layers; auto above 8 "
        "GiB)",
    ),
    Option(
        "tolerance",
        float,
        None,
        "max abs logit difference allowed (default fp32 1e-4; bf16/fp16: 2x the base's own gap)",
    ),
    Option("allow_pickle", bool, False, "read pickled .bin weights with torch.load(weights_only=True)"),
    Option("overwrite", bool, False, "replace an existing output folder"),
    Option(
        "verify", bool, False, "only re-run the numerical gate on an existing merged folder (out=) against the adapter"
    ),
]
DTYPES = ("bfloat16", "float32", "float16")
PARTIAL_SUFFIX = ".partial"  # the merge is written into <out>.partial, then renamed to <out>
PARTIAL_MARKER = ".neo-finetune-merge"  # in <out>.partial while merge writes it: merge removes only such a folder


def main(argv: list[str] | None = None) -> Path | None:
    return cli.main(run, __doc__, OPTIONS, positional="target", argv=argv)


def run(opts: dict) -> Path:
    started = time.perf_counter()
    cli.quiet_libraries()
    target = rundir.locate(opts["target"])
    if target.kind != "adapter":
        raise ConfigError(
            f"{target.weights}: full weights, not an adapter: there is nothing to merge (serve this folder as is)"
        )
    if opts["gate"] not in ("auto", "full", "layers"):
        raise ConfigError(f"gate={opts['gate']}: choose auto, full or layers")
    dtype = opts["dtype"] or _training_dtype(target)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype}: choose one of {', '.join(DTYPES)}")
    if target.checkpoint and not opts["out"]:
        raise ConfigError(
            f"{target.weights} is a training checkpoint, not the run's final adapter: name a folder outside "
            f"the run for its merged model with out=DIR ({target.run_dir / rundir.MERGED_DIR} is the final adapter's)"
        )
    out = Path(opts["out"]).expanduser() if opts["out"] else target.weights.parent / rundir.MERGED_DIR
    invalid = out.with_name(out.name + rundir.INVALID_SUFFIX)
    staging = out.with_name(out.name + PARTIAL_SUFFIX)
    _check_out(out, target)
    _check_partial(staging)
    if opts["verify"]:
        if not (out / "config.json").is_file():
            raise ConfigError(f"verify=true: no merged model in {out}; merge first (or name it with out=DIR)")
    elif (out.exists() or invalid.exists()) and not opts["overwrite"]:
        raise ConfigError(f"out={out}: already exists; choose another out= or pass overwrite=true")
    else:
        _check_replaceable(out, invalid)
    checkpoints.check_final(target.weights)  # the adapter is what training wrote (its MANIFEST.json)
    adapter = load_adapter(target.weights, opts["allow_pickle"])
    base_dir = base_folder(
        rundir.base_source(target, opts["base"]), (target.config or {}).get("model", {}).get("revision")
    )
    _check_out(out, target, base_dir)
    check_base(target, base_dir)
    # QLoRA: merged into the real weights, compared with the 4-bit model
    quantization = (target.base or {}).get("quantization")
    from finetune.adapters import card, gate

    if opts["verify"]:
        checkpoints.check_final(out)
        report = (
            json.loads((out / "merge_report.json").read_text(encoding="utf-8"))
            if (out / "merge_report.json").is_file()
            else {}
        )
        dtype = report.get("dtype") or dtype
        result = gate.check(
            base_dir, adapter, out, dtype, opts["gate"], opts["tolerance"], opts["allow_pickle"], quantization
        )
        report.update(verified=result, valid=result["passed"])
        _write_report(out, report)
        checkpoints.update_manifest(out, ["merge_report.json"])
        return _conclude(out, invalid, result, report, staged=False)

    cli.say(f"merging {target.weights} into {base_dir} ({dtype}) -> {out}")
    shutil.rmtree(staging, ignore_errors=True)  # only one _check_partial found to be merge's own
    staging.mkdir(parents=True)
    (staging / PARTIAL_MARKER).write_text("a merge in progress; removed when it fails\n", encoding="utf-8")
    report = {
        "adapter": target.weights.name,
        "base": target.base or {"name_or_path": base_dir.name},
        "dtype": dtype,
        "lora": {k: adapter.config.get(k) for k in ("r", "lora_alpha", "use_rslora", "use_dora", "target_modules")},
    }
    if target.checkpoint:
        report["checkpoint"] = target.weights.name  # not the run's final adapter: said in the card too
    try:
        with _disk_full_explained(staging, out, lambda: _output_bytes(base_dir, dtype, opts["allow_pickle"])):
            report.update(merge_weights(base_dir, adapter, staging, dtype, opts["allow_pickle"]))
            write_model_files(base_dir, target.weights, staging, dtype)
        report.update(merge_seconds=round(time.perf_counter() - started, 2), merge_peak_rss_bytes=peak_rss_bytes())
        result = gate.check(
            base_dir, adapter, staging, dtype, opts["gate"], opts["tolerance"], opts["allow_pickle"], quantization
        )
        report.update(
            gate=result,
            valid=result["passed"],
            peak_rss_bytes=peak_rss_bytes(),
            seconds=round(time.perf_counter() - started, 2),
        )
        card.write(staging, target.run_dir, target.config or {}, "merged", extra=report)
        report["manifest"] = checkpoints.MANIFEST  # promised: a merged/ without it is refused (checkpoints.check_final)
        _write_report(staging, report)
        (staging / PARTIAL_MARKER).unlink()  # from here merge_report.json marks the folder as merge's
        checkpoints.seal(staging, "merged")  # last: generate, evaluate and push verify the merged model against it
    except BaseException:  # any failure (a bad file, Ctrl-C): the half-written output is merge's own, and useless
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for stale in (out, invalid):
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(staging, out)
    return _conclude(out, invalid, result, report, staged=True)


def _check_partial(staging: Path) -> None:
    """`<out>.partial` is merge's working folder: one left by an earlier merge (its marker or merge_report.json) or
    an empty one is replaced; any other folder of that name is someone's files, and is never removed."""
    if not staging.exists():
        return
    own = staging.is_dir() and (
        (staging / PARTIAL_MARKER).is_file() or (staging / "merge_report.json").is_file() or not any(staging.iterdir())
    )
    if not own:
        raise ConfigError(
            f"{staging}: exists and was not written by merge (no {PARTIAL_MARKER} or merge_report.json), "
            f"and merge writes its output there first; move it away or choose another out="
        )


def _check_out(out: Path, target: rundir.Target, base_dir: Path | None = None) -> None:
    """out= never is, holds or lies inside what the merge reads or the run keeps: overwrite=true would replace the
    adapter, its checkpoints and run.json (or the base) with the merged model. Inside a run directory only its
    merged/ (the default) is the merge's."""
    resolved = out.resolve()
    kept = [(target.weights, "the adapter")] + ([(target.run_dir, "the run directory")] if target.run_dir else [])
    kept += [(base_dir, "the base model")] if base_dir is not None and Path(base_dir).is_dir() else []
    for folder, what in kept:
        folder = Path(folder).resolve()
        if (
            resolved == folder
            or folder.is_relative_to(resolved)
            or (resolved.is_relative_to(folder) and what != "the run directory")
        ):
            raise ConfigError(
                f"out={out}: "
                f"{'is' if resolved == folder else 'contains' if folder.is_relative_to(resolved) else 'is inside'} "
                f"{what} ({folder}); the merged model would replace or mix with it. Choose a new folder "
                f"outside it (default: {target.weights.parent / rundir.MERGED_DIR})"
            )
    if (
        target.run_dir
        and resolved.is_relative_to(target.run_dir.resolve())
        and resolved != (target.run_dir / rundir.MERGED_DIR).resolve()
    ):
        raise ConfigError(
            f"out={out}: is inside the run directory {target.run_dir}, where only {target.run_dir / rundir.MERGED_DIR} "
            "(the default) belongs to merge; leave out= unset or choose a folder outside the run"
        )


def _check_replaceable(out: Path, invalid: Path) -> None:
    """overwrite=true replaces only what merge wrote (a folder with merge_report.json, or an empty one)."""
    for folder in (out, invalid):
        if (
            folder.exists()
            and not (folder / "merge_report.json").is_file()
            and (not folder.is_dir() or any(folder.iterdir()))
        ):
            raise ConfigError(
                f"out={out}: overwrite=true replaces only a merged model written by merge, and {folder} is not "
                "one (no merge_report.json); choose another out="
            )


def _conclude(out: Path, invalid: Path, result: dict, report: dict, staged: bool) -> Path:
    """Passed: say so. Failed: move the folder to <out>.invalid (nothing loads it by mistake) and exit 3."""
    line = (
        f"numerical gate ({result['mode']}): max abs difference {result['max_abs_diff']:.2e}, "
        f"tolerance {result['tolerance']:.2e}"
    )
    trained = result.get("trained_model")
    if trained and trained["measured"]:
        line += (
            "; against the 4-bit model that trained: max next-token probability difference "
            f"{trained['max_abs_diff']:.2e}, "
            f"tolerance {trained['tolerance']:.2e} (2x the base's own 4-bit gap), top-1 agreement "
            f"{trained['top1_agreement']:.1%}"
        )
    elif trained:
        line += f"; not compared with the 4-bit model that trained: {trained['why']}"
    if not result["passed"]:
        shutil.rmtree(invalid, ignore_errors=True)
        os.replace(out, invalid)
        what = (
            "the merged weights do not compute what base + adapter computed"
            if result.get("merge_passed", False) is False
            else "the merged model is further from the 4-bit model that trained than the base's own 4-bit rounding "
            "explains "
            "(serve the adapter on the 4-bit base instead)"
        )
        raise IntegrityError(
            f"{line}: {what}. Moved to {invalid} (see its merge_report.json); check that the adapter, base "
            "and merged files are intact, then merge again"
        )
    cli.say(f"{line}: passed")
    if staged:
        cli.say(
            f"merged model: {out} ({report['merged_modules']} adapted tensors in {len(report['shards'])} shard(s), "
            f"peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB, {report['seconds']:.1f} s)"
        )
    return out


@contextlib.contextmanager
def _disk_full_explained(staging: Path, out: Path, need):
    """A write that fails with ENOSPC, or with any OSError/RuntimeError while less than the merged model's size is
    free (torch and tokenizers report a full disk without an errno), becomes failed:disk_full naming path, free and
    needed bytes; the half-written <out>.partial is removed, since nothing can use it."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        free = shutil.disk_usage(staging.parent).free  # before removing the partial output frees its space
        shutil.rmtree(staging, ignore_errors=True)
        needed = need()
        if getattr(err, "errno", None) != errno.ENOSPC and free >= needed:
            raise
        raise DiskFullError(
            f"no space left on the device of {staging.parent} while merging into {out} "
            f"({free / 2**20:.1f} MiB free; the merged model needs about {needed / 2**20:.1f} MiB); "
            f"{staging.name} was removed. Free space or choose another out=, then merge again "
            f"(the write failed with: {type(err).__name__}: {str(err)[:200]})"
        ) from err


def _output_bytes(base_dir: Path, dtype: str, allow_pickle: bool) -> int:
    """The merged weights' size: each base tensor at the output dtype (integer buffers keep theirs)."""
    import torch

    target, total = getattr(torch, dtype), 0
    for path in shards.weight_files(base_dir, allow_pickle):
        if path.suffix != ".safetensors":
            total += path.stat().st_size
            continue
        with shards.ShardReader(path) as reader:
            total += sum(
                shards._numel(t.shape) * shards.DTYPE_BYTES[_out_dtype(t, target)] for t in reader.tensors.values()
            )
    return total


def _write_report(folder: Path, report: dict) -> None:
    artifacts.write_json(folder / "merge_report.json", report)


def base_folder(source: str, revision: str | None) -> Path:
    """A local folder with the base's config and weights: the path itself, the Hub cache, or a download (safetensors
    only)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1:
        raise ConfigError(
            f"base={source}: no such folder (the base the run trained on has moved or was removed); pass "
            "base=PATH to a local copy of it"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                source, revision=revision or "main", allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt"]
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise ConfigError(
            f"base={source}: not a local folder and not downloadable here ({type(err).__name__}); "
            "pass base=PATH to a local copy"
        ) from None


def check_base(target: rundir.Target, base_dir: Path) -> None:
    """Refuse a base other than the one the adapter was trained on (its base_model.json)."""
    from finetune.models import fingerprint

    if not (base_dir / "config.json").is_file():
        raise ConfigError(f"base {base_dir}: no config.json; give the folder of the base model with base=PATH")
    if target.base is None:
        cli.say(
            f"warning: {target.weights} records no base model (no {rundir.BASE_RECORD}); cannot prove the base "
            "matches, "
            "relying on shapes and the numerical gate"
        )
        return
    changes = fingerprint.base_mismatch(target.base, base_dir, warn=lambda line: cli.say(f"warning: {line}"))
    if changes:
        trained = f"{target.base.get('name_or_path')}@{target.base.get('revision')}"
        raise IntegrityError(
            f"{target.weights} was trained on {trained}, but {base_dir} is a different checkpoint: "
            + "; ".join(changes)
            + ". Merging would produce a model nobody trained; give the right "
            "base with base=PATH (same revision)"
        )


def merge_weights(base_dir: Path, adapter: Adapter, out: Path, dtype: str, allow_pickle: bool) -> dict:
    """Write every base tensor to `out` in `dtype`, adapted ones merged; one tensor in memory at a time."""
    import torch

    target_dtype = getattr(torch, dtype)
    files = shards.weight_files(base_dir, allow_pickle)
    pending = dict(adapter.modules)
    weight_map, shard_reports, total = {}, [], 0
    for number, path in enumerate(files, 1):
        reader = shards.open_weights(path)
        names = list(reader.tensors)
        adapted = {n: m for n in names if n.endswith(".weight") and (m := module_of(n, adapter.modules))}
        bias_of = {
            n.removesuffix(".weight") + ".bias": adapter.modules[m]
            for n, m in adapted.items()
            if adapter.modules[m].bias is not None
        }
        name_out = (
            path.name
            if path.suffix == ".safetensors"
            # pickled shards get standard safetensors names
            else (
                shards.SAFETENSORS_SINGLE if len(files) == 1 else f"model-{number:05d}-of-{len(files):05d}.safetensors"
            )
        )
        layout = [(n, _out_dtype(reader.tensors[n], target_dtype), reader.tensors[n].shape) for n in names]
        writer = shards.ShardWriter(out / name_out, layout, {"merged_by": "neo-finetune"})
        merged_here = 0
        for name, (_, out_dtype, shape) in zip(names, layout):
            tensor = reader.read(name)
            if name in adapted:
                lora = adapter.modules[adapted[name]]
                pending.pop(lora.name, None)
                expected = (lora.B.shape[0], lora.A.shape[1])
                if tuple(shape) != (expected[::-1] if adapter.fan_in_fan_out else expected):
                    raise IntegrityError(
                        f"{adapter.folder}: module {lora.name} has shape {expected} in the adapter, "
                        f"{tuple(shape)} in the base {path.name}: this adapter was not trained on this base"
                    )
                tensor = lora.merged(tensor, adapter.fan_in_fan_out)
                merged_here += 1
            elif name in bias_of:
                tensor = tensor.float() + bias_of[name].scale * bias_of[name].bias.float()
            writer.write(name, tensor.to(getattr(torch, shards.DTYPE_NAMES[out_dtype])))
            del tensor
            weight_map[name] = name_out
        writer.close()
        reader.close()
        total += writer.size
        shard_reports.append({"file": name_out, "tensors": len(names), "merged": merged_here, "bytes": writer.size})
    if pending:
        raise IntegrityError(
            f"{adapter.folder}: adapted module(s) not found in the base weights: "
            f"{', '.join(sorted(pending)[:5])}{' ...' if len(pending) > 5 else ''}; wrong base model?"
        )
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / shards.SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return {"shards": shard_reports, "merged_modules": sum(s["merged"] for s in shard_reports)}


def _out_dtype(info, target_dtype) -> str:
    """Floating tensors take the output dtype; integer buffers keep theirs."""
    return shards.dtype_name(target_dtype) if info.dtype in ("F64", "F32", "F16", "BF16") else info.dtype


def write_model_files(base_dir: Path, adapter_dir: Path, out: Path, dtype: str) -> None:
    """config.json (dtype updated), generation_config.json and the trained tokenizer (with its chat template)."""
    from transformers import AutoTokenizer, GenerationConfig

    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    trained = (adapter_dir / "tokenizer_config.json").is_file()  # training saves it with the chat template
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if trained else base_dir)
    config["pad_token_id"] = tokenizer.pad_token_id
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if (base_dir / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(base_dir)
    else:
        generation = GenerationConfig(bos_token_id=config.get("bos_token_id"))
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _training_dtype(target: rundir.Target) -> str:
    if target.base and target.base.get("training_dtype"):
        return target.base["training_dtype"]
    if target.config:
        return target.config.get("model", {}).get("dtype", "bfloat16")
    return "bfloat16"


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM (Linux; getrusage's ru_maxrss would include the parent's peak
    from before exec), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


if __name__ == "__main__":
    main()
