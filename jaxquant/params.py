"""Parameter pytree paths.

jaxquant params are nested dicts with string keys, and integer keys for layer
indices (``params["layers"][3]["mlp"]["up_proj"]["weight"]``). A *path* is the
dot-joined key sequence, ``"layers.3.mlp.up_proj.weight"``; later modules select
parameters by regular expressions over these paths.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


def _key(part: str) -> str | int:
    return int(part) if part.isdigit() else part


def iter_paths(tree: Mapping[Any, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yields ``(path, leaf)`` in sorted key order; ``None`` subtrees are skipped."""
    for key in sorted(tree, key=lambda k: (isinstance(k, str), k)):
        value = tree[key]
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from iter_paths(value, path + ".")
        elif value is not None:
            yield path, value


def flatten(tree: Mapping[Any, Any]) -> dict[str, Any]:
    """``{"layers": {0: {"w": x}}}`` -> ``{"layers.0.w": x}``."""
    return dict(iter_paths(tree))


def unflatten(flat: Mapping[str, Any]) -> dict[Any, Any]:
    """Inverse of :func:`flatten` (digit-only keys become integers)."""
    tree: dict[Any, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = [_key(p) for p in path.split(".")]
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
