"""Seeding: a trained attention layer's weights → a Mamba-2 mixer that starts near the teacher.

Student shapes (`student_model_config`): a converted layer is a memx `Mamba2` with H heads of
dim P = K (the teacher's heads and head dim: expand = H·K / d_model = 1), state N = K and
n_groups = H, so B and C are per head, as mmMamba does after `repeat_kv`. The map
(`seed_mixer`; D model width, G teacher key/value groups, r = H / G):

| Mamba-2 param   | seeded from / value                          | why                            |
|-----------------|----------------------------------------------|--------------------------------|
| w_c [D, H, N]   | wq [D, H, K]                                 | C plays the query (N = K)      |
| w_b [D, H, N]   | wk [D, G, K], group g copied to heads        | B plays the key; head h reads  |
|                 | g·r … g·r + r − 1                            | group h // r, as GQA does      |
| w_x [D, H, P]   | wv [D, G, K], repeated likewise              | x plays the value (P = K)      |
| w_out [H, P, D] | wo [H, K, D]                                 | the output projection          |
| w_dt [D, H]     | 0                                            | Δ = softplus(dt_bias): no      |
|                 |                                              | input dependence at the start  |
| dt_bias [H]     | softplus⁻¹(Δ), Δ log-spaced over             | one fixed step per head        |
|                 | [dt_min, dt_max]                             |                                |
| a_log [H]       | log(a_init) (−30 when a_init = 0)            | decay exp(−Δ·a_init) per token |
| conv_b, conv_c  | scaled identity: last tap qk_scale, others   | the conv passes its input on,  |
|                 | 0; bias 0                                    | small: SiLU ≈ linear after it  |
| conv_x          | scaled identity, last tap v_scale; bias 0    | likewise for the values        |
| d [H]           | 0                                            | no skip (mmMamba: use_D false) |
| w_z [D, H, P]   | gate "mean": m·gate_scale/|m|² for every     | one positive scalar per token  |
|                 | (h, p), m = mean mixer input; "random":      | and head, which the per-head   |
|                 | N(0, init_std²) (mmMamba's small g_proj)     | RMSNorm divides out            |
| norm [H, P]     | per-head RMS of the teacher's attention      | restores the magnitude the     |
|                 | output (before wo) on calibration data; 1    | RMSNorm removes                |
|                 | without calibration                          |                                |

What the seeded layer computes, and where it still differs from the teacher. With q, k, v the
teacher's projections (no RoPE), φ_s(x) = silu(s·x) (Mamba-2 applies SiLU after its conv, and
the conv is the identity scaled by s) and γ_t,s = Π_{s<j≤t} exp(−Δ a):

  y_t = Δ Σ_{s≤t} γ_t,s (φ_β(q_t)·φ_β(k_s)) φ_α(v_s),
  out_t = Σ_h RMSNorm(y_t,h · silu(z_t,h)) n_h W_o,h            (β = qk_scale, α = v_scale)

With a_init = 0 this is causal linear attention with feature maps φ on q, k and v (the test
`test_seeded_mixer_is_causal_linear_attention` checks it against an einsum oracle). For small
β and α it is ≈ Σ γ (q_t·k_s) v_s up to a scale the norm removes: the first-order expansion of
softmax attention's exp(q·k/√K) without its constant term. It differs from the teacher's
softmax(q kᵀ/√K) v in: (1) the kernel: ≈ q·k (signed, unnormalised) instead of exp(q·k/√K);
(2) normalisation: a per-head RMSNorm of y instead of the softmax denominator
(it fixes the scale; the direction is a different weighted sum); (3) no RoPE: the teacher
rotates q and k by position, the student has no positional encoding but the decay; (4) the
gate: with "mean" it is exactly neutral for tokens whose input has a positive component along
the mean input, and flips the head's sign for the others (memx.distill.runner logs the
fraction on the calibration batch and distill.json records it); (5) the decay γ < 1 forgets
distant tokens, which softmax attention does not. Stage 1 trains exactly these new parameters
to close the gap. How close the seeded layer starts is measured, not assumed: on
experiments/distill's teacher, the seeded layers' output error relative to the teacher's
(MSE / mean square of the attention output) is reported there for seeded and random mixers.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memx.distill.config import StudentConfig
from memx.errors import ConfigError
from memx.models.config import ModelConfig
from memx.models.transformer import TransformerLM
from memx.nn._params import DTYPES

# Parameters seeding creates (trained from stage 1) and those copied from attention (stage 2+).
NEW_PARAMS = ("w_z", "w_dt", "dt_bias", "a_log", "conv_x", "conv_x_bias", "conv_b",
              "conv_b_bias", "conv_c", "conv_c_bias", "d", "norm")
COPIED_PARAMS = ("w_x", "w_b", "w_c", "w_out")

# a_log for "no decay" (a_init = 0): finite, so checks of finite state pass, yet A = -exp(-30)
# ≈ -9e-14 leaves exp(Δ·A), and its products over a chunk, exactly 1 in float32 for Δ up to
# 1e3. Its gradient is as small (∝ exp(a_log)): the decay stays off in training; seed
# a_init > 0 to learn one.
A_LOG_OFF = -30.0


@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Calibration of one converted layer from teacher activations.

  input_mean: [D] mean of the layer's mixer input (the normed hidden state) over tokens.
  head_rms: [H] RMS of each head's attention output (before wo) over tokens and head dims.
  """

  input_mean: jax.Array
  head_rms: jax.Array


def converted_layers(teacher: ModelConfig, student: StudentConfig) -> tuple[int, ...]:
  """Teacher attention layers the student turns into Mamba-2 (others are copied as they are)."""
  return tuple(i for i in range(teacher.n_layers)
               if teacher.mixer(i) == "attention" and not student.keeps_attention(i))


def student_model_config(teacher: ModelConfig, student: StudentConfig) -> ModelConfig:
  """The student's ModelConfig: the teacher's with converted layers as per-head Mamba-2.

  Raises ConfigError when nothing would be converted (a hybrid period that keeps every
  attention layer, or a teacher without attention).
  """
  conv = converted_layers(teacher, student)
  if not any(teacher.mixer(i) == "attention" for i in range(teacher.n_layers)):
    raise ConfigError(
        f"the teacher has no attention layer to convert (mixers "
        f"{[teacher.mixer(i) for i in range(teacher.n_layers)]}): distillation turns a "
        "Transformer's attention layers into Mamba-2; give a teacher with attention.")
  if not conv:
    raise ConfigError(
        f"student {student.label!r} converts no layer of this teacher (mixers "
        f"{[teacher.mixer(i) for i in range(teacher.n_layers)]}): a student needs at least one "
        "attention layer to turn into Mamba-2. Use --student linear or a hybrid period "
        f"student.every <= {teacher.n_layers - 1}.")
  k, h = teacher.head_dim, teacher.n_heads
  mixers = tuple("mamba2" if i in conv else teacher.mixer(i) for i in range(teacher.n_layers))
  ssm = dataclasses.replace(teacher.ssm, d_state=k, expand=1, head_dim=k, n_groups=h,
                            conv_width=student.conv_width, chunk_size=student.chunk_size)
  windows = teacher.attn_window_layers
  if windows is not None:
    windows = tuple(i for i in windows if i not in conv)
  if teacher.mixers is not None and "mamba2" in teacher.mixers and teacher.ssm != ssm:
    raise ConfigError(
        "the teacher already has Mamba-2 layers with model.ssm = "
        f"{teacher.ssm}; converted layers need d_state = head_dim = {k}, n_groups = {h}, "
        "expand = 1 and would change them. Distil a teacher whose Mamba-2 layers use those "
        "settings, or an attention-only teacher.")
  # (a quantized teacher's student trains in full precision; the runner dequantizes the
  # teacher before seeding reads it)
  changes = {"mixers": mixers, "ssm": ssm, "attn_window_layers": windows, "weight_quant": None}
  if getattr(teacher, "attn_plan", None) is not None:  # a sparse plan covers attention only
    changes["attn_plan"] = tuple(None if i in conv else e for i, e in enumerate(teacher.attn_plan))
  return dataclasses.replace(teacher, **changes)


def check_mapping(teacher: ModelConfig, student: ModelConfig, layers: tuple[int, ...]) -> None:
  """ConfigError unless `student` can be seeded from `teacher` at `layers`.

  Every converted layer must be attention in the teacher and Mamba-2 in the student, with
  heads = n_heads, head_dim = d_state = the teacher's head dim and n_groups = n_heads; every
  other shape (width, depth, vocabulary, MLP) must be the teacher's, since those weights are
  copied.
  """
  def bad(field, value, allowed):
    raise ConfigError(f"student model.{field} = {value!r} cannot be seeded from the teacher: "
                      f"{allowed}.")

  for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "mlp",
            "mlp_kind", "tie_embeddings"):
    if getattr(student, f) != getattr(teacher, f):
      bad(f, getattr(student, f), f"must equal the teacher's {getattr(teacher, f)!r} (those "
          "weights are copied)")
  k, h = teacher.head_dim, teacher.n_heads
  for i in range(teacher.n_layers):
    if i in layers:
      if teacher.mixer(i) != "attention":
        raise ConfigError(f"teacher layer {i} is {teacher.mixer(i)!r}, not attention: only "
                          "attention layers can be converted to Mamba-2.")
      if student.mixer(i) != "mamba2":
        bad(f"mixers[{i}]", student.mixer(i), "a converted layer must be 'mamba2'")
    elif student.mixer(i) != teacher.mixer(i):
      bad(f"mixers[{i}]", student.mixer(i),
          f"a layer that is not converted keeps the teacher's {teacher.mixer(i)!r}")
  s = student.ssm
  if s.head_dim != k:
    bad("ssm.head_dim", s.head_dim, f"must equal the teacher's head dim {k} (x ← V copies "
        "each head's values)")
  if s.d_state != k:
    bad("ssm.d_state", s.d_state, f"must equal the teacher's head dim {k} (B ← K and C ← Q "
        "copy each head's keys and queries)")
  if student.ssm_heads != h:
    bad("ssm.expand", s.expand, f"must give {h} Mamba-2 heads (one per attention head): "
        f"expand = n_heads·head_dim/d_model = {h * k // teacher.d_model}")
  if s.n_groups != h:
    bad("ssm.n_groups", s.n_groups, f"must equal n_heads = {h}: queries (→ C) are per head, "
        f"so B and C are per head, keys repeated over the {h // teacher.kv_heads} query "
        "heads of each key/value group")


def seed_dt_bias(heads: int, dt_min: float, dt_max: float) -> np.ndarray:
  """softplus⁻¹ of Δ log-spaced over [dt_min, dt_max], one per head (float32)."""
  dt = np.geomspace(dt_min, dt_max, heads).astype(np.float64)
  return (dt + np.log(-np.expm1(-dt))).astype(np.float32)


def seed_mixer(attn: dict, *, teacher: ModelConfig, student: StudentConfig,
               stats: LayerStats | None = None, key: jax.Array | None = None) -> dict:
  """Mamba-2 parameters for one converted layer; a pure function of its inputs.

  Args:
    attn: the teacher layer's attention weights {"wq" [D,H,K], "wk" [D,G,K], "wv" [D,G,K],
      "wo" [H,K,D]}.
    teacher: the teacher's ModelConfig (shapes and dtypes).
    student: seeding settings (Δ, A, gate, conv width).
    stats: calibration of this layer (gate direction, per-head output scale); None uses the
      data-free fallbacks (random gate, unit norm).
    key: PRNG key of the random gate (student.gate == "random" or no stats).

  Returns:
    {name: numpy array} for every parameter of memx.nn.mamba2.Mamba2, in the student's dtypes.

  Raises:
    ConfigError: the weights' shapes do not fit the teacher config.
  """
  d, h, g, k, w = teacher.d_model, teacher.n_heads, teacher.kv_heads, teacher.head_dim, \
      student.conv_width
  want = {"wq": (d, h, k), "wk": (d, g, k), "wv": (d, g, k), "wo": (h, k, d)}
  for name, shape in want.items():
    got = tuple(getattr(attn.get(name), "shape", ()))
    if got != shape:
      raise ConfigError(f"attention weight {name} has shape {got}, but the teacher config "
                        f"(d_model {d}, n_heads {h}, n_kv_heads {g}) needs {shape}.")
  # numpy on the host: seeding is a handful of copies, not worth a compiled program each.
  pd = np.dtype(DTYPES[teacher.param_dtype])
  f32 = np.float32
  rep = h // g
  a = {n: np.asarray(jax.device_get(attn[n])) for n in want}
  out = {
      "w_c": a["wq"].astype(pd),
      "w_b": np.repeat(a["wk"], rep, axis=1).astype(pd),
      "w_x": np.repeat(a["wv"], rep, axis=1).astype(pd),
      "w_out": a["wo"].astype(pd),
      "w_dt": np.zeros((d, h), pd),
      "dt_bias": seed_dt_bias(h, student.dt_min, student.dt_max),
      "a_log": np.full((h,), np.log(student.a_init) if student.a_init > 0 else A_LOG_OFF, f32),
      "d": np.zeros((h,), f32),
  }
  taps = {"x": student.v_scale, "b": student.qk_scale, "c": student.qk_scale}
  for name in "xbc":
    conv = np.zeros((w, h, k), pd)
    conv[w - 1] = taps[name]
    out[f"conv_{name}"] = conv
    out[f"conv_{name}_bias"] = np.zeros((h, k), pd)
  if stats is not None and student.gate == "mean":
    m = np.asarray(stats.input_mean, f32)
    direction = m * (student.gate_scale / max(float(np.sum(m * m)), 1e-12))
    out["w_z"] = np.ascontiguousarray(
        np.broadcast_to(direction[:, None, None], (d, h, k))).astype(pd)
  else:
    key = jax.random.key(0) if key is None else key
    out["w_z"] = np.asarray(teacher.init_std * jax.random.normal(key, (d, h, k), jnp.float32)
                            ).astype(pd)
  if stats is not None:
    rms = np.asarray(stats.head_rms, f32)
    out["norm"] = np.ascontiguousarray(np.broadcast_to(rms[:, None], (h, k))).astype(pd)
  else:
    out["norm"] = np.ones((h, k), pd)
  return out


# --- whole models ------------------------------------------------------------------------------


def param_arrays(model: nnx.Module) -> dict[tuple, jax.Array]:
  """{path: array} of every nnx.Param of a model."""
  return {tuple(p): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def set_params(model: nnx.Module, values: dict[tuple, jax.Array]) -> None:
  """Writes arrays into the model's params by path (shapes and dtypes must match)."""
  flat = []
  for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    new = values.get(tuple(p))
    if new is not None:
      if tuple(new.shape) != tuple(v.shape):
        raise ConfigError(f"parameter {'.'.join(map(str, p))} has shape {tuple(new.shape)} in "
                          f"the teacher but {tuple(v.shape)} in the student.")
      # Through the host: the student's buffers never alias the teacher's (training donates
      # them), and no per-shape copy program is compiled.
      v = v.replace(jnp.asarray(np.asarray(jax.device_get(new)).astype(v[...].dtype)))
    flat.append((p, v))
  nnx.update(model, nnx.from_flat_state(flat))


def build_student(teacher: TransformerLM, student: StudentConfig, *,
                  stats: dict[int, LayerStats] | None = None,
                  key: jax.Array | None = None) -> TransformerLM:
  """The student model: teacher weights copied, converted layers seeded (or random).

  Embeddings, the final norm, every MLP and norm, and the layers that are not converted are
  copied; a converted layer's attn_norm becomes its mixer_norm. student.init == "random" keeps
  Mamba-2's initialisation (drawn from `key`) for the converted mixers.
  """
  key = jax.random.key(0) if key is None else key
  tcfg = teacher.cfg
  scfg = student_model_config(tcfg, student)
  layers = converted_layers(tcfg, student)
  check_mapping(tcfg, scfg, layers)
  init_key, gate_key = jax.random.split(key)
  model = TransformerLM(scfg, rngs=nnx.Rngs(params=init_key))
  tparams = param_arrays(teacher)
  values = {}
  for path, arr in tparams.items():
    if path[0] == "blocks" and path[1] in layers:
      if path[2] == "attn":
        continue
      if path[2] == "attn_norm":
        path = (*path[:2], "mixer_norm", *path[3:])
    values[path] = arr
  if student.init == "seed":
    for i, gk in zip(layers, jax.random.split(gate_key, len(layers)), strict=True):
      attn = {n: tparams[("blocks", i, "attn", n)] for n in ("wq", "wk", "wv", "wo")}
      seeded = seed_mixer(attn, teacher=tcfg, student=student,
                          stats=None if stats is None else stats.get(i), key=gk)
      values.update({("blocks", i, "mixer", n): v for n, v in seeded.items()})
  set_params(model, values)
  return model
