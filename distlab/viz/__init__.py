"""Figures (plotly) and live dashboards (ipywidgets) of runs, one module per course topic. Imported by
notebooks, never by ranks."""

from .figures import training_figure
from .live import Dashboard

__all__ = ["Dashboard", "training_figure"]
