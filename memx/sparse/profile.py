"""Profile a trained dense model: how much the loss depends on each attention block, per head.

MoA (Fu et al. 2024, §4.2) estimates the loss increase of dropping the attention entry
A_ij (query i, key j) of a head to first order, with the softmax renormalising the rest of
row i: A'_ik = A_ik / (1 - A_ij). Writing g = ∂L/∂A,

  ΔL_ij ≈ Σ_k g_ik ΔA_ik = A_ij (Σ_k A_ik g_ik - g_ij) / (1 - A_ij) = -(∂L/∂s_ij) / (1 - A_ij),

since ∂L/∂s_ij = A_ij (g_ij - Σ_k A_ik g_ik) is the gradient with respect to the logit s_ij.
So one backward pass with a zero logit bias on every attention layer (`TransformerLM(...,
score_biases=...)`) gives every entry's influence |∂L/∂s_ij| / (1 - A_ij) (MoA takes the
magnitude). Influences are summed over [block, block] tiles of the score matrix and averaged
over calibration batches; the loss is the training loss (mean over weighted target tokens:
LM rows everywhere, task rows on their answers only, like MoA's response-only supervision).

The predicted loss increase of a rule at length N is then Σ_tiles E_tile · (fraction of the
tile's causal pairs the rule removes), exact up to the within-tile distribution of influence
(tiles are small: 16–64 tokens). Nothing is rerun to score a candidate mask.

Memory: the profile forward materialises [B, H, N, N] logits, probabilities and gradients for
every attention layer, so calibration batches are small (the lengths it profiles are those of
the plan, not the longest the model will run: spans are length-elastic).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memx._io import atomic_file
from memx.errors import UserError
from memx.kernels.attention import CAUSAL
from memx.sparse.rules import Rule, rules_mask

PROFILE_VERSION = 1
_EPS = 1e-6  # floor on 1 - A_ij (a row whose one visible key takes all the mass)


class ProfileError(UserError):
  """A profile file that is missing, from another version, or lacks a requested length."""


@dataclasses.dataclass(frozen=True)
class Profile:
  """Block-pooled attention influence of a trained model at several lengths.

  Attributes:
    fingerprint: `memx.sparse.plan.model_fingerprint` of the profiled model.
    n_layers, n_heads: the model's layer count and query heads per layer.
    kv_heads: its KV heads per layer (None in profiles written before memx recorded it).
    layers: indices of the attention layers profiled (the plan's layers), in order.
    block: tile size of the pooling.
    influence: {length N: float64 [len(layers), n_heads, ceil(N/block), ceil(N/block)]} mean
      over calibration batches of the summed entry influences in each tile.
    batches: {length N: calibration batches averaged}.
    meta: free-form provenance (source run, step, data, seed).
  """

  fingerprint: str
  n_layers: int
  n_heads: int
  layers: tuple[int, ...]
  block: int
  influence: dict[int, np.ndarray]
  batches: dict[int, int]
  meta: dict
  kv_heads: int | None = None

  @property
  def lengths(self) -> tuple[int, ...]:
    return tuple(sorted(self.influence))

  def require_lengths(self, lengths) -> None:
    missing = [n for n in lengths if n not in self.influence]
    if missing:
      raise ProfileError(f"the profile has no data for length(s) {missing}: it was profiled at "
                         f"{list(self.lengths)}. Profile those lengths too (memx sparse profile "
                         f"--lengths) or search over the profiled ones.")

  def removed_fraction(self, rules: list[Rule], length: int) -> np.ndarray:
    """float [R, nb, nb]: fraction of each tile's causal pairs that each rule removes."""
    b = self.block
    causal = CAUSAL.block_counts(length, length, b, b)[0].astype(np.float64)
    kept = rules_mask(rules, length).block_counts(length, length, b, b).astype(np.float64)
    return np.where(causal > 0, 1.0 - kept / np.maximum(causal, 1.0), 0.0)

  def costs(self, rules: list[Rule], lengths, weights=None) -> np.ndarray:
    """Predicted loss increase [len(layers) · n_heads, R], summed over `lengths` (each length's
    term times its entry of `weights`, default 1).

    Row l·n_heads + h is head h of the l-th profiled attention layer.
    """
    self.require_lengths(lengths)
    weights = [1.0] * len(lengths) if weights is None else weights
    total = 0.0
    for n, w in zip(lengths, weights, strict=True):
      removed = self.removed_fraction(rules, n)
      total = total + w * np.einsum("lhij,rij->lhr", self.influence[n], removed)
    return np.asarray(total).reshape(len(self.layers) * self.n_heads, len(rules))

  # --- files ----------------------------------------------------------------------------------

  def save(self, path: str | pathlib.Path) -> pathlib.Path:
    """Writes an .npz (arrays + a JSON header) atomically: temp file, then rename."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"version": PROFILE_VERSION, "fingerprint": self.fingerprint,
              "n_layers": self.n_layers, "n_heads": self.n_heads, "kv_heads": self.kv_heads,
              "layers": list(self.layers),
              "block": self.block, "batches": {str(k): v for k, v in self.batches.items()},
              "meta": self.meta}
    arrays = {f"influence_{n}": a for n, a in self.influence.items()}
    with atomic_file(path, "wb") as f:
      np.savez(f, header=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
    return path

  @classmethod
  def load(cls, path: str | pathlib.Path) -> Profile:
    path = pathlib.Path(path)
    if not path.is_file():
      raise ProfileError(f"profile {path} does not exist; write one with `memx sparse profile`.")
    try:
      with np.load(path) as z:
        header = json.loads(bytes(z["header"]).decode())
        influence = {int(k.split("_", 1)[1]): np.array(z[k]) for k in z.files
                     if k.startswith("influence_")}
    except (OSError, ValueError, KeyError) as e:
      raise ProfileError(f"{path} is not a memx attention profile ({e}).") from e
    if header.get("version") != PROFILE_VERSION:
      raise ProfileError(f"{path} is a version {header.get('version')} profile; this memx reads "
                         f"version {PROFILE_VERSION}. Profile the model again.")
    return cls(fingerprint=header["fingerprint"], n_layers=header["n_layers"],
               n_heads=header["n_heads"], layers=tuple(header["layers"]),
               block=header["block"], influence=influence,
               batches={int(k): v for k, v in header["batches"].items()}, meta=header["meta"],
               kv_heads=header.get("kv_heads"))


CALIBRATIONS = ("auto", "task", "train")


def calibration_data(data_cfg, mode: str = "auto"):
  """The data config to calibrate on: "task" = the run's synthetic task alone (long-range rows
  whose loss is the answers, as MoA calibrates), "train" = the training mix (corpus rows then
  dominate the loss), "auto" = task if the run has one, else train."""
  task = data_cfg.task_name
  if mode not in CALIBRATIONS:
    raise ProfileError(f"calibration {mode!r} is not one of {', '.join(CALIBRATIONS)}.")
  if mode == "task" and task is None:
    raise ProfileError("calibration 'task': the run was trained without a synthetic task "
                       "(data.task / data.source); calibrate on 'train'.")
  if task is not None and mode in ("task", "auto"):
    return data_cfg.task_only()
  if data_cfg.document_mask:
    raise ProfileError(one_document_error(f"calibration {mode!r}", has_task=task is not None))
  return data_cfg


def one_document_error(what: str, *, has_task: bool) -> str:
  """Why MoA refuses a document-masked run's training rows, and what to do instead. (MoA's
  rules count from the row's start: profiles, plans and their guard work on rows of one
  document.)"""
  instead = ("calibrate on the run's task (calibration 'task'), whose rows are one document "
             "each, or profile" if has_task else "profile")
  return (f"{what}: the run trained with data.document_mask, so its training rows hold several "
          "documents, while MoA profiles and plans rows of one document (spans of alpha + beta·N "
          f"and sinks count from the row's start). Instead, {instead} a run trained with "
          "data.document_mask = false.")


def attention_layers(model_cfg) -> tuple[int, ...]:
  return tuple(i for i in range(model_cfg.n_layers) if model_cfg.mixer(i) == "attention")


def _influence_fn(graphdef, layers: tuple[int, ...], block: int):
  """jit'd (params, batch) -> (loss, float32 [len(layers), H, nb, nb] tile sums over the batch)."""
  from memx.train.loss import token_losses, weighted_mean

  def fn(params, batch):
    inputs = batch["inputs"]
    b, t = inputs.shape

    def loss_fn(biases):
      model = nnx.merge(graphdef, params)
      logits = model(inputs, score_biases=biases)
      probs = nnx.pop(model, nnx.Intermediate)
      loss = weighted_mean(token_losses(logits, batch["targets"]), batch["weights"])
      return loss, probs

    h = nnx.merge(graphdef, params).cfg.n_heads
    zeros = {i: jnp.zeros((b, h, t, t), jnp.float32) for i in layers}
    (loss, probs), grads = jax.value_and_grad(loss_fn, has_aux=True)(zeros)
    nb = -(-t // block)
    pad = nb * block - t
    out = []
    for i in layers:
      a = probs["blocks"][i]["attn"]["attn_probs"].get_value()[0]
      infl = jnp.abs(grads[i]) / jnp.maximum(1.0 - a, _EPS)
      infl = jnp.pad(infl.sum(0), ((0, 0), (0, pad), (0, pad)))
      out.append(infl.reshape(h, nb, block, nb, block).sum((2, 4)))
    return loss, jnp.stack(out)

  return jax.jit(fn)


def _check_fits(lengths, layers, n_heads: int, batch_size: int) -> None:
  """Refuses, before any compute, a length whose profile step cannot fit in memory: it holds
  the zero score biases, the probabilities and their gradients, [B, H, N, N] fp32 each, for
  every attention layer at once (a lower bound: activations and weights come on top)."""
  from memx._device import memory_limit

  limit = memory_limit(host_fallback=True)
  if limit is None:
    return
  for n in lengths:
    need = 3 * len(layers) * batch_size * n_heads * n * n * 4
    if need > limit:
      raise ProfileError(
          f"profiling at length {n} needs at least {need / 2**30:.1f} GiB ([B={batch_size}, "
          f"H={n_heads}, N, N] fp32 scores, probabilities and gradients for {len(layers)} "
          f"attention layers), more than the {limit / 2**30:.1f} GiB this machine has. Profile "
          "shorter lengths (a plan's spans scale to longer ones) or a smaller batch size.")


def profile_model(model, data_cfg, lengths, *, batches: int = 4, batch_size: int = 2,
                  block: int = 32, seed: int = 1234, meta: dict | None = None) -> Profile:
  """Profiles `model` (a trained TransformerLM) on calibration batches of `data_cfg` at each
  length (the data config's source/task mix with seq_len = N, training split, its own seed).
  """
  from memx.data import make_loader
  from memx.sparse.plan import model_fingerprint

  cfg = model.cfg
  lengths = sorted({int(n) for n in lengths})
  if not lengths or lengths[0] < 2:
    raise ProfileError(f"profile lengths {lengths} must be integers >= 2.")
  if block < 1 or batches < 1 or batch_size < 1:
    raise ProfileError(f"block = {block}, batches = {batches}, batch_size = {batch_size} must "
                       "be positive.")
  if cfg.attn_plan is not None or cfg.attn_window is not None:
    raise ProfileError("profile a dense model: this one already has a sparse plan or a window "
                       "(profiling measures what each head's full attention contributes).")
  layers = attention_layers(cfg)
  if not layers:
    raise ProfileError("the model has no attention layers to profile.")
  _check_fits(lengths, layers, cfg.n_heads, batch_size)
  graphdef, params = nnx.split(model)
  fn = _influence_fn(graphdef, layers, block)
  influence, losses = {}, {}
  for n in lengths:
    # Calibrate retrieval at N itself: full-length passkey prompts (passkey_min_len off).
    loader = make_loader(dataclasses.replace(data_cfg, seq_len=n, passkey_min_len=None),
                         batch_size=batch_size, seed=seed, split="train")
    acc, loss_sum = None, 0.0
    for k in range(batches):
      batch = {key: jnp.asarray(v) for key, v in loader.local_batch(k).items()}
      loss, tiles = fn(params, batch)
      # The loss is a batch mean, so tile sums over the batch predict its increase directly.
      tiles = np.asarray(tiles, np.float64)
      acc = tiles if acc is None else acc + tiles
      loss_sum += float(loss)
    influence[n] = acc / batches
    losses[n] = loss_sum / batches
  return Profile(fingerprint=model_fingerprint(cfg), n_layers=cfg.n_layers,
                 n_heads=cfg.n_heads, kv_heads=cfg.kv_heads, layers=layers, block=block,
                 influence=influence, batches=dict.fromkeys(lengths, batches),
                 meta={**(meta or {}), "calibration_loss": {str(n): v for n, v in losses.items()},
                       "batch_size": batch_size, "seed": seed})
