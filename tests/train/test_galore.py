"""GaLore: exact state bytes, the update against a NumPy transcription of the algorithm, the
projection refresh, and training through the memx optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memx.train.galore import scale_by_galore


def _bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def test_state_bytes():
  """A wide matrix projects from the left (moments r x n), a tall one from the right (m x r),
  with its projection; leaves whose smaller side is at most the rank keep Adam's moments."""
  params = {"tall": jnp.ones((512, 256)), "wide": jnp.ones((128, 1024)),
            "b": jnp.ones((256,)), "small": jnp.ones((64, 32))}
  st = scale_by_galore(32, 10, 0.25).init(params)
  assert _bytes(st.projections) == 4 * (256 * 32 + 128 * 32 + 1 + 1)
  assert _bytes(st.mu) == _bytes(st.nu) == 4 * (512 * 32 + 32 * 1024 + 256 + 64 * 32)
  assert _bytes(st.mu) < 0.25 * 4 * (512 * 256 + 128 * 1024)  # vs Adam on the matrices


def _numpy_galore(grads, rank, scale, b1=0.9, b2=0.999, eps=1e-8):
  """The algorithm as written in the paper, one matrix, one projection period."""
  g0 = grads[0]
  left = g0.shape[0] <= g0.shape[1]
  u, _, vt = np.linalg.svd(g0.astype(np.float64), full_matrices=False)
  p = u[:, :rank] if left else vt[:rank].T
  mu = nu = 0.0
  out = []
  for t, g in enumerate(grads, start=1):
    r = p.T @ g if left else g @ p
    mu = b1 * mu + (1 - b1) * r
    nu = b2 * nu + (1 - b2) * r * r
    n = (mu / (1 - b1 ** t)) / (np.sqrt(nu / (1 - b2 ** t)) + eps)
    out.append(scale * (p @ n if left else n @ p.T))
  return out


@pytest.mark.parametrize("shape", [(48, 96), (96, 48)], ids=["left", "right"])
def test_updates_equal_the_algorithm(shape):
  rng = np.random.default_rng(0)
  grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
  tx = scale_by_galore(8, 100, 0.25)
  state = tx.init({"w": jnp.zeros(shape)})
  want = _numpy_galore(grads, 8, 0.25)
  for g, w in zip(grads, want, strict=True):
    u, state = tx.update({"w": jnp.asarray(g)}, state)
    np.testing.assert_allclose(u["w"], w, rtol=2e-3, atol=2e-5)


@pytest.mark.parametrize("shape", [(48, 96), (96, 48)], ids=["left", "right"])
def test_frugal_adds_signsgd_on_the_residual(shape):
  """FRUGAL = the subspace's Adam step (unscaled) + free · sign(G − P Pᵀ G) (right: G − G Q Qᵀ),
  against the NumPy transcription; free 0 is GaLore at scale 1. The residual direction is
  orthogonal to the subspace."""
  rng = np.random.default_rng(2)
  grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
  galore = _numpy_galore(grads, 8, 1.0)
  u, _, vt = np.linalg.svd(grads[0].astype(np.float64), full_matrices=False)
  left = shape[0] <= shape[1]
  p = u[:, :8] if left else vt[:8].T
  tx = scale_by_galore(8, 100, 1.0, free_scale=0.3)
  plain = scale_by_galore(8, 100, 1.0, free_scale=0.0)
  state, pstate = tx.init({"w": jnp.zeros(shape)}), plain.init({"w": jnp.zeros(shape)})
  for g, w in zip(grads, galore, strict=True):
    residual = g - (p @ (p.T @ g) if left else (g @ p) @ p.T)
    want = w + 0.3 * np.sign(residual)
    got, state = tx.update({"w": jnp.asarray(g)}, state)
    # atol: the float32 SVD's error (GaLore's test above has it times its scale 0.25).
    np.testing.assert_allclose(got["w"], want, rtol=2e-3, atol=1e-4)
    sub, pstate = plain.update({"w": jnp.asarray(g)}, pstate)
    np.testing.assert_allclose(sub["w"], w, rtol=2e-3, atol=1e-4)
    # What FRUGAL adds lies outside the subspace (up to the sign's quantization of it).
    assert abs(float(np.sum((p.T @ residual) ** 2 if left else (residual @ p) ** 2))) < 1e-6


def test_the_projection_is_refreshed_every_period():
  """Every `every` updates the projection becomes the new gradient's top singular vectors
  (up to their signs); between refreshes it stays."""
  rng = np.random.default_rng(1)
  tx = scale_by_galore(4, 2, 1.0)
  state = tx.init({"w": jnp.zeros((16, 40))})
  projections = []
  grads = [rng.standard_normal((16, 40)).astype(np.float32) for _ in range(3)]
  for g in grads:
    _, state = tx.update({"w": jnp.asarray(g)}, state)
    projections.append(np.asarray(state.projections["w"]))
  np.testing.assert_array_equal(projections[0], projections[1])  # step 2: same period
  u = np.linalg.svd(grads[2], full_matrices=False)[0][:, :4]
  np.testing.assert_allclose(np.abs(projections[2].T @ u), np.eye(4), atol=1e-4)


def test_weight_decay_and_lr_follow_adamw():
  """Through memx's optimizer: with zero gradients the first update is -lr·wd·p on decayed
  matrices (GaLore's step is 0), and a 1-D leaf gets nothing."""
  from memx.train.config import OptimConfig
  from memx.train.optim import make_optimizer

  params = {"w": np.full((256, 128), 0.5, np.float32), "scale": np.ones((128,), np.float32)}
  opt = make_optimizer(OptimConfig(name="galore", galore_rank=8, lr=0.1, warmup_steps=0,
                                   weight_decay=0.2), 10)
  updates, _ = opt.update(jax.tree.map(np.zeros_like, params), opt.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.2 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(updates["scale"], 0.0)


def test_every_block_weight_of_a_model_is_projected():
  """On memx's Transformer (d 256, 4 heads of 64): wq/wk/wv [d, heads, 64] become [d, 256] and
  wo [heads, 64, d] becomes [256, d], as the MLP's [d, f] / [f, d]: all projected at rank 32.
  The embedding, norms and anything outside the blocks keep Adam's moments."""
  from flax import nnx

  from memx.models.config import ModelConfig
  from memx.models.transformer import TransformerLM
  from memx.train.lowrank import plan as _plan
  from memx.train.optim import lowrank_mask

  model = TransformerLM(ModelConfig(vocab_size=512, d_model=256, n_layers=2, n_heads=4),
                        rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  mask = lowrank_mask(params)
  plans = {}
  for (path, p), (_, ok) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree_util.tree_flatten_with_path(mask)[0], strict=True):
    plans[jax.tree_util.keystr(path)] = _plan(p.shape, 32) if ok else "adam"
  weights = {k: v for k, v in plans.items() if any(f"['{w}']" in k for w in (
      "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))}
  assert len(weights) == 14 and all(v in ("left", "right") for v in weights.values()), weights
  others = {k: v for k, v in plans.items() if k not in weights}
  assert any("['embed']" in k for k in others) and set(others.values()) == {"adam"}, others
