"""Sequence-parallel scans (linear_scan, SSD, linear attention) vs the unsharded kernels: values,
final states, gradients, the layers in a model under SP rules, collectives in the compiled HLO,
and the layout checks."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.interpreters import partial_eval as pe
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from memx.errors import ConfigError
from memx.kernels import _testing
from memx.kernels.linear_scan import linear_scan
from memx.kernels.short_conv import causal_conv
from memx.kernels.ssd import linear_attention, ssd
from memx.models.config import ModelConfig, SSMConfig
from memx.models.transformer import TransformerLM
from memx.nn.linear_attention import LinearAttention
from memx.nn.mamba2 import Mamba2
from memx.nn.mlgru import MLGRU
from memx.parallel.config import ParallelConfig
from memx.parallel.constrain import sharding_context, use_rules
from memx.parallel.sequence import batch_to_layout, permute_sequence, unpermute_sequence
from memx.parallel.sequence_scan import (
  UNSHARDED,
  SeqShard,
  sequence_map,
  sequence_parallel_linear_attention,
  sequence_parallel_linear_scan,
  sequence_parallel_ssd,
)
from memx.parallel.validate import validate_for_model

pytestmark = pytest.mark.multidevice
F32 = jnp.float32


def _mesh(shape: tuple[int, int]) -> Mesh:
  """A ("data", "seq") mesh."""
  if jax.device_count() < shape[0] * shape[1]:
    pytest.skip(f"needs {shape[0] * shape[1]} devices")
  return Mesh(np.asarray(jax.devices()[:shape[0] * shape[1]]).reshape(shape), ("data", "seq"))


def _packed(b: int, t: int, lengths) -> jax.Array:
  ids = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
  return jnp.asarray(np.broadcast_to(np.pad(ids, (0, t - len(ids)), mode="edge"), (b, t)),
                     jnp.int32)


def _normal(rng, *shape):
  # numpy inputs: eager jax.random would compile a sampler per shape, most of a test's time
  return jnp.asarray(rng.standard_normal(shape), F32)


def _check(name, got, want, grad=False):
  for i, (a, b) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
    _testing.assert_allclose(a, b, dtype=F32, grad=grad, name=f"{name}[{i}]")


def _fwd_bwd(fn, n_args):
  """(outputs, input cotangents for fixed random output cotangents)."""
  def run(*args):
    out, vjp = jax.vjp(fn, *args)
    cts = jax.tree.map(lambda o: jnp.cos(jnp.arange(o.size, dtype=F32).reshape(o.shape)), out)
    return out, vjp(cts)[:n_args]
  return run


def _sharded(entry, n, layout, seg, seq_args):
  """entry on layout-ordered inputs, output back in natural order (the permutation is tested)."""
  perm = lambda x: None if x is None else permute_sequence(x, n, layout)  # noqa: E731

  def fn(*args):
    args = [perm(a) if i in seq_args else a for i, a in enumerate(args)]
    y, final = entry(*args, segment_ids=perm(seg))
    return unpermute_sequence(y, n, layout), final
  return fn


# name: (data, seq) mesh, layout, segment lengths or None, initial state
CASES = {
    "contiguous_8_h0": ((1, 8), "contiguous", None, True),
    # segment starts on shard boundaries (16, 56) and inside shards
    "zigzag_8_segments_h0": ((1, 8), "zigzag", (13, 3, 40, 8), True),
    "contiguous_4x2_segments": ((4, 2), "contiguous", (30, 2, 32), False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_linear_scan_matches_unsharded(name):
  shape, layout, lengths, with_h0 = CASES[name]
  mesh, n = _mesh(shape), shape[1]
  b, t, d = 4, 64, 6
  rng = np.random.default_rng(0)
  a = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((b, t, d)))), F32)
  x = _normal(rng, b, t, d)
  h0 = _normal(rng, b, d) if with_h0 else None
  seg = None if lengths is None else _packed(b, t, lengths)

  def entry(a, x, h0, segment_ids):
    with use_rules("sp"):  # BATCH over "data": shard_map follows the rules like the layers
      return sequence_parallel_linear_scan(a, x, h0, mesh=mesh, layout=layout,
                                           segment_ids=segment_ids)

  got = _testing.jit_for_test(_fwd_bwd(_sharded(entry, n, layout, seg, (0, 1)), 3))(a, x, h0)
  want = _testing.jit_for_test(_fwd_bwd(lambda a, x, h0: linear_scan(
      a, x, h0, segment_ids=seg, implementation="reference"), 3))(a, x, h0)
  _check(f"{name} h, final", got[0], want[0])
  _check(f"{name} da, db, dh0", got[1], want[1], grad=True)


@pytest.mark.parametrize("name", list(CASES))
def test_ssd_matches_unsharded(name):
  shape, layout, lengths, with_h0 = CASES[name]
  mesh, n = _mesh(shape), shape[1]
  b, t, h, p, g, s = 4, 64, 4, 8, 2, 16
  rng = np.random.default_rng(1)
  x = _normal(rng, b, t, h, p)
  dt = jnp.asarray(np.log1p(np.exp(rng.standard_normal((b, t, h)))), F32)  # softplus
  a = jnp.asarray(-np.exp(0.5 * rng.standard_normal(h)), F32)
  bm, cm = _normal(rng, b, t, g, s), _normal(rng, b, t, g, s)
  d = _normal(rng, h)
  h0 = _normal(rng, b, h, p, s) if with_h0 else None
  seg = None if lengths is None else _packed(b, t, lengths)

  def entry(x, dt, a, bm, cm, d, h0, segment_ids):
    with use_rules("sp"):
      return sequence_parallel_ssd(x, dt, a, bm, cm, d=d, initial_state=h0,
                                   segment_ids=segment_ids, mesh=mesh, layout=layout)

  args = (x, dt, a, bm, cm, d, h0)
  got = _testing.jit_for_test(_fwd_bwd(_sharded(entry, n, layout, seg, (0, 1, 3, 4)), 7))(*args)
  want = _testing.jit_for_test(_fwd_bwd(lambda x, dt, a, bm, cm, d, h0: ssd(
      x, dt, a, bm, cm, d=d, initial_state=h0, segment_ids=seg, implementation="reference"),
      7))(*args)
  _check(f"{name} y, final", got[0], want[0])
  _check(f"{name} dx, ddt, dA, dB, dC, dD, dh0", got[1], want[1], grad=True)


def test_gated_gqa_linear_attention_matches_unsharded():
  mesh, n, layout = _mesh((1, 8)), 8, "zigzag"
  b, t, h, g, k = 2, 64, 4, 2, 8
  rng = np.random.default_rng(2)
  q, kk, v = _normal(rng, b, t, h, k), _normal(rng, b, t, g, k), _normal(rng, b, t, g, k)
  gate = jnp.asarray(-np.log1p(np.exp(-rng.standard_normal((b, t, h)))) / 4, F32)  # logsigmoid
  h0 = _normal(rng, b, h, k, k)
  seg = _packed(b, t, (21, 43))

  def entry(q, kk, v, gate, h0, segment_ids):
    return sequence_parallel_linear_attention(q, kk, v, log_gate=gate, scale=0.5,
                                              initial_state=h0, segment_ids=segment_ids,
                                              mesh=mesh, layout=layout)

  args = (q, kk, v, gate, h0)
  got = _testing.jit_for_test(_fwd_bwd(_sharded(entry, n, layout, seg, (0, 1, 2, 3)), 5))(*args)
  want = _testing.jit_for_test(_fwd_bwd(lambda q, kk, v, gate, h0: linear_attention(
      q, kk, v, log_gate=gate, scale=0.5, initial_state=h0, segment_ids=seg,
      implementation="reference"), 5))(*args)
  _check("o, final", got[0], want[0])
  _check("dq, dk, dv, dgate, dh0", got[1], want[1], grad=True)


def test_conv_halo_and_last_tokens():
  """with_history(causal_conv) equals the whole-sequence conv (incl. segments); last_tokens
  are the sequence's last tokens on every device."""
  mesh, n = _mesh((1, 4)), 4
  b, t, c, w = 2, 32, 3, 4
  rng = np.random.default_rng(3)
  x, wt = _normal(rng, b, t, c), _normal(rng, w, c)
  seg = _packed(b, t, (6, 2, 24))
  for layout in ("contiguous", "zigzag"):
    def local(shard, x, seg):
      y = shard.with_history(lambda v, s, h, hs: causal_conv(v, wt, jnp.zeros((c,)), s, h, hs),
                             x, w - 1, seg)
      return y, shard.last_tokens(x, w - 1)

    px, ps = permute_sequence(x, n, layout), permute_sequence(seg, n, layout)
    y, last = jax.jit(lambda px, ps, layout=layout: sequence_map(
        local, px, ps, in_axes=((None, "seq", None), (None, "seq")),
        out_axes=((None, "seq", None), (None, None, None)), mesh=mesh, axis="seq",
        layout=layout))(px, ps)
    _check(layout, (unpermute_sequence(y, n, layout), last),
           (causal_conv(x, wt, jnp.zeros((c,)), seg), x[:, -(w - 1):]))
    np.testing.assert_array_equal(UNSHARDED.last_tokens(x[:, :2], 3)[:, 1:], x[:, :2])


def test_routes_by_rules_and_refuses_striped():
  a = jnp.full((1, 16, 2), 0.5)
  # No mesh or rules: exactly the kernel.
  h, _ = sequence_map(lambda s, a: s.linear_scan(a, a), a, in_axes=((None, "seq", None),),
                      out_axes=((None, "seq", None), (None, None)))
  np.testing.assert_array_equal(h, linear_scan(a, a)[0])
  mesh = _mesh((1, 4))
  with pytest.raises(ValueError, match="'striped'.*contiguous"):
    sequence_parallel_linear_scan(a, a, mesh=mesh, layout="striped")
  with pytest.raises(ValueError, match="shorter than the 3 tokens"):
    jax.jit(lambda x: sequence_map(
        lambda s, x: s.with_history(lambda v, *_: v, x, 3), x, in_axes=((None, "seq", None),),
        out_axes=(None, "seq", None), mesh=Mesh(np.asarray(jax.devices()[:8]), ("seq",)),
        axis="seq"))(jnp.zeros((1, 16, 2)))
  with pytest.raises(ValueError, match="initial state must have shape"):
    SeqShard("seq", 4).linear_scan(a, a, jnp.zeros((2, 2)))


def test_validate_names_layout_and_conv_halo():
  model = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                      mixers=("mamba2", "attention"), ssm=SSMConfig(head_dim=16, d_state=16))
  sizes = {"data": 1, "seq": 8}
  striped = ParallelConfig(strategy="sp", mesh_shape=(1, 8), mesh_axes=("data", "seq"),
                           sequence_layout="striped")
  with pytest.raises(ConfigError, match="sequence_layout = 'striped'.*mamba2.*zigzag"):
    validate_for_model(striped, model, sizes, seq_len=64)
  zigzag = dataclasses.replace(striped, sequence_layout="zigzag")
  with pytest.raises(ConfigError, match=r"data.seq_len = 32 .*runs of 2 tokens.*seq_len >= 48"):
    validate_for_model(zigzag, model, sizes, seq_len=32)
  validate_for_model(zigzag, model, sizes, seq_len=64)
  # all_to_all keeps the data contiguous (with heads that split over the 8 devices);
  # attention-only models never scan
  validate_for_model(dataclasses.replace(striped, sequence_method="all_to_all"),
                     dataclasses.replace(model, n_heads=8), sizes)
  validate_for_model(striped, dataclasses.replace(model, mixers=None), sizes)


# --- layers in a model --------------------------------------------------------------------------

SSM = SSMConfig(d_state=16, head_dim=16, chunk_size=16, gated=True)
MAMBA = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    mixers=("mamba2",) * 2, mlp=False, ssm=SSM)
HYBRID = dataclasses.replace(MAMBA, n_layers=4, mlp=True,
                             mixers=("mamba2", "attention", "linear_attention", "mlgru"))


def _model_step(cfg, shape, layout, lengths, strategy="sp", axes=("data", "seq")):
  # One compiled init instead of one eager sampler per parameter shape.
  graphdef, params = nnx.split(nnx.eval_shape(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0))))
  params = _testing.jit_for_test(lambda: nnx.split(TransformerLM(cfg, rngs=nnx.Rngs(0)))[1])()
  b, t = 4, 64
  rng = np.random.default_rng(0)
  batch = {"inputs": jnp.asarray(rng.integers(0, 64, (b, t)), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, 64, (b, t)), jnp.int32)}
  if lengths is not None:
    batch["segment_ids"] = _packed(b, t, lengths)

  def loss(params, batch):
    batch, positions = batch_to_layout(batch)  # the ring's token order under zigzag
    logits = nnx.merge(graphdef, params)(batch["inputs"], positions=positions,
                                         segment_ids=batch.get("segment_ids"))
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1))

  want = _testing.jit_for_test(jax.value_and_grad(loss))(params, batch)
  if jax.device_count() < np.prod(shape):
    pytest.skip("needs more devices")
  mesh = Mesh(np.asarray(jax.devices()[:np.prod(shape)]).reshape(shape), axes)
  with sharding_context(mesh, strategy, sequence_layout=layout):
    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(params, batch).compile(compiler_options=_testing.FAST_CPU_COMPILE)
  got = compiled(params, batch)
  _testing.assert_allclose(got[0], want[0], dtype=F32, name="loss")
  for (path, a), w in zip(jax.tree_util.tree_leaves_with_path(got[1]), jax.tree.leaves(want[1]),
                          strict=True):
    _testing.assert_allclose(a, w, dtype=F32, grad=True, name=jax.tree_util.keystr(path))
  return compiled.as_text()


def test_layers_return_state_under_sp():
  """Prefill under SP (zigzag, 2 x 4): outputs and decode states (SSM / linear-attention /
  MLGRU states, Mamba-2's conv tails: the sequence's last tokens) equal the unsharded ones."""
  mesh, n, layout = _mesh((2, 4)), 4, "zigzag"
  rng = np.random.default_rng(4)
  x, seg = _normal(rng, 2, 64, 32), _packed(2, 64, (20, 30, 14))
  for cls in (Mamba2, LinearAttention, MLGRU):
    graphdef, state = nnx.split(nnx.eval_shape(lambda cls=cls: cls(MAMBA, 0, rngs=nnx.Rngs(0))))
    state = _testing.jit_for_test(lambda cls=cls: nnx.split(cls(MAMBA, 0, rngs=nnx.Rngs(0)))[1])()
    run = lambda state, x, seg, g=graphdef: nnx.merge(g, state)(x, seg, return_state=True)  # noqa: E731
    want = _testing.jit_for_test(run)(state, x, seg)
    with sharding_context(mesh, "sp", sequence_layout=layout):
      y, cache = _testing.jit_for_test(run)(state, permute_sequence(x, n, layout),
                                            permute_sequence(seg, n, layout))
    _check(cls.__name__, (unpermute_sequence(y, n, layout), cache), want)


def test_layers_continue_from_a_state_under_sp():
  """A chunk continuing a decode state (chunked prefill) under SP (zigzag, 2 x 4), packed
  segments: outputs and next states equal the unsharded ones. The state's conv tails precede
  only the sequence's first run (on device 0), not every device's."""
  mesh, n, layout = _mesh((2, 4)), 4, "zigzag"
  rng = np.random.default_rng(6)
  prefix, x, seg = _normal(rng, 2, 8, 32), _normal(rng, 2, 64, 32), _packed(2, 64, (20, 30, 14))
  # Full-precision BitLinears: an int8 activation rounding that flips between two compiled
  # programs would move an output by a quantization step (this tests the state, not rounding).
  cfg = dataclasses.replace(MAMBA, ternary=False)
  for cls in (Mamba2, LinearAttention, MLGRU):
    graphdef, state = nnx.split(nnx.eval_shape(lambda cls=cls: cls(cfg, 0, rngs=nnx.Rngs(0))))
    state = _testing.jit_for_test(lambda cls=cls: nnx.split(cls(cfg, 0, rngs=nnx.Rngs(0)))[1])()
    first = lambda state, x, g=graphdef: nnx.merge(g, state)(x, return_state=True)[1]  # noqa: E731
    run = lambda state, x, seg, h, g=graphdef: nnx.merge(g, state)(  # noqa: E731
        x, seg, return_state=True, state=h)
    h = _testing.jit_for_test(first)(state, prefix)
    want = _testing.jit_for_test(run)(state, x, seg, h)
    with sharding_context(mesh, "sp", sequence_layout=layout):
      y, cache = _testing.jit_for_test(run)(state, permute_sequence(x, n, layout),
                                            permute_sequence(seg, n, layout), h)
    _check(cls.__name__, (unpermute_sequence(y, n, layout), cache), want)


def test_ssm_layers_recompute_no_scan_under_sp(monkeypatch):
  """Under SP the layers' checkpoint keeps the kernel's final state too (the exchange needs it):
  the backward pass reruns no scan, and of the matmuls only the small einsum that reads the
  incoming state through C (batch dims: not a kept dot)."""
  mesh = _mesh((1, 2))
  x = _normal(np.random.default_rng(5), 2, 64, 32)

  def counts(cls):
    graphdef, state = nnx.split(cls(MAMBA, 0, rngs=nnx.Rngs(0)))
    loss = lambda state, x: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))  # noqa: E731
    with sharding_context(mesh, "sp"):
      closed = jax.make_jaxpr(jax.grad(loss))(state, x)
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    text = str(jaxpr)
    return text.count(" scan["), text.count("dot_general")

  for cls in (Mamba2, LinearAttention):
    kept = counts(cls)
    with monkeypatch.context() as patch:
      patch.setattr(jax, "checkpoint", lambda f, policy=None: f)
      plain = counts(cls)
    assert kept[0] == plain[0] and plain[1] <= kept[1] <= plain[1] + 1, (cls, kept, plain)


def _collectives(text: str) -> dict[str, list[str]]:
  return {op: re.findall(rf"= (.*?) {op}(?:-start)?\(", text)
          for op in ("collective-permute", "all-gather", "all-to-all", "all-reduce")}


def test_mamba_model_under_sp_matches_one_device():
  """4 x 2 data x seq, packed segments: loss and every gradient; nothing is all-gathered."""
  ops = _collectives(_model_step(MAMBA, (4, 2), "contiguous", (13, 3, 40, 8)))
  assert ops["collective-permute"] and not ops["all-gather"], ops["all-gather"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_hybrid_model_under_sp_matches_one_device(layout):
  """Mamba-2, ring attention, linear attention and MLGRU in one model, 8-way seq."""
  ops = _collectives(_model_step(HYBRID, (1, 8), layout, (13, 3, 40, 8)))
  assert ops["collective-permute"] and not ops["all-gather"], ops["all-gather"]


@pytest.mark.slow
def test_mamba_model_under_sp_and_tp_matches_one_device():
  """Heads over "tensor" and the sequence over "seq": the map follows both (and remat)."""
  cfg = dataclasses.replace(MAMBA, ssm=dataclasses.replace(SSM, n_groups=2), remat="full")
  _model_step(cfg, (2, 2, 2), "zigzag", None, "sp_tp", ("data", "seq", "tensor"))


def test_sharded_ssd_hlo_moves_states_not_sequences():
  """fwd+bwd of an 8-way SSD at T = 4096, compiled: collective-permutes of states, and no
  collective ever carries a sequence-sized array (T = 4096 or T/n = 512 tokens)."""
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("seq",)) if jax.device_count() >= 8 else None
  if mesh is None:
    pytest.skip("needs 8 devices")
  b, t, h, p, g, s = 2, 4096, 4, 16, 1, 32
  seq = NamedSharding(mesh, PartitionSpec(None, "seq"))
  rep = NamedSharding(mesh, PartitionSpec())
  shapes = [jax.ShapeDtypeStruct(sh, F32, sharding=sd) for sh, sd in (
      ((b, t, h, p), seq), ((b, t, h), seq), ((h,), rep), ((b, t, g, s), seq),
      ((b, t, g, s), seq))]

  def fwd_bwd(*args):
    out, vjp = jax.vjp(lambda *a: sequence_parallel_ssd(*a, mesh=mesh), *args)
    return vjp(out)

  text = jax.jit(fwd_bwd).lower(*shapes).compile(_testing.FAST_CPU_COMPILE).as_text()
  ops = _collectives(text)
  assert ops["collective-permute"], "no collective-permute in the sharded SSD"
  assert not ops["all-gather"] and not ops["all-to-all"], ops
  for op, found in ops.items():
    for shape in found:
      dims = {int(x) for x in re.findall(r"\d+", re.sub(r"\{[^}]*\}", "", shape))}
      assert not dims & {t, t // 8}, (op, shape)
