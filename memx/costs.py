"""What a run costs before it runs: memory per device, FLOPs, and the bounds they imply.

`memx budget EXPERIMENT` prints these for a config (memx.budget); benchmarks compare their
measured numbers with the same bounds.

- State bytes per device (`state_bytes`): the parameters and optimizer state of the run's
  train state, each array's shard under the parallel strategy's shardings on a mesh of the
  given device count. Exact, and nothing is allocated: the state is traced with
  `jax.eval_shape` and sharded on an `AbstractMesh`.
- Step temporaries (`step_temp_bytes`): XLA's own buffer assignment of the compiled train step
  (activations kept for the backward pass, gradients, logits, workspace) on this machine's
  backend, compiled from abstract arguments (nothing allocated). Deep models are compiled at
  one and two periods of their layer pattern and extrapolated linearly in depth. XLA's buffer
  assignment does not add exactly the same bytes per layer, so this is an estimate: 2-3% off
  the whole compile at the tests' 6 layers, within 5% by test (benchmarks/RESULTS.md has it at
  a larger size). The numbers are those of this backend's compiler: XLA:CPU's schedule and
  fusion differ from XLA:GPU's.
- Training FLOPs per token (`train_flops_per_token`): 6 per matmul weight plus causal
  attention's score and value products (the usual model-FLOPs count; remat's recomputation is
  not counted), and the step-time floor it gives at a device's dense bf16 peak.
- Decode (`decode_bytes`): the weights and the decode state (KV caches, SSM states) a step
  reads for `batch` sequences at `context` tokens; one decode step must move at least those
  bytes from HBM, so bandwidth / bytes bounds the steps per second (Pope et al.'s
  memory-bound regime, which batch-1 decoding is in).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh

from memx.config import Config


@dataclasses.dataclass(frozen=True)
class Hardware:
  """A device's memory (bytes, as the driver reports its total), HBM bandwidth (bytes/s) and
  dense bf16 matmul peak (FLOP/s), from vendor datasheets (SXM parts, no sparsity)."""

  name: str
  memory: int
  bandwidth: float
  bf16_flops: float


HARDWARE = {
    "h100": Hardware("NVIDIA H100 SXM 80GB", 81559 * 2**20, 3.35e12, 989e12),
    "h200": Hardware("NVIDIA H200 SXM 141GB", 143771 * 2**20, 4.8e12, 989e12),
    "a100": Hardware("NVIDIA A100 SXM 80GB", 81920 * 2**20, 2.039e12, 312e12),
}
# jax's device_kind → HARDWARE key
DEVICE_KINDS = {"NVIDIA H100 80GB HBM3": "h100", "NVIDIA H100": "h100", "NVIDIA H200": "h200",
                "NVIDIA A100-SXM4-80GB": "a100"}


def hardware_of(device) -> Hardware | None:
  """The HARDWARE entry of a jax device, None for an unknown kind (CPUs)."""
  key = DEVICE_KINDS.get(getattr(device, "device_kind", ""))
  return None if key is None else HARDWARE[key]


def abstract_mesh(cfg: Config, devices: int) -> AbstractMesh:
  """cfg.parallel's mesh over `devices` devices, without devices."""
  from jax.sharding import AxisType

  shape = cfg.parallel.resolved_shape(devices)
  return AbstractMesh(shape, cfg.parallel.mesh_axes,
                      axis_types=(AxisType.Auto,) * len(shape))


def _shard_bytes(tree, shardings) -> int:
  return int(sum(math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings),
                                  strict=True)))


def state_bytes(cfg: Config, devices: int = 1) -> dict[str, int]:
  """Bytes one device holds of the run's train state under cfg.parallel over `devices`
  devices: "params" (every model variable: weights, quantized bases, local learning's
  auxiliary networks), "trainable" (the part the optimizer updates: its gradient has this
  size), "optimizer" (moments and other optimizer state). Also "param_count" and
  "trainable_count": totals over all devices, in numbers."""
  from flax import nnx

  from memx.train.finetune import trainable
  from memx.train.step import abstract_state, state_shardings

  ts = abstract_state(cfg, jax.random.key(0))
  shardings = state_shardings(ts.state, abstract_mesh(cfg, devices), cfg.parallel.strategy)
  model, opt = ts.state[0], ts.state[1]
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  kind = trainable(cfg)
  train_mask = jax.tree.map(lambda v: isinstance(v, kind), model, is_leaf=is_var)

  def part(tree, sh, keep=None):
    leaves = jax.tree.leaves(tree)
    sh_leaves = jax.tree.leaves(sh)
    keep = [True] * len(leaves) if keep is None else jax.tree.leaves(keep)
    return (_shard_bytes([x for x, k in zip(leaves, keep, strict=True) if k],
                         [s for s, k in zip(sh_leaves, keep, strict=True) if k]),
            int(sum(x.size for x, k in zip(leaves, keep, strict=True) if k)))

  params, n_params = part(model, shardings[0])
  train, n_train = part(model, shardings[0], train_mask)
  optimizer, _ = part(opt, shardings[1])
  out = {"params": params, "trainable": train, "optimizer": optimizer,
         "param_count": n_params, "trainable_count": n_train}
  if cfg.teacher.run is not None:  # the frozen teacher (memx.train.kd), sharded as the model
    _, t_state = teacher_model(cfg)
    out["teacher"] = _shard_bytes(t_state, state_shardings(
        t_state, abstract_mesh(cfg, devices), cfg.parallel.strategy))
  return out


def abstract_model(cfg: Config):
  """(graphdef, abstract state) of cfg's model as generation and evaluation use it: local
  learning's auxiliary networks left out, nothing allocated."""
  from flax import nnx

  from memx.train.finetune import build_model
  from memx.train.local import AUX

  def build():
    model = build_model(cfg, jax.random.key(0), load_base=False)
    if hasattr(model, AUX):
      delattr(model, AUX)
    return model
  return nnx.split(nnx.eval_shape(build))


def teacher_model(cfg: Config):
  """abstract_model of teacher.run's config (its run directory is read, not its weights)."""
  from memx.train.restore import load_config
  return abstract_model(load_config(cfg.teacher.run))


def abstract_batch(cfg: Config, batch_size: int | None = None, sharding=None) -> dict:
  """ShapeDtypeStructs of one training batch as the loader makes it."""
  b, t = batch_size or cfg.train.batch_size, cfg.data.seq_len
  dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32,
            "answer_mask": jnp.bool_}
  if cfg.data.document_mask:
    dtypes |= {"segment_ids": jnp.int32, "positions": jnp.int32}
  return {k: jax.ShapeDtypeStruct((b, t), d, sharding=sharding) for k, d in dtypes.items()}


def compile_step_abstract(cfg: Config, devices: list):
  """The train step of cfg, lowered and compiled on `devices` from abstract state and batch
  (nothing allocated)."""
  from memx.parallel.mesh import batch_sharding, make_mesh
  from memx.train.step import abstract_state, make_train_step, state_shardings

  mesh = make_mesh(cfg.parallel, devices)
  ts = abstract_state(cfg, jax.random.key(0))
  shardings = state_shardings(ts.state, mesh, cfg.parallel.strategy)
  state = _placed(ts.state, shardings)
  batch = abstract_batch(cfg, sharding=batch_sharding(mesh, cfg.parallel.strategy))
  t_graphdef, t_args = None, ()
  if cfg.teacher.run is not None:
    t_graphdef, t_state = teacher_model(cfg)
    t_sh = state_shardings(t_state, mesh, cfg.parallel.strategy)
    t_args = (_placed(t_state, t_sh),)
  return jax.jit(make_train_step(cfg, ts.graphdef, t_graphdef), donate_argnums=0,
                 out_shardings=(shardings, None)).lower(state, batch, *t_args).compile()


def _placed(tree, shardings):
  """ShapeDtypeStructs of tree's arrays with their shardings, in tree's structure."""
  leaves = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
            for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)]
  return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def layer_period(cfg: Config) -> int | None:
  """The shortest p such that layers repeat with period p and n_layers is a multiple of it
  (1 for a single mixer kind), or None when there is none shorter than the model or depth
  is not the only thing that grows with more periods (local learning's groups, sparse
  plans, MLGRU's model-level lower bounds)."""
  m = cfg.model
  if cfg.local.groups > 1 or m.attn_plan is not None:
    return None
  windowed = set(range(m.n_layers) if m.attn_window_layers is None else m.attn_window_layers)
  kinds = [(m.mixer(i), i in windowed) for i in range(m.n_layers)]
  if any(kind == "mlgru" for kind, _ in kinds):
    return None
  for p in range(1, m.n_layers // 2 + 1):
    if m.n_layers % p == 0 and all(kinds[i] == kinds[i % p] for i in range(m.n_layers)):
      return p
  return None


def _with_layers(cfg: Config, n: int) -> Config:
  """cfg's first n layers (whole periods of the pattern: their per-layer settings kept)."""
  m = cfg.model
  mixers = None if m.mixers is None else m.mixers[:n]
  window = (None if m.attn_window_layers is None
            else tuple(i for i in m.attn_window_layers if i < n))
  return dataclasses.replace(cfg, model=dataclasses.replace(m, n_layers=n, mixers=mixers,
                                                            attn_window_layers=window))


def step_temp_bytes(cfg: Config, devices: list, *, extrapolate: bool = True) -> dict:
  """XLA's temporary bytes per device of cfg's compiled train step on `devices`: {"temp":
  bytes, "compiled_layers": the depths compiled, "extrapolated": bool}. With extrapolate, a
  model of more than two layer periods is compiled at one and two periods and the
  temporaries extended linearly to its depth."""
  from memx.train.memory import compiled_memory

  p = layer_period(cfg) if extrapolate else None
  if p is None or cfg.model.n_layers <= 2 * p:
    temp = compiled_memory(compile_step_abstract(cfg, devices))["temp_bytes"]
    return {"temp": temp, "compiled_layers": [cfg.model.n_layers], "extrapolated": False}
  one, two = (compiled_memory(compile_step_abstract(_with_layers(cfg, k), devices))["temp_bytes"]
              for k in (p, 2 * p))
  periods = cfg.model.n_layers // p
  return {"temp": int(one + (periods - 1) * (two - one)), "compiled_layers": [p, 2 * p],
          "extrapolated": True}


def train_flops_per_token(cfg: Config, params=None) -> float:
  """Training FLOPs per token, counted from the model (XLA's cost_analysis cannot be used: on
  GPUs it leaves out the cuBLAS/cuDNN custom calls).

  6 per matmul weight (forward 2, backward 4): every weight of rank >= 2, the embedding table
  too when it is tied (it is then the output projection; untied, its lookup is free and the
  separate head counts). Plus causal attention: QKᵀ and PV are 4·T·d per token and layer
  forward over all keys, half of that under the causal mask, times 3 with the backward.
  Recomputation under remat is not counted (model FLOPs, as MFU is usually quoted).
  Local learning (local.groups = G): the auxiliary blocks count as layers (MAN's moving-average
  blocks 4 per weight: no weight gradient), and the output projection runs G times.
  params: the model's variables (arrays or shapes); None traces them from cfg.
  """
  from memx.train.local import AUX, aux_layers

  if params is None:
    from memx.train.step import abstract_state
    params = abstract_state(cfg, jax.random.key(0)).state[0]
  m = cfg.model
  ema = cfg.local.groups > 1 and cfg.local.aux_weights == "ema"
  weights, head = 0.0, 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = jax.tree_util.keystr(path)
    if x.ndim >= 2 and not ("'embed'" in key and not m.tie_embeddings) \
        and "'biases'" not in key:  # (MAN's per-block biases: added, not multiplied)
      weights += (4 / 6 if ema and f"'{AUX}'" in key and "'blocks'" in key else 1) * x.size
      if "'unembed'" in key or ("'embed'" in key and f"'{AUX}'" not in key):
        head = x.size
  n_attention = sum(m.mixer(i) == "attention" for i in range(m.n_layers))
  if cfg.local.groups > 1:
    n_attention += sum(m.mixer(j) == "attention"
                       for layers in aux_layers(m.n_layers, cfg.local) for j in layers)
    weights += (cfg.local.groups - 1) * head
  flops = 6.0 * weights + 6.0 * n_attention * cfg.data.seq_len * m.d_model
  if cfg.teacher.run is not None:  # the teacher's forward pass: a third of a training step's
    teacher_cfg = dataclasses.replace(_teacher_config(cfg), data=cfg.data)
    flops += train_flops_per_token(teacher_cfg, teacher_model(cfg)[1]) / 3
  return flops


def _teacher_config(cfg: Config) -> Config:
  from memx.config import TeacherConfig
  from memx.train.restore import load_config
  return dataclasses.replace(load_config(cfg.teacher.run), teacher=TeacherConfig())


def decode_bytes(cfg: Config, batch: int, context: int, *, kv_quant=None,
                 kv_evict=None) -> dict[str, int]:
  """Bytes a decode step reads at `context` tokens for `batch` sequences: "weights" (the
  model's variables, quantized ones as stored; local learning's auxiliary networks left out)
  and "state" (the decode state `init_cache(batch, context)` allocates: KV caches at full
  length, SSM and linear-attention states, positions). Exact array bytes, traced without
  allocation."""
  from flax import nnx

  graphdef, abstract = abstract_model(cfg)
  model = nnx.merge(graphdef, abstract)
  weights = int(sum(x.size * np.dtype(x.dtype).itemsize
                    for x in jax.tree.leaves(nnx.state(model))))
  cache = jax.eval_shape(lambda: model.init_cache(batch, context, kv_quant=kv_quant,
                                                  kv_evict=kv_evict))
  state = int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache)))
  return {"weights": weights, "state": state}
