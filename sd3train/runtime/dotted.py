"""Objects named by dotted paths in configs (`trainer.callbacks`), imported."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str) -> Any:
    """The callable a dotted path names (`package.module.Name`), imported; ValueError, ImportError,
    AttributeError or TypeError saying what is wrong with `path`."""
    module_name, _, name = path.rpartition(".")
    if not module_name or not name:
        raise ValueError(f"{path!r} is not a dotted path (package.module.Name)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"cannot import {module_name!r} for {path!r}: {error}") from error
    if not hasattr(module, name):
        raise AttributeError(f"module {module_name!r} has no {name!r}")
    found = getattr(module, name)
    if not callable(found):
        raise TypeError(f"{path!r} is a {type(found).__name__}, not a class or function")
    return found
