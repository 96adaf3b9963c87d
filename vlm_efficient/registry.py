"""The method registry and the spec-string parser.

A spec string names methods and their parameters: `"fastv:layer=2,ratio=0.5"`; several methods are joined with
`+` and applied in that order. A method registers itself where it is defined, with `@register_method` on its
dataclass (its `name` is the spec's name); the package's API (vlm_efficient/__init__.py) imports shipped_methods.py,
which imports every method module, so every shipped method is registered before a spec is parsed. Adding a method is
one file."""

from __future__ import annotations

import dataclasses
import re
import typing

from .method import Method

METHODS: dict[str, type[Method]] = {}  # spec name -> method class, filled by register_method
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make the Method dataclass `cls` available to spec strings under `cls.name`. Names are unique
    lower-case identifiers; registering a second class under a taken name is an error."""
    # the class itself a dataclass (not only its base): its fields are the spec's parameters
    if not (isinstance(cls, type) and issubclass(cls, Method) and "__dataclass_fields__" in vars(cls)):
        raise TypeError(f"register_method takes a Method dataclass, not {cls!r}: put it above @dataclass")
    name = cls.__dict__.get("name", "")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{cls.__module__}.{cls.__qualname__}: name = {name!r} is not a method name; give the class "
                         "its own lower-case name (letters, digits, '_'), the word spec strings will use")  # fmt: skip
    taken = METHODS.get(name)
    # the same class defined again by its own module (importlib.reload) replaces itself; any other class is a clash
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method name {name!r} is already registered by {taken.__module__}.{taken.__qualname__}; "
                         f"{cls.__module__}.{cls.__qualname__} needs another name")  # fmt: skip
    METHODS[name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}. Available: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def _convert(value: str, kind, method: str, key: str):
    origin = typing.get_origin(kind)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value.lower() == "none":
            return None
        kind = options[0]
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if kind in (int, float, str):
            return kind(value)
        if typing.get_origin(kind) is tuple:
            inner = typing.get_args(kind)[0]
            return tuple(inner(v) for v in value.split("/") if v)
    except ValueError:
        pass
    raise ValueError(f"{method}: parameter {key}={value!r} is not a valid {getattr(kind, '__name__', kind)}")


def parse_method(text: str) -> Method:
    name, _, params = text.strip().partition(":")
    cls = method_class(name.strip())
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"{name}: expected key=value, got {item!r}")
        if key not in fields:
            raise ValueError(f"{name}: unknown parameter {key!r}. Parameters: {', '.join(sorted(fields))}.")
        if key in kwargs:
            raise ValueError(f"{name}: parameter {key!r} is given twice ({text.strip()!r}): give each parameter once")
        kwargs[key] = _convert(value.strip(), hints[key], name, key)
    return cls(**kwargs)


def parse_methods(methods) -> list[Method]:
    """A Method, a list of them, or a spec string -> a list of Method objects."""
    if isinstance(methods, Method):
        return [methods]
    if isinstance(methods, str):
        if not methods.strip():
            return []  # the empty spec: no method
        parts = methods.split("+")
        if not all(part.strip() for part in parts):
            raise ValueError(f"{methods!r} has an empty method: join method specs with one '+', as in 'fastv+dart'")
        return [parse_method(part) for part in parts]
    if isinstance(methods, (list, tuple)):
        return [m for item in methods for m in parse_methods(item)]
    raise TypeError(f"methods must be a Method, a list of them or a spec string, not {type(methods).__name__}")


def split_specs(text: str) -> list[str]:
    """A ';'-separated list of specs (the command line's --methods) -> the specs; "" -> []. An empty segment is
    refused: it is a typo, not the base model (every list is measured against the base anyway)."""
    if not text.strip():
        return []
    specs = [spec.strip() for spec in text.split(";")]
    if not all(specs):
        raise ValueError(f"{text!r} has an empty spec: separate specs with one ';', as in 'fastv;dart'")
    for spec in specs:
        parse_methods(spec)  # a bad spec fails before any work
    return specs


def to_spec(methods: list[Method]) -> str:
    return "+".join(m.spec() for m in methods)
