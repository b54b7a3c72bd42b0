"""Bilevel loss weightings (moved into a package; the next commit splits forum.py by method)."""

from mtlkit.methods.bilevel.forum import *  # noqa: F403
from mtlkit.methods.bilevel.forum import FORUM_GUARD  # noqa: F401
