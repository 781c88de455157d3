"""Reference pages generated from the code, so they cannot drift from it: every config key (the
pydantic models of ``iopfl.config``: name, type, constraints, default, description) and every command
of the CLI (the typer app of ``iopfl.cli``).

This module is also the MkDocs hook of the documentation site (``mkdocs.yml``, ``hooks:``): a page
holding ``<!-- generated: config-reference -->`` or ``<!-- generated: cli-reference -->`` gets the
generated Markdown in its place at build time. A config key without a description is a warning, which
``mkdocs build --strict`` turns into a failed build.
"""

from __future__ import annotations

import inspect
import logging
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types
import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

MARKER = re.compile(r"<!-- generated: ([\w-]+) -->")
log = logging.getLogger("mkdocs.plugins.iopfl")  # MkDocs counts this logger's warnings in --strict


@dataclass(frozen=True)
class KeyDoc:
    """One config key as the reference lists it."""

    key: str  # dotted, e.g. "adapt.lambda_anchor"
    type: str  # e.g. "int, ≥ 1" or "`online`, `published`"
    default: str  # YAML spelling, e.g. "null", "true", "0.001"
    description: str  # "" when the field has none


# --- config ---------------------------------------------------------------------------------------


def _type_text(annotation: Any) -> str:
    """``int | None`` → "int or null", ``Literal["a", "b"]`` → "`a`, `b`", ``list[str]`` → "list of str"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_text(a) for a in args)
    if origin is list:
        return f"list of {_type_text(args[0])}"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", "≥"),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "≤"),
)


def _bounds_text(field: FieldInfo) -> str:
    """The field's numeric bounds, e.g. "≥ 1, ≤ 6" ("" when unbounded)."""
    parts = []
    for item in field.metadata:
        for cls, attr, symbol in _BOUNDS:
            if isinstance(item, cls):
                parts.append(f"{symbol} {getattr(item, attr)}")
    return ", ".join(parts)


def _yaml_text(value: Any) -> str:
    """A default as it is written in a config file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    return str(value)


def _key_doc(key: str, field: FieldInfo, default: Any) -> KeyDoc:
    bounds = _bounds_text(field)
    type_text = _type_text(field.annotation) + (f", {bounds}" if bounds else "")
    return KeyDoc(key, type_text, _yaml_text(default), (field.description or "").strip())


def _sections(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, type[BaseModel], list[KeyDoc]]]:
    """(section name, its model class, its keys) for ``model`` and every nested section, depth first.
    Defaults are read from the instance, so a section's own default (``data.source: synthetic`` in
    the default config) is the one listed."""
    keys, nested = [], []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            nested.append((f"{prefix}{name}", value))
        else:
            keys.append(_key_doc(f"{prefix}{name}", field, value))
    yield prefix.rstrip("."), type(model), keys
    for name, value in nested:
        yield from _sections(value, f"{name}.")


def method_parameters() -> list[tuple[str, KeyDoc]]:
    """(method, key) for every strategy's own ``fl.<param>`` keys, in registry order."""
    from iopfl.fl import STRATEGIES

    return [
        (method, _key_doc(f"fl.{name}", field, field.get_default(call_default_factory=True)))
        for method, strategy in STRATEGIES.items()
        for name, field in strategy.Params.model_fields.items()
    ]


def config_keys(root: BaseModel | None = None) -> list[KeyDoc]:
    """Every key of ``root`` and its sections (default: the default ``Config``, plus the methods'
    ``fl.<param>`` keys)."""
    from iopfl.config import Config

    keys = [key for _, _, section_keys in _sections(root or Config()) for key in section_keys]
    return keys if root is not None else keys + [key for _, key in method_parameters()]


def undocumented_keys(root: BaseModel | None = None) -> list[str]:
    """Config keys whose field has no description (each should say what it does)."""
    return [key.key for key in config_keys(root) if not key.description]


def _markdown(text: str) -> str:
    """Plain help text as Markdown: ``<`` outside code spans escaped (``runs/<method>`` is not a tag)."""
    parts = re.split(r"(`+[^`]*`+)", text)
    return "".join(part if part.startswith("`") else part.replace("<", "&lt;") for part in parts)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return _markdown(" ".join(text.split())).replace("|", "\\|")


def _keys_table(keys: list[KeyDoc], first: tuple[str, list[str]] | None = None) -> list[str]:
    head = ["key", "type", "default", "description"]
    if first:
        head.insert(1, first[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, key in enumerate(keys):
        cells = [f"`{key.key}`", _cell(key.type), f"`{key.default}`", _cell(key.description)]
        if first:
            cells.insert(1, f"`{first[1][i]}`")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _doc_of(cls: type) -> str:
    """A class's own docstring (not an inherited one), as one paragraph."""
    doc = cls.__dict__.get("__doc__") or ""
    return " ".join(inspect.cleandoc(doc).split())


def config_reference() -> str:
    """Markdown: one table per config section (top-level keys first), then the methods' parameters."""
    from iopfl.config import Config

    lines: list[str] = []
    for name, cls, keys in _sections(Config()):
        lines += ["", f"### {'`' + name + '`' if name else 'Top-level keys'}", ""]
        if _doc_of(cls) and name:
            lines += [_markdown(_doc_of(cls)), ""]
        lines += _keys_table(keys) if keys else ["(sections only)"]
    params = method_parameters()
    lines += [
        "",
        "### `fl.<parameter>` of each method",
        "",
        "Accepted only when `fl.method` is that method; another method's parameter is an error naming the key.",
        "",
    ]
    lines += _keys_table([key for _, key in params], ("method", [method for method, _ in params]))
    return "\n".join(lines).strip() + "\n"


# --- command line ---------------------------------------------------------------------------------


def _help_text(text: str | None) -> str:
    return _markdown(inspect.cleandoc(text or ""))


RANGES = {click.IntRange: "INTEGER", click.FloatRange: "FLOAT"}


def _range_text(kind: click.IntRange | click.FloatRange) -> str:
    """A click range as bounds, e.g. "≥ 2" or "> 0, ≤ 1"."""
    low = None if kind.min is None else f"{'>' if kind.min_open else '≥'} {kind.min}"
    high = None if kind.max is None else f"{'<' if kind.max_open else '≤'} {kind.max}"
    return ", ".join(b for b in (low, high) if b)


def _type_metavar(param: click.Parameter, ctx: click.Context) -> str:
    """``KEY=VALUE``, ``PATH``, ``INTEGER`` (a range's bounds go to the help column)."""
    if param.metavar:
        return param.metavar
    if isinstance(param.type, tuple(RANGES)):
        return RANGES[type(param.type)]
    return param.make_metavar(ctx)


def _param_name(param: click.Parameter, ctx: click.Context) -> str:
    if isinstance(param, click.Argument):
        return f"`{param.make_metavar(ctx)}`"
    names = " / ".join(f"`{opt}`" for opt in param.opts + param.secondary_opts)
    if isinstance(param, click.Option) and not param.is_flag:
        names += f" `{_type_metavar(param, ctx)}`"
    return names


def _param_default(param: click.Parameter) -> str:
    if param.required:
        return "required"
    if param.default is None or (isinstance(param, click.Option) and param.multiple and not param.default):
        return ""
    return f"`{_yaml_text(param.default)}`"


def _declared_help(command: click.Command, param: click.Parameter) -> str:
    """The help typer was given for ``param``. Click 8.5 resets an Argument's ``help`` after typer set
    it (so ``--help`` omits it too); the declaration on the command's function still holds it."""
    help_text = getattr(param, "help", None)
    if help_text:
        return help_text
    import typer.utils

    function = getattr(command.callback, "__wrapped__", None)
    declared = typer.utils.get_params_from_function(function).get(param.name) if function else None
    return getattr(getattr(declared, "default", None), "help", None) or ""


def _param_help(command: click.Command, param: click.Parameter) -> str:
    text = _declared_help(command, param)
    if isinstance(param.type, click.IntRange | click.FloatRange):  # the keys of RANGES
        text += f" ({_range_text(param.type)})"
    return _cell(text)


def _params_table(command: click.Command, ctx: click.Context) -> list[str]:
    params = [p for p in command.params if not getattr(p, "hidden", False)]
    if not params:
        return []
    lines = ["| argument / option | default | meaning |", "|---|---|---|"]
    lines += [f"| {_param_name(p, ctx)} | {_param_default(p)} | {_param_help(command, p)} |" for p in params]
    return lines


def _subcommands(group: click.Command, ctx: click.Context) -> Iterator[tuple[click.Command, click.Context]]:
    """A group's visible subcommands, in the order the app lists them, each with its context."""
    if isinstance(group, click.Group):
        for name in group.list_commands(ctx):
            sub = group.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield sub, click.Context(sub, info_name=name, parent=ctx)


def _command_rows(command: click.Command, ctx: click.Context) -> list[str]:
    """One summary row per command below ``command`` (groups' subcommands included)."""
    rows = []
    for sub, sub_ctx in _subcommands(command, ctx):
        rows.append(f"| `{sub_ctx.command_path}` | {_cell(sub.get_short_help_str(limit=300))} |")
        rows += _command_rows(sub, sub_ctx)
    return rows


def _command_pages(command: click.Command, ctx: click.Context, depth: int) -> list[str]:
    """Markdown for ``command`` and, for a group, each of its subcommands."""
    lines = [
        "",
        f"{'#' * depth} `{ctx.command_path}`",
        "",
        _help_text(command.help),
        "",
        "```text",
        command.get_usage(ctx),
        "```",
        "",
    ]
    lines += _params_table(command, ctx)
    for sub, sub_ctx in _subcommands(command, ctx):
        lines += _command_pages(sub, sub_ctx, depth + 1)
    return lines


def cli_reference() -> str:
    """Markdown: a table of the commands, then the ``iopfl`` app's global options and every command (and
    subcommand) with its usage, arguments and options, read from the typer app itself."""
    import typer

    from iopfl.cli import app

    root = typer.main.get_command(app)
    ctx = click.Context(root, info_name="iopfl")
    lines = ["| command | what it does |", "|---|---|", *_command_rows(root, ctx)]
    lines += _command_pages(root, ctx, depth=2)
    return "\n".join(lines).strip() + "\n"


# --- MkDocs hook ----------------------------------------------------------------------------------

GENERATED: dict[str, Callable[[], str]] = {"config-reference": config_reference, "cli-reference": cli_reference}


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """MkDocs hook: each ``<!-- generated: NAME -->`` marker becomes the generated page section NAME."""

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATED:
            log.warning("%s: unknown generated section '%s' (known: %s)", page.file.src_uri, name, ", ".join(GENERATED))
            return match.group(0)
        if name == "config-reference":
            for key in undocumented_keys():
                log.warning("config key '%s' has no description (Field(description=...))", key)
        return GENERATED[name]()

    return MARKER.sub(replace, markdown)
