"""H2O eviction caches: prompt scores against dense attention, and prefill + steps against a
float64 transcription of the algorithm (which tokens stay, what each step attends)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memx.nn.kv_evict import H2O, evict_cache_bytes, fill, init_evict_cache, key_scores, step


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


def _h2o(q, k, v, t0, heavy, recent, scale):
  """One sequence, one KV head, as the paper states it (float64): q [N, R, D], k, v [N, D].
  Returns the step outputs [N - t0, R, D] and the positions held at the end."""
  n = q.shape[0]
  s = np.einsum("ird,jd->irj", q[:t0], k[:t0]) * scale
  s = np.where(np.tril(np.ones((t0, t0), bool))[:, None, :], s, -np.inf)
  score = dict(enumerate(_softmax(s).sum(axis=(0, 1))))
  if t0 <= heavy + recent:
    kept = set(range(t0))
  else:
    older = sorted(range(t0 - recent), key=lambda j: -score[j])[:heavy]
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


@pytest.mark.parametrize("t0,heavy,recent", [(20, 4, 3), (3, 4, 3), (12, 0, 5), (10, 40, 2)],
                         ids=["long-prompt", "short-prompt", "window-only", "no-eviction"])
def test_prefill_and_steps_equal_the_algorithm(t0, heavy, recent):
  rng = np.random.default_rng(1)
  b, n, h, g, d = 2, 40, 4, 2, 8
  q = rng.standard_normal((b, n, h, d)).astype(np.float32)
  k = rng.standard_normal((b, n, g, d)).astype(np.float32)
  v = rng.standard_normal((b, n, g, d)).astype(np.float32)
  scale = d ** -0.5
  spec = H2O(heavy, recent)
  cache = init_evict_cache(spec, b, n, g, d, jnp.float32)
  cache = fill(cache, jnp.asarray(k[:, :t0]), jnp.asarray(v[:, :t0]),
               key_scores(jnp.asarray(q[:, :t0]), jnp.asarray(k[:, :t0]), scale))
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
          np.float64), v[i, :, j].astype(np.float64), t0, heavy, recent, scale)
      np.testing.assert_allclose(outs[i, :, j * r:(j + 1) * r], want, rtol=1e-4, atol=1e-5)
      held = np.asarray(cache.pos[i, :, j])
      assert set(held[held >= 0].tolist()) == kept
      assert len(kept) == min(heavy + recent, n)


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
