"""ModelConfig: the decoder-only LM's shape, numerics, attention choices and per-layer mixers."""

import dataclasses
import math
from typing import Literal

from memx._validate import one_of, require
from memx.errors import ConfigError

DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots", "offload")
MIXERS = ("attention", "mamba2", "linear_attention", "mlgru")
MLP_KINDS = ("swiglu", "bitglu")
FEATURE_MAPS = ("identity", "elu1")
# memx.kernels.attention.IMPLEMENTATIONS (a test keeps them equal; configs import no kernels).
ATTN_IMPLS = (None, "reference", "xla", "pallas_gpu", "cudnn")


def _pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class SSMConfig:
  """Settings of the linear-time mixers ("mamba2" and "linear_attention" layers).

  Overridable as `--set model.ssm.d_state=128`. Defaults follow state-spaces/mamba's `Mamba2`
  (d_conv 4, expand 2, A_init_range (1, 16), dt in [0.001, 0.1]) at memx's small scale (state
  64, head dim 64, chunk 64).

  Attributes:
    d_state: N, the Mamba-2 state size per head (width of B and C per group).
    expand: Mamba-2 inner width = expand · model.d_model.
    head_dim: P, the Mamba-2 head dim; heads = expand · d_model / head_dim.
    n_groups: G, Mamba-2 B/C groups shared by heads (ngroups); must divide the heads.
    conv_width: width of Mamba-2's short causal depthwise convolution (d_conv).
    chunk_size: SSD chunk length Q (both mixers), a power of two >= 16.
    dt_min, dt_max, dt_init_floor: Δ is initialised log-uniform in [dt_min, dt_max], at least
      dt_init_floor, through the inverse softplus of the Δ bias.
    a_init_min, a_init_max: A = -U(a_init_min, a_init_max) per head (stored as log).
    impl: implementation passed to memx.kernels.ssd and Mamba-2's short conv
      (memx.kernels.short_conv; quadratic runs its xla form). None = dispatch by backend.
    feature_map: linear attention's q/k feature map: "identity" or "elu1" (elu(x) + 1,
      Katharopoulos et al. 2020).
    gated: linear attention with a per-head scalar forget gate per token (GLA-style).
  """

  d_state: int = 64
  expand: int = 2
  head_dim: int = 64
  n_groups: int = 1
  conv_width: int = 4
  chunk_size: int = 64
  dt_min: float = 1e-3
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  a_init_min: float = 1.0
  a_init_max: float = 16.0
  impl: str | None = None
  feature_map: Literal["identity", "elu1"] = "elu1"
  gated: bool = False

  def __post_init__(self):
    name = "model.ssm"
    for f in ("d_state", "expand", "head_dim", "n_groups", "conv_width"):
      require(getattr(self, f) > 0, name, f, getattr(self, f), "must be a positive integer")
    require(_pow2(self.chunk_size) and self.chunk_size >= 16, name, "chunk_size",
            self.chunk_size, "must be a power of two >= 16")
    for f in ("dt_min", "dt_max", "dt_init_floor", "a_init_min", "a_init_max"):
      require(math.isfinite(getattr(self, f)), name, f, getattr(self, f), "must be finite")
    require(0 < self.dt_min <= self.dt_max, name, "dt_min", self.dt_min,
            f"must satisfy 0 < dt_min <= dt_max = {self.dt_max} (dt must stay positive)")
    require(self.dt_init_floor > 0, name, "dt_init_floor", self.dt_init_floor, "must be > 0")
    require(0 < self.a_init_min <= self.a_init_max, name, "a_init_min", self.a_init_min,
            f"must satisfy 0 < a_init_min <= a_init_max = {self.a_init_max}")
    one_of(name, "feature_map", self.feature_map, FEATURE_MAPS)
    require(self.impl in (None, "reference", "quadratic", "xla", "pallas_gpu"), name, "impl",
            self.impl, "expected None or one of reference, quadratic, xla, pallas_gpu")


def matmulfree_config(**overrides) -> "ModelConfig":
  """The MatMul-free LM (Zhu et al. 2024): MLGRU mixers and BitGLU MLPs in every layer."""
  n_layers = overrides.get("n_layers", ModelConfig.n_layers)
  base = {"mixers": ("mlgru",) * n_layers, "mlp_kind": "bitglu", "ternary": True}
  return ModelConfig(**{**base, **overrides})


def hybrid_mixers(n_layers: int, attention_every: int, ssm: str = "mamba2") -> tuple[str, ...]:
  """Attention at layers 0, k, 2k, ... and `ssm` elsewhere (mmMamba-hybrid keeps every 4th)."""
  if isinstance(attention_every, bool) or not isinstance(attention_every, int) \
      or attention_every < 1:
    raise ConfigError(f"attention_every = {attention_every!r} is not allowed: attention goes at "
                      "every k-th layer, so k must be an integer >= 1.")
  return tuple("attention" if i % attention_every == 0 else ssm for i in range(n_layers))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Decoder-only LM: attention, SSM or hybrid, one token mixer per layer.

  Attributes:
    vocab_size: rows of the embedding table; must cover the tokenizer's vocabulary.
    d_model, n_layers, n_heads: width, depth, query heads of attention and linear attention
      (d_model % n_heads == 0, and an even head dim for attention's RoPE; unchecked when no
      layer uses heads: Mamba-2 takes its heads from `ssm`).
    n_kv_heads: key/value heads for grouped-query attention; None means n_heads (MHA).
    d_ff: SwiGLU hidden width; 0 means 8/3·d_model rounded up to a multiple of 64.
    tie_embeddings: reuse the embedding table as the output projection.
    remat: per-block rematerialisation: "none", "full" (save only block inputs), "dots"
      (save matmul outputs and the attention / SSD kernels' forward results, recompute
      elementwise ops) or "offload" ("dots" with the matmul outputs kept in pinned host memory
      until the backward pass: activation memory moves off the device, PCIe traffic is added;
      on CPU it is "dots").
    param_dtype, compute_dtype: storage and compute dtypes ("bfloat16" compute = mixed
      precision; norms, softmax and the loss stay in float32).
    attn_window: left window (tokens) of windowed layers; None means full causal attention.
    attn_sinks: always-visible initial tokens in windowed layers (StreamingLLM sinks).
    attn_window_layers: which layers use the window; None means all layers.
    attn_impl: kernel implementation passed to memx.kernels.attention.attention (None = dispatch).
    attn_plan: a MoA sparse-attention plan (memx.sparse.plan): per layer, None (the layer keeps
      its usual mask) or one (alpha, beta, n_sink) rule per query head; head h then sees the
      alpha + beta·N most recent keys plus its first n_sink keys at whatever length N the
      model runs (`memx.kernels.attention.elastic_mask`). Set it with `memx run --plan FILE`
      or `memx.sparse.plan.apply_plan`; it replaces attn_window (both set is an error).
    mixers: token mixer per layer, each "attention", "mamba2", "linear_attention" or "mlgru"
      (the MatMul-free LM's gated recurrence, BitLinear projections); None means attention
      everywhere. For example ("mamba2",) * 3 + ("attention",), or
      `hybrid_mixers(n_layers, 4)`; on the command line `--set model.mixers=mamba2,attention`.
    ssm: settings of the mamba2 / linear_attention mixers (`SSMConfig`).
    mlp: give every block a SwiGLU; False makes mixer-only blocks (the pure Mamba-2 LM layout,
      whose expanded mixer stands in for the MLP).
    mlp_kind: the channel mixer when mlp is on: "swiglu" (full-precision SwiGLU) or "bitglu"
      (the MatMul-free LM's GLU with BitLinear projections).
    ternary: whether BitLinear layers (those of "mlgru" mixers and "bitglu" MLPs) quantize to
      ternary weights and int8 activations; False trains the same layers in full precision
      (the ablation baseline). Attention/SSM layers and the embeddings are unaffected.
    weight_quant: None, or how the attention and SwiGLU projections are stored, frozen: a
      `memx.quant` spec ("gptq:4:128", "rtn:3:64", "nf4"). Set by `memx quantize`, which
      writes a quantized model as a run of its own (memx.quant.model); such a run evaluates,
      generates and serves as finetune.base for LoRA on its quantized weights.
  """

  vocab_size: int = 512
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int | None = None
  d_ff: int = 0
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02
  tie_embeddings: bool = True
  remat: Literal["none", "full", "dots", "offload"] = "none"
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  compute_dtype: Literal["float32", "bfloat16"] = "float32"
  attn_window: int | None = None
  attn_sinks: int = 0
  attn_window_layers: tuple[int, ...] | None = None
  attn_impl: str | None = None
  attn_plan: tuple[tuple[tuple[float, float, int], ...] | None, ...] | None = None
  mixers: tuple[str, ...] | None = None
  ssm: SSMConfig = SSMConfig()
  mlp: bool = True
  mlp_kind: Literal["swiglu", "bitglu"] = "swiglu"
  ternary: bool = True
  weight_quant: str | None = None

  def __post_init__(self):
    name = "model"
    if self.weight_quant is not None:
      from memx.quant.config import WeightQuant  # (a leaf: dataclass and validation only)
      try:
        WeightQuant.parse(self.weight_quant)
      except ValueError as e:
        require(False, name, "weight_quant", self.weight_quant, str(e))
    for f in ("mixers", "attn_window_layers"):  # lists from Python or JSON: hashable tuples
      value = getattr(self, f)
      require(value is None or isinstance(value, tuple | list), name, f, value,
              "must be None or a sequence (tuple or list)")
      if isinstance(value, list):
        object.__setattr__(self, f, tuple(value))
    for f in ("vocab_size", "d_model", "n_layers", "n_heads"):
      require(getattr(self, f) > 0, name, f, getattr(self, f), "must be a positive integer")
    # Heads shape attention and linear attention only (Mamba-2 takes its own from model.ssm).
    mixers = set(self.mixers or ("attention",))
    if mixers & {"attention", "linear_attention"}:
      require(self.d_model % self.n_heads == 0, name, "n_heads", self.n_heads,
              f"must divide model.d_model = {self.d_model}")
      kv = self.kv_heads
      require(kv > 0 and self.n_heads % kv == 0, name, "n_kv_heads", self.n_kv_heads,
              f"must be a positive divisor of model.n_heads = {self.n_heads}")
    if "attention" in mixers:
      require(self.head_dim % 2 == 0, name, "n_heads", self.n_heads,
              f"head dim d_model/n_heads = {self.head_dim} must be even for RoPE")
    require(self.d_ff >= 0, name, "d_ff", self.d_ff, "must be >= 0 (0 = automatic)")
    require(self.rope_theta > 0 and math.isfinite(self.rope_theta), name, "rope_theta",
            self.rope_theta, "must be finite and > 0")
    require(self.norm_eps > 0 and math.isfinite(self.norm_eps), name, "norm_eps",
            self.norm_eps, "must be finite and > 0")
    require(self.init_std > 0 and math.isfinite(self.init_std), name, "init_std",
            self.init_std, "must be finite and > 0")
    require(self.attn_impl in ATTN_IMPLS, name, "attn_impl", self.attn_impl,
            f"expected None (dispatch) or one of {', '.join(i for i in ATTN_IMPLS if i)}")
    one_of(name, "remat", self.remat, REMAT)
    one_of(name, "param_dtype", self.param_dtype, DTYPES)
    one_of(name, "compute_dtype", self.compute_dtype, DTYPES)
    require(self.attn_window is None or self.attn_window > 0, name, "attn_window",
            self.attn_window, "must be None (full causal) or a positive number of tokens")
    require(self.attn_sinks >= 0, name, "attn_sinks", self.attn_sinks, "must be >= 0")
    require(self.attn_sinks == 0 or self.attn_window is not None, name, "attn_sinks",
            self.attn_sinks, "sinks only apply to windowed layers; set model.attn_window too")
    if self.attn_window_layers is not None:
      require(self.attn_window is not None, name, "attn_window_layers", self.attn_window_layers,
              "picks the layers that use model.attn_window, which is None; set it too")
      bad = [i for i in self.attn_window_layers if not 0 <= i < self.n_layers]
      require(not bad, name, "attn_window_layers", self.attn_window_layers,
              f"layer indices must lie in [0, {self.n_layers})")
    one_of(name, "mlp_kind", self.mlp_kind, MLP_KINDS)
    require(self.mlp or self.mlp_kind == "swiglu", name, "mlp_kind", self.mlp_kind,
            "a channel mixer kind needs model.mlp = True")
    require(isinstance(self.ternary, bool), name, "ternary", self.ternary,
            "must be true or false")
    self._check_mixers(name)
    self._check_plan(name)

  def _check_plan(self, name: str) -> None:
    if self.attn_plan is None:
      return
    plan = self.attn_plan
    require(isinstance(plan, tuple | list) and len(plan) == self.n_layers, name, "attn_plan",
            "<plan>", f"must list one entry per layer (model.n_layers = {self.n_layers}), got "
            f"{len(plan) if isinstance(plan, tuple | list) else type(plan).__name__}")
    require(self.attn_window is None, name, "attn_window", self.attn_window,
            "must be None when model.attn_plan is set (the plan gives every head its window)")
    layers = []
    for i, entry in enumerate(plan):
      if entry is None:
        layers.append(None)
        continue
      require(self.mixer(i) == "attention", name, f"attn_plan[{i}]", "<rules>",
              f"must be None: layer {i} is a {self.mixer(i)} layer, not attention")
      require(isinstance(entry, tuple | list) and len(entry) == self.n_heads, name,
              f"attn_plan[{i}]", "<rules>",
              f"must give one (alpha, beta, n_sink) rule per query head ({self.n_heads})")
      rules = []
      for h, rule in enumerate(entry):
        ok = isinstance(rule, tuple | list) and len(rule) == 3
        alpha, beta, sink = rule if ok else (None, None, None)
        ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool)
                        and math.isfinite(v) for v in (alpha, beta))
        ok = ok and 0.0 <= beta <= 1.0 and isinstance(sink, int) and sink >= 0
        require(ok, name, f"attn_plan[{i}][{h}]", rule,
                "must be (alpha: finite number, beta in [0, 1], n_sink: int >= 0)")
        rules.append((float(alpha), float(beta), int(sink)))
      layers.append(tuple(rules))
    object.__setattr__(self, "attn_plan", tuple(layers))

  def _check_mixers(self, name: str) -> None:
    if self.mixers is None:
      return
    require(isinstance(self.mixers, tuple) and len(self.mixers) == self.n_layers, name,
            "mixers", self.mixers,
            f"must list one mixer per layer (model.n_layers = {self.n_layers}), each one of "
            f"{', '.join(MIXERS)}")
    bad = [m for m in self.mixers if m not in MIXERS]
    require(not bad, name, "mixers", self.mixers,
            f"unknown mixer(s) {bad}; expected each of {', '.join(MIXERS)}")
    if self.attn_window_layers is not None:
      bad = [i for i in self.attn_window_layers if self.mixers[i] != "attention"]
      require(not bad, name, "attn_window_layers", self.attn_window_layers,
              f"layers {bad} are not attention layers in model.mixers")
    if "mamba2" in self.mixers:
      s = self.ssm
      inner = s.expand * self.d_model
      require(inner % s.head_dim == 0, name, "ssm.head_dim", s.head_dim,
              f"must divide the Mamba-2 inner width ssm.expand * d_model = {inner}")
      require(self.ssm_heads % s.n_groups == 0, name, "ssm.n_groups", s.n_groups,
              f"must divide the {self.ssm_heads} Mamba-2 heads")

  @property
  def uses_bitlinear(self) -> bool:
    """Whether any layer has BitLinear projections (mlgru mixers or a bitglu MLP)."""
    return self.mlp_kind == "bitglu" or (self.mixers is not None and "mlgru" in self.mixers)

  @property
  def kv_heads(self) -> int:
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def ff_dim(self) -> int:
    if self.d_ff:
      return self.d_ff
    return -(-(8 * self.d_model // 3) // 64) * 64

  @property
  def ssm_heads(self) -> int:
    """Mamba-2 heads: expand · d_model / head_dim."""
    return self.ssm.expand * self.d_model // self.ssm.head_dim

  def mixer(self, layer: int) -> str:
    """The token mixer of `layer`."""
    return "attention" if self.mixers is None else self.mixers[layer]

  def is_windowed(self, layer: int) -> bool:
    if self.attn_window is None or self.mixer(layer) != "attention":
      return False
    return self.attn_window_layers is None or layer in self.attn_window_layers
