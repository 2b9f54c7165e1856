"""Where the presets live and how a command line becomes a config: Hydra composition, and the pre-flight check that
reports every unknown preset, group option or key at once (with a suggestion) before anything loads.

Cheap to import: the commands import it before deciding whether torch is needed at all.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.errors import did_you_mean

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def _shipped(name: str) -> Path:
    """conf/ and data_templates/ sit at the repository's top level; a wheel carries them inside the package
    (finetune/conf, finetune/data_templates: pyproject's package-dir), so an installed toolkit finds them too."""
    inside = PACKAGE_DIR / name
    return inside if inside.is_dir() else PACKAGE_DIR.parent / name


CONF_DIR = _shipped("conf")
TEMPLATES_DIR = _shipped("data_templates")
DEMO_DATA_DIR = PACKAGE_DIR / "demo_data"
DEFAULT_PRESET = "demo"
LIBRARY_SECTIONS = ("trainer.", "strategy.")  # keys owned by trl / peft, validated against their classes
OPEN_SECTIONS = (*LIBRARY_SECTIONS, "data.columns.")  # keys a user may add without Hydra's `+`


def _bundled_data(name: str) -> str:
    return str(DEMO_DATA_DIR / name)


def _bundled_pair(path, train_name: str, heldout_name: str) -> str | None:
    """The bundled held-out file, but only while `path` is still the bundled training file it belongs to: a user who
    sets data.path to their own rows gets their own held-out split (data.eval_fraction), never the demo's rows."""
    if isinstance(path, str) and Path(path).expanduser().resolve() == (DEMO_DATA_DIR / train_name).resolve():
        return _bundled_data(heldout_name)
    return None


def register_resolvers() -> None:
    """`${finetune_data:NAME}` points at a file bundled with the package (the demo data);
    `${finetune_heldout:${.path},TRAIN,HELDOUT}` at bundled HELDOUT while data.path is bundled TRAIN, else null."""
    if not OmegaConf.has_resolver("finetune_data"):
        OmegaConf.register_new_resolver("finetune_data", _bundled_data)
    if not OmegaConf.has_resolver("finetune_heldout"):
        OmegaConf.register_new_resolver("finetune_heldout", _bundled_pair)


def split_preset(args: list[str]) -> tuple[str, list[str]]:
    """The preset named by `conf=NAME` (DEFAULT_PRESET when none; the last one wins) and the other arguments: how
    `python -m finetune`, finetune.plan and finetune.preview read a command line."""
    name, rest = DEFAULT_PRESET, []
    for arg in args:
        if arg.startswith("conf="):
            name = arg.split("=", 1)[1].removesuffix(".yaml")
        else:
            rest.append(arg)
    return name, rest


def compose(config_name: str = DEFAULT_PRESET, overrides: list[str] | None = None) -> DictConfig:
    """Compose a preset the way the CLI does, for tests, notebooks and tools (no output dir is created).

    `${hydra:...}` interpolations resolve as they would in a real run.
    """
    return compose_with_overrides(config_name, overrides)[0]


def compose_with_overrides(config_name: str, overrides: list[str] | None = None) -> tuple[DictConfig, list[str]]:
    """Compose; return the config and the overrides as Hydra finally took them.

    `trainer.*` and `strategy.*` are trl's and peft's keys: any of their fields may be set without Hydra's `+`
    (`trainer.max_steps=100`), and so may `data.columns.FIELD=COLUMN`. Such an override is retried as
    `++key=value`; validate.py then checks the name against trl.SFTConfig / peft.LoraConfig / the template's fields,
    with a suggestion when it is misspelled.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import ConfigCompositionException

    register_resolvers()
    overrides = list(overrides or [])
    for _ in range(len(overrides) + 1):
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name="train"):
                cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
            break
        except ConfigCompositionException as err:
            index = _library_key_override(err, overrides)
            if index is None:
                raise
            overrides[index] = "++" + overrides[index]
    HydraConfig.instance().set_config(cfg)  # lets ${hydra:job.config_name} resolve as in a real run
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, overrides


def _library_key_override(err: Exception, overrides: list[str]) -> int | None:
    """Index of the plain `trainer.x=` / `strategy.x=` override Hydra refused as not in struct, if that is the error."""
    refused = _refused_key(err)
    for index, override in enumerate(overrides):
        key = override.split("=", 1)[0]
        if key.startswith(OPEN_SECTIONS) and key == refused:
            return index
    return None


def _refused_key(err: Exception) -> str | None:
    """The key or group option a Hydra composition error is about, read from the error's fields, not its wording:
    a missing group option's `missing_cfg_file` (model/gpt_neox_2b), an unknown key's OmegaConf `full_key`."""
    from hydra.errors import MissingConfigException

    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        return err.missing_cfg_file
    return getattr(err.__cause__, "full_key", None) or None


def presets() -> list[str]:
    """Names accepted by `conf=`: every top-level YAML in conf/ except the shared base."""
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml") if p.stem != "config")


def group_options(group: str) -> list[str]:
    """Selectable options of a config group (files starting with _ are shared bases, not options)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain dicts and lists (what we save and validate)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def preflight(config_name: str, overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """Compose once. Return one message per unknown preset, group option or key (empty when all is well),
    and how each override was finally taken (`trainer.max_steps=5` becomes `++trainer.max_steps=5`)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException

    from finetune.config.compose import compose_with_overrides, presets

    if config_name not in presets():
        return [_unknown("preset", f"conf={config_name}", config_name, presets(), "conf=NAME")], {}
    syntax = syntax_problems(overrides)
    if syntax:
        return syntax, {}
    problems, remaining = [], list(overrides)
    for _ in range(len(overrides) + 1):
        try:
            _, taken = compose_with_overrides(config_name, remaining)
            return problems, dict(zip(remaining, taken))
        except (ConfigCompositionException, MissingConfigException) as err:
            bad = _blame(err, remaining)
            if bad is None:
                return [*problems, str(err).strip()], {}
            problems.append(_explain(bad, config_name))
            remaining.remove(bad)
    return problems, {}


def syntax_problems(overrides: list[str]) -> list[str]:
    """One message per override Hydra's grammar rejects (an unclosed bracket or quote), quoting it with the fix."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser, problems = OverridesParser.create(), []
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException as err:
            why = str(err).splitlines()[0]
            problems.append(
                f"command-line override '{override}' is not valid override syntax ({why}); close brackets "
                "and quotes: a list is key=[a,b], a value with brackets, commas or spaces is quoted: "
                "'key=\"text\"'"
            )
    return problems


def _blame(err: Exception, overrides: list[str]) -> str | None:
    """The override an error is about: from the error's fields (_refused_key); only errors that carry none (an
    append `+key=` onto an existing key) are matched by the key Hydra quotes in its message."""
    refused = _refused_key(err)
    for override in overrides:
        key, value = override.split("=", 1)
        key = key.lstrip("+~")
        if refused in (key, f"{key}/{value}") or (refused is None and f"'{key}'" in str(err)):
            return override
    return None


def _explain(override: str, config_name: str) -> str:
    key, value = override.split("=", 1)
    key = key.lstrip("+~")
    if (CONF_DIR / key).is_dir():  # a group selection such as model=gpt_neox_2b
        return _unknown(f"'{key}' option", override, value, group_options(key), f"{key}=NAME")
    parent, _, leaf = key.rpartition(".")
    node = compose(config_name, [])
    for part in filter(None, parent.split(".")):
        node = node.get(part) if hasattr(node, "get") else None
    known = list(node.keys()) if hasattr(node, "keys") else []
    if leaf in known and override.startswith("+") and not override.startswith("++"):
        return f"'{override}': {key} is already set, and '+' only adds new keys; drop the '+' ({override[1:]})"
    return f"unknown key '{key}' in command-line override '{override}'{did_you_mean(leaf, known)}"


def _unknown(what: str, given: str, name: str, known: list[str], form: str) -> str:
    hint = did_you_mean(name, known)
    return f"unknown {what} in '{given}'{hint}; choose one of: {', '.join(known)} ({form})"
