"""WeightQuant: how `memx.quant.model.quantize_model` quantizes a trained model's projections."""

import dataclasses

METHODS = ("rtn", "gptq", "nf4")
BITS = (2, 3, 4, 8)
# codes per stored byte (memx.kernels.intq: 3-bit codes sit in 4-bit containers); a group must
# fill whole bytes
CODES_PER_BYTE = {2: 4, 3: 2, 4: 2, 8: 1}


@dataclasses.dataclass(frozen=True)
class WeightQuant:
  """Attributes:
    method: "gptq" (second-order error compensation on calibration inputs, memx.quant.gptq),
      "rtn" (round-to-nearest, the same integer format) or "nf4" (QLoRA's 4-bit NormalFloat with
      double-quantized absmax blocks of 64; bits and group_size are then 4 and 64).
    bits: 2, 3, 4 or 8 (3-bit codes are stored in 4-bit containers).
    group_size: consecutive input rows per column sharing a scale and zero point.
    calib_batches: GPTQ's calibration batches of the run's training data.
    damp: GPTQ's dampening of the Hessian diagonal (fraction of its mean).
  """

  method: str = "gptq"
  bits: int = 4
  group_size: int = 128
  calib_batches: int = 8
  damp: float = 0.01

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method {self.method!r} is not one of {list(METHODS)}")
    if self.method == "nf4" and (self.bits, self.group_size) != (4, 64):
      raise ValueError(f"nf4 is 4 bits in blocks of 64; got bits {self.bits}, group "
                       f"{self.group_size}")
    if self.bits not in BITS:
      raise ValueError(f"bits = {self.bits} is not one of {list(BITS)}")
    if self.group_size < 1 or self.group_size % CODES_PER_BYTE[self.bits]:
      raise ValueError(f"group_size = {self.group_size} must be a positive multiple of "
                       f"{CODES_PER_BYTE[self.bits]} at {self.bits} bits (whole bytes of codes "
                       "per group)")
    if self.calib_batches < 1:
      raise ValueError(f"calib_batches = {self.calib_batches} must be >= 1")
    if not 0 <= self.damp < 1:
      raise ValueError(f"damp = {self.damp} must lie in [0, 1)")

  @classmethod
  def parse(cls, text: str) -> "WeightQuant":
    """"gptq:4:128[:CALIB]", "rtn:3:64" or "nf4"."""
    parts = text.split(":")
    if parts[0] == "nf4" and len(parts) == 1:
      return cls(method="nf4", bits=4, group_size=64)
    if parts[0] not in ("rtn", "gptq") or len(parts) not in (3, 4) or (
        parts[0] == "rtn" and len(parts) == 4):
      raise ValueError(f"{text!r} is not METHOD:BITS:GROUP (gptq:4:128, gptq:4:128:CALIB_BATCHES, "
                       "rtn:4:128) or nf4")
    try:
      nums = [int(p) for p in parts[1:]]
    except ValueError:
      raise ValueError(f"{text!r}: BITS, GROUP and CALIB_BATCHES must be integers") from None
    return cls(parts[0], *nums)

  @property
  def name(self) -> str:
    if self.method == "nf4":
      return "nf4"
    name = f"{self.method}-w{self.bits}g{self.group_size}"
    if self.method == "gptq":  # settings other than the defaults name the evaluation too
      default = WeightQuant()
      if self.calib_batches != default.calib_batches:
        name += f"-c{self.calib_batches}"
      if self.damp != default.damp:
        name += f"-d{self.damp:g}"
    return name
