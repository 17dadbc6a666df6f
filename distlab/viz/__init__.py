"""Figures (plotly) and live dashboards (ipywidgets) of runs. Imported by notebooks, never by ranks."""

from .figures import training_figure
from .live import Dashboard

__all__ = ["Dashboard", "training_figure"]
