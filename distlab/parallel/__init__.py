"""Parallelism patterns (notebooks 01, 08, 09), one file each: data_parallel, model_parallel, grid (data x model),
pipeline, tensor, mesh (DeviceMesh groups), inference."""
