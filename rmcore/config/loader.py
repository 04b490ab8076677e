"""The config loader: nested dataclasses, loaded from YAML, overridden from the command line. Generic: it knows
nothing of rmcore's sections (rmcore/config/sections.py).

A config is a dataclass whose fields may themselves be dataclasses (sections). A run is described by

    python train.py --config configs/open_llama_3b_rm.yaml optim.lr=5e-6 model.n_layers=2

and built as: dataclass defaults < YAML base file(s) < YAML file < command-line overrides, applied in that order.
Merging is per key: a file that sets `optim.lr` leaves every other key of `optim` as its base left it.

Rules:
- Every key is checked against the dataclass: an unknown key (in YAML or on the command line) is an error naming
  the key, where it came from, and the valid keys of its section. A missing required field (one without a
  default) is an error too.
- Values are read with `yaml.safe_load` semantics, with one fix: PyYAML follows YAML 1.1, where `5e-6` and `1e5`
  are strings (a float needs a dot and a signed exponent there); here every decimal number with an exponent is a
  float, as in YAML 1.2. Then each value is checked against its field's annotation: int, float, bool, str, None,
  `X | None`, other unions, `list[X]`, `tuple[X, ...]`, `tuple[X, Y]`, `Literal[...]`, `Any`, nested dataclasses.
  An int is accepted for a float; an integral float (`1e4`) for an int; nothing else is converted (a bool is not
  an int, 5 is not the string "5": quote it, `name='"5"'` in a shell). A wrong value is an error naming the key,
  the value and the expected type. `key=null` sets None.
- `base: other.yaml` at the top of a YAML file (resolved relative to that file) loads `other.yaml` first; the file's
  own keys then override it. Bases may have bases (recursive, cycles are an error). `base` is therefore reserved
  and cannot be a field name of the top-level config.
- A section may be set whole: `optim.betas=[0.9,0.95]` sets a list, and `lora={r: 8}` sets keys of a section.
  For a section typed `X | None`, `lora=null` disables it and `lora.r=8` re-creates it from X's defaults.

`save_config` writes every field, so a saved config reloads to an equal object with `load_config`.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from rmcore.errors import ConfigError

T = TypeVar("T")

BASE_KEY = "base"

USAGE = (
    "usage: {prog} [--config PATH] [section.key=value ...]\n"
    "  --config PATH       YAML config file (may start with `base: other.yaml`)\n"
    "  section.key=value   override one field; the value is parsed as YAML (5e-6, true, null, [a,b], {k: v})"
)


# ----------------------------------------------------------------------------------------------------------------
# YAML with YAML-1.2 floats


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads 5e-6, 1E5 and 1.0e5 as floats."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings such as "1e5", so that YamlLoader reads them back as strings."""


_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
for _cls in (YamlLoader, _Dumper):
    # add_implicit_resolver copies the inherited table on first use, so yaml.SafeLoader itself is left untouched.
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789."))


def parse_value(text: str) -> Any:
    """yaml.safe_load(text), except that numbers with an exponent are floats."""
    return yaml.load(text, Loader=YamlLoader)


# ----------------------------------------------------------------------------------------------------------------
# Checking values against annotations


def _join(path: str, key: Any) -> str:
    """'a.b' from ('a', 'b'); just the key at the top level."""
    return f"{path}.{key}" if path else str(key)


def _type_name(tp: Any) -> str:
    """A readable name for an annotation: 'float', 'list[str]', 'str | None', "Literal['a', 'b']"."""
    if isinstance(tp, type) and not get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _init_fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """{name: (field, resolved annotation)} for the fields a config file may set."""
    # get_type_hints resolves the string annotations that `from __future__ import annotations` produces.
    hints = get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass of annotation `X` or `X | None`, else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        found = [a for a in get_args(tp) if dataclasses.is_dataclass(a) and isinstance(a, type)]
        if len(found) == 1:
            return found[0]
    return None


def _check_section(cls: type, data: Any, path: str, source: str) -> dict[str, Any]:
    """data (a mapping read from `source`) with every key checked against dataclass `cls` and every value coerced."""
    if not isinstance(data, dict):
        where = f"section {path!r}" if path else "the top level"
        raise ConfigError(f"{source}: {where} must be a mapping of keys to values, got {data!r}")
    known = _init_fields(cls)
    out = {}
    for key, value in data.items():
        if key not in known:
            where = f"section {path!r}" if path else "the top level"
            raise ConfigError(
                f"{source}: unknown key {_join(path, key)!r}; valid keys in {where}: {', '.join(known)}"
            )
        out[key] = _coerce(value, known[key][1], _join(path, key), source)
    return out


def _bad(value: Any, tp: Any, key: str, source: str, why: str = "") -> ConfigError:
    """The error for a value that does not fit its annotation."""
    return ConfigError(f"{source}: {key}={value!r} is not a valid {_type_name(tp)}{why}")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """value checked against annotation tp and converted where that is lossless (int -> float, list -> tuple)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise _bad(value, tp, key, source, f" (a section: give a mapping, or set its keys as {key}.name=value)")
        return _check_section(tp, value, key, source)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _bad(value, tp, key, source)
        section = _dataclass_in(tp)
        if section is not None and isinstance(value, dict):
            # Checked directly rather than tried, so that an unknown key inside an optional section is reported
            # as such instead of as "not a valid X | None".
            return _check_section(section, value, key, source)
        # Try the member whose type matches exactly first, so `float | int` keeps 3 an int.
        members = sorted((a for a in args if a is not type(None)), key=lambda a: a is not type(value))
        for member in members:
            try:
                return _coerce(value, member, key, source)
            except ConfigError:
                continue
        raise _bad(value, tp, key, source)
    if origin is Literal:
        # type() equality as well as ==, because True == 1 and 1 == 1.0 in Python.
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _bad(value, tp, key, source)
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise _bad(value, tp, key, source)
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise _bad(value, tp, key, source)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise _bad(value, tp, key, source, f" (expected {len(args)} items)")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(value, tp, key, source)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # lets `max_steps=1e4` through, but never rounds 2.5
        raise _bad(value, tp, key, source)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _bad(value, tp, key, source)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(value, tp, key, source)
    if tp is type(None):
        if value is None:
            return None
        raise _bad(value, tp, key, source)
    raise TypeError(f"config field {key!r} has an annotation rmcore.config does not support: {tp!r}")


# ----------------------------------------------------------------------------------------------------------------
# Merging and building


def _merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """base updated by new, recursing into sections present as mappings in both."""
    out = dict(base)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _default(f: dataclasses.Field) -> Any:
    """The default value of a dataclass field, or dataclasses.MISSING."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _build(cls: type[T], data: dict[str, Any], path: str, start: Any = None) -> T:
    """An instance of cls from checked data; fields absent from data come from `start`, else from their defaults."""
    kwargs = {}
    for name, (f, tp) in _init_fields(cls).items():
        current = getattr(start, name) if start is not None else _default(f)
        if name in data:
            value = data[name]
            section = _dataclass_in(tp)
            if section is not None and isinstance(value, dict):
                # A partial section is laid over the section's current value (e.g. a default_factory that is not
                # the section class's own defaults), or over the section defaults when it is currently None.
                # A section still equal to its class defaults is rebuilt from them, so fields its __post_init__
                # derives (ModelConfig.n_kv_heads from n_heads) are derived again from the new values.
                start_from = current if isinstance(current, section) and current != section() else None
                value = _build(section, value, _join(path, name), start_from)
            kwargs[name] = value
        elif current is dataclasses.MISSING:
            where = f"section {path!r}" if path else "the top level"
            raise ConfigError(f"missing required key {_join(path, name)!r} in {where}")
        else:
            kwargs[name] = current
    return cls(**kwargs)


def _read_yaml(cls: type, path: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """The checked contents of YAML file `path`, laid over those of its `base:` file(s)."""
    real = os.path.realpath(path)
    if real in chain:
        raise ConfigError(f"{path}: `base:` files form a cycle: {' -> '.join(chain + (real,))}")
    raw = load_yaml_file(path)
    if raw is None:  # an empty file is an empty config
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values, got {type(raw).__name__}")
    raw = dict(raw)
    merged: dict[str, Any] = {}
    base = raw.pop(BASE_KEY, None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: `base:` must be a file path, got {base!r}")
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
        if not os.path.isfile(base_path):
            raise ConfigError(f"{path}: base file {base!r} not found (looked for {base_path})")
        merged = _read_yaml(cls, base_path, chain + (real,))
    return _merge(merged, _check_section(cls, raw, "", path))


def load_yaml_file(path: str) -> Any:
    """The YAML document in `path`; a missing file or a syntax error is a ConfigError naming the file (and line)."""
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a directory; expected a YAML config file")
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.load(fh, Loader=YamlLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}{where}: YAML syntax error: {what}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    """('a.b.c' = value) -> (['a', 'b', 'c'], parsed value)."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.isidentifier() for p in parts):
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        return parts, parse_value(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from None


def load_config(cls: type[T], path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """cls built from its defaults, then YAML file `path` (and its bases), then each `key=value` override in order."""
    if BASE_KEY in _init_fields(cls):
        raise TypeError(f"{cls.__name__} has a field named {BASE_KEY!r}, which config files reserve for inheritance")
    data = _read_yaml(cls, path) if path is not None else {}
    for text in overrides:
        parts, value = _parse_override(text)
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        data = _merge(data, _check_section(cls, nested, "", f"override {text!r}"))
    return _build(cls, data, "")


# ----------------------------------------------------------------------------------------------------------------
# Saving


def config_to_dict(cfg: Any) -> Any:
    """Plain dicts/lists/scalars from a (nested) dataclass config; tuples become lists."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def save_config(cfg: Any, path: str) -> None:
    """Write config_to_dict(cfg) to `path` as YAML, in field order; load_config(type(cfg), path) == cfg."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.dump(config_to_dict(cfg), fh, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_cli(argv: list[str], prog: str | None = None) -> tuple[str | None, list[str]]:
    """(config path or None, overrides) from `[--config PATH] [key=value ...]`; -h/--help prints usage and exits."""
    usage = USAGE.replace("{prog}", prog or os.path.basename(sys.argv[0]) or "rmcore")
    config_path: str | None = None
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(usage)
            raise SystemExit(0)
        if arg == "--config" or arg.startswith("--config="):
            if config_path is not None:
                raise ConfigError(f"--config given twice\n{usage}")
            if arg == "--config":
                if i + 1 >= len(argv):
                    raise ConfigError(f"--config needs a path\n{usage}")
                i += 1
                config_path = argv[i]
            else:
                config_path = arg.split("=", 1)[1]
            if not config_path:
                raise ConfigError(f"--config needs a path\n{usage}")
        elif not arg.startswith("-") and "=" in arg:
            try:
                _parse_override(arg)  # reject a malformed key now, with the usage, rather than after loading
            except ConfigError as e:
                raise ConfigError(f"{e}\n{usage}") from None
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}\n{usage}")
        i += 1
    return config_path, overrides
