"""distlab: learn distributed AI by running it. See README.md and notebooks/00_start_here.ipynb."""

from . import data, models
from .context import Context
from .launch import LaunchTimeout, RankFailure, launch, shutdown
from .ranks import WorldSizeError, place, world_sizes
from .runs import Run, load_run

__all__ = ["data", "models", "Context", "LaunchTimeout", "RankFailure", "Run", "launch", "load_run", "place",
           "shutdown", "world_sizes", "WorldSizeError"]
__version__ = "0.1.0"
