"""A config from where its values come from, besides the defaults: ``--config`` YAML files, ``LLM_*`` environment
variables and flags, in that order of precedence; and the flags' help and docs/config.md, written from each field's
docstring."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import re
import sys
import textwrap
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args, get_origin

import yaml

from llm.cli import ArgParser
from llm.errors import ConfigError, UsageError, closest
from llm.training.core.config import (ENV_PREFIX, Config, NoSettings, _hints, _noted, describe, fitted_settings,
                                      sections, task_settings)


def config_from(cls: type[Config], argv: list[str], environ: Mapping[str, str]) -> Config:
    """A validated ``cls`` from a command line and an environment: defaults < ``--config`` YAML < ``LLM_*``
    environment < flags."""
    # the task decides which --custom-* flags there are: find it (flag < env < files) before parsing them
    paths, task = _glance(argv)
    files = [_read_yaml(path) for path in paths]
    task = task or environ.get(f"{ENV_PREFIX}TASK") or next(
        (f["task"] for f in reversed(files) if isinstance(f, dict) and isinstance(f.get("task"), str)), cls.task)
    custom_given = any(a.startswith("--custom-") for a in argv) \
        or any(k.startswith(f"{ENV_PREFIX}CUSTOM_") for k in environ) or any(isinstance(f, dict) and "custom" in f for f in files)
    settings = task_settings(task, needed=custom_given)
    args = {dest: _dashes(value) for dest, value in vars(build_parser(settings).parse_args(argv)).items()}
    config = cls()
    if (parsed := args.pop("config_paths", [])) != paths:  # the glance missed one: read what the parser found
        files = [_read_yaml(path) for path in parsed]
    # every custom section holds the settings of the task the run trains, whichever task a file names
    files = [(path, _apply_file(config, path, data, task)) for path, data in zip(parsed, files)]
    args.pop("print_config", None)
    args.pop("local_rank", None)
    env = _env_overrides(environ, settings)
    try:
        config._apply(env, origin="environment", task=task)
    except ConfigError as e:  # a value of the wrong type: say which variable holds it
        raise _noted(e, _env_note(e.field)) from None
    flags: dict[str, Any] = {}
    for dest, value in args.items():
        section, _, name = dest.partition(".")
        if name:
            flags.setdefault(section, {})[name] = value
        else:
            flags[section] = value
    config._apply(flags, origin="command line", task=task)
    config.custom = fitted_settings(config, settings, config.task)  # at their defaults where nothing set them
    # where each value that no flag gave came from, for errors found later; a flag is in sight already
    config._set_by = {key: f" (in {path})" for path, file in files for key in _keys(file)}
    config._set_by.update({key: _env_note(key) for key in _keys(env)})
    for key in _keys(flags):
        config._set_by.pop(key, None)
    try:
        return config.validate()
    except ConfigError as e:
        note = config.set_by(e.field)
        if not note:
            raise
        raise _noted(e, note) from None


def _apply_file(config: Config, path: str | os.PathLike, data: Any, task: str | None) -> dict[str, Any]:
    """Apply a YAML file's overrides, an error naming the file; they are returned, for validate's errors."""
    try:
        config._apply(data, origin=str(path), task=task)
    except ConfigError as e:  # an unknown key or a value of the wrong type: all from the file
        raise _noted(e, f" (in {path})") from None
    return data


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring written under each field of a dataclass."""
    body = _class_body(cls)
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = after.value.value.strip()
    return docs


def _class_body(cls: type) -> list[ast.stmt]:
    """The statements of ``cls``'s body: from its module's source, parsed once for all its classes (every command
    builds its parser from the docs of eight of them, and inspect.getsource takes 10 ms a class to find each)."""
    path = getattr(sys.modules.get(cls.__module__), "__file__", None)
    found = [node for node in (_module_tree(path).body if path else [])
             if isinstance(node, ast.ClassDef) and node.name == cls.__qualname__]
    if len(found) == 1:
        return found[0].body
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    except (OSError, TypeError):  # a task's settings defined where no source is kept (typed in at a prompt)
        return []


@functools.cache
def _module_tree(path: str) -> ast.Module:
    return ast.parse(Path(path).read_text(encoding="utf-8"))


def reference() -> str:
    """docs/config.md: every field with its flag, environment variable, default and help text."""
    lines = [
        "# Config reference",
        "",
        "Generated from the field docstrings in `llm/training/core/config.py` by",
        "`python -m llm.training.core.config > docs/config.md`; a test keeps it current.",
        "Precedence, lowest first: defaults < YAML (`--config FILE`; given more than once, each file over the ones "
        "before it) < environment < flags. `--print-config` prints every setting as YAML, for `--config`, and exits.",
        "",
    ]
    defaults = Config()
    entries = [("", Config, [f for f in dataclasses.fields(Config) if f.name == "task"], defaults)]
    entries += [(name, cls, dataclasses.fields(cls), getattr(defaults, name)) for name, cls in sections().items()]
    for section, cls, fields, values in entries:
        lines += [f"## {section or 'top level'}", "", "| flag | environment | default | |", "|---|---|---|---|"]
        for f in fields:
            key = f"{section}.{f.name}" if section else f.name
            flag = f"--{section}-{f.name}".replace("_", "-") if section else f"--{f.name}"
            flag = "`, `".join(dict.fromkeys([flag, *ALIASES.get(key, [])]))  # --task is its own alias
            env = f"{ENV_PREFIX}{section}_{f.name}".upper() if section else f"{ENV_PREFIX}{f.name}".upper()
            kind = describe(_hints(cls)[f.name])
            default = getattr(values, f.name)
            lines.append(f"| `{flag}` | `{env}` | `{default!r}` | {field_docs(cls)[f.name]} ({kind}) |")
        lines.append("")
    lines += ["## custom", "", "A task's own settings, the fields of its `Settings` dataclass (see "
              "[custom-task.md](custom-task.md)): `--custom-<field>`, `LLM_CUSTOM_<FIELD>`, or a `custom:` section "
              "in YAML. `--task package.module:Class --help` lists them. The built-in tasks have none.", ""]
    return "\n".join(lines)


ALIASES = {"training.epochs": ["--epochs"], "task": ["--task"]}
"""Short flags the usage guide shows, beside the full --<section>-<field> form."""


class _Parser(ArgParser):
    """ArgParser for the config's flags, which are all --<section>-<field> VALUE: none positional."""

    def error(self, message: str) -> NoReturn:
        given = message.split(":", 1)[1].split() if message.startswith("unrecognized arguments:") else []
        if given and not any(word.startswith("--") for word in given):  # else a flag's value may start with -
            one_dash = next((word for word in given if re.fullmatch(r"-[A-Za-z][\w-]*", word)), None)
            if one_dash:  # -epochs: a dash short
                flags = [flag for flag in self._option_string_actions if flag.startswith("--")]
                meant = closest("-" + one_dash, flags) if len(one_dash) > 3 else ""  # -e: too short to tell
                message = f"unrecognized argument {one_dash}: flags take two dashes{meant}"
            else:
                message = "unexpected positional argument(s): every setting is given as --<section>-<field> VALUE"
        elif message.startswith("unrecognized arguments:") and "--custom-" in message:
            message += " (--custom-<field> sets a field of the task's Settings: --task ... --help lists them)"
        super().error(message)


def build_parser(settings: type = NoSettings) -> argparse.ArgumentParser:
    """Every config field as a flag, grouped by section, help text from the field docstring; the task's own
    ``settings`` as --custom-<field>."""
    parser = _Parser(
        prog="llm-train",
        description="Train a model. Every config field is a flag; values from --config and LLM_* env vars come first.",
    )
    parser.add_argument("--config", dest="config_paths", metavar="FILE", action="append", default=argparse.SUPPRESS,
                        help="YAML file of overrides; given more than once, each file overrides the ones before it, "
                             "setting by setting (a base config, then an experiment's changes)")
    parser.add_argument("--print-config", action="store_true", default=argparse.SUPPRESS,
                        help="print the config, every setting, as YAML and exit (save it, edit it, pass it back with --config)")
    # torch.distributed.launch passes --local-rank=N; the LOCAL_RANK variable it also sets is what is read
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=argparse.SUPPRESS,
                        help="set by torch.distributed.launch and ignored: the rank comes from LOCAL_RANK")
    defaults = Config()
    _add_flag(parser, "task", "--task", _hints(Config)["task"], defaults.task, field_docs(Config)["task"])
    defaults.custom = settings()
    for section, cls in {**sections(), "custom": settings}.items():
        if not dataclasses.fields(cls):
            continue
        group = parser.add_argument_group(section if cls is not settings else f"custom ({cls.__qualname__})")
        docs = field_docs(cls)
        section_default = getattr(defaults, section)
        for sub in dataclasses.fields(cls):
            flag = f"--{section}-{sub.name}".replace("_", "-")
            _add_flag(group, f"{section}.{sub.name}", flag, _hints(cls)[sub.name],
                      getattr(section_default, sub.name), docs.get(sub.name, ""))
    return parser


def _add_flag(parser: Any, dest: str, flag: str, tp: Any, default: Any, doc: str) -> None:
    flags = [flag] + [a for a in ALIASES.get(dest, []) if a != flag]
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": f"{doc} (default: {default!r})".replace("%", "%%")}
    if get_origin(tp) is Literal:
        kwargs["metavar"] = "{" + ",".join(map(str, get_args(tp))) + "}"
    elif tp is bool:
        kwargs.update(nargs="?", const="true", metavar="BOOL")
    else:
        kwargs["metavar"] = tp.__name__.upper()
    parser.add_argument(*flags, **kwargs)


def _read_yaml(path: str | os.PathLike) -> Any:
    if not str(path):  # Path("") is the current folder: "Is a directory" would name nothing
        raise UsageError("the config file path is empty: give the YAML file's path")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start}); save the config file as UTF-8") from None
    try:
        loader = yaml.SafeLoader(text)  # yaml.safe_load's steps, with a look at the keys between them
        try:
            node = loader.get_single_node()
            # a top level of another shape than a mapping is refused as such once built
            problem = _problem(node, "", set()) if isinstance(node, yaml.MappingNode) else None
            data = loader.construct_document(node) if node is not None and not problem else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{path}: not valid YAML{where}: {problem}") from None
    except RecursionError:  # the parser recurses once per level: a config is a few levels deep
        raise UsageError(f"{path}: nested too deeply to be a config file") from None
    if problem:
        raise UsageError(f"{path}: {problem}")
    return {} if data is None else data


def _problem(node: yaml.Node, prefix: str, seen: set[int]) -> str | None:
    """The first of what PyYAML would take without a word, said in a line, or None: a key given twice in one
    mapping (PyYAML keeps the last), or a number that YAML 1.1 reads otherwise than the command line does.

    Looked for in the composed nodes, before merge keys (``<<: *base``) are applied: a key overriding a merged
    one is written once.
    """
    if id(node) in seen:  # an alias of a node already looked at, maybe of its own parent
        return None
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        return _misread_number(node, prefix.rstrip("."))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _problem(item, f"{prefix.rstrip('.')}[{i}].", seen)
            if found:
                return found
    elif isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):  # a list or mapping as a key: refused when built, as unhashable
                continue
            line = key.start_mark.line + 1
            if (key.tag, key.value) in lines:  # the tag tells the string "1" from the integer 1
                return f"{_shown(prefix + key.value)} is given twice (lines {lines[key.tag, key.value]} and {line}); keep one"
            lines[key.tag, key.value] = line
            found = _problem(value, f"{prefix}{key.value}.", seen)
            if found:
                return found
    return None


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


def _misread_number(node: yaml.ScalarNode, name: str) -> str | None:
    """What is wrong with a number that YAML 1.1 (PyYAML's) reads otherwise than its digits, and the command line,
    say: 010 is 8, 0b101 is 5, 1:30 is 90 (07 is 7, as written: let through). None for any other scalar."""
    if node.style or node.tag not in (_INT, _FLOAT):  # quoted: text
        return None
    digits = node.value.replace("_", "")
    read = yaml.constructor.SafeConstructor().construct_object(node)
    if re.fullmatch(r"[-+]?[0-9]+(:[0-5]?[0-9])+(\.[0-9]*)?", digits):
        why = "a colon makes it base 60"
    elif node.tag == _INT and re.fullmatch(r"[-+]?0b[01]+", digits):
        why = "0b makes it binary"
    elif node.tag == _INT and re.fullmatch(r"[-+]?0[0-7]+", digits) and read != int(digits):
        why = "a leading 0 makes it octal"
    else:
        return None
    return (f"{_shown(name)} is written {node.value}, which YAML reads as {read} ({why}): write the number meant, "
            f"or put it in quotes if it is text")


def _shown(name: str) -> str:
    return name if re.fullmatch(r"[\w.\[\]]+", name) else repr(name)  # a key of any text stays on one line


def _keys(overrides: dict[str, Any]) -> list[str]:
    """The fields nested overrides give a value: "training.batch_size", "task"."""
    keys = []
    for section, values in overrides.items():
        if isinstance(values, dict):
            keys += [f"{section}.{name}" for name in values]
        else:
            keys.append(section)
    return keys


def _env_note(key: str) -> str:
    return f" (set by the environment variable {ENV_PREFIX}{key.replace('.', '_').upper()})"


def _glance(argv: list[str]) -> tuple[list[str], str | None]:
    """The --config files and the --task flag of a command line, before the parser that needs the task reads it."""
    parser = _Glance(add_help=False, allow_abbrev=False)
    parser.add_argument("--config", dest="config_paths", action="append", default=[])
    parser.add_argument("--task")
    try:
        found, _ = parser.parse_known_args(argv)
    except _Unread:  # the whole parser says what is wrong
        return [], None
    return [_dashes(path) for path in found.config_paths], _dashes(found.task)


def _dashes(value: Any) -> Any:
    """A flag's value as given: argparse (Python 3.11's) drops a value of ``--`` (``--flag=--``) as the end of the
    options, leaving an empty list where every flag here takes one value (``--config``: a list of them, one per
    use)."""
    if value == []:
        return "--"
    return [_dashes(v) for v in value] if isinstance(value, list) else value


class _Unread(Exception):
    pass


class _Glance(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Unread(message)


def _env_overrides(environ: dict[str, str] | os._Environ, settings: type = NoSettings) -> dict[str, Any]:
    """LLM_<SECTION>_<FIELD> variables as nested overrides; unknown LLM_* names only warn."""
    known: dict[str, tuple[str, str | None]] = {"LLM_TASK": ("task", None)}
    for section, cls in {**sections(), "custom": settings}.items():
        for sub in dataclasses.fields(cls):
            known[f"{ENV_PREFIX}{section}_{sub.name}".upper()] = (section, sub.name)
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        if key not in known:
            warnings.warn(f"ignoring environment variable {key}: it names no config field{closest(key, known)}",
                          stacklevel=4)  # at from_args_and_env's caller
            continue
        section, name = known[key]
        if name is None:
            out[section] = value
        else:
            out.setdefault(section, {})[name] = value
    return out
