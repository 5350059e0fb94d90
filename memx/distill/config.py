"""DistillConfig: the student's layout and seeding, and the three stages of the mmMamba recipe.

Overridable on the command line as `--set stage1.steps=200 --set student.every=2`. Stage
defaults follow mmMamba (`configs/experiment/distill_stage{1,2,3}_mmMamba.yaml`) scaled down to
memx's small runs: stage 1 lr 1e-3, stage 2 5e-4, stage 3 5e-5 there; mse ×1000; KL at
temperature 1 without CE. memx's stage 3 trains every student parameter by default, as the issue
asks; mmMamba trains only the mixers minus the out-projection (`trainable = "mixer_in"`).
"""

import dataclasses
from typing import Literal

from memx._validate import one_of, require
from memx.checkpoint.config import CheckpointConfig
from memx.data.config import DataConfig

STUDENT_KINDS = ("linear", "hybrid")
INITS = ("seed", "random")
GATES = ("mean", "random")
LOSSES = ("layer_mse", "kl")
# Which student parameters a stage trains (memx.distill.stages.trainable_filter):
#   new       the SSM parameters seeding creates (Δ projection and bias, A, convs, gate, norm, D)
#   mixer_in  the converted mixers except the out-projection (mmMamba's stage 3 list)
#   mixer     the whole converted mixers, seeded projections included (mmMamba's stage 2)
#   all       every student parameter: embeddings, norms, MLPs, kept attention layers
TRAINABLE = ("new", "mixer_in", "mixer", "all")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudentConfig:
  """Which layers become Mamba-2 and how the new SSM parameters start.

  Attributes:
    kind: "linear" converts every attention layer; "hybrid" keeps attention at layers
      i % every == 0 (mmMamba-hybrid keeps every 4th) and converts the rest.
    every: the hybrid's attention period (>= 2; ignored for "linear").
    init: "seed" maps the attention weights into the mixer (memx.distill.seed); "random" keeps
      Mamba-2's own initialisation for the converted mixers (the "skip seeding" ablation).
      Embeddings, norms, MLPs and kept layers are copied from the teacher either way.
    dt_min, dt_max: the seeded Δ per head, log-spaced over [dt_min, dt_max] (Δ projection 0).
    a_init: the seeded A = -a_init per head, so a state decays by exp(-Δ·a_init) per token
      (0.37–0.99 at the defaults: half-lives of 1 to 69 tokens, from local heads to long-range
      ones); 0 disables decay (pure linear attention).
    qk_scale, v_scale: the seeded convolutions' one nonzero tap (a scaled identity) on B, C
      and on x. Mamba-2 applies SiLU after its conv; a small tap keeps SiLU in its linear
      regime, so φ(q)·φ(k) ≈ (qk_scale²/4)·q·k (the first-order term of exp(q·k/√K)) and
      φ(v) ≈ (v_scale/2)·v, and the per-head RMSNorm removes the scale. With taps of 1,
      SiLU's asymmetry distorts both (tests/distill and the experiment's docstring measure it).
    gate: the output gate's seeded projection: "mean" aims it at the mean teacher mixer input
      (calibrated on one batch) so the gate is a positive per-head scalar that the per-head
      RMSNorm cancels for most tokens; "random" is mmMamba's small random projection.
    gate_scale: z = gate_scale at the mean input (silu(4) ≈ 3.93: the gate's linear regime).
    conv_width: width of the converted layers' short convolution (seeded as the identity).
    chunk_size: SSD chunk length of the converted layers.
  """

  kind: Literal["linear", "hybrid"] = "linear"
  every: int = 4
  init: Literal["seed", "random"] = "seed"
  dt_min: float = 0.01
  dt_max: float = 1.0
  a_init: float = 1.0
  qk_scale: float = 0.1
  v_scale: float = 0.1
  gate: Literal["mean", "random"] = "mean"
  gate_scale: float = 4.0
  conv_width: int = 4
  chunk_size: int = 64

  def __post_init__(self):
    name = "student"
    one_of(name, "kind", self.kind, STUDENT_KINDS)
    require(isinstance(self.every, int) and self.every >= 2, name, "every", self.every,
            "must be an integer >= 2 (attention kept at layers i % every == 0; 1 would keep "
            "every layer)")
    one_of(name, "init", self.init, INITS)
    require(0 < self.dt_min <= self.dt_max, name, "dt_min", self.dt_min,
            f"must satisfy 0 < dt_min <= dt_max = {self.dt_max}")
    require(self.a_init >= 0, name, "a_init", self.a_init,
            "must be >= 0 (A = -a_init; 0 disables the decay)")
    for f in ("qk_scale", "v_scale"):
      require(getattr(self, f) > 0, name, f, getattr(self, f), "must be > 0 (the seeded conv "
              "tap; 1 is the plain identity)")
    one_of(name, "gate", self.gate, GATES)
    require(self.gate_scale > 0, name, "gate_scale", self.gate_scale, "must be > 0")
    require(self.conv_width >= 1, name, "conv_width", self.conv_width, "must be >= 1")
    require(self.chunk_size >= 16 and self.chunk_size & (self.chunk_size - 1) == 0, name,
            "chunk_size", self.chunk_size, "must be a power of two >= 16")

  def keeps_attention(self, layer: int) -> bool:
    """Whether the student keeps the teacher's attention at `layer`."""
    return self.kind == "hybrid" and layer % self.every == 0

  @property
  def label(self) -> str:
    """"linear" or "hybrid4": names distillation directories."""
    return "linear" if self.kind == "linear" else f"hybrid{self.every}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageConfig:
  """One distillation stage: what trains, on which loss, for how long.

  Attributes:
    index: which stage this is (1, 2 or 3); names the config section in error messages.
    loss: "layer_mse" (teacher-forced, per converted layer: mse_scale · mean over layers of
      MSE(student mixer(u), teacher attention(u)) on the teacher's mixer inputs u) or "kl"
      (end-to-end: kl_weight · τ² · KL(teacher ‖ student) over softmax(logits / τ), plus
      ce_weight · next-token cross-entropy).
    trainable: "new", "mixer_in", "mixer" or "all" (see TRAINABLE above).
    steps, batch_size: optimizer steps and rows per batch.
    lr, warmup_steps, min_lr_ratio, weight_decay, clip_norm: AdamW with linear warmup and
      cosine decay (memx.train.optim), as for `memx run`.
    mse_scale: multiplies the layer-wise MSE (mmMamba's mse_factor 1000).
    temperature, kl_weight, ce_weight: the end-to-end loss terms.
    log_every: steps between metric records (each loss term and the top-1 agreement).
    checkpoint_every: steps between resumable checkpoints of the student (and always the end).
    microbatches: gradient accumulation (as train.microbatches): the batch runs as this many
      microbatches of batch_size / microbatches rows, teacher pass included, whose loss
      terms and gradients add up to the whole batch's before the one update; the stage's
      evaluations run in the same pieces.
  """

  index: int = 1
  loss: Literal["layer_mse", "kl"] = "layer_mse"
  trainable: Literal["new", "mixer_in", "mixer", "all"] = "new"
  steps: int = 200
  batch_size: int = 16
  lr: float = 1e-3
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  clip_norm: float | None = 1.0
  mse_scale: float = 1000.0
  temperature: float = 1.0
  kl_weight: float = 1.0
  ce_weight: float = 0.0
  log_every: int = 10
  checkpoint_every: int = 100
  microbatches: int = 1

  def __post_init__(self):
    require(self.index in (1, 2, 3), "stage", "index", self.index, "must be 1, 2 or 3")
    name = f"stage{self.index}"
    one_of(name, "loss", self.loss, LOSSES)
    one_of(name, "trainable", self.trainable, TRAINABLE)
    for f in ("steps", "batch_size", "log_every", "checkpoint_every", "microbatches"):
      require(isinstance(getattr(self, f), int) and not isinstance(getattr(self, f), bool)
              and getattr(self, f) > 0, name, f, getattr(self, f), "must be a positive integer")
    require(self.batch_size % self.microbatches == 0, name, "microbatches", self.microbatches,
            f"must divide batch_size = {self.batch_size} (microbatches are equal slices of "
            "the batch)")
    require(self.lr > 0, name, "lr", self.lr, "must be > 0")
    require(self.warmup_steps >= 0, name, "warmup_steps", self.warmup_steps, "must be >= 0")
    require(0 <= self.min_lr_ratio <= 1, name, "min_lr_ratio", self.min_lr_ratio,
            "must lie in [0, 1]")
    require(self.weight_decay >= 0, name, "weight_decay", self.weight_decay, "must be >= 0")
    require(self.clip_norm is None or self.clip_norm > 0, name, "clip_norm", self.clip_norm,
            "must be None (no clipping) or > 0")
    require(self.mse_scale > 0, name, "mse_scale", self.mse_scale, "must be > 0")
    require(self.temperature > 0, name, "temperature", self.temperature, "must be > 0")
    require(self.kl_weight >= 0 and self.ce_weight >= 0, name, "kl_weight",
            (self.kl_weight, self.ce_weight), "kl_weight and ce_weight must be >= 0")
    require(self.loss != "kl" or self.kl_weight + self.ce_weight > 0, name, "kl_weight",
            self.kl_weight, "kl_weight + ce_weight must be > 0 for an end-to-end stage")
    require(self.loss != "layer_mse" or self.trainable != "all", name, "trainable",
            self.trainable, "a layer-wise stage only reaches the converted mixers; use new, "
            "mixer_in or mixer (or loss = 'kl')")


# As memx.config.HASH_NEUTRAL, for the DistillConfig a sweep's distillation entry hashes.
HASH_NEUTRAL = {(f"stage{k}", "microbatches"): 1 for k in (1, 2, 3)}

STAGE1 = StageConfig(index=1, loss="layer_mse", trainable="new", lr=1e-3)
STAGE2 = StageConfig(index=2, loss="layer_mse", trainable="mixer", lr=5e-4)
STAGE3 = StageConfig(index=3, loss="kl", trainable="all", lr=1e-4, warmup_steps=10)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
  """A whole distillation: student, stages, data, seed.

  Attributes:
    student: which layers convert and how they are seeded (`StudentConfig`).
    stages: the stages to run, increasing, from {1, 2, 3}.
    from_init: start the first listed stage from the freshly seeded (or random) student instead
      of the previous stage's checkpoint (the "skip stage 1" ablation is stages (2, 3) with
      from_init). Stage 1 always starts from the initial student.
    stage1, stage2, stage3: each stage's settings (`StageConfig`).
    data: the distillation data; None uses the teacher run's data config.
    seed: seeds the student's random initialisation and the data order.
    calib_batches: teacher batches used to calibrate the seeding (gate direction, norm scale).
    eval_batches: batches of the eval split for each stage's final evaluation.
    checkpoint: how the stages checkpoint (mode, keep); `every` comes from each stage.
  """

  student: StudentConfig = StudentConfig()
  stages: tuple[int, ...] = (1, 2, 3)
  from_init: bool = False
  stage1: StageConfig = STAGE1
  stage2: StageConfig = STAGE2
  stage3: StageConfig = STAGE3
  data: DataConfig | None = None
  seed: int = 0
  calib_batches: int = 1
  eval_batches: int = 4
  checkpoint: CheckpointConfig = CheckpointConfig(mode="sync", keep=1)

  def __post_init__(self):
    name = "distill"
    ok = (isinstance(self.stages, tuple) and len(self.stages) > 0
          and all(s in (1, 2, 3) for s in self.stages) and list(self.stages) == sorted(
              set(self.stages)))
    require(ok, name, "stages", self.stages,
            "must list stages from {1, 2, 3} once each, in increasing order (e.g. 1,2,3 or 2,3)")
    for i in (1, 2, 3):
      require(self.stage(i).index == i, name, f"stage{i}.index", self.stage(i).index,
              f"must be {i}")
    require(0 <= self.seed < 2**32, name, "seed", self.seed,
            "must lie in [0, 2**32): seeds are 32-bit, so larger ones wrap around")
    require(self.calib_batches >= 1, name, "calib_batches", self.calib_batches, "must be >= 1")
    require(self.eval_batches >= 1, name, "eval_batches", self.eval_batches, "must be >= 1")

  def stage(self, i: int) -> StageConfig:
    return {1: self.stage1, 2: self.stage2, 3: self.stage3}[i]
