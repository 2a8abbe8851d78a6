"""Command-line options from config dataclasses, and the --config file: what every `fedpeat`
subcommand uses to turn argv into validated configs.

    groups = [Group("fed", FedConfig, FedConfig()), ...]
    table = add_groups(parser, groups)          # an option per field: typed, described, defaulted
    configs = build_configs(parser.parse_args(argv), table, groups)

Every field of a group's dataclass is an option (`--client-lr 3e-3`), typed from its annotation
and described by the field's own description (`config.field_docs`); a field name used by two
groups gets the group as prefix (`--offsite-steps`). `--config run.json` holds one JSON object
per group (`{"fed": {"rounds": 50}}`) and command-line options win over it. Errors in the file
name the file and `group.field`; other errors name `Class.field`, which `with_options` rewrites
into the option the user typed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path


def _scalar(kind) -> Callable:
    """Parse one command-line word as `kind` (int, float, bool or str)."""
    if kind is bool:

        def parse_bool(text: str) -> bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")

        return parse_bool
    if kind in (int, float):

        def parse_number(text: str):
            try:
                return kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
                ) from None

        return parse_number
    return str


def _guess(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parser_for(hint) -> Callable:
    """The argparse `type` of a field annotation: scalars, comma-separated tuples, `none` for Optional."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = _parser_for(args[0])

        def parse_optional(text: str):
            return None if text.lower() in ("none", "null") else inner(text)

        return parse_optional
    if hint is tuple or typing.get_origin(hint) is tuple:
        kinds = typing.get_args(hint)

        def parse_tuple(text: str) -> tuple:
            items = [t.strip() for t in text.split(",") if t.strip()]
            if not kinds:
                return tuple(_guess(t) for t in items)
            if len(kinds) == 2 and kinds[1] is Ellipsis:
                return tuple(_scalar(kinds[0])(t) for t in items)
            return tuple(_scalar(k)(t) for k, t in zip(kinds, items)) if len(items) == len(kinds) else tuple(items)

        return parse_tuple
    return _scalar(hint) if hint in (bool, int, float) else str


def _metavar(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _metavar(args[0])
    if hint is tuple or typing.get_origin(hint) is tuple:
        return "A,B,..."
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT"}.get(hint, "VALUE")


def shown_default(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (and exit status 2), like the library's."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class Group(typing.NamedTuple):
    """A config dataclass exposed as a section of options (and of the --config file)."""

    name: str  # section name in config files, e.g. "fed"
    cls: type  # the dataclass
    defaults: object  # an instance giving the defaults
    skip: tuple = ()  # fields not exposed; one named after another group is filled with that group's config


OPTIONS: dict = {}  # the options of the running subcommand, to name them in error messages
_SECTIONS: dict = {}  # {class name: section name}, to name fields of a --config file


def add_groups(parser: argparse.ArgumentParser, groups: list) -> dict:
    """Add an option per dataclass field; returns {dest: (group, field name, option string)}."""
    from fedpeat_jax.config import field_docs

    seen: dict = {}
    for group in groups:
        for f in dataclasses.fields(group.cls):
            if f.name not in group.skip:
                seen[f.name] = seen.get(f.name, 0) + 1
    table = {}
    for group in groups:
        hints = typing.get_type_hints(group.cls)
        docs = field_docs(group.cls)
        section = parser.add_argument_group(
            f"{group.name} ({group.cls.__name__})", (group.cls.__doc__ or "").strip().split("\n")[0]
        )
        for f in dataclasses.fields(group.cls):
            if f.name in group.skip:
                continue
            default = getattr(group.defaults, f.name)
            name = f.name if seen[f.name] == 1 else f"{group.name}_{f.name}"
            option = "--" + name.replace("_", "-")
            dest = f"{group.name}__{f.name}"
            shown = shown_default(default)
            text = docs.get(f.name, "")
            help_text = (f"{text} " if text else "") + f"(default: {shown})"
            action = section.add_argument(
                option,
                dest=dest,
                type=_parser_for(hints[f.name]),
                default=None,
                metavar=_metavar(hints[f.name]),
                help=help_text.replace("%", "%%"),
            )
            action.shown_default = shown  # read by scripts/config_reference.py
            table[dest] = (group, f.name, option)
        _SECTIONS[group.cls.__name__] = group.name
    OPTIONS.update(table)
    return table


def preparse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """The options that choose the defaults (e.g. --preset, --tiny), parsed before the config
    options exist; --help waits for the full parser so that it lists them."""
    return parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])[0]


def _read_config_file(path_text: str, groups: list) -> dict:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ValueError(f"--config: no such file {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path} is not valid JSON: {e}") from None
    names = [g.name for g in groups]
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a JSON object with sections {names}")
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"--config {path}: unknown section(s) {unknown}; expected {names}")
    for group in groups:
        section = data.get(group.name, {})
        if not isinstance(section, dict):
            raise ValueError(f"--config {path}: section {group.name!r} must be a JSON object of fields")
        fields = {f.name for f in dataclasses.fields(group.cls)} - set(group.skip)
        bad = sorted(set(section) - fields)
        if bad:
            raise ValueError(f"--config {path}: section {group.name!r} has unknown field(s) {bad}")
    return data


def _file_fields(message: str, path: str) -> str:
    """'FedConfig.client_lr must be ...' -> '--config run.json: fed.client_lr must be ...'."""
    for cls_name, section in _SECTIONS.items():
        message = re.sub(rf"\b{cls_name}\.(\w+)", rf"{section}.\1", message)
    return f"--config {path}: {message}"


def build_configs(args: argparse.Namespace, table: dict, groups: list) -> dict:
    """The configs of `groups`: defaults, then the --config file, then command-line options; a
    skipped field named after another group gets that group's config (e.g. TaskConfig.text).
    Errors in the file's values name the file and field; the others propagate to `main`, which
    names the options the user typed."""
    path = getattr(args, "config", None)
    from_file = _read_config_file(path, groups) if path else {}
    configs = {}
    for group in groups:
        file_changes = dict(from_file.get(group.name, {}))
        if file_changes:
            try:
                dataclasses.replace(group.defaults, **file_changes)
            except ValueError as e:
                raise ValueError(_file_fields(str(e), path)) from None
        changes = dict(file_changes)
        for dest, (g, name, _) in table.items():
            value = getattr(args, dest, None)
            if g is group and value is not None:
                changes[name] = value
        configs[group.name] = dataclasses.replace(group.defaults, **changes) if changes else group.defaults
    for group in groups:
        nested = {name: configs[name] for name in group.skip if name in configs}
        if nested:
            configs[group.name] = configs[group.name].replace(**nested)
    return configs


def with_options(message: str, table: dict = None) -> str:
    """'FedConfig.client_lr must be > 0' -> '--client-lr (FedConfig.client_lr) must be > 0'."""
    for group, name, option in (table or OPTIONS).values():
        message = re.sub(rf"\b{group.cls.__name__}\.{name}\b", f"{option} ({group.cls.__name__}.{name})", message)
    return message


# --------------------------------------------------------------------------------------------
# The subcommands of `fedpeat` (registered by fedpeat_jax.cli and fedpeat_jax.cli_mec)
# --------------------------------------------------------------------------------------------
SUBCOMMANDS: dict = {}


def subcommand(name: str, help: str):
    def register(fn):
        SUBCOMMANDS[name] = (fn, help)
        return fn

    return register


def text_group(defaults=None) -> Group:
    from fedpeat_jax.data.source import TextConfig

    return Group("text", TextConfig, defaults if defaults is not None else TextConfig())


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


__all__ = [
    "OPTIONS",
    "SUBCOMMANDS",
    "Group",
    "Parser",
    "add_groups",
    "build_configs",
    "preparse",
    "print_json",
    "shown_default",
    "subcommand",
    "text_group",
    "with_options",
]
