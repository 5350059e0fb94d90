"""H2O eviction caches: prompt scores against dense attention, and prefill + steps against a
float64 transcription of the algorithm (which tokens stay, what each step attends)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memx.kernels import _testing
from memx.kernels.kv_quant import KVQuant
from memx.models.config import ModelConfig, SSMConfig
from memx.models.decode import decode_nll, generate, kv_cache_bytes
from memx.models.transformer import TransformerLM
from memx.nn.kv_evict import (
  H2O,
  EvictCache,
  evict_cache_bytes,
  fill,
  init_evict_cache,
  key_scores,
  step,
)
from memx.nn.kv_evict import extend as evict_extend


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def test_key_scores_are_column_sums_of_causal_attention():
  """300 prompt tokens (three query blocks, the last partial), GQA 4 query heads on 2 KV
  heads."""
  rng = np.random.default_rng(0)
  b, t, h, g, d = 2, 300, 4, 2, 16
  q = rng.standard_normal((b, t, h, d)).astype(np.float32)
  k = rng.standard_normal((b, t, g, d)).astype(np.float32)
  got = np.asarray(key_scores(jnp.asarray(q), jnp.asarray(k), d ** -0.5))
  s = np.einsum("bthd,bsgd->bhgts", q.astype(np.float64), k.astype(np.float64)) * d ** -0.5
  s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  p = _softmax(s)
  own = np.arange(h) // (h // g)                                    # query head -> KV head
  want = np.stack([p[:, own == j, j].sum(axis=(1, 2)) for j in range(g)], axis=-1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got.sum(axis=(1, 2)), t * h, rtol=1e-5)   # every row sums to 1
  # The last 150 queries only (an observation window crossing a block boundary).
  tail = np.asarray(key_scores(jnp.asarray(q[:, 150:]), jnp.asarray(k), d ** -0.5, 150))
  want = np.stack([p[:, own == j, j, 150:].sum(axis=(1, 2)) for j in range(g)], axis=-1)
  np.testing.assert_allclose(tail, want, rtol=1e-4, atol=1e-5)


def _h2o(q, k, v, t0, heavy, recent, scale, observe=0, pool=1):
  """One sequence, one KV head, as the paper states it (float64): q [N, R, D], k, v [N, D];
  observe > 0 scores the prompt by its last `observe` queries (SnapKV). Returns the step
  outputs [N - t0, R, D] and the positions held at the end."""
  n = q.shape[0]
  s = np.einsum("ird,jd->irj", q[:t0], k[:t0]) * scale
  s = np.where(np.tril(np.ones((t0, t0), bool))[:, None, :], s, -np.inf)
  rows = slice(t0 - observe if 0 < observe < t0 else 0, t0)
  score = dict(enumerate(_softmax(s)[rows].sum(axis=(0, 1))))
  if t0 <= heavy + recent:
    kept = set(range(t0))
  else:
    half, n_old = pool // 2, t0 - recent
    rank = {j: max(score[i] for i in range(max(0, j - half), min(n_old, j + half + 1)))
            for j in range(n_old)}
    older = sorted(range(n_old), key=lambda j: (-rank[j], j))[:heavy]
    kept = set(older) | set(range(t0 - recent, t0))
  outs = []
  for p in range(t0, n):
    keys = sorted(kept) + [p]
    prob = _softmax(q[p] @ k[keys].T * scale)                      # [R, len]
    outs.append(prob @ v[keys])
    score[p] = 0.0
    for j, key in enumerate(keys):
      score[key] += prob[:, j].sum()
    kept.add(p)
    if len(kept) > heavy + recent:
      kept.remove(min((x for x in kept if x <= p - recent), key=lambda x: score[x]))
  return np.stack(outs), kept


@pytest.mark.parametrize("t0,heavy,recent,observe,pool", [
    (20, 4, 3, 0, 1), (3, 4, 3, 0, 1), (12, 0, 5, 0, 1), (10, 40, 2, 0, 1), (20, 4, 3, 5, 1),
    (20, 4, 3, 5, 3)], ids=["long-prompt", "short-prompt", "window-only", "no-eviction",
                            "observation-window", "pooled"])
def test_prefill_and_steps_equal_the_algorithm(t0, heavy, recent, observe, pool):
  rng = np.random.default_rng(1)
  b, n, h, g, d = 2, 40, 4, 2, 8
  q = rng.standard_normal((b, n, h, d)).astype(np.float32)
  k = rng.standard_normal((b, n, g, d)).astype(np.float32)
  v = rng.standard_normal((b, n, g, d)).astype(np.float32)
  scale = d ** -0.5
  spec = H2O(heavy, recent, observe, pool)
  cache = init_evict_cache(spec, b, n, g, d, jnp.float32)
  observed, first = spec.observed(jnp.asarray(q[:, :t0]))
  cache = fill(cache, jnp.asarray(k[:, :t0]), jnp.asarray(v[:, :t0]),
               key_scores(observed, jnp.asarray(k[:, :t0]), scale, first))
  one = jax.jit(step, static_argnums=5)
  outs = []
  for p in range(t0, n):
    out, cache = one(cache, jnp.asarray(q[:, p]), jnp.asarray(k[:, p]), jnp.asarray(v[:, p]),
                     p, scale)
    outs.append(np.asarray(out))
  outs = np.stack(outs, axis=1)                                       # [B, N - t0, H, D]
  r = h // g
  for i in range(b):
    for j in range(g):
      want, kept = _h2o(q[i, :, j * r:(j + 1) * r].astype(np.float64), k[i, :, j].astype(
          np.float64), v[i, :, j].astype(np.float64), t0, heavy, recent, scale, observe, pool)
      np.testing.assert_allclose(outs[i, :, j * r:(j + 1) * r], want, rtol=1e-4, atol=1e-5)
      held = np.asarray(cache.pos[i, :, j])
      assert set(held[held >= 0].tolist()) == kept
      assert len(kept) == min(heavy + recent, n)


def _h2o_chunked(q, k, v, t0, chunk, heavy, recent, scale):
  """The prompt prefilled `chunk` tokens at a time in a cache of heavy + recent tokens (each
  chunk query sees the held tokens and the chunk so far; after the chunk the recent latest
  and the highest scores stay), then steps as `_h2o`. Returns every output [N, R, D] and the
  positions held at the end."""
  n, budget = q.shape[0], heavy + recent
  kept, score, outs = set(), {}, []
  for c0 in range(0, t0, chunk):
    c1 = min(c0 + chunk, t0)
    for i in range(c0, c1):
      keys = sorted(kept) + list(range(c0, i + 1))
      prob = _softmax(q[i] @ k[keys].T * scale)
      outs.append(prob @ v[keys])
      for j, key in enumerate(keys):
        score[key] = score.get(key, 0.0) + prob[:, j].sum()
    cand = kept | set(range(c0, c1))
    if len(cand) > budget:
      late = {x for x in cand if x >= c1 - recent}
      kept = late | set(sorted(cand - late, key=lambda x: -score[x])[:budget - len(late)])
    else:
      kept = cand
  for p in range(t0, n):
    keys = sorted(kept) + [p]
    prob = _softmax(q[p] @ k[keys].T * scale)
    outs.append(prob @ v[keys])
    score[p] = 0.0
    for j, key in enumerate(keys):
      score[key] += prob[:, j].sum()
    kept.add(p)
    if len(kept) > budget:
      kept.remove(min((x for x in kept if x <= p - recent), key=lambda x: score[x]))
  return np.stack(outs), kept


@pytest.mark.parametrize("chunk,heavy,recent", [(5, 4, 3), (7, 2, 6), (4, 20, 20)],
                         ids=["evicting", "recent-heavy", "no-eviction"])
def test_chunked_prefill_equals_the_chunked_algorithm(chunk, heavy, recent):
  """Locret's setting: a 23-token prompt in chunks (the last one partial) through a cache that
  never exceeds the budget, then steps; static and traced chunk offsets agree."""
  rng = np.random.default_rng(5)
  b, n, h, g, d, t0 = 2, 32, 4, 2, 8, 23
  q, k, v = (rng.standard_normal((b, n, x, d)).astype(np.float32) for x in (h, g, g))
  scale = d ** -0.5
  spec = H2O(heavy, recent)
  outs = {}
  for traced in (False, True):
    cache = init_evict_cache(spec, b, n, g, d, jnp.float32)
    run = jax.jit(evict_extend, static_argnums=5) if traced else evict_extend
    got = []
    for c0 in range(0, t0, chunk):
      c1 = min(c0 + chunk, t0)
      out, cache = run(cache, *(jnp.asarray(a[:, c0:c1]) for a in (q, k, v)),
                       jnp.int32(c0) if traced else c0, scale)
      got.append(np.asarray(out))
    for p in range(t0, n):
      out, cache = step(cache, jnp.asarray(q[:, p]), jnp.asarray(k[:, p]),
                        jnp.asarray(v[:, p]), p, scale)
      got.append(np.asarray(out)[:, None])
    outs[traced] = (np.concatenate(got, axis=1), np.asarray(cache.pos))
  np.testing.assert_allclose(outs[True][0], outs[False][0], rtol=1e-5, atol=1e-6)
  got, pos = outs[False]
  r = h // g
  for i in range(b):
    for j in range(g):
      want, kept = _h2o_chunked(q[i, :, j * r:(j + 1) * r].astype(np.float64),
                                k[i, :, j].astype(np.float64), v[i, :, j].astype(np.float64),
                                t0, chunk, heavy, recent, scale)
      np.testing.assert_allclose(got[i, :, j * r:(j + 1) * r], want, rtol=1e-4, atol=1e-5)
      held = pos[i, :, j]
      assert set(held[held >= 0].tolist()) == kept


def test_a_rewound_position_never_attends_to_later_tokens():
  """A cache fed back with its position rewound (as a benchmark repeats the same steps) treats
  slots holding positions >= pos as empty: the step attends to the older held tokens and the
  new one, and the new token takes a stale slot."""
  rng = np.random.default_rng(4)
  b, n, h, g, d, t0 = 1, 24, 2, 1, 8, 12
  q, k, v = (rng.standard_normal((b, n, x, d)).astype(np.float32) for x in (h, g, g))
  spec = H2O(3, 3)
  cache = fill(init_evict_cache(spec, b, n, g, d, jnp.float32), jnp.asarray(k[:, :t0]),
               jnp.asarray(v[:, :t0]), key_scores(jnp.asarray(q[:, :t0]),
                                                  jnp.asarray(k[:, :t0]), d ** -0.5))
  for p in range(t0, n):
    _, cache = step(cache, jnp.asarray(q[:, p]), jnp.asarray(k[:, p]), jnp.asarray(v[:, p]), p,
                    d ** -0.5)
  pos, keys, vals = (np.asarray(a)[0, :, 0] for a in (cache.pos, cache.k, cache.v))
  older = pos < t0
  assert 0 < older.sum() < len(pos)                     # both kinds of slot are there
  out, rewound = step(cache, jnp.asarray(q[:, t0]), jnp.asarray(k[:, t0]),
                      jnp.asarray(v[:, t0]), t0, d ** -0.5)
  kk = np.concatenate([keys[older], k[0, t0]], axis=0)
  vv = np.concatenate([vals[older], v[0, t0]], axis=0)
  want = _softmax(q[0, t0] @ kk.T * d ** -0.5) @ vv
  np.testing.assert_allclose(np.asarray(out)[0], want, rtol=1e-5, atol=1e-6)
  new_slot = np.asarray(rewound.pos)[0, :, 0] == t0
  assert new_slot.sum() == 1 and pos[new_slot][0] >= t0  # a stale slot, not an older token


def test_spec_bytes_and_bad_settings():
  spec = H2O.parse("16:8")
  assert (spec.heavy, spec.recent, spec.budget, spec.name) == (16, 8, 24, "h2o16+8")
  cache = init_evict_cache(spec, 3, 100, 2, 64, jnp.bfloat16)
  assert evict_cache_bytes(spec, 3, 100, 2, 64, 2) == sum(
      x.nbytes for x in jax.tree.leaves(cache)) == 3 * 24 * 2 * (2 * 64 * 2 + 8)
  assert init_evict_cache(spec, 1, 10, 2, 64, jnp.bfloat16).k.shape[1] == 10  # never > max_len
  with pytest.raises(ValueError, match="recent must be an int >= 1"):
    H2O(4, 0)
  with pytest.raises(ValueError, match="heavy must be an int >= 0"):
    H2O(-1, 4)
  with pytest.raises(ValueError, match="expected HEAVY:RECENT"):
    H2O.parse("16")
  assert H2O.parse("16:8:4") == H2O(16, 8, 4) and H2O(16, 8, 4).name == "h2o16+8o4"
  assert H2O.parse("16:8:4:7").name == "h2o16+8o4p7"
  with pytest.raises(ValueError, match="pool must be odd"):
    H2O(4, 4, 0, 2)


# --- through the model -----------------------------------------------------------------------

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  attn_window=5, attn_window_layers=(1,))


def test_a_budget_as_long_as_the_sequence_equals_the_dense_cache():
  """Layer 0 (causal) gets an H2O cache, layer 1 (windowed) keeps its dense one; with room for
  every token nothing is evicted and the decode loss is the dense cache's."""
  model = TransformerLM(CFG, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(5), (2, 24), 0, 64)
  _testing.assert_allclose(decode_nll(model, tokens, 7, kv_evict=H2O(20, 4)),
                           decode_nll(model, tokens, 7), name="h2o without eviction")
  cache = model.init_cache(2, 24, kv_evict=H2O(4, 4))
  assert isinstance(cache["layers"][0], EvictCache) and isinstance(cache["layers"][1], dict)
  assert kv_cache_bytes(CFG, 24, 2, kv_evict=H2O(4, 4)) == sum(
      x.nbytes for layer in cache["layers"] for x in jax.tree.leaves(layer))


def test_a_smaller_budget_moves_the_decode_loss_further():
  cfg = dataclasses.replace(CFG, d_model=64, init_std=0.1, attn_window=None,
                            attn_window_layers=None)
  model = TransformerLM(cfg, rngs=nnx.Rngs(1))
  tokens = jax.random.randint(jax.random.key(6), (4, 40), 0, 64)
  full = decode_nll(model, tokens, 4)
  gap = {b: float(jnp.mean(jnp.abs(decode_nll(model, tokens, 4, kv_evict=H2O(b, b)) - full)))
         for b in (2, 8)}
  assert 0 < gap[8] < gap[2], gap


def test_generate_on_a_hybrid():
  """Mamba-2 then attention: greedy tokens with a budget that never evicts are the dense
  cache's; a small budget still generates."""
  cfg = dataclasses.replace(CFG, mixers=("mamba2", "attention"), attn_window=None,
                            attn_window_layers=None,
                            ssm=SSMConfig(d_state=8, head_dim=8, chunk_size=16))
  model = TransformerLM(cfg, rngs=nnx.Rngs(2))
  prompt = jax.random.randint(jax.random.key(7), (2, 9), 0, 64)
  out = generate(model, prompt, 6, kv_evict=H2O(8, 8))
  np.testing.assert_array_equal(out, generate(model, prompt, 6))
  small = generate(model, prompt, 6, kv_evict=H2O(2, 2))
  assert small.shape == (2, 15)
  np.testing.assert_array_equal(small[:, :9], prompt)


def test_chunked_prefill_through_the_model():
  """With room for every token, chunked prefill under H2O gives the dense prefill's logits;
  with a small budget, the scanned chunks (traced offsets) equal the unrolled ones."""
  model = TransformerLM(CFG, rngs=nnx.Rngs(3))
  tokens = jax.random.randint(jax.random.key(8), (2, 17), 0, 64)
  dense, _ = model.prefill(tokens, 24)
  whole, _ = model.prefill(tokens, 24, chunk_size=4, kv_evict=H2O(20, 4))
  _testing.assert_allclose(whole, dense, name="chunked h2o without eviction")
  scanned, c1 = model.prefill(tokens, 24, chunk_size=4, kv_evict=H2O(3, 2))
  unrolled, c2 = model.prefill(tokens, 24, chunk_size=4, kv_evict=H2O(3, 2), unroll=True)
  _testing.assert_allclose(scanned, unrolled, name="scanned vs unrolled chunks")
  np.testing.assert_array_equal(c1["layers"][0].pos, c2["layers"][0].pos)
  assert c1["layers"][0].pos.shape[1] == 5 and not np.allclose(scanned, dense, atol=1e-3)


def test_what_h2o_cannot_do_is_refused():
  model = TransformerLM(CFG, rngs=nnx.Rngs(0))
  tokens = jnp.zeros((1, 12), jnp.int32)
  with pytest.raises(ValueError, match="observation window and pooling score the whole"):
    model.prefill(tokens, 16, chunk_size=4, kv_evict=H2O(2, 2, 4))
  with pytest.raises(ValueError, match="kv_quant and kv_evict do not combine"):
    model.init_cache(1, 16, kv_quant=KVQuant(4, 4), kv_evict=H2O(2, 2))
  _, cache = model.prefill(tokens[:, :8], 16, kv_evict=H2O(2, 2, 0, 3))
  with pytest.raises(ValueError, match="prefill it at once, or chunk it without them"):
    model.blocks[0].extend(jnp.zeros((1, 4, CFG.d_model)), 8, cache["layers"][0])
