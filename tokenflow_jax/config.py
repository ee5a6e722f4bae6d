"""Configs: Python files with ``get_config(arg)``, loaded by path, overridden from the command line.

A config is a Python file with ``get_config(arg)``; ``FILE:ARG`` picks a variant, big_vision style:
``configs/tokenizer.py:b,res=256,enhanced``. ``ARG`` is a variant name followed by comma-separated
``key=value`` options (a bare ``key`` means ``key=True``). Any field can then be overridden on the
command line with ``--config.a.b=value``; values are parsed as Python literals and must keep the
field's type (ints may become floats), so a typo or a wrong type fails before anything compiles, and
:func:`build_config` checks every numeric field's range (``config_rules.py``) before anything is created.

Models hold frozen (hashable) dataclasses, not ConfigDicts, so Linen modules stay pure values:
:func:`to_dataclass` is the one place where config fields meet them; an unknown or missing field, or a value
that a dataclass rejects, becomes an error naming the full config path.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import ml_collections

from tokenflow_jax import config_rules
from tokenflow_jax.errors import ConfigError, InputNotFoundError

ConfigDict = ml_collections.ConfigDict


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """'b,res=256,enhanced' -> ConfigDict(variant='b', res=256, enhanced=True), over ``defaults``.

    Options not present in ``defaults`` are rejected with the list of known ones.
    """
    out = ml_collections.ConfigDict(dict(defaults))
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    if parts and "=" not in parts[0]:
        out.variant = parts.pop(0)
    for part in parts:
        key, _, raw = part.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ConfigError(f"unknown config option {key!r} in {arg!r}; known options: {sorted(defaults)}")
        out[key] = _literal(raw.strip()) if raw else True
    return out


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        if raw.lower() in ("none", "null"):
            return None
        return raw  # a bare string such as a path or a hub id


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/file.py[:arg]`` and returns ``get_config(arg)``."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path) and path.startswith("configs/"):
        # `configs/tokenizer.py:tiny` from any directory: setup.py installs configs/ as tokenflow_jax.bundled_configs.
        bundled = importlib.util.find_spec("tokenflow_jax.bundled_configs")
        for folder in (bundled.submodule_search_locations or []) if bundled else []:
            if os.path.isfile(os.path.join(folder, path[len("configs/"):])):
                path = os.path.join(folder, path[len("configs/"):])
                break
    if not os.path.isfile(path):
        raise InputNotFoundError(f"config file {path!r} does not exist (from --config {spec!r})")
    module_name = "tokenflow_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg)")
    config = module.get_config(arg or None)
    with config.unlocked():
        config.config_spec = spec
    return config


def _coerce(path: str, old: Any, new: Any) -> Any:
    if old is None or new is None:
        return new
    if isinstance(old, bool) or isinstance(new, bool):
        if isinstance(old, bool) and isinstance(new, bool):
            return new
        raise ConfigError(f"--config.{path}: expected a bool (True/False), got {new!r}")
    if isinstance(old, float) and isinstance(new, int):
        return float(new)
    if isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)):
        return type(old)(new)
    if isinstance(old, str) and not isinstance(new, str):
        return str(new)
    if type(old) is not type(new):
        raise ConfigError(
            f"--config.{path}: expected {type(old).__name__} like {old!r}, got {type(new).__name__} {new!r}"
        )
    return new


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies ``['a.b=1', ...]`` (the ``--config.`` prefix is optional) with type checks."""
    for item in overrides:
        item = item.removeprefix("--").removeprefix("config.")
        if "=" not in item:
            raise ConfigError(f"config override {item!r} must look like --config.a.b=value")
        path, raw = item.split("=", 1)
        *parents, leaf = path.split(".")
        node = config
        for i, key in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                raise ConfigError(_unknown(".".join(parents[: i + 1]), node))
            node = node[key]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ConfigError(_unknown(path, node))
        value = _literal(raw)
        if value is None and isinstance(node[leaf], str):
            value = raw  # 'none' stays a word for string fields (remat=none, a variant named 'none')
        with node.ignore_type():
            node[leaf] = _coerce(path, node[leaf], value)
    return config


def build_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """:func:`load_config` then :func:`apply_overrides`, then every field's range and the checks between fields
    (:func:`tokenflow_jax.config_rules.check`: a ConfigError naming the field, before anything is created); the
    overrides are recorded (``config.config_overrides``) next to ``config.config_spec`` so checkpoints can rebuild
    the same config."""
    config = apply_overrides(load_config(spec), overrides)
    config_rules.check(config)
    with config.unlocked():
        config.config_overrides = list(overrides)
    return config


def _unknown(path: str, node: Any) -> str:
    keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    close = difflib.get_close_matches(path.split(".")[-1], keys, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else (f"; fields here: {sorted(keys)}" if keys else "")
    return f"unknown config field --config.{path}{hint}"


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates ``--config.x=v`` / ``--config.x v`` overrides from the other arguments."""
    rest, overrides = [], []
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" in arg:
                overrides.append(arg)
            elif i + 1 < len(argv):
                overrides.append(f"{arg}={argv[i + 1]}")
                next(it, None)
            else:
                raise ConfigError(f"{arg} needs a value")
        else:
            rest.append(arg)
    return rest, overrides


T = TypeVar("T")


def to_dataclass(cls: type[T], node: Any, path: str, **extra: Any) -> T:
    """Builds ``cls`` from the mapping ``node`` (a ConfigDict or dict) found at config ``path``.

    Sequences become tuples (hashable); ``extra`` supplies already-built nested fields.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = dict(node.items() if hasattr(node, "items") else node)
    unknown = sorted(set(values) - set(fields) - set(extra))
    if unknown:
        raise ConfigError(f"config.{path}: unknown field(s) {unknown}; expected some of {sorted(fields)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k not in extra}
    kwargs.update(extra)
    missing = sorted(
        name for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ConfigError(f"config.{path}: missing field(s) {missing}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.{path}: {e}") from e
