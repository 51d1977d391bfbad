"""Typed configuration: YAML recipes -> nested dataclasses, ``a.b=c`` overrides, strict validation.

A recipe is plain YAML. :func:`load_config` turns it into a tree of dataclasses, checking every key
against the dataclass fields and every value against the field's type annotation, so a typo or a
wrong type fails *before* any model or data is loaded, with the key's full path and the fix::

    optimizer.lr: expected float, got 'abc'
    optimizer.lrr: unknown key; allowed keys: betas, eps, lr, name, weight_decay
    loss.name: 'infonse' is not one of: infonce

Dataclasses validate their own values in ``__post_init__`` by raising :class:`ConfigError` with a
message that starts with the field name (``"lr: must be > 0"``); the loader prefixes the path of the
enclosing block. Pluggable parts (loss, pooling, optimizer, scheduler) are chosen by *name* from a
:class:`Registry`, never by importing a dotted path found in YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, Union

import yaml

from embedtune.errors import ConfigError

T = TypeVar("T")
F = TypeVar("F")

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "POOLING",
    "SCHEDULERS",
    "Registry",
    "apply_overrides",
    "config_to_dict",
    "load_config",
    "override_path",
    "read_yaml",
]


# --------------------------------------------------------------------------------------------------
# Registries of names
# --------------------------------------------------------------------------------------------------
class Registry(Generic[F]):
    """A named set of implementations for one pluggable slot (loss, optimizer, ...).

    Recipes name an entry (``optimizer.name: adamw``); code registers entries with
    ``@REGISTRY.register("adamw")``. Only registered names can be used, so a YAML file can never make
    embedtune import arbitrary code.

    Args:
        kind: what the entries are, used in error messages ("optimizer").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, F] = {}
        self._loaders: list[Callable[[], object]] = []

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator that registers ``fn`` under ``name`` (re-registering a name is an error)."""

        def deco(fn: F) -> F:
            # A name declared with add_names (value None) is filled in by its implementation.
            if self._entries.get(name) is not None and self._entries[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = fn
            return fn

        return deco

    def add_names(self, names: Iterable[str]) -> None:
        """Register names whose implementation lives elsewhere (validation only, value ``None``)."""
        for name in names:
            self._entries.setdefault(name, None)  # type: ignore[arg-type]

    def add_loader(self, loader: Callable[[], object]) -> None:
        """Register a function that imports the module which fills this registry (lazily)."""
        self._loaders.append(loader)

    def _load(self) -> None:
        while self._loaders:
            self._loaders.pop()()

    def names(self) -> list[str]:
        """All registered names, sorted."""
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def get(self, name: str, key: str = "") -> F:
        """Return the entry for ``name``.

        Raises:
            ConfigError: ``name`` is not registered; the message names ``key`` and lists the names.
        """
        self._load()
        if name not in self._entries:
            where = f"{key}: " if key else ""
            raise ConfigError(
                f"{where}unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            )
        return self._entries[name]

    def check(self, name: str, key: str) -> None:
        """Raise :class:`ConfigError` naming ``key`` when ``name`` is not registered.

        A name declared with :meth:`add_names` passes without importing its implementation, so that
        recipes validate without torch; any other name loads the registry first.
        """
        if name in self._entries:
            return
        self.get(name, key)


LOSSES: Registry[Any] = Registry("loss")
OPTIMIZERS: Registry[Any] = Registry("optimizer")
SCHEDULERS: Registry[Any] = Registry("lr scheduler")
POOLING: Registry[Any] = Registry("pooling method")
# Pooling is implemented by embedtune.models.pooling; the names are known here so that a recipe can be
# validated without importing the model code.
POOLING.add_names(["mean", "avg", "cls", "last", "weighted_mean"])
# The same for the training registries (implemented in embedtune.training.loss/optim, which import
# torch); tests/unit/test_config.py checks that each declared name has an implementation.
LOSSES.add_names(["infonce"])
OPTIMIZERS.add_names(["adamw", "sgd"])
SCHEDULERS.add_names(["constant", "linear", "cosine"])


def _load_training_registries() -> None:
    import embedtune.training.loss
    import embedtune.training.optim  # noqa: F401  (fills OPTIMIZERS and SCHEDULERS)


LOSSES.add_loader(_load_training_registries)
OPTIMIZERS.add_loader(_load_training_registries)
SCHEDULERS.add_loader(_load_training_registries)


# --------------------------------------------------------------------------------------------------
# YAML and overrides
# --------------------------------------------------------------------------------------------------
def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or is not a mapping at the top.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: recipe file not found; list shipped recipes with `embedtune ls`")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: the top level must be a mapping of keys to values, got {type(data).__name__}"
        )
    return data


def _parse_value(text: str) -> Any:
    # YAML scalars so that `a.b=1e-5`, `x=true`, `l=[1,2]` and `s=null` mean what they mean in a recipe.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (a modified copy is returned).

    Values are parsed as YAML scalars/flow collections (``1e-5``, ``true``, ``[64, 32]``, ``null``).
    Intermediate mappings are created as needed; whether a key is *allowed* is checked later against
    the dataclasses, so the error names the key path and the allowed keys.

    Raises:
        ConfigError: an override is not of the form ``key.path=value``.
    """
    out = _deepcopy(data)
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE, e.g. optimizer.lr=1e-5")
        key, raw = item.split("=", 1)
        parts = _split_key(key.strip(), item)
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            path = _path_str(parts[: i + 1])
            if isinstance(part, int):
                if not isinstance(node, list) or not -len(node) <= part < len(node):
                    raise ConfigError(f"override {item!r}: {path} does not exist (no such list entry)")
                node = node[part]
                continue
            nxt = node.get(part)
            if nxt is None:
                if isinstance(parts[i + 1], int):
                    raise ConfigError(f"override {item!r}: {path} is not a list in the recipe")
                nxt = {}
                node[part] = nxt
            elif not isinstance(nxt, (dict, list)):
                raise ConfigError(f"override {item!r}: {path} is a value, not a section")
            node = nxt
        last = parts[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or not -len(node) <= last < len(node):
                raise ConfigError(
                    f"override {item!r}: {_path_str(parts)} does not exist (no such list entry)"
                )
        elif not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {_path_str(parts[:-1])} is a list; index it, e.g. [0]")
        node[last] = _parse_value(raw)
    return out


def override_path(item: str) -> str:
    """The key path an override sets, normalised: ``"data.datasets.0.path=x"`` -> ``"data.datasets[0].path"``.

    Raises:
        ConfigError: ``item`` is not of the form ``key.path=value``.
    """
    if "=" not in item or not item.split("=", 1)[0].strip():
        raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE, e.g. optimizer.lr=1e-5")
    return _path_str(_split_key(item.split("=", 1)[0].strip(), item))


def _split_key(key: str, item: str) -> list[str | int]:
    # "data.datasets[0].path" -> ["data", "datasets", 0, "path"]; "a.0.b" indexes lists too.
    parts: list[str | int] = []
    for raw in key.split("."):
        name, *indices = raw.split("[")
        if name:
            parts.append(int(name) if name.isdigit() else name)
        for idx in indices:
            if not idx.endswith("]") or not idx[:-1].lstrip("-").isdigit():
                raise ConfigError(f"override {item!r}: bad list index in {raw!r}; write e.g. datasets[0]")
            parts.append(int(idx[:-1]))
    if not parts or any(p == "" for p in parts):
        raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE, e.g. optimizer.lr=1e-5")
    return parts


def _path_str(parts: Sequence[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _deepcopy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deepcopy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deepcopy(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# Building dataclasses with type checks
# --------------------------------------------------------------------------------------------------
def load_config(
    cls: type[T],
    source: Mapping[str, Any] | str | Path | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Build a (nested) dataclass config from a YAML file or a mapping, with overrides.

    Args:
        cls: the dataclass type to build (e.g. ``TrainConfig``).
        source: a YAML path, an already-parsed mapping, or ``None`` for all defaults.
        overrides: ``"a.b=c"`` strings applied on top of ``source`` (command-line style).

    Returns:
        An instance of ``cls`` whose every field has been type-checked and validated.

    Raises:
        ConfigError: unknown key, wrong type or invalid value; the message names the key path (and the
            file when ``source`` is a path) and lists allowed keys/values.
    """
    if source is None:
        data: dict[str, Any] = {}
        origin = ""
    elif isinstance(source, (str, Path)):
        data = read_yaml(source)
        origin = f"{source}: "
    elif isinstance(source, Mapping):
        data = dict(source)
        origin = ""
    else:
        raise TypeError(f"source must be a path or a mapping, got {type(source).__name__}")
    data = apply_overrides(data, overrides)
    try:
        return _build_dataclass(cls, data, "")
    except ConfigError as exc:
        if origin:
            raise ConfigError(f"{origin}{exc}") from None
        raise


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, Sequence, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Mapping):
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _build_dataclass(cls: type[T], data: Any, path: str) -> T:
    where = path or "the recipe"
    if isinstance(data, cls):  # already built (e.g. passed in code)
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = _join(path, str(unknown[0]))
        close = difflib.get_close_matches(str(unknown[0]), sorted(fields), n=1, cutoff=0.6)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: unknown key; allowed keys: {', '.join(sorted(fields))}{hint}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, _join(path, name))
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{_join(path, missing[0])}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # __post_init__ messages start with the field name; prefix the enclosing block's path.
        msg = str(exc)
        raise ConfigError(f"{path}.{msg}" if path else msg) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got null")
        errors = []
        # Try non-None members, most specific first (bool before int before float before str).
        for arg in sorted((a for a in args if a is not type(None)), key=_specificity):
            try:
                return _convert(arg, value, path)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(f"{path}: {value!r} is not one of: {', '.join(str(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            raise ConfigError(f"{path}: expected a mapping, got null")
        return _build_dataclass(tp, value, path)
    if origin in (list, Sequence, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, path): _convert(vt, v, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads `1e-5` (no dot) as a string; accept anything float() accepts.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected string, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}")
    raise TypeError(f"{path}: unsupported annotation {tp!r} in a config dataclass")


def _specificity(tp: Any) -> int:
    order = {bool: 0, int: 1, float: 2, str: 4}
    if dataclasses.is_dataclass(tp):
        return 3
    return order.get(tp, 5)


def config_to_dict(cfg: Any) -> Any:
    """Turn a config dataclass tree back into plain YAML-ready data (lists, dicts, scalars)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg
