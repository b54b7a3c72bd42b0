"""The ``plots`` config key: whether a run draws its figures, and whether it can here.

The figures (:mod:`mtlkit.app.plots`) need matplotlib, the optional ``plot`` extra.
``plots: null`` (the default) draws them where matplotlib is installed and says so before
training where it is not; ``plots: true`` needs it (:func:`mtlkit.app.validation.check_plots`
refuses the run before training); ``plots: false`` draws none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mtlkit.app.config import TrainConfig

__all__ = ["PLOT_EXTRA", "missing_matplotlib", "plots_enabled", "plots_note"]

PLOT_EXTRA = 'pip install "mtlkit[plot]"'
"""The command that installs what the plots need."""


def missing_matplotlib() -> str | None:
    """Why no figure can be drawn here (``"plots need matplotlib, ..."``, naming the plot extra),
    or ``None`` when matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        return f"plots need matplotlib ({error}): {PLOT_EXTRA} (or pip install matplotlib)"
    return None


def plots_enabled(config: TrainConfig) -> bool:
    """Whether a run of ``config`` draws its figures: ``plots: true`` (matplotlib required, which
    :func:`~mtlkit.app.validation.check_plots` checks before training), ``plots: null`` (the
    default) where matplotlib is installed, never for ``plots: false``."""
    if config.plots is None:
        return missing_matplotlib() is None
    return config.plots


def plots_note(config: TrainConfig) -> str | None:
    """The note that ``plots: null`` draws no figure here (matplotlib is missing), naming the
    plot extra; ``None`` when there is nothing to say."""
    if config.plots is not None:
        return None
    why = missing_matplotlib()
    if why is None:
        return None
    return f"mtlkit: no figures will be drawn: {why}; plots=false hides this note"
