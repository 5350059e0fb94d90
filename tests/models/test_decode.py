"""Recurrent decoding ≡ parallel forward for every mixer and the hybrid LM; O(1) SSM state."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memx.kernels import _testing
from memx.models._testing import jit_for_test
from memx.models.config import ModelConfig, SSMConfig, matmulfree_config
from memx.models.decode import cache_bytes, generate, kv_cache_bytes
from memx.models.transformer import TransformerLM

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                   attn_window=5, attn_sinks=1,
                   ssm=SSMConfig(d_state=16, head_dim=16, chunk_size=16, gated=True))
MODELS = {
    "attention": BASE,
    "mamba2": dataclasses.replace(BASE, mixers=("mamba2",) * 3, mlp=False),
    "linear_attention": dataclasses.replace(BASE, mixers=("linear_attention",) * 3),
    "hybrid": dataclasses.replace(BASE, mixers=("mamba2", "attention", "linear_attention")),
}


def _tokens(b=2, t=20, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, 64)


@pytest.mark.parametrize("name", tuple(MODELS))
def test_decode_steps_equal_parallel_forward(name):
  model = TransformerLM(MODELS[name], rngs=nnx.Rngs(0))
  tokens = _tokens()
  full = jit_for_test(lambda m, t: m(t))(model, tokens)
  step = jit_for_test(lambda m, t, c: m.decode_step(t, c))
  # From an empty cache, one token at a time.
  cache, steps = model.init_cache(2, 24), []
  for t in range(tokens.shape[1]):
    logits, cache = step(model, tokens[:, t], cache)
    steps.append(logits)
  _testing.assert_allclose(jnp.stack(steps, 1), full, name="decode from empty")
  # Prefill a prompt in parallel, then continue step by step.
  logits, cache = jit_for_test(lambda m, t: m.prefill(t, 24))(model, tokens[:, :13])
  _testing.assert_allclose(logits, full[:, :13], name="prefill")
  tail = []
  for t in range(13, tokens.shape[1]):
    logits, cache = step(model, tokens[:, t], cache)
    tail.append(logits)
  _testing.assert_allclose(jnp.stack(tail, 1), full[:, 13:], name="prefill + decode")


def test_greedy_generation_is_consistent_with_the_parallel_forward():
  model = TransformerLM(MODELS["hybrid"], rngs=nnx.Rngs(1))
  prompt = _tokens(t=6, seed=2)
  out = generate(model, prompt, 5)
  assert out.shape == (2, 11)
  np.testing.assert_array_equal(out[:, :6], prompt)
  # Teacher-forced: every generated token is the argmax of the forward pass before it.
  logits = jit_for_test(lambda m, t: m(t))(model, out)
  np.testing.assert_array_equal(jnp.argmax(logits[:, 5:-1], -1), out[:, 6:])
  np.testing.assert_array_equal(generate(model, prompt, 5, prefill_chunk=4), out)
  sampled = generate(model, prompt, 5, temperature=1.0, rng=jax.random.key(3))
  assert sampled.shape == (2, 11) and int(sampled.max()) < 64
  with pytest.raises(ValueError, match="rng"):
    generate(model, prompt, 5, temperature=1.0)
  with pytest.raises(ValueError, match="max_len"):
    generate(model, prompt, 5, max_len=8)


# MoA ring caches (spans at N = 24: 3, 4, 24, 2 and 4, 3, 1, 5; the short rings wrap within a
# chunk and between chunks) next to an SSM layer.
RING_PLAN = (None,
             ((3.0, 0.0, 1), (1.0, 0.1, 0), (0.0, 1.0, 0), (2.0, 0.0, 2)),
             ((4.0, 0.0, 0), (2.0, 0.05, 1), (1.0, 0.0, 3), (3.0, 0.1, 0)))
CHUNKED = {**MODELS,
           "matmulfree": matmulfree_config(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                           d_ff=64, ssm=SSMConfig(chunk_size=16)),
           "plan": dataclasses.replace(BASE, attn_window=None, attn_sinks=0, attn_plan=RING_PLAN,
                                       mixers=("mamba2", "attention", "attention"))}


@pytest.mark.parametrize("name", tuple(CHUNKED))
def test_chunked_prefill_equals_whole_prefill(name):
  """prefill(chunk_size=C): chunks of 1 token, of a size that does not divide the prompt, and
  larger than a kernel chunk give the whole prefill's logits and decode state (conv tails
  across chunk boundaries, SSM states, KV caches), and decoding continues from it the same.
  The whole chunks run in a scan (attention over its cache with a traced offset), the remainder
  unrolled; unroll=True and ring caches unroll every chunk: all paths run."""
  model = TransformerLM(CHUNKED[name], rngs=nnx.Rngs(0))
  tokens = _tokens(t=21, seed=6)
  whole, want = jit_for_test(lambda m, t: m.prefill(t, 24))(model, tokens)
  for chunk in (1, 5, 17):
    got, cache = jit_for_test(lambda m, t, c=chunk: m.prefill(t, 24, chunk_size=c))(
        model, tokens)
    _testing.assert_allclose(got, whole, name=f"logits, chunks of {chunk}")
    if chunk == 5 and "attention" in (CHUNKED[name].mixers or ("attention",)):
      unrolled, _ = jit_for_test(lambda m, t: m.prefill(t, 24, chunk_size=5, unroll=True))(
          model, tokens)
      _testing.assert_allclose(unrolled, whole, name="logits, unrolled chunks of 5")
    for (path, a), w in zip(jax.tree_util.tree_leaves_with_path(cache), jax.tree.leaves(want),
                            strict=True):
      where = f"chunks of {chunk}: cache{jax.tree_util.keystr(path)}"
      if jnp.issubdtype(a.dtype, jnp.integer):  # positions
        np.testing.assert_array_equal(a, w, err_msg=where)
      else:
        _testing.assert_allclose(a, w, name=where)
  for chunk in (5, 7):  # with and without a remainder chunk after the whole ones
    last, _ = jit_for_test(lambda m, t, c=chunk: m.prefill(t, 24, chunk_size=c,
                                                           last_logits=True))(model, tokens)
    _testing.assert_allclose(last, whole[:, -1], name=f"last logits, chunks of {chunk}")
  step = jit_for_test(lambda m, t, c: m.decode_step(t, c))
  np.testing.assert_allclose(step(model, tokens[:, 0], cache)[0],
                             step(model, tokens[:, 0], want)[0], rtol=1e-5, atol=1e-5)


def test_chunked_prefill_rejects_bad_input():
  model = TransformerLM(MODELS["hybrid"], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    model.prefill(_tokens(t=8), 8, chunk_size=0)
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    model.prefill(_tokens(t=8), 8, chunk_size=True)
  with pytest.raises(ValueError, match=r"Mamba2: state\['ssm'\] must have shape \(2, 4, 16"):
    layer = model.blocks[0].mixer
    bad = dict(layer.init_cache(2), ssm=jnp.zeros((1, 4, 16, 16)))
    layer(jnp.zeros((2, 4, 32)), state=bad)
  with pytest.raises(ValueError, match="keys"):
    model.blocks[2].mixer(jnp.zeros((2, 4, 32)), state={"h": jnp.zeros((2,))})


def test_ssm_state_does_not_grow_with_length():
  for name in ("mamba2", "linear_attention"):
    model = TransformerLM(MODELS[name], rngs=nnx.Rngs(0))
    assert cache_bytes(model.init_cache(2, 64)) == cache_bytes(model.init_cache(2, 4096))
  hybrid = TransformerLM(MODELS["hybrid"], rngs=nnx.Rngs(0))
  grow = cache_bytes(hybrid.init_cache(2, 4096)) - cache_bytes(hybrid.init_cache(2, 64))
  # Only the one attention layer grows: keys + values, [B, S, G, K] fp32 each.
  assert grow == 2 * 2 * (4096 - 64) * 2 * 8 * 4


# --- sparse plans (MoA): per-head ring caches -----------------------------------------------

# Heterogeneous per-head rules (alpha, beta, n_sink); spans at N = 26 in the comments. Layer 0
# has a full head, layer 1 only short spans (its rings wrap several times in 26 tokens).
PLAN = (
    ((3.0, 0.0, 1), (1.0, 0.1, 0), (0.0, 1.0, 0), (2.0, 0.0, 2)),   # 3, 4, 26, 2
    ((4.0, 0.0, 0), (2.0, 0.05, 1), (1.0, 0.0, 3), (3.0, 0.1, 0)),  # 4, 3, 1, 6
)
PLAN_BASE = dataclasses.replace(BASE, n_layers=2, attn_window=None, attn_sinks=0)


def _decode_all(model, tokens, prompt: int, max_len: int, full_cache: bool):
  """Prefill tokens[:, :prompt], then decode the rest: logits at every position [B, T, V]."""
  logits, cache = jit_for_test(lambda m, t: m.prefill(t, max_len, full_cache=full_cache))(
      model, tokens[:, :prompt])
  step = jit_for_test(lambda m, t, c: m.decode_step(t, c))
  out = [logits]
  for t in range(prompt, tokens.shape[1]):
    logits, cache = step(model, tokens[:, t], cache)
    out.append(logits[:, None])
  return jnp.concatenate(out, 1), cache


def test_plan_ring_cache_equals_full_cache_and_parallel_forward():
  """Prompt 6 + 20 decoded tokens with max_len = 26: the plan's N is max_len, and the parallel
  forward on the 26 tokens uses the spans at N = 26 too, so all three agree at every position
  (however the spans depend on N). Other KV-head counts: tests/nn/test_sparse_cache.py."""
  cfg = dataclasses.replace(PLAN_BASE, attn_plan=PLAN)
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens(t=26, seed=4)
  full = jit_for_test(lambda m, t: m(t))(model, tokens)
  ring, cache = _decode_all(model, tokens, 6, 26, full_cache=False)
  dense, dense_cache = _decode_all(model, tokens, 6, 26, full_cache=True)
  _testing.assert_allclose(ring, dense, name="ring cache vs full cache")
  _testing.assert_allclose(ring, full, name="ring cache vs parallel forward at N = max_len")
  assert cache_bytes(cache) < cache_bytes(dense_cache)


def test_plan_with_full_spans_is_the_dense_model():
  """Spans >= N (and sinks, which a full span already sees) change nothing."""
  full_span = ((0.0, 1.0, 0), (40.0, 0.0, 2), (1.0, 1.0, 5), (30.0, 0.5, 0))
  dense_cfg = dataclasses.replace(PLAN_BASE, mixers=("mamba2", "attention"))
  dense = TransformerLM(dense_cfg, rngs=nnx.Rngs(0))
  planned = TransformerLM(dataclasses.replace(dense_cfg, attn_plan=(None, full_span)),
                          rngs=nnx.Rngs(0))
  nnx.update(planned, nnx.state(dense, nnx.Param))
  tokens = _tokens(t=20, seed=5)
  want = jit_for_test(lambda m, t: m(t))(dense, tokens)
  _testing.assert_allclose(jit_for_test(lambda m, t: m(t))(planned, tokens), want,
                           name="parallel forward")
  got, cache = _decode_all(planned, tokens, 5, 20, full_cache=False)
  _testing.assert_allclose(got, want, name="ring-cache decode")
  ring = cache["layers"][1]
  assert ring.caps == (20, 20) and ring.k.shape == (2, 40, 8)  # rings hold everything


def test_kv_cache_bytes_matches_the_cache_arrays():
  hybrid_plan = dataclasses.replace(PLAN_BASE, n_layers=3, mixers=("attention", "mamba2",
                                                                    "attention"),
                                    attn_plan=(None, None, PLAN[1]))
  for cfg in (dataclasses.replace(PLAN_BASE, attn_plan=PLAN), hybrid_plan, BASE,
              dataclasses.replace(PLAN_BASE, attn_plan=PLAN, compute_dtype="bfloat16")):
    model = TransformerLM(cfg, rngs=nnx.Rngs(0))
    for max_len, batch, full in ((26, 2, False), (9, 3, False), (26, 1, True)):
      cache = jax.eval_shape(lambda m=model, b=batch, n=max_len, f=full:
                             m.init_cache(b, n, full_cache=f))
      attn = [c for blk, c in zip(model.blocks, cache["layers"], strict=True)
              if blk.kind == "attention"]
      kv = sum(x.size * x.dtype.itemsize for c in attn for x in jax.tree.leaves(c)
               if x.dtype != jnp.int32)
      everything = sum(x.size * x.dtype.itemsize for c in attn for x in jax.tree.leaves(c))
      assert kv_cache_bytes(cfg, max_len, batch, full=full) == kv
      assert kv_cache_bytes(cfg, max_len, batch, full=full, include_positions=True) == everything
  # A plan's cache follows its spans: at N = 4096, layer 1's KV head 0 (query heads 0, 1) keeps
  # max sink 1 + max span(4, 2 + 0.05 N = 207) slots, KV head 1 (heads 2, 3) max sink 3 +
  # max span(1, 3 + 0.1 N = 413); the dense layer 0 keeps N slots per KV head.
  cfg = dataclasses.replace(PLAN_BASE, attn_plan=(None, PLAN[1]))
  slot = 2 * 8 * 4  # key + value, head_dim 8, fp32
  assert kv_cache_bytes(cfg, 4096) == (2 * 4096 + (1 + 207) + (3 + 413)) * slot
  short = dataclasses.replace(PLAN_BASE, attn_plan=(PLAN[1], PLAN[1]))
  assert kv_cache_bytes(short, 4096) / kv_cache_bytes(short, 4096, full=True) == pytest.approx(
      (1 + 207 + 3 + 413) / (2 * 4096))
  assert kv_cache_bytes(cfg, 4096, full=True) == 2 * 2 * 4096 * slot
  with pytest.raises(ValueError, match="max_len"):
    kv_cache_bytes(cfg, 0)


def test_greedy_generation_with_a_plan():
  """generate's max_len (= prompt + new tokens) is the plan's N: each generated token is the
  argmax of the parallel forward on the generated sequence (which runs at that same N)."""
  cfg = dataclasses.replace(PLAN_BASE, attn_plan=PLAN)
  model = TransformerLM(cfg, rngs=nnx.Rngs(2))
  prompt = _tokens(t=4, seed=6)
  out = generate(model, prompt, 14)
  assert out.shape == (2, 18)
  np.testing.assert_array_equal(out[:, :4], prompt)
  logits = jit_for_test(lambda m, t: m(t))(model, out)
  np.testing.assert_array_equal(jnp.argmax(logits[:, 3:-1], -1), out[:, 4:])


def test_decoding_past_max_len_or_with_wrong_shapes_is_refused():
  """Past the cache's max_len a step raises (position known) or gives NaN logits (under jit);
  tokens that are not one per cached sequence are refused (the MLGRU's broadcasting would
  otherwise run them and corrupt its state)."""
  plan_cfg = dataclasses.replace(BASE, attn_window=None, attn_sinks=0,
                                 attn_plan=(((0, 0.0, 8),) * 4, None, None))   # all sinks
  mlgru = matmulfree_config(vocab_size=64, d_model=32, n_layers=2, n_heads=4)
  for cfg in (BASE, plan_cfg, mlgru):
    model = TransformerLM(cfg, rngs=nnx.Rngs(0))
    if cfg is not mlgru:
      _, cache = model.prefill(_tokens(t=8), 8)
      with pytest.raises(ValueError, match="past the cache's max_len 8"):
        model.decode_step(jnp.zeros((2,), jnp.int32), cache)
      logits, _ = jax.jit(lambda m, t, c: m.decode_step(t, c))(
          model, jnp.zeros((2,), jnp.int32), cache)
      assert bool(jnp.all(jnp.isnan(logits)))
    _, cache = model.prefill(_tokens(t=4), 8)
    for bad in (jnp.zeros((2, 1), jnp.int32), jnp.zeros((1,), jnp.int32)):
      with pytest.raises(ValueError, match=r"tokens must be \[B\] with B = 2"):
        model.decode_step(bad, cache)
  # Pure SSM/recurrent models have no bound: any number of steps.
  mamba = TransformerLM(MODELS["mamba2"], rngs=nnx.Rngs(0))
  _, cache = mamba.prefill(_tokens(t=4), 4)
  logits, _ = mamba.decode_step(jnp.zeros((2,), jnp.int32), cache)
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_bad_generation_input_is_refused_before_compute():
  model = TransformerLM(MODELS["hybrid"], rngs=nnx.Rngs(0))
  prompt = _tokens(t=4)
  for bad, match in ((prompt.at[0, 0].set(64), r"in \[0, 64\)"), (prompt.at[1, 2].set(-1), "-1"),
                     (prompt[0], r"\[B, T\]"), (prompt[:, :0], "T >= 1"),
                     (prompt.astype(jnp.float32), "integer")):
    with pytest.raises(ValueError, match=match):
      generate(model, bad, 2)
  for temperature in (float("nan"), -1.0, float("inf")):
    with pytest.raises(ValueError, match="temperature must be finite"):
      generate(model, prompt, 2, temperature=temperature, rng=jax.random.key(0))
  out = generate(model, prompt, 2, temperature=jnp.float32(0.5), rng=jax.random.key(0))
  assert out.shape == (2, 6)
  with pytest.raises(ValueError, match="prompt is empty"):
    model.prefill(prompt[:, :0], 4)


def test_a_windowed_model_runs_sequences_shorter_than_its_sinks():
  cfg = dataclasses.replace(BASE, attn_sinks=4)
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens(t=3)
  logits, _ = model.prefill(tokens, 8)
  _testing.assert_allclose(model(tokens), logits, name="forward of 3 tokens with 4 sinks")
