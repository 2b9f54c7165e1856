"""Every config key with its one-line doc: what `finetune train --help` lists (and tests/test_cli.py checks).

Our keys' docs are the attribute docstrings of finetune/config/schema.py (the string right after each field), read
with `ast`. `trainer.*` and `strategy.*` belong to trl.SFTConfig and peft.LoraConfig, whose fields carry
`metadata={"help": ...}`; importing trl or peft takes about 10 s (torch, transformers), so their help texts are read
with `ast` from the installed libraries' source files instead (about 50 ms), and the classes are imported only when a
release has moved a field out of the files named in LIBRARIES. Values come from composing a preset (Hydra, ~0.3 s).
Nothing here imports torch.

Listed by default: every key of the schema and every key a file in conf/ sets; `everything=True` (`finetune train
--help all`) adds every field of trl.SFTConfig and peft.LoraConfig.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

SCHEMA_FILE = Path(__file__).with_name("schema.py")
SECTIONS = (
    "",
    "model",
    "data",
    "strategy",
    "objective",
    "trainer",
    "distributed",
    "card",
    "tracking",
)  # "": top-level keys
GROUPS = (
    "model",
    "strategy",
    "objective",
    "data",
    "trainer",
    "distributed",
)  # conf/GROUP/OPTION.yaml: keys are GROUP.KEY
NOT_GROUPS = ("accelerate",)  # conf/accelerate/: `accelerate launch --config_file` configs, not Hydra's
HYDRA_INTERNALS = ("defaults", "hydra", "_target_")  # Hydra's own keys in a conf file, never config keys

# trl.SFTConfig and peft.LoraConfig, each with its bases (first hit wins, as in the MRO): (package, file, class)
LIBRARIES = {
    "trainer": (
        "trl.SFTConfig",
        "trl",
        "SFTConfig",
        (
            ("trl", "trainer/sft_config.py", "SFTConfig"),
            ("trl", "trainer/base_config.py", "_BaseConfig"),
            ("transformers", "training_args.py", "TrainingArguments"),
        ),
    ),
    "objective": (  # each objective's trl config: its own method fields (TrainingArguments' are trainer.*)
        "trl's DPOConfig / KTOConfig / ORPOConfig / CPOConfig",
        "trl",
        "DPOConfig",
        (
            ("trl", "trainer/dpo_config.py", "DPOConfig"),
            ("trl", "trainer/kto_config.py", "KTOConfig"),
            ("trl", "experimental/orpo/orpo_config.py", "ORPOConfig"),
            ("trl", "experimental/cpo/cpo_config.py", "CPOConfig"),
        ),
    ),
    "strategy": (
        "peft.LoraConfig",
        "peft",
        "LoraConfig",
        (
            ("peft", "tuners/lora/config.py", "LoraConfig"),
            ("peft", "config.py", "PeftConfig"),
            ("peft", "config.py", "PeftConfigMixin"),
        ),
    ),
}
# where we give a library key a meaning of ours, said after the library's own doc
NOTES = {
    "trainer.bf16": "Ours: auto (the default) is bf16 where the hardware computes it natively, else fp32.",
}
VALUE_WIDTH = 40  # longer values are shortened in the middle
KEY_COLUMN = 52  # docs start here (or two spaces after a longer KEY=VALUE)


@dataclass(frozen=True)
class Key:
    name: str  # dotted, as on the command line: model.dtype, trainer.learning_rate, seed
    doc: str  # one line; "" when the key has none (tests/test_cli.py fails on that)
    source: str  # "ours", "trl.SFTConfig" or "peft.LoraConfig"


def one_line(text: str | None) -> str:
    """A doc on one line: whitespace collapsed, HTML tags and argparse's %% undone."""
    text = re.sub(r"<[^>]+>", "", text or "").replace("%%", "%")
    return " ".join(text.split())


def first_sentence(text: str | None) -> str:
    """The first sentence of a library's help (theirs run to a paragraph)."""
    line = one_line(text)
    return re.split(r"(?<=[.!?])\s+(?=[A-Z`\[])", line, maxsplit=1)[0]


def section_of(key: str) -> str:
    head = key.split(".", 1)[0]
    return head if "." in key and head in SECTIONS else ""


# --- our keys: finetune/config/schema.py ----------------------------------------------------------------------------


@cache
def _schema_classes() -> dict[str, list[tuple[str, str, str]]]:
    """Class name -> [(field, annotation, docstring or "")] in source order, read from schema.py with ast."""
    tree = ast.parse(SCHEMA_FILE.read_text(encoding="utf-8"))
    classes = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields, body = [], node.body
        for index, statement in enumerate(body):
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                after = body[index + 1] if index + 1 < len(body) else None
                text = after.value if isinstance(after, ast.Expr) else None
                doc = text.value if isinstance(text, ast.Constant) and isinstance(text.value, str) else ""
                fields.append((statement.target.id, ast.unparse(statement.annotation), doc))
        classes[node.name] = fields
    return classes


def _section_classes() -> dict[str, str]:
    """Section -> the schema class holding its keys: RunConfig's fields typed by a schema class, and StrategyKeys."""
    classes = _schema_classes()
    sections = {name: annotation for name, annotation, _ in classes["RunConfig"] if annotation in classes}
    return {**sections, "strategy": "StrategyKeys", "objective": "ObjectiveKeys"}


def schema_keys() -> dict[str, str]:
    """Every key of our schema -> its docstring on one line ("" when it has none), in schema order per section."""
    classes, sections = _schema_classes(), _section_classes()
    keys = {}
    for name, annotation, doc in classes["RunConfig"]:
        if name not in sections and name not in LIBRARIES:
            keys[name] = one_line(doc)
    for section in SECTIONS[1:]:
        for name, _, doc in classes.get(sections.get(section, ""), []):
            keys[f"{section}.{name}"] = one_line(doc)
    return keys


def section_docs() -> dict[str, str]:
    """Section -> what it is: the docstring of RunConfig's field of that name."""
    return {name: one_line(doc) for name, _, doc in _schema_classes()["RunConfig"] if name in SECTIONS}


# --- the keys conf/ sets -------------------------------------------------------------------------------------------


def _conf_dir() -> Path:
    from finetune.config.compose import CONF_DIR

    return CONF_DIR


def _load_yaml(path: Path) -> dict:
    import yaml

    return yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}


def _default_options(conf_dir: Path) -> dict[str, str]:
    """Group -> the option conf/config.yaml selects (listed first, so keys come in the order a reader meets them)."""
    base = _load_yaml(conf_dir / "config.yaml")
    return {k: v for entry in base.get("defaults", []) if isinstance(entry, dict) for k, v in entry.items()}


def conf_keys(conf_dir: Path | None = None) -> dict[str, list[str]]:
    """Every key some file in conf/ sets -> where (`conf=demo`, `strategy=qlora`, `model/_family_neo`), in reading
    order: config.yaml, each group (its default option first), then the presets. Group files' keys are GROUP.KEY;
    a preset's top-level keys are themselves and its section dicts (trainer:, card:, ...) give SECTION.KEY; values
    are never walked into (distributed.deepspeed is one key whose value is DeepSpeed's dict)."""
    conf_dir = conf_dir or _conf_dir()
    found: dict[str, list[str]] = {}

    def add(key: str, where: str) -> None:
        found.setdefault(key, [])
        if where not in found[key]:
            found[key].append(where)

    defaults = _default_options(conf_dir)
    presets = [conf_dir / "config.yaml", *sorted(p for p in conf_dir.glob("*.yaml") if p.stem != "config")]
    for group in GROUPS:
        files = sorted((conf_dir / group).glob("*.yaml"), key=lambda p: (p.stem != defaults.get(group), p.stem))
        for path in files:
            data = _load_yaml(path)
            where = f"{group}/{path.stem}" if path.stem.startswith("_") else f"{group}={path.stem}"
            for key in data:
                if key not in HYDRA_INTERNALS:
                    add(f"{group}.{key}", where)
    for path in presets:
        data = _load_yaml(path)
        where = "conf/config.yaml" if path.stem == "config" else f"conf={path.stem}"
        for key, value in data.items():
            if key in HYDRA_INTERNALS:
                continue
            if key in SECTIONS and isinstance(value, dict):
                for sub in value:
                    if sub not in HYDRA_INTERNALS:
                        add(f"{key}.{sub}", where)
            else:
                add(key, where)
    return found


# --- trl's and peft's keys -----------------------------------------------------------------------------------------


@cache
def _library_fields(section: str) -> dict[str, str | None]:
    """Field -> help text of the library class behind `trainer` / `strategy`, read from its source files with ast
    (fields declared with init=False are left out). Empty when a file is not where LIBRARIES says."""
    fields: dict[str, str | None] = {}
    for package, relative, class_name in LIBRARIES[section][3]:
        spec = importlib.util.find_spec(package)  # a top-level package: located, not imported
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError):
            continue
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == class_name:
                for statement in node.body:
                    if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                        name = statement.target.id
                        if name.startswith("_") or name in fields:
                            continue
                        init, help_text = _field_call(statement.value)
                        if init:
                            fields[name] = help_text
    return fields


def _field_call(value: ast.expr | None) -> tuple[bool, str | None]:
    """(init, metadata["help"]) of a `field(...)` default; (True, None) for a plain default."""
    if not isinstance(value, ast.Call):
        return True, None
    init, help_text = True, None
    for keyword in value.keywords:
        if keyword.arg == "init" and isinstance(keyword.value, ast.Constant):
            init = bool(keyword.value.value)
        if keyword.arg == "metadata" and isinstance(keyword.value, ast.Dict):
            for k, v in zip(keyword.value.keys, keyword.value.values):
                if isinstance(k, ast.Constant) and k.value == "help":
                    try:
                        help_text = str(ast.literal_eval(v))
                    except ValueError:
                        help_text = None  # an f-string or a call: left to the import fallback
    return init, help_text


def library_docs(section: str, names=None) -> dict[str, str]:
    """Field -> one-line help of trl.SFTConfig (`trainer`) or peft.LoraConfig (`strategy`) for `names` (default: all
    their fields). Read from source; only a name the source files lack sends us to the imported class (~10 s)."""
    fields = _library_fields(section)
    docs = {name: first_sentence(text) for name, text in fields.items() if text and (names is None or name in names)}
    if names is None:
        if fields:
            return docs
        lacking = None  # nothing read from source: every field of the imported class
    else:
        lacking = [name for name in names if name not in fields]
        if not lacking:
            return docs
    imported = _imported_fields(section)
    for name in imported if lacking is None else lacking:
        if imported.get(name):
            docs[name] = first_sentence(imported[name])
    return docs


def _imported_fields(section: str) -> dict[str, str | None]:
    """The fallback: field -> help of the imported class ({} when it does not import)."""
    import dataclasses

    _, module, class_name, _ = LIBRARIES[section]
    try:
        cls = getattr(importlib.import_module(module), class_name)
    except Exception:  # noqa: BLE001 - not installed or broken: the keys are listed without a doc
        return {}
    return {f.name: f.metadata.get("help") for f in dataclasses.fields(cls) if f.init}


def _library_extras(section: str) -> dict[str, str]:
    """Library fields whose doc is ours (`--help all`): trainer keys another key owns, strategy fields we refuse."""
    if section in ("trainer", "objective"):
        from finetune.config.objective_checks import OWNED_OBJECTIVE_KEYS
        from finetune.config.validate import OWNED_TRAINER_KEYS

        owned = OWNED_TRAINER_KEYS if section == "trainer" else OWNED_OBJECTIVE_KEYS
        return {name: f"Ours: set through {where} instead." for name, where in owned.items()}
    from finetune.models.strategy import REFUSED_FIELDS

    return {name: f"Refused: {one_line(reason).split(';')[0]}." for name, reason in REFUSED_FIELDS.items()}


# --- the listing ---------------------------------------------------------------------------------------------------


def keys(everything: bool = False, conf_dir: Path | None = None) -> list[Key]:
    """Every key to list, grouped by SECTIONS: schema keys in schema order, then keys only conf/ sets (all of
    trainer.*, most of strategy.*) in reading order; `everything`: then every other field of trl/peft's class."""
    ours, in_conf = schema_keys(), conf_keys(conf_dir)
    names_by_section: dict[str, list[str]] = {section: [] for section in SECTIONS}
    for name in [*ours, *in_conf]:
        if name not in names_by_section[section_of(name)]:
            names_by_section[section_of(name)].append(name)
    if "strategy.name" in names_by_section["strategy"]:  # conf order for strategy (name, r, lora_alpha, ...)
        names_by_section["strategy"].sort(key=lambda n: list(in_conf).index(n) if n in in_conf else len(in_conf))
    result = []
    for section in SECTIONS:
        names = names_by_section[section]
        if section in LIBRARIES:
            leaves = [n.split(".", 1)[1] for n in names if n not in ours]
            extras = _library_extras(section) if everything else {}
            if everything:
                leaves += [n for n in _library_fields(section) if n not in leaves and f"{section}.{n}" not in ours]
                names = [*names, *(f"{section}.{n}" for n in leaves if f"{section}.{n}" not in names)]
            docs = library_docs(section, [n for n in leaves if n not in extras])
            label = LIBRARIES[section][0]
            for name in names:
                leaf = name.split(".", 1)[1]
                if name in ours:
                    result.append(Key(name, ours[name], "ours"))
                else:
                    doc = extras.get(leaf) or " ".join(filter(None, (docs.get(leaf, ""), NOTES.get(name, ""))))
                    result.append(Key(name, doc, label))
        else:
            result += [Key(name, ours.get(name, ""), "ours") for name in names]
    return result


def preset_values(preset: str) -> dict:
    """The composed, resolved preset as plain dicts, or {} when it does not compose (the listing goes on without)."""
    try:
        from finetune.config.compose import compose, to_container

        return to_container(compose(preset))
    except Exception:  # noqa: BLE001 - help must print whatever the preset's state
        return {}


_MISSING = object()


def _lookup(values: dict, name: str):
    node = values
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def show(value) -> str:
    """A value as one would type it on the command line (YAML flow style), shortened in the middle past VALUE_WIDTH."""

    def flow(v) -> str:
        if v is None:
            return "null"
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(map(flow, v)) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {flow(x)}" for k, x in v.items()) + "}"
        return " ".join(str(v).split()) or "''"

    text = flow(value)
    if len(text) <= VALUE_WIDTH:
        return text
    head = (VALUE_WIDTH - 1) * 2 // 5
    return text[:head] + "…" + text[len(text) - (VALUE_WIDTH - 1 - head) :]


def _where(places: list[str]) -> str:
    """`distributed=zero2|zero3, conf=qlora_neox20b`: the options of one group joined."""
    options: dict[str, list[str]] = {}
    for place in places:
        head, _, option = place.partition("=")
        options.setdefault(head, []).append(option)
    return ", ".join(f"{head}={'|'.join(opts)}" if all(opts) else head for head, opts in options.items())


def listing(preset: str | None = None, everything: bool = False) -> str:
    """The key listing of `finetune train --help`: one line per key, `KEY=VALUE  doc [where]`, by section."""
    from finetune.config.compose import DEFAULT_PRESET

    preset = preset or DEFAULT_PRESET
    values, in_conf, headers = preset_values(preset), conf_keys(), section_docs()
    lines = [
        f"config keys: KEY=VALUE as conf={preset} composes it"
        + ("" if values else " (it does not compose: values left out)")
        + f", then what the key does; [where] names the conf files that set a key conf={preset} leaves out.",
        "  Another preset's values: finetune train --help conf=NAME."
        + ("" if everything else " Every field of trl.SFTConfig and peft.LoraConfig: finetune train --help all."),
    ]
    entries = keys(everything)
    rows = []
    for key in entries:
        value = _lookup(values, key.name)
        left = f"  {key.name}" if value is _MISSING else f"  {key.name}={show(value)}"
        where = in_conf.get(key.name, [])
        hint = f" [{_where(where)}]" if value is _MISSING and where else ""
        rows.append((section_of(key.name), left, key.doc + hint))
    width = min(KEY_COLUMN, max(len(left) for _, left, _ in rows))
    current = None
    for section, left, doc in rows:
        if section != current:
            current = section
            title = f"{section}.*" if section else "top-level"
            lines += ["", f"{title}: {headers.get(section, 'the run itself (conf/config.yaml).')}"]
        lines.append(f"{left:<{width}}  {doc}".rstrip() if doc else left)
    return "\n".join(lines)
