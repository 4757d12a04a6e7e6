"""Hydra composition, up-front validation and one-line config errors.

Hydra itself rejects unknown group options and unknown override keys (configs are in struct mode), but
with multi-line messages and exit code 1, and only after creating an output directory. We compose once
before Hydra runs, convert every composition error to one line, and check what Hydra cannot:

* required values (``???``) left unset;
* keys of ``_target_`` nodes that the target does not accept (a typo in a YAML file), with a suggestion;
* literal values whose type does not match the target's annotation (``trainer.max_steps=abc``), also for
  options a class takes through ``**kwargs`` from a base class, and every value of a sweep;
* ranges of common parameters (``lr > 0``, ``max_steps >= -1``, ``batch_size >= 1``: :data:`RANGES`);
* sections with a dataclass schema (``backbone``).

:func:`check_option_dataclasses` builds every ``_target_`` option dataclass (its ``__post_init__`` checks
choices and ``init_weights`` paths); the CLI then checks ``ckpt_path`` and the data source
(``xa_lightning.cli.check_paths``).
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


def register_resolvers(overrides: Iterable[str] = ()) -> None:
    """Our resolvers, and the table runs of the tables ``overrides`` name (``+table=<name>``) as config options."""
    if not OmegaConf.has_resolver("xa.root"):
        OmegaConf.register_new_resolver("xa.root", lambda: str(repo_root()))
    if not OmegaConf.has_resolver(EXPERIMENT_NAME_RESOLVER):
        OmegaConf.register_new_resolver(EXPERIMENT_NAME_RESOLVER, _experiment_name_of_job)
    from xa_lightning.reporting import sweeps

    sweeps.register(sweeps.tables_named(overrides))


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
    raise UserError(f"{key}={value!r} must be a mapping of {cls.__name__} settings, not a {type(value).__name__}")


# ---------------------------------------------------------------------------------------------- compose
def _first_of_sweeps(overrides: Iterable[str], config_loader: Any = None) -> list[str]:
    """Overrides for one job of a sweep: the first value of each sweep; Hydra's own keys dropped.

    Every sweep syntax passes (comma lists, ``range``, ``choice``, ``glob`` with a config loader,
    ``interval`` and ``tag``); the job is composed and validated with the first value it would get.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create(config_loader=config_loader).parse_overrides(list(overrides))
    result = []
    for override in parsed:
        key = override.get_key_element()
        if key.startswith("hydra") or key.lstrip("+~").startswith("hydra"):
            continue
        if override.is_interval_sweep():  # an Optuna search space: validate with its lower bound
            result.append(f"{key}={override.value().start}")
        elif override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()), None)
            if first is None:  # e.g. a glob that matches no option of the group
                raise UserError(f"{override.input_line} sweeps over nothing; check the pattern")
            result.append(f"{key}={first}")
        else:
            result.append(override.input_line)
    return result


def _sweeper_params(cfg: DictConfig) -> list[str]:
    """``hydra.sweeper.params`` of a composed config as overrides (what the sweeper adds to every job)."""
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None)
    if not params:
        return []
    result = []
    for key in params:
        try:
            value = params[key]
        except Exception as exc:  # a resolver's UserError arrives wrapped by OmegaConf
            cause: BaseException | None = exc
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__
            raise cause or exc from None
        result.append(f"{key}={value}")
    return result


def _keys(overrides: Iterable[str]) -> set[str]:
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def compose(config_name: str, overrides: Iterable[str] = (), multirun: bool = False) -> DictConfig:
    """Compose a config the way the CLI does (for tests and for the pre-check); errors become UserError.

    ``multirun`` (or ``hydra.mode: MULTIRUN`` in the config): compose the sweep's first job, with the
    first value of the sweeper's ``params`` too (a table sweep's runs and seeds, an experiment's grid)
    unless the command line sets the same key, as Hydra's sweepers do.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    register_resolvers(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            first = _first_of_sweeps(overrides, loader)
            cfg = hydra_compose(config_name=config_name, overrides=first, return_hydra_config=True)
            if multirun or str(OmegaConf.select(cfg, "hydra.mode", default="")).endswith("MULTIRUN"):
                given = _keys(overrides)
                params = [p for p in _sweeper_params(cfg) if p.split("=", 1)[0].lstrip("+~") not in given]
                if params:
                    first = _first_of_sweeps(params, loader) + first
                    cfg = hydra_compose(config_name=config_name, overrides=first, return_hydra_config=True)
    except UserError:
        raise
    except Exception as exc:  # hydra / omegaconf errors have many types; all become one line
        raise UserError(_unquoted_brace_hint(overrides) or one_line(exc)) from exc
    finally:
        GlobalHydra.instance().clear()
    return _without_hydra_node(cfg)


_BRACE_PATTERN = re.compile(r"\{[^{}]*\.\.[^{}]*\}")


def _unquoted_brace_hint(overrides: Iterable[str]) -> str | None:
    """Hydra reads ``{...}`` in an override as a dict: a shard pattern must be quoted inside the override."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and _BRACE_PATTERN.search(value) and not value.startswith(("'", '"')):
            return (
                f"{key.lstrip('+~')}={value}: Hydra reads the braces as a dict; quote the pattern inside the "
                f"override: \"{key}='{value}'\""
            )
    return None


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
    hints = _init_hints(target)
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
        _check_range(f"{path}.{key}", key, value)


def _init_hints(target: Any) -> dict[str, Any]:
    """Annotations of a target's parameters, also of those a class passes on to a base class's
    ``__init__`` through ``**kwargs`` (the data modules' shared options)."""
    if not inspect.isclass(target):
        try:
            return typing.get_type_hints(target)
        except Exception:
            return {}
    hints: dict[str, Any] = {}
    for klass in reversed(target.__mro__):
        if "__init__" in vars(klass):
            try:
                hints.update(typing.get_type_hints(klass.__init__))
            except Exception:  # unresolvable annotations: those parameters go unchecked
                continue
    return hints


# Ranges of parameters that mean the same in every ``_target_`` node: name -> (bound, inclusive).
RANGES: dict[str, tuple[float, bool]] = {
    "lr": (0, False),
    "weight_decay": (0, True),
    "max_steps": (-1, True),
    "max_epochs": (-1, True),
    "batch_size": (1, True),
    "val_batch_size": (1, True),
    "num_workers": (0, True),
    "accumulate_grad_batches": (1, True),
    "log_every_n_steps": (1, True),
    "every_n_train_steps": (0, True),
    "keep_last_k": (-1, True),
    "max_consecutive": (1, True),
    "resolution": (8, True),
    "epoch_samples": (1, True),
    "shuffle_buffer": (0, True),
}


def _check_range(full_key: str, name: str, value: Any) -> None:
    if name not in RANGES or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    bound, inclusive = RANGES[name]
    if value < bound or (value == bound and not inclusive):
        relation = ">=" if inclusive else ">"
        raise UserError(f"{full_key}={value} is out of range; set it {relation} {bound}")


_SIMPLE = {int, float, bool, str}


def _matches(value: Any, annotation: Any) -> bool:
    """True unless the annotation is made of simple types and the value fits none of them."""
    if typing.get_origin(annotation) is typing.Literal and isinstance(value, (str, int, float, bool)):
        return value in typing.get_args(annotation)
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
            if _is_tensor_type(arg):  # a tensor cannot be written in a config: the other options apply
                continue
            sub = _simple_options(arg)
            if sub is None:
                return None
            options |= sub
        return options
    if origin is typing.Literal:
        return {type(a) for a in typing.get_args(annotation)}
    return None


def _is_tensor_type(annotation: Any) -> bool:
    return getattr(annotation, "__module__", "") == "torch" and getattr(annotation, "__name__", "") == "Tensor"


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    options = _simple_options(annotation) or set()
    names = sorted("None" if o is type(None) else o.__name__ for o in options)
    return " or ".join(names) or str(annotation)


# ---------------------------------------------------------------------------------------------- sweeps
def validate_sweeps(cfg: DictConfig, overrides: Iterable[str]) -> None:
    """Every value of a sweep over a config value (``a=1,2``, ``range``, ``choice``, both ends of an
    ``interval``) through the same type and range checks as the first one; group sweeps are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.get_key_element().lstrip("+~")
        if key.startswith("hydra") or not override.is_sweep_override():
            continue
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, throw_on_missing=False) if parent_key else cfg
        if not isinstance(parent, DictConfig) or leaf not in parent:
            continue
        current = parent._get_node(leaf)
        if isinstance(current, (DictConfig, ListConfig)):  # a config group: its options are files
            continue
        if override.is_interval_sweep():
            interval = override.value()
            values = [interval.start, interval.end]
        else:
            values = list(override.sweep_iterator())
        original = current._value()
        try:
            for value in values:
                with open_dict(parent):
                    parent[leaf] = value
                _validate_sweep_value(cfg, parent, parent_key)
        finally:
            with open_dict(parent):
                parent[leaf] = original


def _validate_sweep_value(cfg: DictConfig, parent: DictConfig, parent_key: str) -> None:
    if "_target_" in parent and not OmegaConf.is_interpolation(parent, "_target_"):
        _check_target_node(parent, parent_key)
    for key, schema_path in SCHEMAS.items():
        if parent_key == key or parent_key.startswith(f"{key}."):
            validate_schema(OmegaConf.select(cfg, key), schema_path, key)


# ---------------------------------------------------------------------------------------------- options
def check_option_dataclasses(node: Any, path: str = "") -> None:
    """Build every ``_target_`` node that is an option dataclass: its ``__post_init__`` checks choices and
    paths (``init_weights``) before anything runs. Errors become one-line UserErrors naming the node."""
    import dataclasses

    from omegaconf.errors import InterpolationResolutionError

    if isinstance(node, DictConfig):
        if "_target_" in node and not OmegaConf.is_interpolation(node, "_target_"):
            target = _import(str(node["_target_"]), f"{path}._target_")
            if dataclasses.is_dataclass(target):
                try:
                    instantiate(node)
                except UserError:
                    raise
                except InterpolationResolutionError:  # needs Hydra's runtime (output dir): checked in the job
                    pass
                except Exception as exc:
                    raise UserError(f"{path}: {one_line(exc)}") from exc
        for key in node:
            if not (OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key)):
                check_option_dataclasses(node._get_node(key), f"{path}.{key}" if path else str(key))
