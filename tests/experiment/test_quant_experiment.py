"""experiments/quant/pipeline.py: its configs validate and every method it evaluates parses and
fits the model (group 64 divides every projection's input size). The evaluation path itself
runs in tests/sparse/test_sparse_cli.py and tests/quant."""

import jax
from flax import nnx

from memx.experiment import loading
from memx.models.transformer import TransformerLM
from memx.quant.config import WeightQuant
from memx.quant.model import check
from memx.train.loop import check_data

EXPERIMENT = "experiments/quant/pipeline.py"


def test_configs_and_methods_fit():
  module = loading.load_module(EXPERIMENT)
  for variant in loading.variants(module):
    cfg = module.config(variant)
    check_data(cfg)
    model = nnx.eval_shape(lambda cfg=cfg: TransformerLM(
        cfg.model, rngs=nnx.Rngs(params=jax.random.key(0))))
    for spec in module.METHODS:
      check(model, WeightQuant.parse(spec))
