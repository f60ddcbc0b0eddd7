"""Recipes: one YAML file per runnable pipeline, read into typed dataclasses.

A recipe names a pipeline (``progressive``, ``consistency``, ``clip-distill``, ...) and gives its sections.
The common sections (``train``, ``eval``) have fixed types; ``method`` and ``student`` are typed by the
pipeline's own config classes, found through a fixed table in this module (never through YAML tags, so a
recipe cannot import or call arbitrary code).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Union

import yaml


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false are booleans.

    Under PyYAML's YAML 1.1 rules ``mixed_precision: no`` (accelerate's own spelling) and ``--set
    train.mixed_precision=no`` would read as False; here yes/no/on/off stay strings. Safety is SafeLoader's.
    """


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def read_yaml(text: str) -> Any:
    """Parse recipe YAML safely (no Python objects) with YAML 1.2 booleans."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader

from vlkd.errors import RecipeError


@dataclass
class TrainConfig:
    """Hyperparameters of the training loop, shared by every pipeline."""

    steps: int = 1000  # optimizer steps (per round for round-based methods)
    batch_size: int = 64  # global batch: split across processes and accumulation steps
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    ema_decay: float | None = None  # EMA of the student for evaluation and export; None: no EMA
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 25
    num_workers: int = 0
    attention: str = "auto"  # vlkd.kernels backend installed into every trained model


@dataclass
class EvalConfig:
    """What to measure after training."""

    num_samples: int = 1000
    steps: list[int] = field(default_factory=list)  # sampler step counts to evaluate (diffusion)
    features: list[str] = field(default_factory=lambda: ["digits-classifier"])
    batch_size: int = 100
    enabled: bool = True
    zero_shot: list[str] = field(default_factory=list)  # CLIP: SPEC:TASK[@SPLIT] datasets; default: shapes tasks
    # Text-to-image students on shapes data: sample the first num_samples shapes *test* captions (not train ones),
    # measure FD against the data's test split (all 2,000 images) and prompt fidelity (vlkd.eval.fidelity) on the
    # same images; the fidelity figures join the FD rows of each step count in vlkd.json.
    fidelity: bool = False


@dataclass
class PipelineSpec:
    """How a pipeline name maps to its typed sections and its runner."""

    name: str
    method_config: type
    student_config: type | None
    run: Callable[..., Any]  # run(recipe, out_dir: Path, *, resume: bool, overwrite: bool) -> Path
    text_to_image: bool = False  # its students take prompts (what eval.fidelity measures)


@dataclass
class Recipe:
    """A validated recipe. ``method`` and ``student`` are instances of the pipeline's config classes."""

    pipeline: str
    teacher: str
    data: str
    method: Any
    student: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str = ""
    description: str = ""
    source: str = ""  # the file it was read from
    raw: dict = field(default_factory=dict)  # the recipe as read plus overrides, for vlkd.json


# Pipeline name -> "module:ATTRIBUTE" holding its PipelineSpec. A fixed table, not a plugin hook read from YAML.
_PIPELINES: dict[str, str] = {
    "progressive": "vlkd.diffusion.runner:PROGRESSIVE",
    "consistency": "vlkd.diffusion.runner:CONSISTENCY",
    "lcm": "vlkd.diffusion.lcm_runner:LCM",
    "lcm-lora": "vlkd.diffusion.lcm_runner:LCM_LORA",
    "clip-distill": "vlkd.clip.runner:CLIP_DISTILL",
}
_REGISTERED: dict[str, PipelineSpec] = {}


def register_pipeline(spec: PipelineSpec) -> None:
    """Make a pipeline available to recipes from Python (for users extending vlkd)."""
    _REGISTERED[spec.name] = spec


def pipeline_names() -> list[str]:
    """Names a recipe's ``pipeline`` key may take."""
    return sorted(set(_PIPELINES) | set(_REGISTERED))


def get_pipeline(name: str, where: str = "recipe") -> PipelineSpec:
    """The PipelineSpec for ``name``; a RecipeError listing the known names otherwise."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _PIPELINES:
        raise RecipeError(f"{where}: unknown pipeline {name!r}; known: {', '.join(pipeline_names())}")
    module_name, attribute = _PIPELINES[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("vlkd"):
            raise RecipeError(f"{where}: pipeline {name!r} is not available in this version of vlkd") from exc
        raise
    return getattr(module, attribute)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read ``path`` with a safe YAML loader (``read_yaml``), apply ``--set key.sub=value`` overrides, and validate every key."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path}: no such file; pass the path of a YAML recipe (see pipelines/)")
    try:
        raw = read_yaml(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"recipe {path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    return recipe_from_dict(raw, overrides, source=str(path))


def recipe_from_dict(raw: Any, overrides: list[str] | tuple[str, ...] = (), source: str = "recipe") -> Recipe:
    """Validate a recipe given as a dict (what ``load_recipe`` reads from YAML)."""
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {source}: expected a mapping of keys at the top level, got {_kind(raw)}")
    raw = _deep_copy(raw)
    for item in overrides:
        _apply_override(raw, item, source)
    where = f"recipe {source}"
    if "pipeline" not in raw:
        raise RecipeError(f"{where}: missing required key 'pipeline' (one of {', '.join(pipeline_names())})")
    if not isinstance(raw["pipeline"], str):
        raise RecipeError(f"{where}: key 'pipeline' must be a string, got {_kind(raw['pipeline'])}")
    schema = {f.name: f for f in dataclasses.fields(Recipe) if f.name not in ("source", "raw")}
    _check_keys(raw, schema, "", where)
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(Recipe)
    for name in schema:
        if name in ("method", "student"):
            continue
        if name in raw:
            values[name] = _convert(raw[name], hints[name], name, where)
        elif _required(schema[name]):
            raise RecipeError(f"{where}: missing required key {name!r}")
    spec = get_pipeline(raw["pipeline"], where)
    values["method"] = _convert(raw.get("method", {}) or {}, spec.method_config, "method", where)
    if spec.student_config is not None:
        values["student"] = _convert(raw.get("student", {}) or {}, spec.student_config, "student", where)
    elif raw.get("student") is not None:
        raise RecipeError(f"{where}: pipeline {spec.name!r} takes no 'student' section")
    if values.get("eval", EvalConfig()).fidelity and not spec.text_to_image:
        raise RecipeError(f"{where}: eval.fidelity measures text-to-image students (lcm, lcm-lora); pipeline "
                          f"{spec.name!r} takes no prompts, so leave eval.fidelity out")
    return Recipe(**values, source=source, raw=raw)


def recipe_to_dict(recipe: Recipe) -> dict:
    """The validated recipe as plain data (for vlkd.json and reports)."""
    out = {}
    for f in dataclasses.fields(recipe):
        if f.name in ("raw",):
            continue
        value = getattr(recipe, f.name)
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def parse_section(data: Any, cls: type, where: str, key: str = "") -> Any:
    """Validate ``data`` against the dataclass ``cls`` with the same rules and messages as recipes."""
    return _convert(data, cls, key, where)


# ---------------------------------------------------------------- validation


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


def _check_keys(data: dict, schema: dict, prefix: str, where: str) -> None:
    for key in data:
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(schema)}"
            raise RecipeError(f"{where}: unknown key '{prefix}{key}'{hint}")


def _convert(value: Any, annotation: Any, key: str, where: str) -> Any:
    """Check ``value`` against ``annotation`` and convert it (dataclasses, containers, scalars)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    label = key or "<top>"
    if annotation is Any or annotation is object:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, key, where)
            except RecipeError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else RecipeError(
            f"{where}: key '{label}' must be {_describe(annotation)}, got {_kind(value)}"
        )
    if origin is Literal:
        if value in args:
            return value
        raise RecipeError(f"{where}: key '{label}' must be one of {', '.join(map(repr, args))}, got {_kind(value)}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: key '{label}' must be a mapping of keys, got {_kind(value)}")
        fields = {f.name: f for f in dataclasses.fields(annotation) if f.init}
        prefix = f"{key}." if key else ""
        _check_keys(value, fields, prefix, where)
        hints = typing.get_type_hints(annotation)
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = _convert(value[name], hints[name], prefix + name, where)
            elif _required(f):
                raise RecipeError(f"{where}: missing required key '{prefix}{name}'")
        try:
            return annotation(**kwargs)
        except (ValueError, TypeError) as exc:  # __post_init__ checks of the config class
            raise RecipeError(f"{where}: section '{label}': {exc}") from None
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and origin is list and not isinstance(value, bool):
            value = [value]  # `steps: 4` reads as `steps: [4]`
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: key '{label}' must be a list, got {_kind(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise RecipeError(f"{where}: key '{label}' must have {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        converted = [_convert(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: key '{label}' must be a mapping, got {_kind(value)}")
        item = args[1] if args else Any
        return {k: _convert(v, item, f"{key}.{k}", where) for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is type(None):
        if value is None:
            return None
    else:
        raise TypeError(f"recipes cannot validate the annotation {annotation!r} of '{label}'")
    raise RecipeError(f"{where}: key '{label}' must be {_describe(annotation)}, got {_kind(value)}")


def _describe(annotation: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if annotation in names:
        return names[annotation]
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        return "a list"
    return getattr(annotation, "__name__", str(annotation))


def _apply_override(raw: dict, item: str, source: str) -> None:
    """``key.sub=value``: the value is read as YAML (``4``, ``1e-4``, ``[1, 2]``, ``null``, ``text``)."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, for example train.steps=100")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"--set {item!r}: empty key segment in {key!r}")
    try:
        value = read_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {item!r}: recipe {source} key {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
