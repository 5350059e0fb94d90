"""ParallelConfig: mesh shape and sharding strategy."""

import dataclasses
import math

from memx._validate import one_of, require

STRATEGIES = ("dp",)  # fsdp / tp / sequence parallel arrive with the scaling issue


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelConfig:
  """How devices are arranged.

  Attributes:
    strategy: name of a rule table in memx.parallel.rules ("dp": data parallel).
    mesh_shape: sizes of the mesh axes; one entry may be -1 (= all remaining devices).
    mesh_axes: names of the mesh axes, same length as mesh_shape.
  """

  strategy: str = "dp"
  mesh_shape: tuple[int, ...] = (-1,)
  mesh_axes: tuple[str, ...] = ("data",)

  def __post_init__(self):
    one_of("parallel", "strategy", self.strategy, STRATEGIES)
    require(len(self.mesh_shape) == len(self.mesh_axes), "parallel", "mesh_shape",
            self.mesh_shape, f"needs one size per axis of parallel.mesh_axes = {self.mesh_axes}")
    require(sum(s == -1 for s in self.mesh_shape) <= 1, "parallel", "mesh_shape",
            self.mesh_shape, "at most one axis may be -1")
    require(all(s == -1 or s > 0 for s in self.mesh_shape), "parallel", "mesh_shape",
            self.mesh_shape, "sizes must be positive or -1")
    require(len(set(self.mesh_axes)) == len(self.mesh_axes), "parallel", "mesh_axes",
            self.mesh_axes, "axis names must be distinct")
    require("data" in self.mesh_axes, "parallel", "mesh_axes", self.mesh_axes,
            "must contain a 'data' axis")

  def resolved_shape(self, n_devices: int) -> tuple[int, ...]:
    known = math.prod(s for s in self.mesh_shape if s != -1)
    if -1 in self.mesh_shape:
      require(n_devices % known == 0, "parallel", "mesh_shape", self.mesh_shape,
              f"fixed axes ({known}) must divide the {n_devices} devices")
      return tuple(n_devices // known if s == -1 else s for s in self.mesh_shape)
    require(known == n_devices, "parallel", "mesh_shape", self.mesh_shape,
            f"axis sizes must multiply to the {n_devices} devices")
    return self.mesh_shape
