"""Command-line options generated from the option declarations (pydantic dataclasses).

A configuration class (`sae_mlops.config.AnalysisConfig`, `FullOptions`, `RunOptions`,
`sae_mlops.training.config.TrainConfig`) declares each option once: name, type, default, bounds and a
description. This module turns those declarations into what each front end needs:

- :func:`typer_parameters`: ``inspect.Parameter`` objects with ``typer.Option`` defaults, for a Typer
  command whose signature is set from them (Typer reads ``__signature__``);
- :func:`add_arguments`: argparse arguments for the MLproject entry points, where an empty string
  means "not given" (MLproject has no null);
- :func:`build`: the configuration from parsed values, with pydantic's validation errors turned into one
  `InputError` sentence naming the option.

Why hand-written: Typer builds commands from function signatures, not from dataclasses, and the
libraries that do (``simple_parsing``, ``tyro``) bring their own argparse front end and do not produce
Typer commands or MLproject parameters; this is the small adapter between pydantic's field metadata
and the two parsers we already use. The declarations stay the one source.
"""

from __future__ import annotations

import argparse
import enum
import functools
import inspect
import re
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from sae_mlops.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class OptionSpec:
    """One user option as declared on a configuration class.

    field: the dataclass field; name: its name on the command line / in MLproject (underscores);
    kind: the scalar type (int, float, str, bool); optional: None is allowed (and means "not given");
    choices: the allowed strings for a Literal type; default: the default (``...`` when required);
    ge / le: inclusive bounds; help: the description; extra: the field's ``json_schema_extra``.
    """

    field: str
    name: str
    kind: type
    optional: bool
    choices: tuple[str, ...] | None
    default: Any
    ge: float | None
    le: float | None
    help: str
    extra: dict[str, Any]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def required(self) -> bool:
        return self.default is ...


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional) for ``X | None`` / ``Optional[X]``; (annotation, False) otherwise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def option_specs(cls: type, *, include_internal: bool = False) -> list[OptionSpec]:
    """The user options of a pydantic dataclass, in declaration order.

    Fields whose ``json_schema_extra`` has ``option: False`` are left out unless `include_internal`.
    """
    pyd = getattr(cls, "__pydantic_fields__", None)
    if pyd is None:
        raise TypeError(f"{cls.__name__} is not a pydantic dataclass")
    out = []
    for f in fields(cls):
        info = pyd[f.name]
        extra = dict(info.json_schema_extra or {}) if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("option") is False and not include_internal:
            continue
        inner, optional = _unwrap(info.annotation)
        choices = tuple(extra["choices"]) if "choices" in extra else None
        if choices:
            kind: type = str
        elif typing.get_origin(inner) is typing.Literal:
            choices = tuple(str(a) for a in typing.get_args(inner))
            kind = str
        elif inner in (int, float, str, bool):
            kind = inner
        else:
            kind = object
        ge = le = None
        for m in info.metadata:
            ge = getattr(m, "ge", ge)
            le = getattr(m, "le", le)
        if info.is_required():
            default: Any = ...
        elif info.default_factory is not None:
            default = info.get_default(call_default_factory=True)
        else:
            default = info.default
        out.append(
            OptionSpec(
                field=f.name,
                name=str(extra.get("cli", f.name)),
                kind=kind,
                optional=optional,
                choices=choices,
                default=default,
                ge=ge,
                le=le,
                help=info.description or "",
                extra=extra,
            )
        )
    return out


# --- Typer ------------------------------------------------------------------------------------

_ENUMS: dict[tuple[str, tuple[str, ...]], type[enum.Enum]] = {}


def _choice_enum(name: str, choices: tuple[str, ...]) -> type[enum.Enum]:
    """A str Enum for a Literal (Typer shows and validates Enum choices); one class per option."""
    key = (name, choices)
    if key not in _ENUMS:
        title = "".join(part.title() for part in name.split("_"))
        made: type[enum.Enum] = enum.Enum(title, {c: c for c in choices}, type=str)  # type: ignore[misc]
        _ENUMS[key] = made
    return _ENUMS[key]


def typer_parameters(cls: type, *, overrides: dict[str, str] | None = None) -> list[inspect.Parameter]:
    """Keyword parameters with ``typer.Option`` defaults for every option of `cls`.

    overrides: option name -> help text to use instead of the declared description (for a command whose
    meaning of the option differs, e.g. the default output directory).
    """
    import typer

    params = []
    for spec in option_specs(cls):
        help_text = (overrides or {}).get(spec.name, spec.help)
        decls = [spec.flag]
        if spec.extra.get("short"):
            decls.append(str(spec.extra["short"]))
        # Typer shows a concrete default itself ("[default: 25; x>=1]"); the prose "(default: ...)" stays
        # only where the default is a rule (None: "the SAE's recorded hook").
        shown = spec.default not in (None, ..., False)
        if shown:
            help_text = re.sub(r"\s*\(default: [^()]*\)\s*$", "", help_text)
        kw: dict[str, Any] = {"help": help_text, "show_default": shown}
        annotation: Any
        default: Any = spec.default
        if spec.choices:
            enum_cls = _choice_enum(spec.name, spec.choices)
            annotation = enum_cls
            kw["case_sensitive"] = False
            if default not in (None, ...):
                default = enum_cls(default)
        elif spec.kind is bool:
            annotation = bool
            if spec.optional:
                decls = [f"{spec.flag}/--no-{spec.flag[2:]}"]
        else:
            annotation = spec.kind if spec.kind is not object else str
            if spec.ge is not None:
                kw["min"] = spec.ge
            if spec.le is not None:
                kw["max"] = spec.le
        if spec.optional:
            annotation = typing.Optional[annotation]  # noqa: UP007 (Typer reads typing.Optional)
        params.append(
            inspect.Parameter(
                spec.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(default, *decls, **kw),
                annotation=annotation,
            )
        )
    return params


def plain(value: Any) -> Any:
    """An Enum member's value; anything else unchanged."""
    return value.value if isinstance(value, enum.Enum) else value


# --- argparse (MLproject entry points) --------------------------------------------------------


def whole(value: str) -> int:
    """An argparse type: a whole number, also written as 1e6 or 16.0."""
    f = float(value)  # accepts 1e6 and 16.0 (MLproject passes numbers as floats)
    if not f.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}")
    return int(f)


def boolean(value: str) -> bool:
    """An argparse type: true/false, yes/no, 1/0, on/off."""
    v = value.lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def choice(*allowed: str) -> Any:
    """An argparse type accepting one of `allowed`."""

    def parse(value: str) -> str:
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"expected {' or '.join(allowed)}, got {value!r}")
        return value

    parse.__name__ = "|".join(allowed)
    return parse


def _cast(spec: OptionSpec) -> Any:
    if spec.choices:
        return choice(*spec.choices)
    return {int: whole, float: float, bool: boolean}.get(spec.kind, str)


def opt(cast: Any) -> Any:
    """An argparse type: '' (or 'none') -> None, else cast(value); MLproject has no null."""
    def parse(value: str) -> Any:
        value = value.strip()
        if value == "" or value.lower() == "none":
            return None
        return cast(value)

    parse.__name__ = getattr(cast, "__name__", "value")
    return parse


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, mlproject_only: bool = True) -> None:
    """Add an argument per option of `cls`: ``--flag VALUE``; an empty VALUE means "not given" (None).

    mlproject_only: leave out options marked ``mlproject: False`` (tracking options that ``mlflow run``
    sets itself).
    """
    for spec in option_specs(cls):
        if mlproject_only and spec.extra.get("mlproject") is False:
            continue
        help_text = spec.help.replace("%", "%%")  # argparse formats help with %
        if spec.required:
            parser.add_argument(spec.flag, dest=spec.name, required=True, type=_cast(spec), help=help_text)
        else:
            parser.add_argument(spec.flag, dest=spec.name, type=opt(_cast(spec)), default=None, help=help_text)


# --- construction -----------------------------------------------------------------------------


def user_errors(cls: type[T]) -> type[T]:
    """Class decorator for a pydantic dataclass: a validation error on construction becomes one
    `InputError` sentence naming the option (``--max-tokens must be at least 1 (got 0).``), so the CLI,
    the entry points, the service and Python callers all see the same user error."""
    from pydantic import ValidationError

    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as e:
            raise InputError(_sentence(cls, e)) from None

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def build(cls: type[T], values: dict[str, Any], **fixed: Any) -> T:
    """`cls` from option values keyed by option name (others ignored; None means "not given", so the
    declared default applies unless the field is optional)."""
    by_name = {s.name: s for s in option_specs(cls)}
    kw: dict[str, Any] = {}
    for name, value in values.items():
        spec = by_name.get(name)
        if spec is None:
            continue
        value = plain(value)
        if value is None and not spec.optional and not spec.required:
            continue
        kw[spec.field] = value
    kw.update(fixed)
    return cls(**kw)


def _sentence(cls: type, error: Any) -> str:
    """One sentence for the first validation error, naming the option as the user typed it."""
    first = error.errors()[0]
    field = str(first["loc"][0]) if first.get("loc") else ""
    specs = {s.field: s for s in option_specs(cls, include_internal=True)}
    spec = specs.get(field)
    name = spec.flag if spec else field
    got = first.get("input")
    msg = first.get("msg", "is invalid")
    ctx = first.get("ctx") or {}
    if "ge" in ctx:
        msg = f"must be at least {ctx['ge']}"
    elif "gt" in ctx:
        msg = f"must be greater than {ctx['gt']}"
    elif "le" in ctx:
        msg = f"must be at most {ctx['le']}"
    elif spec is not None and spec.choices:
        msg = f"must be one of {', '.join(spec.choices)}"
    elif first.get("type") in ("extra_forbidden", "unexpected_keyword_argument"):
        msg = "is not an option"
    else:
        msg = msg[0].lower() + msg[1:] if msg else msg
    return f"{name} {msg} (got {got!r})."
