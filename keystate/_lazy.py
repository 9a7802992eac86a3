"""Public names of a package's ``__init__`` that load on first access (PEP 562).

keystate's package faces re-export many names, but importing ``keystate.storage`` must not import boto3 and
importing ``keystate.runtime.restore_rules`` must not import asyncio; so each face maps a name to the module
that defines it and resolves it here the first time it is asked for, then caches it in the package.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection, Mapping, MutableMapping
from typing import Any

__all__ = ["lazy_dir", "resolve_lazy"]


def resolve_lazy(
    namespace: MutableMapping[str, Any], name: str, lazy: Mapping[str, str], submodules: Collection[str] = ()
) -> Any:
    """The package attribute ``name``: a name of ``lazy`` (``name -> defining module``) or a submodule.

    Raises:
        AttributeError: ``name`` is neither, as for any missing module attribute.
    """
    package = namespace["__name__"]
    if name in submodules:
        value = importlib.import_module(f"{package}.{name}")
    elif name in lazy:
        value = getattr(importlib.import_module(lazy[name]), name)
    else:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    namespace[name] = value
    return value


def lazy_dir(namespace: Mapping[str, Any]) -> list[str]:
    """``dir()`` of a package with lazy names: what is loaded plus everything in its ``__all__``."""
    return sorted(set(namespace) | set(namespace["__all__"]))
