"""YAML as users write it: ``2e-5`` and ``2.5e1`` are numbers (YAML 1.2), and a mapping with a
repeated key is an error, not the last value silently winning."""

from __future__ import annotations

import re
from typing import Any

import yaml

from .errors import SpectrumError


class _Loader(yaml.SafeLoader):
    pass


# YAML 1.1 (PyYAML's default) needs a dot and a signed exponent for a float: 2e-5 is a string.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


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
