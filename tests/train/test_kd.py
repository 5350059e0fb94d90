"""Knowledge distillation (teacher.run, memx.train.kd): the divergences against scipy, a student
that is its teacher has nothing to learn, distillation pulls a smaller student toward its
teacher's distribution more than cross-entropy alone, and runs with a teacher resume exactly
and refuse what they cannot do before any compute."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr, softmax

from memx.config import (
  CheckpointConfig,
  Config,
  DataConfig,
  FinetuneConfig,
  LocalConfig,
  ModelConfig,
  OptimConfig,
  ParallelConfig,
  TeacherConfig,
  TrainConfig,
)
from memx.errors import ConfigError, UserError
from memx.experiment.rundir import write_config
from memx.train import kd
from memx.train._testing import straight_and_resumed
from memx.train.loop import train
from memx.train.metrics import read_metrics

TEACHER_MODEL = ModelConfig(vocab_size=264, d_model=64, n_layers=2, n_heads=2)
STUDENT_MODEL = ModelConfig(vocab_size=264, d_model=32, n_layers=1, n_heads=2)
BASE = Config(model=TEACHER_MODEL, data=DataConfig(source="corpus", seq_len=32),
              optim=OptimConfig(lr=3e-3, warmup_steps=5),
              train=TrainConfig(steps=40, batch_size=8, log_every=1, eval_batches=1),
              checkpoint=CheckpointConfig(every=40, keep=1))


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("kd") / "teacher"
  train(BASE, run_dir, progress=False)
  write_config(run_dir, BASE)
  return str(run_dir)


def _student(teacher_run, steps=20, **teacher_fields):
  return dataclasses.replace(
      BASE, model=STUDENT_MODEL, train=dataclasses.replace(BASE.train, steps=steps),
      checkpoint=CheckpointConfig(enabled=False),
      teacher=TeacherConfig(run=teacher_run, **teacher_fields))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergences_match_scipy(kind, temperature):
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 3, 7)) * 2, rng.normal(size=(2, 3, 7)) * 2
  got = np.asarray(kd.divergence(jnp.asarray(s), jnp.asarray(t), kind, temperature))
  p, q = softmax(t / temperature, axis=-1), softmax(s / temperature, axis=-1)
  want = {"forward_kl": temperature**2 * rel_entr(p, q).sum(-1),
          "reverse_kl": temperature**2 * rel_entr(q, p).sum(-1),
          "jsd": temperature**2 * jensenshannon(p, q, axis=-1) ** 2,
          "tvd": 0.5 * np.abs(p - q).sum(-1)}[kind]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_divergences_stay_finite_where_both_distributions_underflow(kind):
  """Probabilities that underflow to 0 in both (sharp trained LMs at a low temperature)."""
  s, t = jnp.array([[0.0, -150.0, 3.0]]), jnp.array([[0.0, -200.0, 2.0]])
  value, grad = jax.value_and_grad(lambda s: kd.divergence(s, t, kind, 0.5).sum())(s)
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("on_policy", [0.0, 1.0], ids=["data", "on-policy"])
def test_a_student_that_is_its_teacher_has_nothing_to_learn(teacher_run, on_policy):
  """Started from the teacher's weights with the divergence alone: zero divergence, zero
  gradient, on the data's tokens as on its own samples."""
  from memx.parallel.mesh import make_mesh
  from memx.train._testing import fixed_batch
  from memx.train.step import init_state, make_grad_step

  cfg = dataclasses.replace(_student(teacher_run, weight=1.0, on_policy=on_policy,
                                     prompt_len=8),
                            model=TEACHER_MODEL, finetune=FinetuneConfig(base=teacher_run))
  ts = init_state(cfg, jax.random.key(0))
  one = make_mesh(ParallelConfig(mesh_shape=(1,)), devices=jax.devices()[:1])
  t_graphdef, t_state = kd.load_teacher(cfg, one)
  grads, metrics = jax.jit(make_grad_step(cfg, ts.graphdef, t_graphdef))(
      ts.state, fixed_batch(cfg), t_state)
  assert abs(float(metrics["kd_divergence"])) < 1e-6
  if not on_policy:
    assert float(metrics["loss"]) > 1.0  # the cross-entropy is logged, not the objective
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-5


def _tvd_to_teacher(student_dir, teacher_run) -> float:
  from memx.train._testing import fixed_batch
  from memx.train.restore import load_trained

  student, teacher = load_trained(student_dir).model, load_trained(teacher_run).model
  batch = fixed_batch(dataclasses.replace(BASE, train=dataclasses.replace(BASE.train,
                                                                          batch_size=16)))
  return float(jnp.mean(kd.divergence(student(batch["inputs"]), teacher(batch["inputs"]),
                                      "tvd")))


def test_distillation_pulls_the_student_toward_its_teacher(teacher_run, tmp_path):
  ce_only = dataclasses.replace(_student(teacher_run, steps=30, weight=0.0),
                                checkpoint=CheckpointConfig(every=30, keep=1))
  distilled = dataclasses.replace(ce_only, teacher=dataclasses.replace(ce_only.teacher,
                                                                       weight=1.0))
  for name, cfg in (("ce", ce_only), ("kd", distilled)):
    train(cfg, tmp_path / name, progress=False)
    write_config(tmp_path / name, cfg)
  records = [r for r in read_metrics(tmp_path / "kd" / "metrics.jsonl") if r["split"] == "train"]
  assert records[-1]["kd_divergence"] < 0.7 * records[0]["kd_divergence"]
  assert _tvd_to_teacher(tmp_path / "kd", teacher_run) < _tvd_to_teacher(tmp_path / "ce",
                                                                          teacher_run)


def test_a_run_with_a_teacher_resumes_exactly(teacher_run, tmp_path):
  """The teacher is restored again on resume; the split step a mid-run save uses takes it too;
  on-policy rows are sampled again from (seed, step)."""
  cfg = dataclasses.replace(_student(teacher_run, steps=6, divergence="tvd", on_policy=0.5,
                                     prompt_len=8),
                            checkpoint=CheckpointConfig(every=3, keep=3))
  _, (straight, resumed), states = straight_and_resumed(cfg, tmp_path, stop_at=3)
  assert [(r["loss"], r["kd_divergence"]) for r in resumed] == [
      (r["loss"], r["kd_divergence"]) for r in straight]
  for x, y in zip(*(jax.tree.leaves(s) for s in states), strict=True):
    np.testing.assert_array_equal(x, y)


def test_policy_rows_spread_evenly():
  assert kd.policy_rows(8, 0.5).tolist() == [False, True] * 4
  assert kd.policy_rows(8, 0.25).nonzero()[0].tolist() == [3, 7]
  assert kd.policy_rows(6, 1.0).all() and not kd.policy_rows(6, 0.0).any()
  assert kd.policy_rows(10, 0.3).sum() == 3


def test_on_policy_rows_are_the_models_own_generation():
  from flax import nnx

  from memx.models.decode import generate
  from memx.models.transformer import TransformerLM
  from memx.train._testing import fixed_batch

  model = TransformerLM(STUDENT_MODEL, rngs=nnx.Rngs(3))
  batch = {k: v for k, v in fixed_batch(BASE).items()}
  key, p, t = jax.random.key(7), 12, BASE.data.seq_len
  out = kd.on_policy_batch(model, batch, 0.5, p, 1.0, key)
  want = generate(model, batch["inputs"][:, :p], t - p + 1, temperature=1.0, rng=key)
  rows = kd.policy_rows(batch["inputs"].shape[0], 0.5)
  np.testing.assert_array_equal(out["inputs"][rows], want[rows, :t])
  np.testing.assert_array_equal(out["targets"][rows], want[rows, 1:])
  np.testing.assert_array_equal(out["inputs"][~rows], batch["inputs"][~rows])
  assert not np.array_equal(out["inputs"][rows], batch["inputs"][rows])  # it really sampled
  # CE only where the tokens are data; the divergence there and on every sampled target.
  generated = np.zeros(out["weights"].shape, bool)
  generated[rows, p - 1:] = True
  np.testing.assert_array_equal(out["weights"], np.where(generated, 0, batch["weights"]))
  np.testing.assert_array_equal(out["kd_weights"], np.where(generated, 1, batch["weights"]))


@pytest.mark.parametrize("change,match", [
    (dict(model=dataclasses.replace(STUDENT_MODEL, vocab_size=300)), "same vocabulary"),
    (dict(optim=OptimConfig(name="sgd", estimator="mezo", clip_norm=None)), "optim.estimator"),
    (dict(local=LocalConfig(groups=2), model=TEACHER_MODEL), "local.groups"),
    (dict(train=TrainConfig(batch_size=8, loss_vocab_block=128)), "loss_vocab_block"),
    (dict(teacher=TeacherConfig(run="R", on_policy=0.5, prompt_len=32)), "nothing of"),
    (dict(teacher=TeacherConfig(run="R", on_policy=0.5, prompt_len=8),
          data=DataConfig(source="corpus", seq_len=32, document_mask=True,
                          text_separator="\n\n")), "document boundaries"),
])
def test_runs_a_teacher_cannot_serve_are_refused(teacher_run, change, match):
  from memx.train.loop import prepare
  if "teacher" in change:
    change = {**change, "teacher": dataclasses.replace(change["teacher"], run=teacher_run)}
  with pytest.raises(ConfigError, match=match):
    prepare(dataclasses.replace(_student(teacher_run), **change))


def test_an_unfinished_teacher_is_refused_unless_a_step_is_named(teacher_run, tmp_path):
  import json
  import shutil

  from memx.train.loop import prepare
  half = tmp_path / "half"
  shutil.copytree(teacher_run, half)
  summary = json.loads((half / "summary.json").read_text())
  (half / "summary.json").write_text(json.dumps({**summary, "status": "stopped"}))
  with pytest.raises(ConfigError, match="has not finished training"):
    prepare(_student(str(half)))
  prepare(_student(str(half), step=BASE.train.steps))  # a named complete checkpoint is fine
  with pytest.raises(ConfigError, match="teacher.step = 7"):
    prepare(_student(str(half), step=7))


def test_a_missing_teacher_is_refused(tmp_path):
  from memx.train.loop import prepare
  with pytest.raises(UserError, match="no config.json"):
    prepare(_student(str(tmp_path / "nothing")))


@pytest.mark.parametrize("fields,match", [
    (dict(weight=1.5), "teacher.weight"),
    (dict(temperature=0.0), "teacher.temperature"),
    (dict(divergence="kl"), "teacher.divergence"),
    (dict(run=None, step=3), "needs teacher.run"),
    (dict(on_policy=0.5), "teacher.prompt_len"),
    (dict(on_policy=1.5, prompt_len=4), "teacher.on_policy"),
    (dict(run=None, on_policy=0.5, prompt_len=4), "needs teacher.run"),
    (dict(sample_temperature=-1.0), "teacher.sample_temperature"),
])
def test_bad_teacher_settings_are_refused(fields, match):
  with pytest.raises(ConfigError, match=match):
    TeacherConfig(**{"run": "x", **fields})
