"""OptimConfig and TrainConfig: the optimizer schedule and the loop's lengths and intervals."""

import dataclasses
import math

from memx._validate import require

# jax.random keys take 32-bit seeds: a larger one wraps around to a smaller run's seed.
SEED_LIMIT = 2**32


OPTIMIZERS = ("adamw", "lion", "adafactor", "galore", "apollo", "apollo_mini", "sgd", "frugal")
ESTIMATORS = ("backprop", "mezo")
MOMENT_QUANTS = ("fp8", "fp8_plain")
MOMENT_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
  """An optax optimizer with linear warmup then cosine decay to min_lr_ratio·lr, after
  global-norm clipping (memx.train.optim).

  Attributes:
    name: "adamw" (two moments per parameter), "lion" (one moment, sign updates: use a 3-10x
      smaller lr than AdamW's), or "adafactor" (factored second moments: a matrix keeps one
      row and one column of statistics instead of a full moment; no first moment; the update
      is scaled by the parameter's RMS as in Shazeer & Stern 2018). The optimizer state's size
      is what they trade: per parameter about 2, 1 and ~0 float32 numbers (exact bytes in
      benchmarks/RESULTS.md).
    galore_rank, galore_every, galore_scale: name "galore" (memx.train.galore): Adam on the
      gradient projected to this rank (moments r x n instead of m x n per matrix), the
      projection recomputed from an SVD of the gradient every galore_every steps, the update
      scaled by galore_scale (the paper's 0.25 with rank 128-512, every 200).
    frugal_free_scale: name "frugal" (memx.train.galore, FRUGAL): GaLore's subspace (galore_rank,
      galore_every; its update unscaled) plus signSGD on the rest of the gradient, that step
      times this (relative to lr). Its state is GaLore's.
    apollo_rank, apollo_every, apollo_scale: name "apollo" (memx.train.apollo): Adam moments
      on a random projection of the gradient to apollo_rank (regenerated from the seed every
      apollo_every steps, never stored, no SVD) measure how Adam would rescale each channel;
      the raw gradient, so rescaled, is the update, times sqrt(apollo_scale) (apollo-torch's
      `scale`). "apollo_mini" is rank 1 with one factor per tensor (apollo_rank is not used).
      apollo_scale None: the paper's, 1 for apollo and 128 for apollo_mini. The paper uses
      rank 256 (1/4 of d_model on small models), every 200, AdamW's lr.
    name "sgd": plain SGD (no state; decoupled weight decay as AdamW's), MeZO's optimizer.
    estimator: where the gradient comes from. "backprop" (the default); "mezo" estimates it
      from two forward passes (memx.train.mezo: SPSA along a random direction z drawn again
      from the step's key, never stored): no backward pass and no activations kept for one.
      Pairs with "sgd" (MeZO) or "adamw" (MeZO-Adam), needs clip_norm None, and wants a far
      smaller lr than backprop (the paper's 1e-6 to 1e-7 at 1.3B-13B parameters).
    mezo_eps: the perturbation scale ε (the paper's 1e-3).
    mezo_sparsity: Sparse MeZO: the fraction of each tensor left unperturbed, its
      largest-magnitude entries (0: every entry, plain MeZO).
    moment_quant: "fp8" stores both of AdamW's moments in FP8 E4M3 with a float32 scale and
      exponent per 128 numbers, after COAT's dynamic range expansion (memx.train.fp8_adam):
      ~2.1 bytes of state per parameter instead of 8; "fp8_plain" without the expansion (the
      ablation); None keeps float32 moments.
    mu_dtype: "bfloat16" stores AdamW's / Lion's first moment in bf16 (half its bytes; the
      second moment stays in the parameters' dtype); None keeps it in the parameters' dtype.
    lr, min_lr_ratio, warmup_steps: the schedule; weight_decay: decoupled, on matrices only
      (memx.train.optim.decay_mask); b1, b2, eps: AdamW's (Lion uses b1, b2: its paper's b2 is
      0.99; Adafactor its own decay schedule); clip_norm: global-norm clipping of the gradient,
      None for none.
  """

  lr: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 50
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float | None = 1.0
  name: str = "adamw"
  mu_dtype: str | None = None
  galore_rank: int = 128
  galore_every: int = 200
  galore_scale: float = 0.25
  frugal_free_scale: float = 1.0
  apollo_rank: int = 256
  apollo_every: int = 200
  apollo_scale: float | None = None
  moment_quant: str | None = None
  estimator: str = "backprop"
  mezo_eps: float = 1e-3
  mezo_sparsity: float = 0.0

  def __post_init__(self):
    require(self.name in OPTIMIZERS, "optim", "name", self.name,
            f"expected one of {list(OPTIMIZERS)}")
    require(self.mu_dtype is None or self.mu_dtype in MOMENT_DTYPES, "optim", "mu_dtype",
            self.mu_dtype, f"expected None or one of {list(MOMENT_DTYPES)}")
    require(self.mu_dtype is None or self.name in ("adamw", "lion"), "optim", "mu_dtype",
            self.mu_dtype, "only adamw and lion take it (adafactor keeps no first moment, "
            "galore's and apollo's projected moments stay float32); leave mu_dtype None")
    for f in ("galore_rank", "galore_every", "apollo_rank", "apollo_every"):
      v = getattr(self, f)
      require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, "optim", f, v,
              "must be an integer >= 1")
    require(self.galore_scale > 0 and math.isfinite(self.galore_scale), "optim",
            "galore_scale", self.galore_scale, "must be finite and > 0")
    require(isinstance(self.frugal_free_scale, int | float)
            and math.isfinite(self.frugal_free_scale) and self.frugal_free_scale >= 0, "optim",
            "frugal_free_scale", self.frugal_free_scale,
            "must be finite and >= 0 (0: the subspace alone, GaLore at scale 1)")
    require(self.apollo_scale is None or (self.apollo_scale > 0 and math.isfinite(
        self.apollo_scale)), "optim", "apollo_scale", self.apollo_scale,
            "must be None (the paper's: 1 for apollo, 128 for apollo_mini) or finite and > 0")
    require(self.moment_quant is None or self.moment_quant in MOMENT_QUANTS, "optim",
            "moment_quant", self.moment_quant, f"expected None or one of {list(MOMENT_QUANTS)}")
    require(self.moment_quant is None or (self.name == "adamw" and self.mu_dtype is None),
            "optim", "moment_quant", self.moment_quant, "applies to adamw's two moments: use "
            "optim.name adamw and leave mu_dtype None")
    require(self.estimator in ESTIMATORS, "optim", "estimator", self.estimator,
            f"expected one of {list(ESTIMATORS)}")
    require(self.estimator == "backprop" or self.name in ("sgd", "adamw"), "optim",
            "estimator", self.estimator, f"pairs with optim.name sgd (MeZO) or adamw "
            f"(MeZO-Adam), not {self.name!r}: the others' statistics assume true gradients")
    require(self.estimator == "backprop" or self.clip_norm is None, "optim", "clip_norm",
            self.clip_norm, "must be None with estimator mezo: its estimate's norm is "
            "|g|·‖z‖ ≈ |g|·√(parameters), so clipping would shrink every step to the same "
            "length")
    require(isinstance(self.mezo_eps, int | float) and math.isfinite(self.mezo_eps)
            and self.mezo_eps > 0, "optim", "mezo_eps", self.mezo_eps, "must be finite and > 0")
    require(isinstance(self.mezo_sparsity, int | float) and 0 <= self.mezo_sparsity < 1,
            "optim", "mezo_sparsity", self.mezo_sparsity,
            "must lie in [0, 1) (the fraction of each tensor left unperturbed)")
    require(self.estimator == "mezo" or (self.mezo_eps == 1e-3 and self.mezo_sparsity == 0),
            "optim", "mezo_sparsity" if self.mezo_sparsity else "mezo_eps",
            self.mezo_sparsity or self.mezo_eps, "only applies with optim.estimator = mezo")
    require(self.lr > 0 and math.isfinite(self.lr), "optim", "lr", self.lr,
            "must be finite and > 0")
    require(0 <= self.min_lr_ratio <= 1, "optim", "min_lr_ratio", self.min_lr_ratio,
            "must lie in [0, 1]")
    require(self.warmup_steps >= 0, "optim", "warmup_steps", self.warmup_steps, "must be >= 0")
    require(self.weight_decay >= 0, "optim", "weight_decay", self.weight_decay, "must be >= 0")
    require(0 <= self.b1 < 1, "optim", "b1", self.b1, "must lie in [0, 1)")
    require(0 <= self.b2 < 1, "optim", "b2", self.b2, "must lie in [0, 1)")
    require(self.eps > 0 and math.isfinite(self.eps), "optim", "eps", self.eps,
            "must be finite and > 0 (Adam divides by sqrt(v) + eps)")
    require(math.isfinite(self.weight_decay), "optim", "weight_decay", self.weight_decay,
            "must be finite")
    require(self.clip_norm is None or self.clip_norm > 0, "optim", "clip_norm", self.clip_norm,
            "must be None (no clipping) or > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Attributes:
    steps: optimizer steps.
    batch_size: global batch (rows), split across the mesh's data axis and the hosts.
    seed: the one seed; model, data and training keys are split from it by purpose.
    log_every: steps between metric fetches (the only host syncs of the loop).
    eval_every: steps between evaluations (0 = only at the end).
    eval_batches: batches per evaluation.
    loss_vocab_block: 0 computes the training loss from the full [B, T, V] logits; > 0 uses
      memx.kernels.cross_entropy over blocks of this many vocabulary columns, so neither the
      logits nor their gradient ever exist whole (evaluation still forms logits: it needs
      their argmax and keeps no gradient).
    microbatches: gradient accumulation. 1 runs the global batch at once; n > 1 runs it as n
      microbatches of batch_size / n rows in turn (forward and backward each) and sums their
      gradients before the one optimizer update, so activation memory is that of
      batch_size / n rows and the update is the full batch's (memx.train.microbatch).
      Evaluation runs in the same pieces. batch_size / n must be a multiple of the
      data-parallel size.
  """

  steps: int = 200
  batch_size: int = 16
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0
  eval_batches: int = 4
  loss_vocab_block: int = 0
  microbatches: int = 1

  def __post_init__(self):
    require(self.steps > 0, "train", "steps", self.steps, "must be > 0")
    require(self.batch_size > 0, "train", "batch_size", self.batch_size, "must be > 0")
    require(0 <= self.seed < SEED_LIMIT, "train", "seed", self.seed,
            f"must lie in [0, 2**32): seeds are 32-bit, so {SEED_LIMIT} would rerun seed 0")
    require(self.log_every > 0, "train", "log_every", self.log_every, "must be > 0")
    require(self.eval_every >= 0, "train", "eval_every", self.eval_every, "must be >= 0")
    require(self.eval_batches > 0, "train", "eval_batches", self.eval_batches, "must be > 0")
    require(self.loss_vocab_block >= 0, "train", "loss_vocab_block", self.loss_vocab_block,
            "must be >= 0 (0: full logits)")
    require(not isinstance(self.microbatches, bool) and isinstance(self.microbatches, int)
            and self.microbatches >= 1, "train", "microbatches", self.microbatches,
            "must be an integer >= 1 (1: no gradient accumulation)")
    require(self.batch_size % self.microbatches == 0, "train", "microbatches",
            self.microbatches, f"must divide train.batch_size = {self.batch_size} (microbatches "
            "are equal slices of the global batch)")


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TeacherConfig:
  """Knowledge distillation from a trained run (memx.train.kd): the model trains on
  (1 - weight) · cross-entropy + weight · D(teacher || model) per token, the teacher's next-token
  distribution computed on the same batch by a frozen trained model (any memx architecture
  and size over the same vocabulary). DistillSpec trains speculative-decoding drafts this way.

  Attributes:
    run: the teacher's run directory (or its checkpoints/ path); None: no teacher (the rest
      does not apply).
    step: its checkpoint step; None takes the newest complete one.
    weight: the divergence's share of the loss, in [0, 1] (1: the divergence alone).
    temperature: both distributions are softened by it before the divergence; the KL kinds are
      multiplied by its square (Hinton et al.), so gradients keep their scale.
    divergence: "forward_kl" KL(teacher || model) (mass-covering, the classic KD loss),
      "reverse_kl" KL(model || teacher) (mode-seeking), "jsd" (Jensen-Shannon, β = 1/2) or
      "tvd" (total variation, the distance acceptance in speculative decoding depends on:
      1 - TVD is the expected acceptance of one drafted token). DistillSpec finds the best one
      depends on the task and the decoding strategy.
    on_policy: the fraction of each batch's rows whose continuation the model samples itself
      (GKD, Agarwal et al. 2024; DistillSpec's best setting): such a row keeps its first
      prompt_len tokens, the rest are the model's own samples at sample_temperature, and the
      divergence from the teacher is taken on them (no cross-entropy: they are not data). 0:
      every row is data (the default).
    prompt_len: tokens of a data row an on-policy row starts from (1 <= prompt_len <
      data.seq_len).
    sample_temperature: the temperature the model samples its on-policy continuations at.
  """

  run: str | None = None
  step: int | None = None
  weight: float = 0.5
  temperature: float = 1.0
  divergence: str = "forward_kl"
  on_policy: float = 0.0
  prompt_len: int = 0
  sample_temperature: float = 1.0

  def __post_init__(self):
    require(self.run is None or (isinstance(self.run, str) and self.run), "teacher", "run",
            self.run, "must be None or a run directory path")
    require(self.step is None or (isinstance(self.step, int) and not isinstance(self.step, bool)
                                  and self.step >= 0), "teacher", "step", self.step,
            "must be None (newest) or a step >= 0")
    require(self.step is None or self.run is not None, "teacher", "step", self.step,
            "needs teacher.run (the run whose checkpoint step it names)")
    require(isinstance(self.weight, int | float) and 0 <= self.weight <= 1, "teacher",
            "weight", self.weight, "must lie in [0, 1]")
    require(isinstance(self.temperature, int | float) and math.isfinite(self.temperature)
            and self.temperature > 0, "teacher", "temperature", self.temperature,
            "must be finite and > 0")
    require(self.divergence in DIVERGENCES, "teacher", "divergence", self.divergence,
            f"expected one of {list(DIVERGENCES)}")
    require(isinstance(self.on_policy, int | float) and 0 <= self.on_policy <= 1, "teacher",
            "on_policy", self.on_policy, "must lie in [0, 1] (a fraction of each batch's rows)")
    require(isinstance(self.prompt_len, int) and not isinstance(self.prompt_len, bool)
            and self.prompt_len >= 0, "teacher", "prompt_len", self.prompt_len,
            "must be an integer >= 0")
    require(self.on_policy == 0 or self.prompt_len >= 1, "teacher", "prompt_len",
            self.prompt_len, "must be >= 1 with teacher.on_policy > 0 (the data an on-policy "
            "row starts from)")
    require(isinstance(self.sample_temperature, int | float)
            and math.isfinite(self.sample_temperature) and self.sample_temperature >= 0,
            "teacher", "sample_temperature", self.sample_temperature,
            "must be finite and >= 0 (0: greedy)")
    require(self.on_policy == 0 or self.run is not None, "teacher", "on_policy",
            self.on_policy, "needs teacher.run")


AUX_WEIGHTS = ("own", "ema")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LocalConfig:
  """Supervised local learning (memx.train.local): the blocks train in `groups` consecutive,
  gradient-isolated groups, each from a loss of its own, so a backward pass never crosses a
  group boundary and the activations kept for it are one group's, not the whole model's.

  Group g < groups - 1 feeds its output to an auxiliary network: aux_depth blocks built like
  layers sampled evenly from the layers after the group (AugLocal's choice of its auxiliary
  layers), then an RMSNorm and the model's own output projection, and a next-token loss on
  that; the last group trains on the model's loss. Group g + 1 reads group g's output as a
  constant. The auxiliary networks are training-only: the model's forward, evaluation and
  generation never run them.

  Attributes:
    groups: 1 is end-to-end backpropagation (the default; the rest then does not apply);
      2..model.n_layers cuts the layers into that many contiguous groups of near-equal size
      (the earlier groups take the extra layers).
    aux_depth: blocks in the first group's auxiliary network; 0 gives every group just the
      norm and the output projection (a linear probe on the group's output, as DGL).
    aux_decay: AugLocal's pyramid: group g's auxiliary depth falls linearly from aux_depth
      (g = 0) to ceil(aux_depth / (groups - 1)) (the last auxiliary group). False: every
      auxiliary network has aux_depth blocks.
    aux_weights: "own": the auxiliary blocks are parameters of their own, freshly initialized
      and trained by their group's loss (AugLocal). "ema": they are exponential moving
      averages of the very layers they copy, updated after every optimizer step, plus a
      trained bias after each block (MAN, the Momentum Auxiliary Network): no auxiliary
      weights to train or to keep optimizer state for.
    ema_decay: the moving average's decay for aux_weights "ema".
  """

  groups: int = 1
  aux_depth: int = 1
  aux_decay: bool = True
  aux_weights: str = "own"
  ema_decay: float = 0.99

  def __post_init__(self):
    require(isinstance(self.groups, int) and not isinstance(self.groups, bool)
            and self.groups >= 1, "local", "groups", self.groups,
            "must be an integer >= 1 (1: end-to-end backpropagation)")
    require(isinstance(self.aux_depth, int) and not isinstance(self.aux_depth, bool)
            and self.aux_depth >= 0, "local", "aux_depth", self.aux_depth,
            "must be an integer >= 0 (0: norm and output projection only)")
    require(isinstance(self.aux_decay, bool), "local", "aux_decay", self.aux_decay,
            "must be true or false")
    require(self.aux_weights in AUX_WEIGHTS, "local", "aux_weights", self.aux_weights,
            f"expected one of {list(AUX_WEIGHTS)}")
    require(isinstance(self.ema_decay, int | float) and 0 <= self.ema_decay < 1, "local",
            "ema_decay", self.ema_decay, "must lie in [0, 1)")
    require(self.aux_weights == "own" or self.aux_depth >= 1, "local", "aux_weights",
            self.aux_weights, "needs local.aux_depth >= 1 (blocks to average)")


LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
BASE_QUANT = ("none", "nf4")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
  """Starting from a trained model, and which of its parameters train (memx.train.finetune).

  Attributes:
    base: a trained run directory (or its checkpoints/ or checkpoints/STEP path) whose weights
      initialize the model (model.* must describe the same architecture); None trains from the
      initialization.
    base_step: the base run's checkpoint step; None takes its newest complete one.
    lora_rank: 0 trains every parameter (full fine-tuning); r >= 1 adds LoRA adapters of rank r
      to the lora_targets weights of the attention and SwiGLU layers (memx.nn.lora) and trains
      only them: no gradient or optimizer state for anything else.
    lora_alpha: the adapters' scale is lora_alpha / lora_rank.
    lora_targets: which projections get adapters: wq, wk, wv, wo (attention), w_gate, w_up,
      w_down (SwiGLU).
    quantize_base: "nf4" stores the adapted weights' frozen bases in 4-bit NormalFloat with
      double-quantized block scales (QLoRA, memx.nn.quantized; needs lora_rank >= 1 and input sizes
      that are multiples of 64); "none" keeps them in model.param_dtype.
  """

  base: str | None = None
  base_step: int | None = None
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = LORA_TARGETS
  quantize_base: str = "none"

  def __post_init__(self):
    require(self.base is None or (isinstance(self.base, str) and self.base), "finetune", "base",
            self.base, "must be None or a run directory path")
    require(self.base_step is None or (isinstance(self.base_step, int) and self.base_step >= 0),
            "finetune", "base_step", self.base_step, "must be None (newest) or a step >= 0")
    require(self.base_step is None or self.base is not None, "finetune", "base_step",
            self.base_step, "needs finetune.base (the run whose checkpoint step it names)")
    require(isinstance(self.lora_rank, int) and not isinstance(self.lora_rank, bool)
            and self.lora_rank >= 0, "finetune", "lora_rank", self.lora_rank,
            "must be an integer >= 0 (0: full fine-tuning, no adapters)")
    require(isinstance(self.lora_alpha, int | float) and math.isfinite(self.lora_alpha)
            and self.lora_alpha > 0, "finetune", "lora_alpha", self.lora_alpha,
            "must be finite and > 0")
    targets = tuple(self.lora_targets) if isinstance(self.lora_targets, tuple | list) else None
    require(targets is not None and len(targets) > 0 and set(targets) <= set(LORA_TARGETS)
            and len(set(targets)) == len(targets), "finetune", "lora_targets",
            self.lora_targets, f"must be a non-empty tuple of distinct names from "
            f"{list(LORA_TARGETS)}")
    require(self.quantize_base in BASE_QUANT, "finetune", "quantize_base", self.quantize_base,
            f"expected one of {list(BASE_QUANT)}")
    require(self.quantize_base == "none" or self.lora_rank >= 1, "finetune", "quantize_base",
            self.quantize_base, "needs finetune.lora_rank >= 1: a quantized base is frozen, so "
            "only adapters could train (QLoRA)")
    if self.lora_rank == 0:
      require(self.lora_targets == LORA_TARGETS, "finetune", "lora_targets", self.lora_targets,
              "only applies with finetune.lora_rank >= 1")
