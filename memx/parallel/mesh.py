"""The only place a mesh is built; also distributed initialisation (single host tolerated)."""

import logging
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from memx.parallel.config import ParallelConfig

log = logging.getLogger(__name__)


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Start multi-controller JAX when launched on several hosts; a no-op on one host.

  Under SLURM with more than one task, JAX's cluster detection fills in the coordinator.
  Elsewhere pass the coordinator address, process count and id explicitly.
  """
  if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
    return
  if coordinator is not None:
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  log.info("process %d/%d, local devices: %s", jax.process_index(), jax.process_count(),
           jax.local_devices())


def make_mesh(cfg: ParallelConfig, devices=None) -> Mesh:
  """Mesh over all (or the given) devices with Auto axis types (shard_map-friendly)."""
  devices = jax.devices() if devices is None else devices
  shape = cfg.resolved_shape(len(devices))
  mesh = Mesh(np.asarray(devices).reshape(shape), cfg.mesh_axes,
              axis_types=(AxisType.Auto,) * len(shape))
  log.info("mesh %s", dict(zip(cfg.mesh_axes, shape, strict=True)))
  return mesh


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim over the data axis; everything else replicated."""
  return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
