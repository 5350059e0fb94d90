"""Knowledge distillation from a trained run (`teacher.*`, TeacherConfig).

The teacher is any trained memx run over the same vocabulary: restored once when training
starts (memx.train.restore), sharded as the student's state is, frozen, and passed to the step
as an argument of its own (never part of the train state: checkpoints stay the student's). Each
(micro)batch runs the teacher forward on the same tokens; the student's loss per token is

  (1 - weight) · cross-entropy + weight · D(p_teacher^τ || p_student^τ)

over the batch's weighted tokens, D one of `DIVERGENCES` on the τ-softened distributions
(Hinton et al.'s τ² factor on the KL kinds). The teacher's logits enter as constants: no
gradient, no activations kept for it.

On-policy distillation (teacher.on_policy = λ, GKD: Agarwal et al. 2024): a fraction λ of each
batch's rows keep only their first prompt_len tokens and continue with the model's own samples
(drawn in the step from the current parameters, keys from (seed, step), so a resumed run draws
the same), and the divergence is taken on those samples, where the model will actually be
asked to predict; they carry no cross-entropy. The sampling runs every row through
memx.models.decode.generate (simple and balanced across data-parallel shards; data rows then
discard theirs).

DistillSpec (Zhou et al. 2024) trains speculative-decoding drafts this way: a draft closer to
the target in total variation has more of its tokens accepted (1 - TVD per token, Leviathan
et al.), so the divergence is a knob on acceptance, measured by
experiments/speculative/pipeline.py.
"""

import jax
import jax.numpy as jnp
import numpy as np

from memx.config import Config
from memx.errors import ConfigError, UserError


def divergence(student_logits, teacher_logits, kind: str, temperature: float = 1.0):
  """Per-token D(teacher || student) [..., ] of logits [..., V], in float32."""
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  p, q = jnp.exp(t), jnp.exp(s)
  if kind == "forward_kl":
    return temperature**2 * jnp.sum(p * (t - s), axis=-1)
  if kind == "reverse_kl":
    return temperature**2 * jnp.sum(q * (s - t), axis=-1)
  if kind == "jsd":
    # log of the mixture in log space: log(p + q) would be -inf where both underflow, and
    # 0 · inf a NaN in the value and the gradient
    m = jnp.logaddexp(t, s) - jnp.log(2.0)
    return temperature**2 * 0.5 * (jnp.sum(p * (t - m), axis=-1) + jnp.sum(q * (s - m), axis=-1))
  if kind == "tvd":
    return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)
  raise ValueError(f"divergence: unknown kind {kind!r}")


def policy_rows(batch_size: int, fraction: float) -> np.ndarray:
  """Which of a batch's rows are on-policy: round(fraction · rows) of them, spread evenly (row
  j when floor((j + 1)·fraction) > floor(j·fraction)), so every data-parallel shard of the
  batch samples about as many."""
  j = np.arange(batch_size)
  return np.floor((j + 1) * fraction + 1e-9) > np.floor(j * fraction + 1e-9)


def on_policy_batch(model, batch: dict, fraction: float, prompt_len: int, temperature: float,
                    key) -> dict:
  """The batch with its on-policy rows' continuations sampled by `model` (GKD): each such row
  keeps its first prompt_len input tokens and the rest is the model's own generation from them
  (memx.models.decode.generate, at `temperature`, keys from `key`). "weights" (the
  cross-entropy's) drop the generated targets; "kd_weights" (the divergence's) count them. Data
  rows keep their tokens and both weights are theirs. The model's parameters are not
  differentiated through the sampling."""
  from memx.models.decode import generate

  b, t = batch["inputs"].shape
  rows = jnp.asarray(policy_rows(b, fraction))[:, None]
  seq = jax.lax.stop_gradient(generate(model, batch["inputs"][:, :prompt_len],
                                       t - prompt_len + 1, temperature=temperature, rng=key))
  generated = rows & (jnp.arange(t)[None, :] >= prompt_len - 1)  # targets the model sampled
  weights = batch["weights"]
  return {**batch, "inputs": jnp.where(rows, seq[:, :t], batch["inputs"]),
          "targets": jnp.where(rows, seq[:, 1:], batch["targets"]),
          "weights": jnp.where(generated, 0.0, weights),
          "kd_weights": jnp.where(generated, 1.0, weights)}


def check(cfg: Config) -> None:
  """ConfigError / UserError for a teacher the run cannot use, before any compute: the rest
  of the config allows a teacher (`check_config`), and the run exists, finished training (or
  teacher.step names a complete checkpoint of it) and speaks the student's vocabulary."""
  t = cfg.teacher
  if t.run is None:
    return
  from memx.train.finetune import check_run_checkpoint
  from memx.train.restore import find_run_dir, load_config

  check_config(cfg)
  run_dir = find_run_dir(t.run)
  teacher = load_config(run_dir)
  check_run_checkpoint(run_dir, teacher, t.run, t.step, "teacher.run", "teacher.step",
                       "distilled from")
  check_against(cfg, teacher, repr(t.run))


def check_config(cfg: Config) -> None:
  """The config-only part of `check` (a sweep runs it before the teacher entry trains)."""
  t = cfg.teacher
  if t.run is None:
    return

  clash = [(name, why) for name, bad, why in (
      ("optim.estimator", cfg.optim.estimator != "backprop",
       "MeZO estimates the gradient of a plain loss"),
      ("local.groups", cfg.local.groups > 1, "local learning has per-group losses of its own"),
      ("train.loss_vocab_block", cfg.train.loss_vocab_block > 0,
       "the divergence needs both full distributions"),
      ("teacher.on_policy", t.on_policy > 0 and t.prompt_len >= cfg.data.seq_len,
       f"teacher.prompt_len = {t.prompt_len} leaves nothing of data.seq_len = "
       f"{cfg.data.seq_len} to sample"),
      ("teacher.on_policy", t.on_policy > 0 and cfg.data.document_mask,
       "sampled continuations have no document boundaries"),
      ("teacher.on_policy", t.on_policy > 0 and "seq" in cfg.parallel.mesh_axes
       and dict(zip(cfg.parallel.mesh_axes, cfg.parallel.mesh_shape, strict=True))["seq"] != 1,
       "sampling runs whole sequences, not the ring's shards of them"),
  ) if bad]
  if clash:
    name, why = clash[0]
    raise ConfigError(f"teacher.run is not allowed with {name} = "
                      f"{_value(cfg, name)!r}: {why}")


def check_against(cfg: Config, teacher: Config, name: str) -> None:
  """ConfigError unless the teacher's config (a sweep entry's teacher may not have trained
  yet) predicts over this run's vocabulary, from the same tokenizer."""
  if teacher.model.vocab_size != cfg.model.vocab_size:
    raise ConfigError(f"teacher.run {name} has model.vocab_size = "
                      f"{teacher.model.vocab_size}, the model {cfg.model.vocab_size}: a "
                      "teacher must predict over the same vocabulary")
  if (teacher.data.source == "npy") != (cfg.data.source == "npy") or (
      teacher.data.source == "npy" and teacher.data.vocab_size != cfg.data.vocab_size):
    raise ConfigError(f"teacher.run {name} was trained on tokens of another tokenizer "
                      f"(data.source {teacher.data.source!r}, vocab_size "
                      f"{teacher.data.vocab_size}) than this run ({cfg.data.source!r}, "
                      f"{cfg.data.vocab_size}): its token ids would mean other things")


def _value(cfg, dotted: str):
  section, field = dotted.split(".")
  return getattr(getattr(cfg, section), field)


def load_teacher(cfg: Config, mesh):
  """(graphdef, state) of the teacher's model, sharded on `mesh` as the run's strategy shards
  model state; None without teacher.run."""
  if cfg.teacher.run is None:
    return None
  from flax import nnx

  from memx.train.restore import load_trained
  from memx.train.step import state_shardings

  try:
    trained = load_trained(cfg.teacher.run, step=cfg.teacher.step)
  except UserError as e:
    raise UserError(f"teacher.run: {e}") from None
  graphdef, state = nnx.split(trained.model)
  return graphdef, jax.device_put(state, state_shardings(state, mesh, cfg.parallel.strategy))


class WithTeacher:
  """A compiled step called as step(state, batch): the teacher's state is bound as the last
  argument. memory_analysis() is the compiled step's."""

  def __init__(self, compiled, teacher_state):
    self.compiled, self.teacher_state = compiled, teacher_state

  def __call__(self, state, batch):
    return self.compiled(state, batch, self.teacher_state)

  def memory_analysis(self):
    return self.compiled.memory_analysis()
