"""Lazy public names for a package: its API lives in submodules that import torch, but importing
the package (and every command's ``--help``) must not (PEP 562 module ``__getattr__``)."""

from __future__ import annotations

import importlib
from typing import Callable


def exports(package: str, api: dict[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package`` whose public ``name`` lives in the module
    ``api[name]``: a submodule name ("engine") or a full module path ("varstudy.models")."""
    def __getattr__(name: str):
        if name not in api:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        where = api[name] if "." in api[name] else f"{package}.{api[name]}"
        return getattr(importlib.import_module(where), name)

    def __dir__() -> list[str]:
        return sorted(api)

    return __getattr__, __dir__
