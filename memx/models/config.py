"""ModelConfig: the decoder-only Transformer LM's shape, numerics and attention choices."""

import dataclasses
from typing import Literal

from memx._validate import one_of, require

DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Decoder-only Transformer LM.

  Attributes:
    vocab_size: rows of the embedding table; must cover the tokenizer's vocabulary.
    d_model, n_layers, n_heads: width, depth, query heads (d_model % n_heads == 0).
    n_kv_heads: key/value heads for grouped-query attention; None means n_heads (MHA).
    d_ff: SwiGLU hidden width; 0 means 8/3·d_model rounded up to a multiple of 64.
    tie_embeddings: reuse the embedding table as the output projection.
    remat: per-block rematerialisation: "none", "full" (save only block inputs) or "dots"
      (save matmul outputs, recompute elementwise ops).
    param_dtype, compute_dtype: storage and compute dtypes ("bfloat16" compute = mixed
      precision; norms, softmax and the loss stay in float32).
    attn_window: left window (tokens) of windowed layers; None means full causal attention.
    attn_sinks: always-visible initial tokens in windowed layers (StreamingLLM sinks).
    attn_window_layers: which layers use the window; None means all layers.
    attn_impl: kernel implementation passed to memx.kernels.attention.attention (None = dispatch).
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
  remat: Literal["none", "full", "dots"] = "none"
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  compute_dtype: Literal["float32", "bfloat16"] = "float32"
  attn_window: int | None = None
  attn_sinks: int = 0
  attn_window_layers: tuple[int, ...] | None = None
  attn_impl: str | None = None

  def __post_init__(self):
    name = "model"
    for f in ("vocab_size", "d_model", "n_layers", "n_heads"):
      require(getattr(self, f) > 0, name, f, getattr(self, f), "must be a positive integer")
    require(self.d_model % self.n_heads == 0, name, "n_heads", self.n_heads,
            f"must divide model.d_model = {self.d_model}")
    require(self.head_dim % 2 == 0, name, "n_heads", self.n_heads,
            f"head dim d_model/n_heads = {self.head_dim} must be even for RoPE")
    kv = self.kv_heads
    require(kv > 0 and self.n_heads % kv == 0, name, "n_kv_heads", self.n_kv_heads,
            f"must be a positive divisor of model.n_heads = {self.n_heads}")
    require(self.d_ff >= 0, name, "d_ff", self.d_ff, "must be >= 0 (0 = automatic)")
    require(self.rope_theta > 0, name, "rope_theta", self.rope_theta, "must be > 0")
    require(self.norm_eps > 0, name, "norm_eps", self.norm_eps, "must be > 0")
    one_of(name, "remat", self.remat, REMAT)
    one_of(name, "param_dtype", self.param_dtype, DTYPES)
    one_of(name, "compute_dtype", self.compute_dtype, DTYPES)
    require(self.attn_window is None or self.attn_window > 0, name, "attn_window",
            self.attn_window, "must be None (full causal) or a positive number of tokens")
    require(self.attn_sinks >= 0, name, "attn_sinks", self.attn_sinks, "must be >= 0")
    require(self.attn_sinks == 0 or self.attn_window is not None, name, "attn_sinks",
            self.attn_sinks, "sinks only apply to windowed layers; set model.attn_window too")
    if self.attn_window_layers is not None:
      bad = [i for i in self.attn_window_layers if not 0 <= i < self.n_layers]
      require(not bad, name, "attn_window_layers", self.attn_window_layers,
              f"layer indices must lie in [0, {self.n_layers})")

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

  def is_windowed(self, layer: int) -> bool:
    if self.attn_window is None:
      return False
    return self.attn_window_layers is None or layer in self.attn_window_layers
