"""A DeviceMesh that gives its process groups back: warm ranks outlive every launch, so a mesh built in
one launch must not leave its groups' connections open for the next."""

from __future__ import annotations

from contextlib import contextmanager

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@contextmanager
def device_mesh(device_type: str, shape: tuple[int, ...], names: tuple[str, ...]):
    """init_device_mesh over the default group, axes named `names`; its axis groups destroyed on exit."""
    mesh: DeviceMesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
    try:
        yield mesh
    finally:
        if len(shape) > 1:  # a 1-D mesh over every rank is the default group itself, which stays
            for name in names:
                dist.destroy_process_group(mesh.get_group(name))
