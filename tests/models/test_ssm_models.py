"""Mamba-2, linear-attention and hybrid LMs: config, causality, remat, gradients, factory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memx.config import Config, from_dict, to_dict
from memx.errors import ConfigError
from memx.experiment.overrides import apply_overrides
from memx.models._testing import jit_for_test
from memx.models.config import ModelConfig, SSMConfig, hybrid_mixers
from memx.models.factory import build_model
from memx.models.transformer import TransformerLM

SSM = SSMConfig(d_state=16, head_dim=16, chunk_size=16, gated=True)
HYBRID = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                     mixers=("mamba2", "attention", "linear_attention"), ssm=SSM)
MAMBA = dataclasses.replace(HYBRID, mixers=("mamba2",) * 3, mlp=False)


def _tokens(b=2, t=12, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, 64)


def test_factory_builds_each_layer_type():
  model = build_model(HYBRID, rngs=nnx.Rngs(0))
  assert isinstance(model, TransformerLM)
  kinds = [type(b.attn if b.kind == "attention" else b.mixer).__name__ for b in model.blocks]
  assert kinds == ["Mamba2", "Attention", "LinearAttention"]
  mamba = build_model(MAMBA, rngs=nnx.Rngs(0))
  assert all(b.mlp is None for b in mamba.blocks)
  assert jit_for_test(lambda m, t: m(t))(mamba, _tokens()).shape == (2, 12, 64)


def test_hybrid_is_causal_by_gradient():
  model = TransformerLM(HYBRID, rngs=nnx.Rngs(0))
  tokens = _tokens()
  emb = jnp.take(model.embed[...], tokens, axis=0)
  positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)

  def probe(m, e):
    x = e
    for block in m.blocks:
      x = block(x, positions)
    return m.final_norm(x)[:, 5].sum()

  g = jit_for_test(lambda m, e: jax.grad(lambda e: probe(m, e))(e))(model, emb)
  per_pos = np.abs(np.asarray(g)).sum(axis=(0, 2))
  assert np.all(per_pos[6:] == 0.0) and per_pos[0] > 0 and per_pos[5] > 0, per_pos


def test_remat_matches_no_remat_and_every_param_gets_a_gradient():
  cfg = HYBRID  # covers all three mixers
  tokens = _tokens()
  base = TransformerLM(cfg, rngs=nnx.Rngs(1))
  rem = TransformerLM(dataclasses.replace(cfg, remat="full"), rngs=nnx.Rngs(1))
  loss = lambda m: jnp.mean(m(tokens) ** 2)  # noqa: E731
  vg = jit_for_test(lambda m: nnx.value_and_grad(loss)(m))
  l0, g0 = vg(base)
  l1, g1 = vg(rem)
  np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for path, g in jax.tree_util.tree_leaves_with_path(g0):
    assert np.all(np.isfinite(np.asarray(g))), path
    assert float(jnp.abs(g).max()) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


def test_bf16_close_to_fp32():
  tokens = _tokens()
  run = jit_for_test(lambda m, t: m(t))
  a = run(TransformerLM(HYBRID, rngs=nnx.Rngs(2)), tokens)
  b = run(TransformerLM(dataclasses.replace(HYBRID, compute_dtype="bfloat16"),
                        rngs=nnx.Rngs(2)), tokens)
  assert b.dtype == jnp.float32
  np.testing.assert_allclose(a, b, atol=5e-2, rtol=5e-2)


def test_mixers_and_ssm_config_from_overrides_and_json():
  cfg = Config(model=ModelConfig(n_layers=4))
  cfg = apply_overrides(cfg, {"model.mixers": "mamba2,mamba2,mamba2,attention",
                              "model.ssm.d_state": "32", "model.ssm.gated": "true"})
  assert cfg.model.mixers == ("mamba2",) * 3 + ("attention",)
  assert cfg.model.ssm.d_state == 32 and cfg.model.ssm.gated
  assert from_dict(to_dict(cfg)) == cfg
  assert hybrid_mixers(8, 4) == ("attention", "mamba2", "mamba2", "mamba2") * 2


@pytest.mark.parametrize("kwargs, match", [
    ({"mixers": ("mamba2",)}, "one mixer per layer"),
    ({"mixers": ("mamba", "attention")}, "unknown mixer"),
    ({"mixers": ("mamba2", "attention"), "attn_window": 4, "attn_window_layers": (0,)},
     "not attention layers"),
    ({"mixers": ("mamba2", "mamba2"), "ssm": SSMConfig(head_dim=48)}, "ssm.head_dim"),
    ({"mixers": ("mamba2", "mamba2"), "ssm": SSMConfig(head_dim=32, n_groups=3)},
     "ssm.n_groups"),
    ({"attn_window_layers": (0,)}, "attn_window_layers.*attn_window, which is None"),
    ({"mixers": "mamba2,attention"}, "mixers.*must be None or a sequence"),
    ({"mixers": ("linear_attention",) * 2, "n_heads": 5}, "must divide model.d_model"),
    ({"mixers": ("mamba2", "attention"), "n_heads": 128}, "even for RoPE"),
])
def test_bad_model_configs_name_the_field(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    ModelConfig(d_model=128, n_layers=2, **kwargs)


def test_lists_from_python_become_tuples_and_the_model_decodes():
  # A list made the config unhashable: accepted, then jit's static GraphDef failed in generate.
  from memx.models.decode import generate
  cfg = dataclasses.replace(HYBRID, mixers=["attention", "mamba2", "attention"],
                            attn_window=4, attn_window_layers=[0])
  assert cfg.mixers == ("attention", "mamba2", "attention") and cfg.attn_window_layers == (0,)
  hash(cfg)
  model = build_model(cfg, rngs=nnx.Rngs(0))
  out = generate(model, _tokens(1, 6), max_new_tokens=2, max_len=16)
  assert out.shape[1] == 8


def test_pure_ssm_models_skip_the_attention_head_checks():
  # No attention layer: n_heads / n_kv_heads shape nothing, so they are not checked (they used
  # to be refused "for RoPE").
  cfg = ModelConfig(d_model=48, n_layers=2, n_heads=48, n_kv_heads=5, mixers=("mamba2",) * 2,
                    ssm=SSMConfig(head_dim=16), mlp=False)
  assert build_model(cfg, rngs=nnx.Rngs(0))(_tokens()).shape == (2, 12, cfg.vocab_size)


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_hybrid_mixers_needs_a_positive_period(every):
  with pytest.raises(ConfigError, match="attention_every"):
    hybrid_mixers(4, every)


@pytest.mark.parametrize("kwargs, match", [
    ({"chunk_size": 48}, "chunk_size"), ({"dt_min": 0.0}, "dt_min"),
    ({"feature_map": "relu"}, "feature_map"), ({"impl": "cuda"}, "impl"),
])
def test_bad_ssm_configs_name_the_field(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    SSMConfig(**kwargs)
