"""memx.kernels.cross_entropy: the vocabulary-blocked form against full logits (the oracle)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memx.kernels import _testing
from memx.kernels.cross_entropy import cross_entropy, cross_entropy_reference
from memx.train.loss import token_losses
from memx.train.memory import saved_activation_bytes

B, T, D, V = 2, 9, 24, 203  # V prime: every block size pads


def _inputs(dtype=jnp.float32, seed=0):
  kh, kw, kt = jax.random.split(jax.random.key(seed), 3)
  h = (2.0 * jax.random.normal(kh, (B, T, D))).astype(dtype)
  w = (0.5 * jax.random.normal(kw, (D, V))).astype(dtype)
  return h, w, jax.random.randint(kt, (B, T), 0, V)


def test_reference_is_the_train_loss():
  h, w, t = _inputs()
  np.testing.assert_allclose(cross_entropy_reference(h, w, t), token_losses(h @ w, t),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block", [16, 64, 203, 4096])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blocked_matches_reference_values_and_gradients(dtype, block):
  h, w, t = _inputs(dtype)
  ct = jax.random.uniform(jax.random.key(5), (B, T))  # per-token weights, as the train loss
  kw = {"compute_dtype": dtype}
  got = cross_entropy(h, w, t, vocab_block=block, **kw)
  want = cross_entropy(h, w, t, implementation="reference", **kw)
  assert got.dtype == jnp.float32 and got.shape == (B, T)
  _testing.assert_allclose(got, want, dtype=dtype, reduction_size=V, name="loss")

  def loss(impl):
    return lambda h, w: jnp.sum(ct * cross_entropy(h, w, t, vocab_block=block,
                                                   implementation=impl, **kw))

  dh, dw = jax.grad(loss("xla"), argnums=(0, 1))(h, w)
  rh, rw = jax.grad(loss("reference"), argnums=(0, 1))(h, w)
  assert dh.dtype == h.dtype and dw.dtype == w.dtype
  _testing.assert_allclose(dh, rh, dtype=dtype, grad=True, reduction_size=V, name="dh")
  _testing.assert_allclose(dw, rw, dtype=dtype, grad=True, reduction_size=B * T, name="dW")


def test_gradient_is_softmax_minus_onehot():
  """dL/dlogits = softmax − onehot, so dh = (p − y) Wᵀ: an independent closed form."""
  h, w, t = _inputs()
  dh = jax.grad(lambda h: jnp.sum(cross_entropy(h, w, t, vocab_block=32)))(h)
  p = jax.nn.softmax(h @ w, axis=-1) - jax.nn.one_hot(t, V)
  _testing.assert_allclose(dh, p @ w.T, grad=True, name="dh")


def test_keeps_no_vocab_sized_activation():
  h, w, t = _inputs()

  def loss(impl):
    return lambda h, w: jnp.sum(cross_entropy(h, w, t, vocab_block=32, implementation=impl))

  # xla keeps the per-token logsumexp [B, T] (plus a copy of the ids); reference keeps logits.
  assert saved_activation_bytes(loss("xla"), h, w) <= 2 * B * T * 4
  assert saved_activation_bytes(loss("reference"), h, w) >= B * T * V * 4


def test_sequence_sharded_tokens_are_not_gathered():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("seq",))
  seq = NamedSharding(mesh, PartitionSpec(None, "seq"))
  rep = NamedSharding(mesh, PartitionSpec())
  args = [jax.ShapeDtypeStruct((2, 64, D), jnp.float32, sharding=seq),
          jax.ShapeDtypeStruct((D, V), jnp.float32, sharding=rep),
          jax.ShapeDtypeStruct((2, 64), jnp.int32, sharding=seq)]

  def grads(h, w, t):
    return jax.grad(lambda h, w: jnp.sum(cross_entropy(h, w, t, vocab_block=64)),
                    argnums=(0, 1))(h, w)

  text = jax.jit(grads).lower(*args).compile(_testing.FAST_CPU_COMPILE).as_text()
  assert "all-gather" not in text


def test_bad_input():
  h, w, t = _inputs()
  with pytest.raises(ValueError, match="D = 24"):
    cross_entropy(h[..., :-1], w, t)
  with pytest.raises(ValueError, match=r"\[D, V\]"):
    cross_entropy(h, w[None], t)
  with pytest.raises(ValueError, match="leading shape"):
    cross_entropy(h, w, t[:, :-1])
  with pytest.raises(ValueError, match="integer"):
    cross_entropy(h, w, t.astype(jnp.float32))
  with pytest.raises(ValueError, match="vocab_block"):
    cross_entropy(h, w, t, vocab_block=0)
  with pytest.raises(ValueError, match="vocab_block"):
    cross_entropy(h, w, t, vocab_block=True)
  with pytest.raises(ValueError, match="no vocabulary"):
    cross_entropy(h, w[:, :0], t)
  assert cross_entropy(h, w, t, vocab_block=np.int64(32)).shape == (B, T)


def test_out_of_range_ids_agree_across_implementations():
  """An id outside [0, V) is refused where its value is known; under jit (values unknown) it
  picks no logit in either implementation: the loss is the lse."""
  h, w, _ = _inputs()
  t = jnp.broadcast_to(jnp.array([-1, V, 0]), (B, 3))
  h = h[:, :3]
  want = jax.nn.logsumexp(h @ w, axis=-1) - jnp.where(t == 0, (h @ w)[..., 0], 0.0)
  for impl in ("reference", "xla"):
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, {V}\).*\[-1, {V}\]"):
      cross_entropy(h, w, t, vocab_block=64, implementation=impl)
    jitted = jax.jit(lambda h, w, t, impl=impl: cross_entropy(h, w, t, vocab_block=64,
                                                              implementation=impl))
    _testing.assert_allclose(jitted(h, w, t), want, name=impl)


def test_a_non_float_compute_dtype_is_refused():
  # int8 operands used to run and give a wrong loss (3.51 for a true 8.69).
  h, w, t = _inputs()
  with pytest.raises(ValueError, match="compute_dtype must be a floating dtype"):
    cross_entropy(h, w, t, compute_dtype=jnp.int8)


@pytest.mark.parametrize("v, block", [(4097, 4096), (203, 16), (50257, 4096), (7, 3), (256, 64)])
def test_blocks_cover_the_vocabulary_once_with_little_padding(v, block):
  from memx.kernels.cross_entropy import _Layout

  lay = _Layout.of(v, block)
  assert lay.block <= max(block, lay.runs) and lay.nb == -(-v // block)
  padded = lay.nb * lay.block
  assert v <= padded < v + lay.nb * lay.runs   # not up to a whole block of padding
  cols = np.concatenate([np.asarray(lay.take(jnp.zeros((1, lay.runs, lay.nb, lay.run)), j)[1])
                         for j in range(lay.nb)])
  np.testing.assert_array_equal(np.sort(cols), np.arange(padded))
  # Each block's columns of W are the view's slice: take() picks exactly those columns.
  w = jnp.arange(1, v + 1, dtype=jnp.float32)[None, :]   # column c holds c + 1
  for j in (0, lay.nb - 1):
    wb, ids = lay.take(lay.view(w), j)
    ids = np.asarray(ids)
    np.testing.assert_array_equal(np.asarray(wb[0]), np.where(ids < v, ids + 1, 0))


def test_the_head_is_never_copied():
  """Compiled temporaries of value-and-grad stay far below the head's size: W is viewed, not
  permuted into blocks, and dW is written block by block into its output (the permuted copies
  took 2x W before)."""
  d, v, n = 64, 16384, 8
  h = jax.random.normal(jax.random.key(0), (n, d))
  w = jax.random.normal(jax.random.key(1), (d, v))
  t = jax.random.randint(jax.random.key(2), (n,), 0, v)
  fn = jax.jit(jax.value_and_grad(
      lambda h, w: jnp.sum(cross_entropy(h, w, t, vocab_block=1024)), argnums=(0, 1)))
  temp = fn.lower(h, w).compile().memory_analysis().temp_size_in_bytes
  assert temp < 0.5 * w.nbytes, (temp, w.nbytes)


def test_vocabulary_sharded_head_is_not_gathered():
  """Tensor parallelism splits V into contiguous runs; strided blocks keep every block split
  the same way, so neither W nor the logits are gathered (only per-token statistics move)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
  args = [jax.ShapeDtypeStruct((4, 64, D), jnp.float32,
                               sharding=NamedSharding(mesh, PartitionSpec("data"))),
          jax.ShapeDtypeStruct((D, 256), jnp.float32,
                               sharding=NamedSharding(mesh, PartitionSpec(None, "tensor"))),
          jax.ShapeDtypeStruct((4, 64), jnp.int32,
                               sharding=NamedSharding(mesh, PartitionSpec("data")))]

  def grads(h, w, t):
    return jax.grad(lambda h, w: jnp.sum(cross_entropy(h, w, t, vocab_block=64)),
                    argnums=(0, 1))(h, w)

  text = jax.jit(grads).lower(*args).compile(_testing.FAST_CPU_COMPILE).as_text()
  assert "all-gather" not in text


@pytest.mark.parametrize("block", [16, 203])
def test_a_vocab_major_table_is_used_in_place(block):
  """w_layout="vd" (a tied embedding table [V, D]): the same losses and gradients as its
  transpose in the [D, V] layout, and the backward keeps the table itself (an argument), not a
  transposed copy of it."""
  h, w, t = _inputs()
  table = w.T

  def loss(layout, impl="xla"):
    return lambda h, w: jnp.sum(cross_entropy(h, w, t, vocab_block=block, w_layout=layout,
                                              implementation=impl))

  for impl in ("xla", "reference"):
    _testing.assert_allclose(loss("vd", impl)(h, table), loss("dv")(h, w), name=f"{impl} loss")
  dh, dtable = jax.grad(loss("vd"), argnums=(0, 1))(h, table)
  rh, rw = jax.grad(loss("dv", "reference"), argnums=(0, 1))(h, w)
  _testing.assert_allclose(dh, rh, grad=True, reduction_size=V, name="dh")
  _testing.assert_allclose(dtable, rw.T, grad=True, reduction_size=B * T, name="dtable")
  # Only per-token statistics are saved; through a transpose, the [D, V] copy would be too.
  assert saved_activation_bytes(loss("vd"), h, table) <= 2 * B * T * 4
  transposed = lambda h, e: loss("dv")(h, e.T)  # noqa: E731
  assert saved_activation_bytes(transposed, h, table) >= D * V * 4
  with pytest.raises(ValueError, match="w_layout"):
    cross_entropy(h, w, t, w_layout="vdd")
  with pytest.raises(ValueError, match=r"\[V, D\]"):
    cross_entropy(h, w[0], t, w_layout="vd")
  with pytest.raises(ValueError, match="D = 203"):
    cross_entropy(h, w, t, w_layout="vd")   # a [D, V] weight passed as a table


def test_padded_vocabulary_columns_take_no_probability():
  # With every logit 0 the loss is exactly log V: a padding column let into the softmax shows
  # as log(V + 1). (With the other tests' large logits it hid below the tolerance.)
  v = 203
  h = jax.random.normal(jax.random.key(0), (2, 9, 24))
  t = jax.random.randint(jax.random.key(1), (2, 9), 0, v)
  for block in (16, 64, 203, 4096):
    got = cross_entropy(h, jnp.zeros((24, v)), t, vocab_block=block)
    np.testing.assert_allclose(np.asarray(got), np.log(v), rtol=1e-6, err_msg=f"block {block}")
