"""The only place a mesh is built; also distributed initialisation (single host tolerated)."""

import inspect
import logging
import os
import time

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from memx.errors import ConfigError, UserError
from memx.parallel.axes import BATCH, SEQ
from memx.parallel.config import ParallelConfig
from memx.parallel.rules import RULES, logical_to_spec

log = logging.getLogger(__name__)

# Bounds on waiting for peers (seconds). JAX's own defaults (300 s to start, 100 s without a
# heartbeat) are bounded too; these are shorter so a dead peer ends a job within ~a minute,
# and overridable because very large jobs can need longer to assemble.
INIT_TIMEOUT_ENV, HEARTBEAT_TIMEOUT_ENV = "MEMX_DIST_INIT_TIMEOUT", "MEMX_DIST_HEARTBEAT_TIMEOUT"
DEFAULT_INIT_TIMEOUT_S, DEFAULT_HEARTBEAT_TIMEOUT_S = 300, 60


class DistributedInitError(UserError):
  """jax.distributed could not assemble all processes (a peer is missing or unreachable, the
  coordinator's port is taken): a one-paragraph error of the CLI, exit status 2."""


def check_process_args(coordinator: str | None, num_processes: int | None,
                       process_id: int | None) -> None:
  """ConfigError for an inconsistent --coordinator / --num-processes / --process-id set."""
  explicit = (num_processes, process_id)
  if coordinator is None:
    if any(x is not None for x in explicit) and "SLURM_NTASKS" not in os.environ:
      raise ConfigError(
          f"--num-processes = {num_processes} / --process-id = {process_id} is not allowed "
          "without --coordinator HOST:PORT: pass all three (under SLURM, pass none; srun's "
          "environment supplies them).")
    return
  host, sep, port = coordinator.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f"--coordinator = {coordinator!r} is not allowed: expected HOST:PORT, "
                      "e.g. 127.0.0.1:12355 or node001:12355.")
  if num_processes is None or process_id is None:
    raise ConfigError(f"--coordinator = {coordinator!r} needs --num-processes N and "
                      f"--process-id I as well (got {num_processes}, {process_id}).")
  if num_processes < 1:
    raise ConfigError(f"--num-processes = {num_processes} is not allowed: must be >= 1.")
  if not 0 <= process_id < num_processes:
    raise ConfigError(f"--process-id = {process_id} is not allowed: must lie in "
                      f"[0, {num_processes}) for --num-processes = {num_processes}.")


def _timeout(env: str, default: int) -> int:
  raw = os.environ.get(env)
  if raw is None:
    return default
  if not raw.isdigit() or int(raw) <= 0:
    raise ConfigError(f"{env} = {raw!r} is not allowed: must be a positive number of seconds.")
  return int(raw)


def _timeout_kwargs(init_s: int, heartbeat_s: int) -> dict:
  # Only the keywords this jax accepts (0.11 and 0.12 both have them; older ones did not).
  params = inspect.signature(jax.distributed.initialize).parameters
  kwargs = {"initialization_timeout": init_s, "heartbeat_timeout_seconds": heartbeat_s}
  return {k: v for k, v in kwargs.items() if k in params}


def _is_initialized() -> bool:
  fn = getattr(jax.distributed, "is_initialized", None)
  return bool(fn()) if fn is not None else False


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None, *,
                                 initialization_timeout: int | None = None,
                                 heartbeat_timeout: int | None = None) -> None:
  """Start multi-controller JAX when launched on several hosts; a no-op on one host.

  Under SLURM with more than one task, JAX's cluster detection fills in the coordinator.
  Elsewhere pass the coordinator address, process count and id explicitly. Waiting is bounded:
  a peer that never arrives fails initialisation after `initialization_timeout` seconds
  (env MEMX_DIST_INIT_TIMEOUT, default 300), and one that dies later is detected by the
  coordination service's heartbeat after `heartbeat_timeout` seconds (env
  MEMX_DIST_HEARTBEAT_TIMEOUT, default 60), which terminates the surviving processes with an
  error instead of leaving them blocked in a collective.

  Raises:
    ConfigError: inconsistent flags (checked before anything starts).
    DistributedInitError: the processes could not assemble within the timeout.
  """
  check_process_args(coordinator, num_processes, process_id)
  if _is_initialized():
    return
  slurm = coordinator is None and int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if coordinator is None and not slurm:
    return
  init_s = initialization_timeout or _timeout(INIT_TIMEOUT_ENV, DEFAULT_INIT_TIMEOUT_S)
  beat_s = heartbeat_timeout or _timeout(HEARTBEAT_TIMEOUT_ENV, DEFAULT_HEARTBEAT_TIMEOUT_S)
  kwargs = _timeout_kwargs(init_s, beat_s)
  where = (f"coordinator {coordinator}, process {process_id} of {num_processes}" if coordinator
           else f"SLURM job {os.environ.get('SLURM_JOB_ID', '?')}, "
                f"{os.environ.get('SLURM_NTASKS')} tasks")
  if coordinator is not None and process_id == 0:
    _check_port_free(coordinator)
  t0 = time.monotonic()
  try:
    if coordinator is not None:
      jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)
    else:
      jax.distributed.initialize(**kwargs)
  except Exception as e:  # jaxlib raises XlaRuntimeError/RuntimeError with a long gRPC message
    text = str(e)
    if any(k in text.lower() for k in ("address already in use", "failed to bind",
                                        "could not start")):
      hint = ("The coordinator could not listen on its port: another process holds it. Choose "
              "another port (--coordinator HOST:PORT, launch_local.sh --port).")
    else:
      hint = ("Check that every process was started with the same --coordinator and "
              "--num-processes, a distinct --process-id, and that the coordinator's port is "
              "reachable.")
    raise DistributedInitError(
        f"jax.distributed.initialize failed ({where}) after {time.monotonic() - t0:.0f} s "
        f"(timeout {init_s} s): {text[:500]}. {hint}") from e
  if num_processes is not None and jax.process_count() != num_processes:
    # The coordinator's count wins inside jaxlib: a process told another count would run on.
    raise DistributedInitError(
        f"this process was started with --num-processes {num_processes}, but the job the "
        f"coordinator {coordinator} assembled has {jax.process_count()} processes: start "
        "every process with the same --num-processes.")
  log.info("process %d/%d, local devices: %s", jax.process_index(), jax.process_count(),
           jax.local_devices())


def _check_port_free(coordinator: str) -> None:
  """Process 0 hosts the coordination service on the coordinator's port (all interfaces): a
  port another process holds makes jaxlib's server crash the process (a segfault, no Python
  error), so it is probed here first."""
  import errno
  import socket

  port = int(coordinator.rsplit(":", 1)[1])
  for family, addr in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise DistributedInitError(
            f"the coordinator's port {port} (--coordinator {coordinator}) is in use by another "
            "process, so process 0 cannot host the coordination service there. Choose another "
            "port (--coordinator HOST:PORT, launch_local.sh --port).") from None
      # no IPv6 (or the like): the other family decides


def make_mesh(cfg: ParallelConfig, devices=None) -> Mesh:
  """Mesh over all (or the given) devices with Auto axis types (shard_map-friendly).

  Devices are laid out process-major (jax.devices() order), so the last mesh axes stay within
  a host: put "tensor" (and "seq") last and "data" first, where the slow links are cheapest.
  """
  devices = jax.devices() if devices is None else devices
  shape = cfg.resolved_shape(len(devices))
  mesh = Mesh(np.asarray(devices).reshape(shape), cfg.mesh_axes,
              axis_types=(AxisType.Auto,) * len(shape))
  log.info("mesh %s", dict(zip(cfg.mesh_axes, shape, strict=True)))
  return mesh


def batch_spec(mesh: Mesh, strategy: str | None = None) -> PartitionSpec:
  """Spec of [B, T] token arrays: B over the strategy's batch axes, T over "seq" when split."""
  if strategy is None:
    return PartitionSpec("data")
  return logical_to_spec((BATCH, SEQ), RULES[strategy], dict(mesh.shape))


def batch_sharding(mesh: Mesh, strategy: str | None = None) -> NamedSharding:
  """Leading (batch) dim over the data axis (and fsdp / seq per strategy); rest replicated."""
  return NamedSharding(mesh, batch_spec(mesh, strategy))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
