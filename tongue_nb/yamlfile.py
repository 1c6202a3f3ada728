"""YAML files as their author wrote them: `yaml.safe_load`, except that a key given twice in one mapping is an
error naming it and both lines (PyYAML keeps the last one silently, so `batch_size: 16` further up a recipe
would be dropped without a word). The error is a `yaml.YAMLError`, so every reader's handler names the file."""
from __future__ import annotations

from typing import Any

import yaml


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses repeated mapping keys."""


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: a merged key may be overridden on purpose
            continue
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        try:
            first = seen.setdefault(key, line)
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if first != line:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice in one mapping (lines {first} and {line}); keep one",
                key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def safe_load(text: str) -> Any:
    """Like yaml.safe_load; a repeated key is a yaml.YAMLError naming the key and its two lines."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
