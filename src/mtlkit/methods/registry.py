"""The registry of methods; each method module registers its classes with ``@METHODS.register``."""

from __future__ import annotations

from mtlkit.methods.base import Method
from mtlkit.registry import Registry

METHODS: Registry[Method] = Registry("method")
