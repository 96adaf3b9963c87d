"""The method registry and the spec-string parser.

A spec string names methods and their parameters: `"fastv:layer=2,ratio=0.5"`; several methods are joined with
`+` and applied in that order. Adding a method is one file plus one line in METHODS."""

from __future__ import annotations

import dataclasses
import importlib
import typing

from .method import Method

METHODS: dict[str, str] = {
    "fastv": "vlm_efficient.token_ops.fastv:FastV",
    "pdrop": "vlm_efficient.token_ops.pyramid_drop:PyramidDrop",
    "dart": "vlm_efficient.token_ops.dart:DART",
    "divprune": "vlm_efficient.token_ops.divprune:DivPrune",
    "dycoke": "vlm_efficient.token_ops.dycoke:DyCoke",
    "random": "vlm_efficient.token_ops.baselines:RandomKeep",
    "pool": "vlm_efficient.token_ops.baselines:GridPool",
    "dyvte": "vlm_efficient.token_ops.dyvte:DyVTE",
    "sparsevlm": "vlm_efficient.token_ops.sparsevlm:SparseVLM",
    "fastervlm": "vlm_efficient.token_ops.fastervlm:FasterVLM",
    "visionzip": "vlm_efficient.token_ops.visionzip:VisionZip",
    "vmtc": "vlm_efficient.token_ops.vmtc:VMTC",
    "yopo": "vlm_efficient.token_ops.yopo:YOPO",
    "avl": "vlm_efficient.token_ops.avl:AVL",
    "plphp": "vlm_efficient.token_ops.plphp:PLPHP",
    "pai": "vlm_efficient.heads.pai:PAI",
    "vaf": "vlm_efficient.heads.vaf:VAF",
    "var": "vlm_efficient.heads.var:VAR",
    "act": "vlm_efficient.heads.act:ACT",
    "ocr_sink": "vlm_efficient.heads.ocr_sink:OCRSink",
    "vhr": "vlm_efficient.heads.vhr:VHR",
    "gift": "vlm_efficient.heads.gift:GIFT",
    "paint": "vlm_efficient.heads.paint:PAINT",
    "adaptvis": "vlm_efficient.heads.adaptvis:AdaptVis",
    "naavit": "vlm_efficient.heads.naavit:NAAViT",
    "ee_mllm": "vlm_efficient.heads.ee_mllm:EEMLLM",
    "aki": "vlm_efficient.heads.aki:AKI",
    "cmai": "vlm_efficient.heads.cmai:CMAI",
    "knockout": "vlm_efficient.heads.knockout:Knockout",
    "equal_distance": "vlm_efficient.heads.equal_distance:EqualDistance",
    "window": "vlm_efficient.heads.window:NeighbourWindow",
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}. Available: {', '.join(sorted(METHODS))}.")
    module, attr = METHODS[name].split(":")
    return getattr(importlib.import_module(module), attr)


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
