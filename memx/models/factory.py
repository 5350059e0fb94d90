"""build_model: the one constructor the train step calls for any ModelConfig."""

from flax import nnx

from memx.models.config import ModelConfig
from memx.models.transformer import TransformerLM


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs) -> TransformerLM:
  """The model a ModelConfig describes.

  Every current family (attention, Mamba-2, linear attention, the MatMul-free LM's MLGRU and
  hybrids of them) is a TransformerLM whose blocks pick their token mixer from cfg.mixers and
  their channel mixer from cfg.mlp_kind; later families branch here. The packed inference form
  of a ternary model comes from memx.models.packed (pack_model / load_packed).
  """
  return TransformerLM(cfg, rngs=rngs)
