"""Run configurations: a dataclass of defaults per example, a config file on top, ``key=value`` overrides last.

Every example declares its options as a dataclass whose defaults are the embedded default config. A config file
(``configs/*.json``, or ``.yaml`` when PyYAML is installed) sets some of those fields; the reserved key
``"example"`` names the script it is meant for. Command-line overrides come last, as shortcuts (``--steps``,
``--batch-size``, ``--out``, ``--seed``, ``--engine``) or generic ``key=value`` words. Every value is converted to the
field's type and checked by the dataclass's ``check()``; anything wrong raises :class:`ConfigError` with a one-line
message, so the launcher can refuse bad input before it starts any worker.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

#: Repository root (where ``configs/`` and ``examples/`` live in a clone).
ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"

#: Command-line shortcuts: option -> config field.
SHORTCUTS = {"--steps": "steps", "--batch-size": "batch_size", "--out": "out", "--seed": "seed",
             "--engine": "engine"}


class ConfigError(ValueError):
    """Bad configuration input (file, key or value); the message is one line meant for the user."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`ConfigError` instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def parse_or_exit(parse: typing.Callable[[list[str] | None], Any], argv: list[str] | None, prog: str) -> Any:
    """``parse(argv)``; on bad input, one line ``<prog>: error: ...`` on stderr and exit status 2 (an example's
    command line, checked before any training starts)."""
    try:
        return parse(argv)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def find_config(name: str) -> Path:
    """A config path as given, or relative to the repository, or a bare name in ``configs/``."""
    candidates = [Path(name), ROOT / name, CONFIG_DIR / name]
    candidates += [CONFIG_DIR / f"{name}{suffix}" for suffix in (".json", ".yaml", ".yml")]
    for path in candidates:
        if path.is_file():
            return path
    known = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*"))) if CONFIG_DIR.is_dir() else "none"
    raise ConfigError(f"config file not found: {name!r} (configs/ holds: {known})")


def read_config_file(name: str) -> dict[str, Any]:
    """The mapping stored in a JSON or YAML config file."""
    path = find_config(name)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path} is YAML: install PyYAML (pip install pyyaml) or use a .json config") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def example_of(config_file: str | None) -> str | None:
    """The ``"example"`` a config file names (None without a file or without the key)."""
    if config_file is None:
        return None
    example = read_config_file(config_file).get("example")
    if example is not None and not isinstance(example, str):
        raise ConfigError(f"{config_file}: 'example' must be a script name, got {example!r}")
    return example


def _convert(name: str, value: Any, kind: Any) -> Any:
    """``value`` (from a file or a ``key=value`` string) as the field's type."""
    from_text = isinstance(value, str)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_text and value.lower() in ("1", "true", "yes", "on"):
            return True
        if from_text and value.lower() in ("0", "false", "no", "off"):
            return False
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text:
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text:
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if from_text:
            return value
    else:  # pragma: no cover - a field type the examples do not use
        raise TypeError(f"unsupported config field type for {name}: {kind!r}")
    raise ConfigError(f"invalid value for {name}: {value!r} (expected {kind.__name__})")


def apply(config: Any, values: dict[str, Any], source: str) -> Any:
    """A copy of ``config`` with ``values`` set, each converted to its field's type."""
    types = typing.get_type_hints(type(config))
    fields = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown option {key!r} in {source} (known: {', '.join(sorted(fields))})")
        changes[key] = _convert(key, value, types[key])
    return dataclasses.replace(config, **changes)


def parse_override(word: str) -> tuple[str, str]:
    """``"key=value"`` -> ``(key, value)``."""
    key, sep, value = word.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise ConfigError(f"invalid override {word!r} (expected key=value, e.g. steps=100)")
    return key, value


def add_config_arguments(parser: argparse.ArgumentParser, default_engine: str) -> None:
    """The options every example shares: config file, shortcuts, ``key=value`` overrides."""
    parser.add_argument("--config", help="a config file (configs/NAME.json or a path); defaults are built in")
    parser.add_argument("--engine", choices=("fsdp2", "ddp", "deepspeed", "single"),
                        help=f"how the model is distributed (default {default_engine})")
    parser.add_argument("--steps", help="training steps")
    parser.add_argument("--batch-size", help="sequences (or samples) per process and step")
    parser.add_argument("--out", help="run directory (metrics, plot, checkpoints)")
    parser.add_argument("--seed", help="seed of the model initialisation and of the data order")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="any other option of the config")


def resolve(defaults: Any, args: argparse.Namespace, example: str) -> Any:
    """Defaults, then the config file, then the shortcuts, then ``key=value``; finally the config's ``check()``."""
    config = defaults
    if args.config is not None:
        values = read_config_file(args.config)
        named = values.pop("example", example)
        if named != example:
            raise ConfigError(f"config {args.config} is for example {named!r}, not {example!r}")
        config = apply(config, values, f"config {args.config}")
    shortcuts = {field: getattr(args, option[2:].replace("-", "_")) for option, field in SHORTCUTS.items()}
    config = apply(config, {k: v for k, v in shortcuts.items() if v is not None}, "the command line")
    config = apply(config, dict(parse_override(w) for w in args.overrides), "the overrides")
    config.check()
    return config


def check_positive(config: Any, *names: str) -> None:
    """Each named field must be > 0."""
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ConfigError(f"invalid value for {name}: {value!r} (expected > 0)")


def check_non_negative(config: Any, *names: str) -> None:
    """Each named field must be >= 0."""
    for name in names:
        value = getattr(config, name)
        if not value >= 0:
            raise ConfigError(f"invalid value for {name}: {value!r} (expected >= 0)")


def check_choice(config: Any, name: str, choices: tuple[str, ...]) -> None:
    """The named field must be one of ``choices``."""
    value = getattr(config, name)
    if value not in choices:
        raise ConfigError(f"invalid value for {name}: {value!r} (expected one of {', '.join(choices)})")


def describe(defaults: Any) -> str:
    """The fields of a config and their defaults, for ``--help``."""
    return "config fields (set with key=value or in a config file), with their defaults: " + ", ".join(
        f"{f.name}={getattr(defaults, f.name)!r}" for f in dataclasses.fields(defaults))
