"""``mtlkit compare`` (moved into a package; the next commit splits grid.py along its seams)."""

from mtlkit.app.compare.grid import *  # noqa: F403
from mtlkit.app.compare.grid import check_same_config, compare_command, is_finished  # noqa: F401
