"""Seeding: attention weights land in the right Mamba-2 parameters, and the seeded mixer is
causal linear attention on the teacher's Q/K/V when decay is off and Δ is fixed."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memx.distill.capture import attention_heads, calibrate, teacher_pass
from memx.distill.config import StudentConfig
from memx.distill.seed import (
  COPIED_PARAMS,
  NEW_PARAMS,
  build_student,
  check_mapping,
  converted_layers,
  param_arrays,
  seed_mixer,
  set_params,
  student_model_config,
)
from memx.errors import ConfigError
from memx.models.config import ModelConfig
from memx.models.transformer import TransformerLM
from memx.nn.mamba2 import Mamba2


def _teacher_cfg(kv_heads: int, n_layers: int = 2) -> ModelConfig:
  return ModelConfig(vocab_size=64, d_model=32, n_layers=n_layers, n_heads=4,
                     n_kv_heads=kv_heads)


def _attn(cfg: ModelConfig, seed: int = 0) -> dict:
  d, h, g, k = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
  ks = jax.random.split(jax.random.key(seed), 4)
  return {"wq": jax.random.normal(ks[0], (d, h, k)) * 0.3,
          "wk": jax.random.normal(ks[1], (d, g, k)) * 0.3,
          "wv": jax.random.normal(ks[2], (d, g, k)) * 0.3,
          "wo": jax.random.normal(ks[3], (h, k, d)) * 0.3}


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_seed_maps_attention_weights(kv_heads):
  cfg = _teacher_cfg(kv_heads)
  student = StudentConfig(conv_width=3)
  attn = _attn(cfg)
  seeded = seed_mixer(attn, teacher=cfg, student=student)
  scfg = student_model_config(cfg, student)
  # Shapes and dtypes are exactly those of the student's Mamba-2 layer.
  layer = Mamba2(scfg, 0, rngs=nnx.Rngs(0))
  want = {p[0]: (v.shape, v.dtype) for p, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
  assert {n: (v.shape, v.dtype) for n, v in seeded.items()} == want
  assert set(seeded) == set(NEW_PARAMS) | set(COPIED_PARAMS)
  rep = cfg.n_heads // kv_heads
  np.testing.assert_array_equal(seeded["w_c"], attn["wq"])
  np.testing.assert_array_equal(seeded["w_out"], attn["wo"])
  for h in range(cfg.n_heads):  # head h reads key/value group h // rep, as GQA attention does
    np.testing.assert_array_equal(seeded["w_b"][:, h], attn["wk"][:, h // rep])
    np.testing.assert_array_equal(seeded["w_x"][:, h], attn["wv"][:, h // rep])
  assert not seeded["w_dt"].any() and not seeded["d"].any()
  for name, tap in (("x", student.v_scale), ("b", student.qk_scale), ("c", student.qk_scale)):
    conv = seeded[f"conv_{name}"]
    np.testing.assert_array_equal(conv[-1], np.full_like(conv[-1], tap))
    assert not conv[:-1].any() and not seeded[f"conv_{name}_bias"].any()
  dt = np.log1p(np.exp(seeded["dt_bias"]))  # softplus
  np.testing.assert_allclose(dt, np.geomspace(student.dt_min, student.dt_max, cfg.n_heads),
                             rtol=1e-5)
  np.testing.assert_allclose(np.exp(seeded["a_log"]), student.a_init)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_seeded_mixer_is_causal_linear_attention(kv_heads):
  """Decay off (a_init 0) and Δ fixed at 1: the mixer is causal linear attention with feature
  maps φ_s(x) = silu(s·x) (the seeded conv's tap s, then Mamba-2's SiLU) on the teacher's own
  q, k, v, then the gated per-head RMSNorm and wo. The oracle is plain einsums with a causal
  mask."""
  cfg = _teacher_cfg(kv_heads)
  student = StudentConfig(a_init=0.0, dt_min=1.0, dt_max=1.0, gate="random", qk_scale=0.5,
                          v_scale=0.3)
  attn = _attn(cfg, seed=1)
  seeded = seed_mixer(attn, teacher=cfg, student=student, key=jax.random.key(3))
  mixer = Mamba2(student_model_config(cfg, student), 0, rngs=nnx.Rngs(0))
  set_params(mixer, {(n,): v for n, v in seeded.items()})
  b, t, d, h = 2, 24, cfg.d_model, cfg.n_heads
  u = jax.random.normal(jax.random.key(2), (b, t, d))
  got = mixer(u)

  rep = h // kv_heads
  qk = lambda x: jax.nn.silu(student.qk_scale * x)  # noqa: E731
  q = qk(jnp.einsum("btd,dhk->bthk", u, attn["wq"]))
  k = qk(jnp.repeat(jnp.einsum("btd,dgk->btgk", u, attn["wk"]), rep, axis=2))
  v = jax.nn.silu(student.v_scale
                  * jnp.repeat(jnp.einsum("btd,dgk->btgk", u, attn["wv"]), rep, axis=2))
  causal = jnp.tril(jnp.ones((t, t), bool))
  scores = jnp.where(causal[None, None], jnp.einsum("bthk,bshk->bhts", q, k), 0.0)
  o = jnp.einsum("bhts,bshk->bthk", scores, v)          # Σ_{s<=t} (φq_t·φk_s) φv_s
  z = jnp.einsum("btd,dhk->bthk", u, seeded["w_z"])
  g = o * jax.nn.silu(z)
  g = g / jnp.sqrt(jnp.mean(g * g, axis=-1, keepdims=True) + 1e-5) * seeded["norm"][None, None]
  want = jnp.einsum("bthk,hkd->btd", g, attn["wo"])
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_teacher_pass_and_heads_match_the_model():
  cfg = _teacher_cfg(2, n_layers=3)
  teacher = TransformerLM(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  logits, inputs, outputs = teacher_pass(teacher, tokens, (0, 2))
  np.testing.assert_array_equal(logits, teacher(tokens))
  assert set(inputs) == set(outputs) == {0, 2}
  pos = jnp.broadcast_to(jnp.arange(16), tokens.shape)
  heads = attention_heads(teacher.blocks[2].attn, inputs[2], pos)
  np.testing.assert_allclose(jnp.einsum("bthk,hkd->btd", heads, teacher.blocks[2].attn.wo[...]),
                             outputs[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "hybrid"])
def test_build_student_copies_teacher_and_seeds_converted_layers(kind):
  cfg = _teacher_cfg(2, n_layers=4)
  teacher = TransformerLM(cfg, rngs=nnx.Rngs(0))
  student_cfg = StudentConfig(kind=kind, every=2)
  layers = converted_layers(cfg, student_cfg)
  assert layers == ((0, 1, 2, 3) if kind == "linear" else (1, 3))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  stats, positive = calibrate(teacher, [{"inputs": tokens}], layers)
  assert set(positive) == set(layers) and all(0 <= p <= 1 for p in positive.values())
  student = build_student(teacher, student_cfg, stats=stats)
  assert student.cfg.mixers == tuple("mamba2" if i in layers else "attention" for i in range(4))
  t, s = param_arrays(teacher), param_arrays(student)
  for path, value in t.items():
    if path[0] == "blocks" and path[1] in layers and path[2] in ("attn", "attn_norm"):
      continue
    np.testing.assert_array_equal(s[path], value)  # embeddings, norms, MLPs, kept layers
  for i in layers:
    np.testing.assert_array_equal(s[("blocks", i, "mixer_norm", "scale")],
                                  t[("blocks", i, "attn_norm", "scale")])
    np.testing.assert_array_equal(s[("blocks", i, "mixer", "w_c")],
                                  t[("blocks", i, "attn", "wq")])
    np.testing.assert_allclose(s[("blocks", i, "mixer", "norm")][:, 0], stats[i].head_rms,
                               rtol=1e-6)
  # The student's buffers are its own (training donates them).
  assert s[("embed",)].unsafe_buffer_pointer() != t[("embed",)].unsafe_buffer_pointer()


def test_mapping_errors_name_the_field():
  cfg = _teacher_cfg(2)
  good = student_model_config(cfg, StudentConfig())
  check_mapping(cfg, good, (0, 1))
  bad = {
      "ssm.head_dim": dataclasses.replace(good, ssm=dataclasses.replace(good.ssm, head_dim=4,
                                                                        expand=1)),
      "ssm.d_state": dataclasses.replace(good, ssm=dataclasses.replace(good.ssm, d_state=16)),
      "ssm.n_groups": dataclasses.replace(good, ssm=dataclasses.replace(good.ssm, n_groups=2)),
      "d_model": dataclasses.replace(good, d_model=64),
      r"mixers\[1\]": dataclasses.replace(good, mixers=("mamba2", "attention")),
  }
  for field, student in bad.items():
    with pytest.raises(ConfigError, match=field):
      check_mapping(cfg, student, (0, 1))
  with pytest.raises(ConfigError, match="converts no layer"):
    # One layer, kept as attention by the hybrid: nothing to distil.
    student_model_config(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4),
                         StudentConfig(kind="hybrid", every=2))
  with pytest.raises(ConfigError, match="no attention layer to convert"):
    # (It used to advise --student linear, which this already is.)
    student_model_config(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                     mixers=("mamba2",) * 2), StudentConfig())
  with pytest.raises(ConfigError, match="student.every"):
    StudentConfig(kind="hybrid", every=1)
  with pytest.raises(ConfigError, match="wk"):
    seed_mixer({**_attn(cfg), "wk": jnp.zeros((32, 3, 8))}, teacher=cfg, student=StudentConfig())
