"""ParallelConfig: mesh shape, sharding strategy and how sequence-parallel attention runs."""

import dataclasses
import math

from memx._validate import one_of, require
from memx.parallel.rules import REQUIRED_AXES, STRATEGIES

SEQUENCE_METHODS = ("ring", "all_to_all")
# How a sequence is laid out over the "seq" axis: contiguous shards, or the causal
# load-balanced orders (zigzag = two mirrored chunks per device, striped = every n-th token).
SEQUENCE_LAYOUTS = ("contiguous", "zigzag", "striped")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelConfig:
  """How devices are arranged.

  Attributes:
    strategy: name of a rule table in memx.parallel.rules: "dp" (data parallel), "fsdp"
      (ZeRO-3 over an "fsdp" axis; with a "data" axis > 1 it is hybrid sharding), "tp"
      (Megatron tensor parallel over "tensor"), "sp" (sequence parallel over "seq"), or a
      combination such as "fsdp_tp", "fsdp_sp", "dp_tp", "fsdp_sp_tp".
    mesh_shape: sizes of the mesh axes; one entry may be -1 (= all remaining devices).
    mesh_axes: names of the mesh axes, same length as mesh_shape. Must hold "data" and every
      axis the strategy splits over ("fsdp", "seq", "tensor").
    sequence_method: attention over a sequence split on "seq": "ring" (K/V blocks passed
      around the ring, memory O(T/n) per device) or "all_to_all" (Ulysses: re-shard from
      sequence to heads around the kernel; needs heads divisible by the seq axis).
    sequence_layout: token order over "seq" for ring attention: "zigzag" (default; equal
      causal work on every device), "striped" or "contiguous".
  """

  strategy: str = "dp"
  mesh_shape: tuple[int, ...] = (-1,)
  mesh_axes: tuple[str, ...] = ("data",)
  sequence_method: str = "ring"
  sequence_layout: str = "zigzag"

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
    missing = [a for a in REQUIRED_AXES[self.strategy] if a not in self.mesh_axes]
    require(not missing, "parallel", "mesh_axes", self.mesh_axes,
            f"strategy {self.strategy!r} splits over mesh axes {REQUIRED_AXES[self.strategy]} "
            f"but {tuple(missing)} is missing; e.g. mesh_axes="
            f"{REQUIRED_AXES[self.strategy]} with mesh_shape="
            f"{(1,) * (len(REQUIRED_AXES[self.strategy]) - 1) + (-1,)} (then set the sizes)")
    idle = [a for a, n in zip(self.mesh_axes, self.mesh_shape, strict=True)
            if a not in REQUIRED_AXES[self.strategy] and n > 1]
    require(not idle, "parallel", "mesh_shape", self.mesh_shape, self._idle_message(idle))
    one_of("parallel", "sequence_method", self.sequence_method, SEQUENCE_METHODS)
    one_of("parallel", "sequence_layout", self.sequence_layout, SEQUENCE_LAYOUTS)

  def _idle_message(self, idle: list[str]) -> str:
    return (f"strategy {self.strategy!r} splits nothing over mesh axes {tuple(idle)}: their "
            "devices would repeat each other's work. Give them size 1, or a strategy that uses "
            f"them (its axes: {REQUIRED_AXES[self.strategy]})")

  def resolved_shape(self, n_devices: int) -> tuple[int, ...]:
    known = math.prod(s for s in self.mesh_shape if s != -1)
    if -1 in self.mesh_shape:
      require(n_devices % known == 0, "parallel", "mesh_shape", self.mesh_shape,
              f"fixed axes ({known}) must divide the {n_devices} devices")
      shape = tuple(n_devices // known if s == -1 else s for s in self.mesh_shape)
      idle = [a for a, n in zip(self.mesh_axes, shape, strict=True)
              if a not in REQUIRED_AXES[self.strategy] and n > 1]
      require(not idle, "parallel", "mesh_shape", self.mesh_shape,
              f"resolves to {shape} on {n_devices} devices; " + self._idle_message(idle))
      return shape
    require(known == n_devices, "parallel", "mesh_shape", self.mesh_shape,
            f"axis sizes must multiply to the {n_devices} devices")
    return self.mesh_shape

  @property
  def layout(self) -> str:
    """The token order the data must arrive in: only ring attention reorders the sequence."""
    if "sp" in self.strategy.split("_") and self.sequence_method == "ring":
      return self.sequence_layout
    return "contiguous"
