"""data.document_mask end to end: a row of packed documents trains as the documents apart."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from memx.config import Config, DataConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from memx.data import document_layout, make_loader
from memx.data.documents import check_model
from memx.errors import ConfigError
from memx.kernels import _testing
from memx.models.config import SSMConfig
from memx.models.transformer import TransformerLM
from memx.parallel.constrain import sharding_context
from memx.parallel.mesh import make_mesh
from memx.train.loop import train
from memx.train.loss import lm_token_losses
from memx.train.metrics import read_metrics
from memx.train.step import init_state, make_grad_step

EOS = 63
SSM = SSMConfig(d_state=16, head_dim=16, chunk_size=16, gated=True)
HYBRID = ModelConfig(vocab_size=64, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, ssm=SSM,
                     mixers=("mamba2", "attention", "linear_attention", "mlgru", "attention"),
                     attn_window=6, attn_window_layers=(4,))


def _packed_row(rng, lengths):
  """Documents of the given lengths, each after the first opened by EOS (its BOS)."""
  docs = [rng.integers(0, EOS, n) for n in lengths]
  for d in docs[1:]:
    d[0] = EOS
  return docs, np.concatenate(docs)[None]


@pytest.mark.parametrize("vocab_block", [0, 16])
def test_packed_documents_equal_the_documents_apart(vocab_block):
  """Every mixer (Mamba-2 with its conv, attention, windowed attention, linear attention,
  MLGRU): per-token losses and parameter gradients of one packed row equal those of its
  documents run one at a time from position 0 (the independent oracle)."""
  rng = np.random.default_rng(0)
  docs, row = _packed_row(rng, (21, 3, 30, 10))  # 64 tokens, not a multiple of the chunk
  targets = np.roll(row, -1, axis=1)
  seg, pos = document_layout(row, EOS)
  graphdef, params = nnx.split(TransformerLM(HYBRID, rngs=nnx.Rngs(0)))

  def losses(params, inputs, targets, **kw):
    return lm_token_losses(nnx.merge(graphdef, params), inputs, targets, vocab_block=vocab_block,
                           **kw)

  packed_fn = _testing.jit_for_test(jax.value_and_grad(
      lambda p: jnp.sum(losses(p, jnp.asarray(row), jnp.asarray(targets),
                               positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))),
      has_aux=False))
  packed_losses = _testing.jit_for_test(lambda p: losses(
      p, jnp.asarray(row), jnp.asarray(targets), positions=jnp.asarray(pos),
      segment_ids=jnp.asarray(seg)))(params)
  total, grads = packed_fn(params)

  want_losses, want_grads, start = [], None, 0
  for d in docs:
    t = targets[:, start:start + len(d)]
    start += len(d)
    fn = _testing.jit_for_test(jax.value_and_grad(
        lambda p, d=d, t=t: jnp.sum(losses(p, jnp.asarray(d[None]), jnp.asarray(t)))))
    want_losses.append(_testing.jit_for_test(lambda p, d=d, t=t: losses(
        p, jnp.asarray(d[None]), jnp.asarray(t)))(params))
    g = fn(params)[1]
    want_grads = g if want_grads is None else jax.tree.map(jnp.add, want_grads, g)
  _testing.assert_allclose(packed_losses, jnp.concatenate(want_losses, axis=1),
                           dtype=jnp.float32, name="losses")
  for (path, a), w in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree.leaves(want_grads), strict=True):
    _testing.assert_allclose(a, w, dtype=jnp.float32, grad=True, name=jax.tree_util.keystr(path))
  # Without the document masks the same row gives other losses: the masks took effect.
  plain = _testing.jit_for_test(lambda p: losses(p, jnp.asarray(row), jnp.asarray(targets)))(params)
  assert not np.allclose(plain[:, 21:], packed_losses[:, 21:], rtol=1e-3)


def _npy_config(tmp_path, **model):
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, EOS, 6000)
  tokens[rng.integers(0, 6000, 300)] = EOS
  path = tmp_path / "tok.npy"
  np.save(path, tokens)
  small = dataclasses.replace(HYBRID, n_layers=2, mixers=("mamba2", "attention"), attn_window=None,
                              attn_window_layers=None)
  return Config(model=dataclasses.replace(small, **model),
                data=DataConfig(source="npy", paths=(str(path),), seq_len=64, vocab_size=64,
                                document_mask=True, eos_id=EOS),
                optim=OptimConfig(lr=3e-3, warmup_steps=1),
                train=TrainConfig(steps=2, batch_size=8, log_every=1, eval_batches=1))


def test_grad_step_under_sequence_parallelism(tmp_path):
  """The train step's loss and gradients under 4-way sequence parallelism (zigzag: the batch's
  own positions and segment ids are reordered with its tokens) equal one device's."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  cfg = _npy_config(tmp_path)
  ts = init_state(cfg, jax.random.key(0))
  loader = make_loader(cfg.data, batch_size=8, seed=0, split="train")
  one = NamedSharding(make_mesh(ParallelConfig(mesh_shape=(1,)), devices=jax.devices()[:1]),
                      PartitionSpec())
  batch = loader.global_batch(1, one)
  assert int(jnp.max(batch["segment_ids"])) > 0
  step = make_grad_step(cfg, ts.graphdef)
  want_g, want_m = _testing.jit_for_test(step)(ts.state, batch)
  # The step reads the batch's document positions and segment ids (the loss with them given
  # explicitly), and they matter (the loss without them differs).
  model = nnx.merge(ts.graphdef, ts.state)[0]
  for kw, same in (({"positions": batch["positions"], "segment_ids": batch["segment_ids"]}, True),
                   ({}, False)):
    loss = jnp.mean(lm_token_losses(model, batch["inputs"], batch["targets"], **kw))
    assert np.isclose(loss, want_m["loss"], rtol=1e-5) == same
  par = ParallelConfig(strategy="sp", mesh_axes=("data", "seq"), mesh_shape=(2, 4),
                       sequence_layout="zigzag")
  mesh = make_mesh(par)
  state, batch = jax.device_put((ts.state, batch), NamedSharding(mesh, PartitionSpec()))
  with sharding_context(mesh, "sp", sequence_layout="zigzag"):
    got_g, got_m = _testing.jit_for_test(step)(state, batch)
  _testing.assert_allclose(got_m["loss"], want_m["loss"], dtype=jnp.float32, name="loss")
  for (path, a), w in zip(jax.tree_util.tree_leaves_with_path(got_g), jax.tree.leaves(want_g),
                          strict=True):
    _testing.assert_allclose(a, w, dtype=jnp.float32, grad=True, name=jax.tree_util.keystr(path))


def test_a_run_trains_on_documents_and_refuses_sinks(tmp_path):
  """Text files (one document each) with MQAR rows mixed in: training, evaluation and the
  task-only evaluation run (their batches share one structure); sinks are refused."""
  rng = np.random.default_rng(4)
  paths = []
  for i, n in enumerate(rng.integers(20, 200, 12)):
    paths.append(str(tmp_path / f"doc{i}.txt"))
    pathlib.Path(paths[-1]).write_text("".join(rng.choice(list("abcdefgh "), n)))
  base = _npy_config(tmp_path)
  cfg = dataclasses.replace(
      base, model=dataclasses.replace(base.model, vocab_size=264),
      data=DataConfig(source="text", paths=tuple(paths), seq_len=64, document_mask=True,
                      task="mqar", task_fraction=0.25, mqar_pairs=2))
  summary = train(cfg, tmp_path / "run", progress=False)
  rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert np.isfinite(summary["final_eval_loss"]) and summary["task_accuracy"] is not None
  with pytest.raises(ConfigError, match="model.attn_sinks = 2 is not allowed with data.document"):
    train(_npy_config(tmp_path, attn_window=8, attn_sinks=2), tmp_path / "sinks", progress=False)
  assert not (tmp_path / "sinks").exists()
  cudnn = _npy_config(tmp_path, attn_impl="cudnn")  # (on CPU the backend check comes first)
  with pytest.raises(ConfigError, match="attn_impl = 'cudnn' is not allowed with data.document"):
    check_model(cudnn.data, cudnn.model)
