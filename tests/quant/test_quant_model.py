"""quantize_model: RTN and GPTQ replace every attention and SwiGLU projection by codes whose
matmul equals the dequantized weights; GPTQ's first layers are gptq() on the model's own
inputs, and its logits stay closer to the unquantized model's than RTN's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memx.kernels import intq
from memx.models.config import ModelConfig
from memx.models.transformer import TransformerLM
from memx.nn.lora import add_lora
from memx.nn.quantized import IntQWeight, NF4Weight
from memx.quant.config import WeightQuant
from memx.quant.gptq import gptq, hessian
from memx.quant.model import check, quantize_model

CFG = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1)


def _model(cfg=CFG):
  return TransformerLM(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))


def _calib(n=3, b=4, t=32):
  keys = jax.random.split(jax.random.key(7), n)
  return [{"inputs": jax.random.randint(k, (b, t), 0, CFG.vocab_size)} for k in keys]


def _plain(model):
  """The same model with every quantized weight replaced by its dequantized Param (oracle)."""
  for block in model.blocks:
    for owner in (block.attn, block.mlp):
      for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        w = getattr(owner, name, None)
        if isinstance(w, IntQWeight | NF4Weight):
          setattr(owner, name, nnx.Param(w[...]))
  return model


@pytest.mark.parametrize("spec", ["rtn:4:32", "gptq:3:64:2", "nf4"])
def test_quantized_model_equals_its_dequantized_weights(spec):
  tokens = _calib()[0]["inputs"]
  model = _model()
  stats = quantize_model(model, WeightQuant.parse(spec), _calib(), log=lambda *_: None)
  kind = NF4Weight if spec == "nf4" else IntQWeight
  assert all(isinstance(getattr(b.attn, n), kind) for b in model.blocks for n in ("wq", "wo"))
  assert all(isinstance(b.mlp.w_down, kind) for b in model.blocks)
  got = model(tokens)
  np.testing.assert_allclose(_plain(model)(tokens), got, rtol=1e-4, atol=1e-4)
  per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 192
  assert stats["quantized_weights"] == 2 * per_layer
  if spec == "rtn:4:32":
    assert stats["bits_per_weight"] == 4 + 64 / 32


def test_gptq_first_layers_are_gptq_on_the_models_inputs():
  """Block 0's q/k/v see the normed embeddings, which no quantization has touched yet: their
  codes are gptq() against the Hessian of exactly those inputs."""
  calib = _calib()
  dense = _model()
  u = jnp.concatenate([dense.blocks[0].attn_norm(dense._embed(b["inputs"])).reshape(-1, 64)
                       for b in calib])
  want = gptq(dense.blocks[0].attn.wq[...].reshape(64, 64), hessian(u), bits=4, group_size=32)
  model = _model()
  quantize_model(model, WeightQuant("gptq", 4, 32), calib, log=lambda *_: None)
  wq = model.blocks[0].attn.wq
  np.testing.assert_array_equal(intq.unpack(wq.packed[...], 4, 64), want[0])
  # (H summed batch by batch vs over the concatenation: the later groups' scales move an ulp)
  np.testing.assert_allclose(wq.scales[...], want[1], rtol=1e-5)


def test_gptq_logits_stay_closer_to_the_model_than_rtn():
  calib = _calib()
  tokens = calib[0]["inputs"]
  dense = _model()(tokens)
  err = {}
  for method in ("gptq", "rtn"):
    m = _model()
    quantize_model(m, WeightQuant(method, 3, 32, calib_batches=3), calib, log=lambda *_: None)
    err[method] = float(jnp.mean((m(tokens) - dense) ** 2))
  assert err["gptq"] < 0.8 * err["rtn"], err


def test_bad_requests_fail_before_any_work():
  with pytest.raises(ValueError, match="not a whole number of groups of 48"):
    check(_model(), WeightQuant("rtn", 4, 48))
  lora = add_lora(_model(), rank=2, alpha=2.0, rngs=nnx.Rngs(params=jax.random.key(1)))
  with pytest.raises(ValueError, match="merge them first"):
    check(lora, WeightQuant("rtn", 4, 32))
  mamba = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, mixers=("mamba2",),
                      mlp=False)
  with pytest.raises(ValueError, match="no attention or SwiGLU projection"):
    check(_model(mamba), WeightQuant("rtn", 4, 32))
  with pytest.raises(ValueError, match="gptq needs calibration batches"):
    quantize_model(_model(), WeightQuant("gptq", 4, 32), None)
  for text, msg in (("gptq:4", "METHOD:BITS:GROUP"), ("rtn:4:32:8", "METHOD:BITS:GROUP"),
                    ("gptq:x:32", "must be integers"), ("nf4:4:64", "METHOD:BITS:GROUP"),
                    ("gptq:4:32:0", "calib_batches = 0"),
                    ("rtn:2:2", "positive multiple of 4 at 2 bits"),
                    ("gptq:4:1:1", "positive multiple of 2 at 4 bits")):
    with pytest.raises(ValueError, match=msg):
      WeightQuant.parse(text)


def test_names_tell_settings_apart():
  assert WeightQuant.parse("gptq:4:128").name == "gptq-w4g128"
  assert WeightQuant.parse("gptq:4:128:16").name == "gptq-w4g128-c16"
  assert WeightQuant("gptq", 4, 128, damp=0.1).name == "gptq-w4g128-d0.1"
  assert WeightQuant.parse("rtn:3:64").name == "rtn-w3g64"
  assert WeightQuant.parse("nf4").name == "nf4"
