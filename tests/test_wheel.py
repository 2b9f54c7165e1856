"""The wheel is the whole tool (issue 21 item 1): `pip install .`, `pip install git+URL` or a release must run
`finetune conf=lora_neox20b` with no checkout anywhere. conf/ and data_templates/ live at the repository's top level
and travel inside the package (finetune/conf, finetune/data_templates; pyproject's [tool.setuptools] package-dir).

The wheel is built from a copy of what a clone holds (git's tracked and not-ignored files), its file list is compared
with the source tree, then it is installed into a fresh venv that sees this venv's third-party packages but not the
editable finetune, and run from a folder outside the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from helpers import PROJECT

pytestmark = pytest.mark.slow

PACKAGE = PROJECT / "finetune"
DATA_DIRS = {"evaluate/harness_tasks"}  # folders in finetune/ whose .py files are data (lm_eval loads them by path)
IGNORED_NAMES = ("__pycache__", ".pyc", ".pyo", "~", ".swp", ".orig", ".rej")  # editor and interpreter droppings


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)


def _explain(out: subprocess.CompletedProcess) -> str:
    return f"exit {out.returncode}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-5000:]}"


def _clone_files() -> list[str]:
    """The files a clone of this checkout holds (tracked and untracked-not-ignored: uncommitted work is tested too),
    relative to the project; without git, every file but the droppings."""
    if (PROJECT / ".git").exists() and shutil.which("git"):
        listed = _run(
            ["git", "-C", PROJECT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"], check=True
        )
        return sorted(name for name in set(listed.stdout.split("\0")) if name and (PROJECT / name).is_file())
    skip = {".git", ".venv", "build", "dist", "runs", "outputs", "multirun", ".pytest_cache", ".cache"}
    return sorted(
        str(p.relative_to(PROJECT))
        for p in PROJECT.rglob("*")
        if p.is_file() and not skip & set(p.relative_to(PROJECT).parts) and not _dropping(p)
    )


def _dropping(path: Path) -> bool:
    return (
        path.name.startswith(".")
        or any(part == "__pycache__" for part in path.parts)
        or path.name.endswith(IGNORED_NAMES)
    )


def _source_files(folder: Path, pattern: str = "*") -> list[Path]:
    return sorted(p for p in folder.rglob(pattern) if p.is_file() and not _dropping(p.relative_to(PROJECT)))


def _copy_of_clone(tmp_path_factory) -> Path:
    """A copy of the checkout as a clone holds it (pip builds in place: the copy keeps build/ and *.egg-info out of
    the repository, and no stale build/lib of an earlier build can leak deleted modules into the wheel)."""
    source = tmp_path_factory.mktemp("source")
    for name in _clone_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / name, source / name)
    return source


def _build_wheel(source: Path, dist: Path) -> Path:
    """`pip install .` / `pip install git+URL`: a wheel straight from a source tree."""
    out = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            source,
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "-w",
            dist,
        ],
        timeout=300,
    )
    assert out.returncode == 0, _explain(out)
    wheels = list(dist.glob("neo_finetune-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return _build_wheel(_copy_of_clone(tmp_path_factory), tmp_path_factory.mktemp("dist"))


def test_wheel_carries_every_module_preset_template_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    clone = set(_clone_files())
    expected = {
        # every file of the package a clone holds: modules, demo data, model configs, harness tasks, any new data
        *(name for name in clone if name.startswith("finetune/") and not _dropping(Path(name))),
        # every module on disk, even one git ignores (a clone would lack it: fix .gitignore or `git add -f` it)
        *(p.relative_to(PROJECT).as_posix() for p in _source_files(PACKAGE, "*.py")),
        # the Hydra presets and every group option, the data templates and their README
        *(f"finetune/{p.relative_to(PROJECT).as_posix()}" for p in _source_files(PROJECT / "conf", "*.yaml")),
        *(f"finetune/{p.relative_to(PROJECT).as_posix()}" for p in _source_files(PROJECT / "data_templates")),
    }
    missing = sorted(expected - names)
    assert not missing, (
        f"the wheel lacks {missing}: list a new subpackage in pyproject.toml's [tool.setuptools] "
        "packages and a new data file in its package-data; a file git ignores must be added with "
        "`git add -f` or un-ignored (git check-ignore -v PATH)"
    )
    # the things the commands read at runtime, named explicitly (the comparison above would pass on an empty tree)
    for name in (
        "finetune/conf/config.yaml",
        "finetune/conf/demo.yaml",
        "finetune/conf/lora_neox20b.yaml",
        "finetune/conf/model/gpt_neox_20b.yaml",
        "finetune/conf/model/tiny_neo.yaml",
        "finetune/conf/strategy/lora.yaml",
        "finetune/conf/data/demo.yaml",
        "finetune/conf/trainer/demo.yaml",
        "finetune/conf/distributed/zero3.yaml",
        "finetune/conf/accelerate/ddp.yaml",
        "finetune/data_templates/alpaca.yaml",
        "finetune/data_templates/README.md",
        "finetune/demo_data/legal_medical_qa.jsonl",
        "finetune/demo_data/legal_medical_qa_heldout.jsonl",
        "finetune/models/model_configs/EleutherAI__gpt-neox-20b.json",
        "finetune/evaluate/harness_tasks/neo_ft_cloze.yaml",
        "finetune/evaluate/harness_tasks/local_docs.py",
        "finetune/__main__.py",
        "finetune/cli.py",
    ):
        assert name in names, name
    presets = {p.stem for p in (PROJECT / "conf").glob("*.yaml")}
    assert {"config", "demo", "lora_neox20b", "qlora_neox20b"} <= presets
    assert {f"finetune/conf/{name}.yaml" for name in presets} <= names
    # every folder of modules (but the harness's data folder) is a regular package in the wheel
    folders = {p.parent.relative_to(PACKAGE).as_posix() for p in _source_files(PACKAGE, "*.py")} - DATA_DIRS
    assert {"adapters", "config", "data", "evaluate", "inference", "models", "plan", "runs", "train"} <= folders
    lacking = sorted(
        f for f in folders if ("finetune/__init__.py" if f == "." else f"finetune/{f}/__init__.py") not in names
    )
    assert not lacking, f"no __init__.py in the wheel for these folders of finetune/: {lacking}"
    # nothing but the package and its metadata; no bytecode, no checkout folders at the top level
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info/"
    assert all(n.startswith(("finetune/", dist_info)) for n in names), sorted(
        n for n in names if not n.startswith(("finetune/", dist_info))
    )
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    entry_points = zipfile.ZipFile(wheel).read(dist_info + "entry_points.txt").decode()
    assert "finetune = finetune.__main__:command" in entry_points


def test_a_release_built_through_the_sdist_ships_the_same_files(wheel, tmp_path_factory):
    """`python -m build` (a PyPI release) makes the sdist first and the wheel from it: conf/ and data_templates/ must
    travel through the sdist too."""
    source, dist = _copy_of_clone(tmp_path_factory), tmp_path_factory.mktemp("sdist")
    out = _run(
        [sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(dist)!r}))"],
        cwd=source,
        timeout=300,
    )
    assert out.returncode == 0, _explain(out)
    sdist = dist / out.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        archive.extractall(dist, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    unpacked = dist / sdist.name.removesuffix(".tar.gz")
    assert (unpacked / "conf" / "config.yaml").is_file() and (unpacked / "data_templates" / "alpaca.yaml").is_file()
    released = _build_wheel(unpacked, tmp_path_factory.mktemp("released"))
    assert sorted(zipfile.ZipFile(released).namelist()) == sorted(zipfile.ZipFile(wheel).namelist())


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """A fresh venv holding the wheel's finetune, this venv's third-party packages visible through a .pth line (a
    plain path line: the .pth files in that folder, the editable finetune's finder among them, are not run)."""
    root = tmp_path_factory.mktemp("installed")
    venv = root / "venv"
    out = _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120)
    assert out.returncode == 0, _explain(out)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    # installed before the .pth exists, by this pip driving the new interpreter: it sees no neo-finetune to replace
    out = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            wheel,
        ],
        timeout=300,
    )
    assert out.returncode == 0, _explain(out)
    site = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True).stdout.strip()
    )
    assert (site / "finetune" / "conf" / "config.yaml").is_file()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_outer_site_packages.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    elsewhere = root / "elsewhere"  # the working directory: not the repository, nothing of finetune in it
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(
        VIRTUAL_ENV=str(venv),
        PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONNOUSERSITE="1",
        HF_HUB_OFFLINE="1",
        NEO_FINETUNE_CACHE=str(root / "cache"),
    )
    return {
        "venv": venv,
        "site": site,
        "version": wheel.name.split("-")[1],
        "python": python,
        "finetune": bindir / "finetune",
        "cwd": elsewhere,
        "env": env,
    }


def _in(installed: dict, *command, timeout: int = 300) -> subprocess.CompletedProcess:
    return _run(list(command), cwd=installed["cwd"], env=installed["env"], timeout=timeout)


PROBE = """
import importlib.metadata, json, sys
import finetune, finetune.cli, finetune.plan.cli, finetune.data.templates
from finetune.config import compose
print(json.dumps({
    "modules": sorted(m.__file__ for n, m in list(sys.modules.items()) if n.split(".")[0] == "finetune" and m.__file__),
    "dirs": [str(compose.CONF_DIR), str(compose.TEMPLATES_DIR), str(compose.DEMO_DATA_DIR)],
    "presets": compose.presets(), "templates": finetune.data.templates.available(),
    "editable": sorted(n for n in sys.modules if "editable" in n)
                + [repr(f) for f in sys.meta_path if "editable" in repr(f)],
    "path": sys.path, "prefix": sys.prefix, "version": importlib.metadata.version("neo-finetune"),
}))
"""


def test_installed_wheel_finds_its_presets_and_plans_from_anywhere(installed):
    probe = _in(installed, installed["python"], "-c", PROBE)
    assert probe.returncode == 0, _explain(probe)
    seen = json.loads(probe.stdout)
    site = installed["site"].resolve()
    # the wheel's finetune, not the checkout's: no editable finder, the repository nowhere on sys.path
    assert Path(seen["prefix"]).resolve() == installed["venv"].resolve()
    assert not seen["editable"], seen["editable"]
    assert seen["modules"] and all(Path(f).resolve().is_relative_to(site) for f in seen["modules"]), seen["modules"]
    assert all(Path(d).resolve().is_relative_to(site / "finetune") for d in seen["dirs"]), seen["dirs"]
    others = [p for p in seen["path"] if p and (Path(p) / "finetune").is_dir() and Path(p).resolve() != site]
    assert not others, f"another finetune is importable from {others}"  # the checkout (PROJECT) above all
    assert seen["version"] == installed["version"]
    assert set(seen["presets"]) == {p.stem for p in (PROJECT / "conf").glob("*.yaml")} - {"config"}
    assert set(seen["templates"]) == {p.stem for p in (PROJECT / "data_templates").glob("*.yaml")} and seen["templates"]

    out = _in(installed, installed["finetune"], "--help")
    assert out.returncode == 0, _explain(out)
    assert (
        "presets (finetune conf=NAME)" in out.stdout and "lora_neox20b" in out.stdout and "gpt_neox_20b" in out.stdout
    )

    out = _in(installed, installed["finetune"], "conf=lora_neox20b", "--cfg", "job")
    assert out.returncode == 0, _explain(out)
    assert "name_or_path: EleutherAI/gpt-neox-20b" in out.stdout and "template: alpaca" in out.stdout, out.stdout

    out = _in(installed, installed["finetune"], "plan", "conf=lora_neox20b", "gpu=h100-80gb")
    assert out.returncode == 0, _explain(out)
    assert "plan: conf=lora_neox20b" in out.stdout and "EleutherAI__gpt-neox-20b.json" in out.stdout, out.stdout
    assert "fits" in out.stdout

    out = _in(installed, installed["python"], "-m", "finetune.plan", "conf=demo", "gpu=cpu")
    assert out.returncode == 0, _explain(out)
    assert "plan: conf=demo on CPU" in out.stdout and "total" in out.stdout, out.stdout
    assert not list(installed["cwd"].iterdir()), "a print-only command wrote into the working directory"


def test_installed_wheel_trains_the_demo(installed, tiny_models, tmp_path):
    run_dir = tmp_path / "run"
    # the session's unpretrained tiny GPT-Neo: the demo's own base would be pretrained on first use (slow on 2 cores)
    out = _in(
        installed,
        installed["finetune"],
        "conf=demo",
        f"model.name_or_path={tiny_models['neo']}",
        "model.tiny=null",
        "trainer.max_steps=2",
        f"output_dir={run_dir}",
        timeout=600,
    )
    assert out.returncode == 0, _explain(out)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["exit_code"] == 0 and record["global_steps"] == 2
    assert record["data"]["train_rows"] == 288  # the demo data shipped in the wheel
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "config.yaml",
        "data_template.yaml",
    ):
        assert (run_dir / name).is_file(), name
    assert not list(installed["cwd"].iterdir()), "the run wrote into the working directory"
