"""Parallelism patterns, one file each: data.py, model.py, hybrid.py (and pipeline.py, tensor.py)."""
