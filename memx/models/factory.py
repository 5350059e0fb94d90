"""build_model: the one constructor the train step calls for any ModelConfig."""

from flax import nnx

from memx.models.config import ModelConfig
from memx.models.transformer import TransformerLM


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs) -> TransformerLM:
  """The model a ModelConfig describes.

  Every current family (attention, Mamba-2, linear attention and hybrids of them) is a
  TransformerLM whose blocks pick their token mixer from cfg.mixers; later families (e.g. the
  MatMul-free LM) branch here.
  """
  return TransformerLM(cfg, rngs=rngs)
