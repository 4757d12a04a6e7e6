"""Hydra composition, up-front validation and one-line config errors.

Hydra itself rejects unknown group options and unknown override keys (configs are in struct mode), but
with multi-line messages and exit code 1, and only after creating an output directory. We compose once
before Hydra runs, convert every composition error to one line, and check what Hydra cannot:

* required values (``???``) left unset;
* keys of ``_target_`` nodes that the target does not accept (a typo in a YAML file), with a suggestion;
* literal values whose type does not match the target's annotation (``trainer.max_steps=abc``);
* sections with a dataclass schema (``backbone``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from xa_lightning.errors import UserError
from xa_lightning.paths import repo_root


def config_dir() -> Path:
    path = repo_root() / "conf"
    if not (path / "train.yaml").is_file():
        raise UserError(f"config directory {path} not found; run from a checkout (pip install -e .) or set XA_ROOT")
    return path


# Sections validated against a dataclass schema: config key -> "module:Class".
SCHEMAS: dict[str, str] = {
    "backbone": "xa_lightning.backbones.config:BackboneConfig",
}


EXPERIMENT_NAME_RESOLVER = "xa.experiment_name"


def experiment_run_name(choice: str | None, default: str = "run") -> str:
    """The run name an experiment gets unless it sets one: its path in experiments/, ``/`` -> ``_``."""
    return str(choice).replace("/", "_") if choice else default


def _experiment_name_of_job(default: str = "run") -> str:
    """``${xa.experiment_name:}`` inside a Hydra job: the job's own ``experiment=`` choice (so each job of
    ``-m experiment=a,b`` is named after its experiment)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return default
    return experiment_run_name(HydraConfig.get().runtime.choices.get("experiment"), default)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("xa.root"):
        OmegaConf.register_new_resolver("xa.root", lambda: str(repo_root()))
    if not OmegaConf.has_resolver(EXPERIMENT_NAME_RESOLVER):
        OmegaConf.register_new_resolver(EXPERIMENT_NAME_RESOLVER, _experiment_name_of_job)


# ---------------------------------------------------------------------------------------------- values
def to_plain(value: Any) -> Any:
    """OmegaConf containers (what Hydra's instantiate may pass) as plain Python values; others unchanged."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def coerce_options(value: Any, cls: type, key: str) -> Any:
    """A method's option dataclass from None, an instance, or a (Hydra) mapping; unknown keys -> UserError."""
    import dataclasses
    from collections.abc import Mapping

    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        value = {k: v for k, v in dict(to_plain(value)).items() if k != "_target_"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f" (did you mean {key}.{close[0]}?)" if close else f"; valid keys: {', '.join(sorted(known))}"
            raise UserError(f"{key}.{unknown[0]} is not a setting of {cls.__name__}{hint}")
        return cls(**value)
    raise TypeError(f"{key}: expected {cls.__name__} or a mapping, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------- compose
def _first_of_sweeps(overrides: Iterable[str]) -> list[str]:
    """Overrides for one job of a sweep: the first value of each sweep; Hydra's own keys dropped."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    result = []
    for override in parsed:
        key = override.get_key_element()
        if key.startswith("hydra") or key.lstrip("+~").startswith("hydra"):
            continue
        if override.is_interval_sweep():  # an Optuna search space: validate with its lower bound
            result.append(f"{key}={override.value().start}")
        elif override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            result.append(f"{key}={first}")
        else:
            result.append(override.input_line)
    return result


def compose(config_name: str, overrides: Iterable[str] = ()) -> DictConfig:
    """Compose a config the way the CLI does (for tests and for the pre-check); errors become UserError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(
                config_name=config_name, overrides=_first_of_sweeps(overrides), return_hydra_config=True
            )
    except UserError:
        raise
    except Exception as exc:  # hydra / omegaconf errors have many types; all become one line
        raise UserError(one_line(exc)) from exc
    finally:
        GlobalHydra.instance().clear()
    return _without_hydra_node(cfg)


def _without_hydra_node(cfg: DictConfig) -> DictConfig:
    """The job config as a Hydra job sees it, with ``run_name`` fixed from the experiment choice: outside a
    Hydra job there is no HydraConfig for ``${xa.experiment_name:}`` to read."""
    choice = OmegaConf.select(cfg, "hydra.runtime.choices.experiment", default=None)
    with open_dict(cfg):
        if "run_name" in cfg and EXPERIMENT_NAME_RESOLVER in str(cfg._get_node("run_name")._value()):
            cfg.run_name = experiment_run_name(choice)
        del cfg["hydra"]
    return cfg


def one_line(exc: BaseException) -> str:
    """Hydra's multi-line composition errors as one line that says what to do."""
    text = str(exc).strip()
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing:
        group, _, option = missing.group(1).rpartition("/")
        options = (
            re.findall(r"^\s+(\S+)\s*$", text.split("Available options", 1)[-1], flags=re.M)
            if "Available options" in text
            else []
        )
        hint = f"; available: {', '.join(options)}" if options else ""
        if group:
            return f"{group}={option} is not a config option{hint}"
        return f"config {option!r} not found{hint}"
    struct = re.search(
        r"Could not override '([^']+)'.*?(is not in struct|To append to your config use)", text, flags=re.S
    )
    if struct:
        key = struct.group(1)
        return f"unknown config key {key!r}; check its spelling (to add a new key on purpose use +{key}=...)"
    append = re.search(r"Could not append to config. An item is already at '([^']+)'", text)
    if append:
        return f"config key {append.group(1)!r} already exists; override it without '+'"
    first = text.splitlines()[0] if text else type(exc).__name__
    return re.sub(r"\s+", " ", first)


def instantiate(node: Any, **kwargs: Any) -> Any:
    """Hydra's instantiate, but a UserError raised by a constructor surfaces as itself (one line)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


# ---------------------------------------------------------------------------------------------- validate
def validate(cfg: DictConfig) -> None:
    """Check a composed config before anything runs; raises UserError with one line."""
    missing = [k for k in _missing_keys(cfg) if not k.startswith("hydra")]
    if missing:
        key = missing[0]
        raise UserError(f"config key {key} is required: set {key}=... on the command line or in an experiment file")
    for key, schema_path in SCHEMAS.items():
        node = OmegaConf.select(cfg, key, throw_on_missing=False)
        if isinstance(node, DictConfig):
            validate_schema(node, schema_path, key)
    _validate_targets(cfg, path="")


def _missing_keys(node: Any, path: str = "") -> list[str]:
    """Keys whose value is ``???``, without resolving interpolations (they may need Hydra's runtime)."""
    found = []
    if isinstance(node, DictConfig):
        items = [(str(k), k) for k in node]
    elif isinstance(node, ListConfig):
        items = [(f"[{i}]", i) for i in range(len(node))]
    else:
        return found
    for label, key in items:
        child_path = (f"{path}.{label}" if path and not label.startswith("[") else f"{path}{label}") if path else label
        if OmegaConf.is_missing(node, key):
            found.append(child_path)
        elif not OmegaConf.is_interpolation(node, key):
            found.extend(_missing_keys(node._get_node(key), child_path))
    return found


def validate_schema(node: DictConfig, schema_path: str, key: str) -> None:
    schema_cls = _import(schema_path, key)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema_cls), node)
    except Exception as exc:
        raise UserError(_omegaconf_message(exc, key)) from exc
    obj = OmegaConf.to_object(merged)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()


def _omegaconf_message(exc: Exception, prefix: str) -> str:
    full_key = getattr(exc, "full_key", None) or ""
    key = f"{prefix}.{full_key}" if full_key else prefix
    msg = str(exc).splitlines()[0]
    if "not in struct" in str(exc) or "Key '" in msg and "not" in msg:
        return f"unknown config key {key!r}; check its spelling"
    return f"{key}: {msg}"


def _import(path: str, key: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not attr:
        module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"{key}: cannot import {path!r} ({exc})") from exc


def _validate_targets(node: Any, path: str) -> None:
    if isinstance(node, DictConfig):
        if "_target_" in node and not OmegaConf.is_interpolation(node, "_target_"):
            _check_target_node(node, path)
        for key in node:
            if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
                continue
            child_path = f"{path}.{key}" if path else str(key)
            if child_path == "hydra":
                continue
            _validate_targets(node._get_node(key), child_path)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            if not OmegaConf.is_interpolation(node, i):
                _validate_targets(node._get_node(i), f"{path}[{i}]")


def _check_target_node(node: DictConfig, path: str) -> None:
    target = _import(str(node["_target_"]), f"{path}._target_")
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    params = signature.parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:
        hints = {}
    for key in node:
        key = str(key)
        if key.startswith("_") and key.endswith("_"):
            continue
        if key not in params:
            if takes_kwargs:
                continue
            close = difflib.get_close_matches(key, [p for p in params if p not in ("self", "args", "kwargs")], n=1)
            hint = f" (did you mean {path}.{close[0]}?)" if close else ""
            raise UserError(f"{path}.{key} is not a parameter of {node['_target_']}{hint}")
        if OmegaConf.is_interpolation(node, key) or key not in hints:
            continue
        value = node._get_node(key)._value() if hasattr(node._get_node(key), "_value") else node[key]
        if isinstance(value, (DictConfig, ListConfig)):
            continue
        if not _matches(value, hints[key]):
            raise UserError(f"{path}.{key}={value!r} has the wrong type; expected {_type_name(hints[key])}")


_SIMPLE = {int, float, bool, str}


def _matches(value: Any, annotation: Any) -> bool:
    """True unless the annotation is made of simple types and the value fits none of them."""
    options = _simple_options(annotation)
    if options is None:  # not a simple annotation: nothing to check
        return True
    if value is None:
        return type(None) in options
    if isinstance(value, bool):
        return bool in options or str in options
    if isinstance(value, int):
        return bool(options & {int, float, str})
    if isinstance(value, float):
        return float in options or str in options
    if isinstance(value, str):
        return str in options
    return True


def _simple_options(annotation: Any) -> set | None:
    if annotation in _SIMPLE:
        return {annotation}
    origin = typing.get_origin(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        options: set = set()
        for arg in typing.get_args(annotation):
            if arg is type(None):
                options.add(type(None))
                continue
            sub = _simple_options(arg)
            if sub is None:
                return None
            options |= sub
        return options
    if origin is typing.Literal:
        return {type(a) for a in typing.get_args(annotation)}
    return None


def _type_name(annotation: Any) -> str:
    options = _simple_options(annotation) or set()
    names = sorted("None" if o is type(None) else o.__name__ for o in options)
    return " or ".join(names) or str(annotation)
