"""The registry of distillation methods: ``names()`` lists them, ``build(name, **hp)`` makes one."""
from __future__ import annotations

import importlib
from typing import Dict, List, Type

from kdlib.errors import unknown_name
from kdlib.methods.base import Method, SetupContext, StepContext

_REGISTRY: Dict[str, Type[Method]] = {}
# one module per method; imported lazily so a broken method cannot break the others' import
_MODULES = ["vanilla", "kd", "dkd", "cwkd", "clkd", "rekd", "aekt", "dlkd", "dist", "nkd", "ctkd", "mlkd"]


def register(cls: Type[Method]) -> Type[Method]:
    """Class decorator: make a :class:`Method` available to ``build`` under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for module in _MODULES:
        importlib.import_module(f"kdlib.methods.{module}")


def names() -> List[str]:
    _load_all()
    return list(_REGISTRY)


def get(name: str) -> Type[Method]:
    _load_all()
    if name not in _REGISTRY:
        raise unknown_name("method", name, _REGISTRY)
    return _REGISTRY[name]


def build(name: str, **hyperparameters) -> Method:
    """Build the method ``name`` with its defaults overridden by ``hyperparameters`` (validated)."""
    return get(name)(**hyperparameters)


__all__ = ["Method", "SetupContext", "StepContext", "build", "get", "names", "register"]
