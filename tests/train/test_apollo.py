"""APOLLO and APOLLO-Mini: exact state bytes, the update against a NumPy transcription of the
algorithm (projection refresh and norm-growth limiter included), the seeded projections, and
the optimizer through memx's chain."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memx.train.apollo import moment_shape, projection, scale_by_apollo
from memx.train.galore import scale_by_galore
from memx.train.lowrank import dims, plan


def _bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def test_state_bytes():
  """Moments r x n (wide), m x r (tall), Adam's for what is too small; one norm per leaf and
  no stored projection: GaLore at the same rank keeps its projections on top."""
  params = {"tall": jnp.ones((512, 256)), "wide": jnp.ones((128, 1024)),
            "b": jnp.ones((256,)), "small": jnp.ones((64, 32))}
  st = scale_by_apollo(32, 10).init(params)
  assert _bytes(st.mu) == _bytes(st.nu) == 4 * (512 * 32 + 32 * 1024 + 256 + 64 * 32)
  assert _bytes(st.last_norm) == 4 * 4 and _bytes(st.count) == 4
  galore = scale_by_galore(32, 10, 0.25).init(params)
  assert _bytes(galore) - _bytes(st) == 4 * (256 * 32 + 128 * 32 + 2) - 4 * 4


def test_moments_keep_the_weight_dims_beside_the_rank():
  """wq [d, heads, k] projects its d side: moments [r, heads, k]; wo [heads, k, d] its d side
  from the right: [heads, k, r]."""
  assert moment_shape((256, 4, 64), plan((256, 4, 64), 32), 32) == (32, 4, 64)
  assert moment_shape((4, 64, 128), plan((4, 64, 128), 32), 32) == (4, 64, 32)
  assert moment_shape((8, 8), "adam", 32) == (8, 8)


def _numpy_apollo(grads, projections, every, scale, tensorwise, limiter=1.01, b1=0.9,
                  b2=0.999, eps=1e-8):
  """The algorithm as written in the paper (float64, one matrix): Adam on the projected
  gradient, per-channel (or per-tensor) scaling of the raw gradient, the norm-growth limiter.
  Returns the updates and how many steps the limiter cut."""
  m, n = grads[0].shape
  left = m <= n
  mu = nu = 0.0
  prev, cuts, out = None, 0, []
  for t, g in enumerate(grads, start=1):
    p = projections[(t - 1) // every]
    r = p.T @ g if left else g @ p
    mu = b1 * mu + (1 - b1) * r
    nu = b2 * nu + (1 - b2) * r * r
    rt = (mu / (1 - b1 ** t)) / (np.sqrt(nu / (1 - b2 ** t)) + eps)
    if tensorwise:
      s = np.linalg.norm(rt) / (np.linalg.norm(r) + 1e-8)
    elif left:  # one factor per column
      s = (np.linalg.norm(rt, axis=0) / (np.linalg.norm(r, axis=0) + 1e-8))[None, :]
    else:       # one per row
      s = (np.linalg.norm(rt, axis=1) / (np.linalg.norm(r, axis=1) + 1e-8))[:, None]
    gt = g * s
    norm = np.linalg.norm(gt)
    if prev is not None and norm > limiter * prev:
      gt, cuts = gt * (limiter * prev / norm), cuts + 1
    prev = np.linalg.norm(gt)
    out.append(np.sqrt(scale) * gt)
  return out, cuts


@pytest.mark.parametrize("tensorwise", [False, True], ids=["channel", "tensor"])
@pytest.mark.parametrize("shape", [(24, 64), (64, 24), (24, 4, 16), (4, 16, 24)],
                         ids=["left", "right", "wq-like", "wo-like"])
def test_updates_equal_the_algorithm(shape, tensorwise):
  """Six steps, a new projection every two; the gradient shrinks tenfold, then jumps 30x at
  step 6, which the limiter must cut (the transcription counts its cuts)."""
  rank, every, scale = (1 if tensorwise else 6), 2, (128.0 if tensorwise else 2.0)
  rng = np.random.default_rng(0)
  grow = [1.0, 0.1, 0.1, 0.1, 0.1, 3.0]
  grads = [(c * rng.standard_normal(shape)).astype(np.float32) for c in grow]
  kind = plan(shape, rank)
  assert kind == ("left" if dims(shape)[0] <= dims(shape)[1] else "right")
  projections = [np.asarray(projection(7, 0, i, shape, kind, rank), np.float64)
                 for i in range(3)]
  want, cuts = _numpy_apollo([g.reshape(dims(shape)).astype(np.float64) for g in grads],
                             projections, every, scale, tensorwise)
  assert cuts >= 1
  tx = scale_by_apollo(rank, every, scale, tensorwise=tensorwise, seed=7)
  state = tx.init({"w": jnp.zeros(shape)})
  update = jax.jit(tx.update)
  for g, w in zip(grads, want, strict=True):
    u, state = update({"w": jnp.asarray(g)}, state)
    np.testing.assert_allclose(np.asarray(u["w"]).reshape(w.shape), w, rtol=1e-4, atol=1e-6)


def test_the_limiter_caps_norm_growth():
  """With the limiter no update's norm exceeds 1.01x the previous one's; without it the jump
  after a quiet phase passes through."""
  rng = np.random.default_rng(3)
  grads = [c * rng.standard_normal((16, 40)).astype(np.float32)
           for c in (1.0, 0.1, 0.1, 0.1, 0.1, 10.0)]
  growth = {}
  for limiter in (1.01, None):
    tx = scale_by_apollo(4, 100, limiter=limiter)
    state = tx.init({"w": jnp.zeros((16, 40))})
    norms = []
    for g in grads:
      u, state = tx.update({"w": jnp.asarray(g)}, state)
      norms.append(float(jnp.linalg.norm(u["w"])))
    growth[limiter] = max(b / a for a, b in zip(norms, norms[1:], strict=False))
  assert growth[1.01] <= 1.01 * (1 + 1e-5) and growth[None] > 1.1, growth


def test_projections_regenerate_from_the_seed():
  """The same (seed, leaf, period) gives the same matrix, bit for bit; another leaf, period or
  seed another one; entries are N(0, 1/r)."""
  a = projection(0, 3, 5, (64, 128), "left", 8)
  np.testing.assert_array_equal(a, projection(0, 3, 5, (64, 128), "left", 8))
  for other in (projection(0, 4, 5, (64, 128), "left", 8), projection(0, 3, 6, (64, 128),
                "left", 8), projection(1, 3, 5, (64, 128), "left", 8)):
    assert not np.allclose(a, other)
  assert projection(0, 0, 0, (64, 128), "right", 8).shape == (128, 8)
  big = np.asarray(projection(0, 0, 0, (4096, 8192), "left", 16))
  assert abs(big.mean()) < 0.01 / 4 and big.var() * 16 == pytest.approx(1.0, rel=0.01)


def test_mini_scales_the_gradient_as_a_whole():
  """Rank 1, one factor per tensor: the update is a positive multiple of the gradient."""
  rng = np.random.default_rng(2)
  tx = scale_by_apollo(1, 10, 128.0, tensorwise=True)
  state = tx.init({"w": jnp.zeros((32, 48))})
  for _ in range(3):
    g = rng.standard_normal((32, 48)).astype(np.float32)
    u, state = tx.update({"w": jnp.asarray(g)}, state)
    ratio = np.asarray(u["w"]) / g
    assert ratio.min() > 0 and np.ptp(ratio) < 1e-4 * ratio.mean()


@pytest.mark.parametrize("name", ["apollo", "apollo_mini"])
def test_weight_decay_and_lr_follow_adamw(name):
  """Through memx's optimizer: with zero gradients the first update is -lr·wd·p on decayed
  matrices (APOLLO's step is 0), and a 1-D leaf gets nothing."""
  from memx.train.config import OptimConfig
  from memx.train.optim import make_optimizer

  params = {"w": np.full((256, 128), 0.5, np.float32), "scale": np.ones((128,), np.float32)}
  opt = make_optimizer(OptimConfig(name=name, apollo_rank=8, lr=0.1, warmup_steps=0,
                                   weight_decay=0.2), 10)
  updates, _ = opt.update(jax.tree.map(np.zeros_like, params), opt.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.2 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(updates["scale"], 0.0)


def test_the_run_seed_draws_the_projections():
  """make_optimizer's seed (the run's train.seed) picks the projections: the same seed gives
  the same update, another seed another."""
  from memx.train.config import OptimConfig
  from memx.train.optim import make_optimizer

  g = {"blocks": {"w": np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)}}
  cfg = OptimConfig(name="apollo", apollo_rank=4, lr=0.1, warmup_steps=0, weight_decay=0.0)

  def first(seed):
    opt = make_optimizer(cfg, 10, seed)
    return np.asarray(opt.update(g, opt.init(g), g)[0]["blocks"]["w"])

  np.testing.assert_array_equal(first(3), first(3))
  assert not np.allclose(first(3), first(4))


def test_bad_settings():
  from memx.errors import ConfigError
  from memx.train.config import OptimConfig

  with pytest.raises(ConfigError, match="optim.apollo_rank = 0"):
    OptimConfig(name="apollo", apollo_rank=0)
  with pytest.raises(ConfigError, match="optim.apollo_scale = -1"):
    OptimConfig(name="apollo_mini", apollo_scale=-1.0)
  with pytest.raises(ConfigError, match="apollo's projected moments stay float32"):
    OptimConfig(name="apollo", mu_dtype="bfloat16")
