"""YAML as users write it (YAML 1.2's core schema): ``2e-5`` and ``2.5e1`` are numbers, ``on``
and ``0755`` are not booleans or octal, and a mapping with a repeated key is an error, not the
last value silently winning."""

from __future__ import annotations

import re
from typing import Any

import yaml

from .errors import SpectrumError


class _Loader(yaml.SafeLoader):
    pass


# YAML 1.2's core schema instead of PyYAML's 1.1: ``2e-5`` is a number (1.1 needs a dot and a
# signed exponent), while ``on``/``yes``, ``0755`` (octal), ``1:00`` (base 60) and ``1_000`` are
# what they look like: text, decimal 755, text, text.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag.rsplit(":", 1)[-1]
            not in ("bool", "int", "float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}  # fmt: skip
for kind, pattern, first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    (
        "float",
        r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        list("-+0123456789."),
    ),
):
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{kind}", re.compile(pattern, re.X), first)


def _int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    # 0o and 0x are octal and hexadecimal; 0755 is 755, as YAML 1.2 reads it.
    return int(text, 0 if text.startswith(("0o", "0x")) else 10)


_Loader.add_constructor("tag:yaml.org,2002:int", _int)


def _unique_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(text: str, where: str) -> Any:
    """Parse ``text``; a syntax error or a repeated key is one :class:`SpectrumError` naming
    ``where``."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise SpectrumError(f"{where} is not valid YAML ({problem})") from exc
