"""Evaluate a trained model as is or under a sparse plan, without retraining.

Per length N: eval loss on the held-out corpus, passkey retrieval accuracy at several needle
depths (a row counts only when every digit of the key is predicted; the per-digit accuracy is
reported beside it), MQAR recall (per queried key), KV-cache
bytes per token of context (exact, from the decode cache layout), and decode tokens/s at the
longest length (prefill N - k tokens, then k single-token steps under jit, median of repeats).
The effective context length is the longest evaluated N whose mean retrieval accuracy (over
depths) is at least `threshold` (MoA's definition, with 90%).

With kv_quant (a quantized KV cache, `memx.kernels.kv_quant`) or kv_evict (H2O caches that keep
heavy-hitter and recent tokens, `memx.nn.kv_evict`) the cache is what changes, not the
forward, so every row runs through the decode path (`memx.models.decode.decode_logits`):
retrieval rows prefill their prompt up to the first answer token (passkey rows exactly, the
question included; MQAR rows, whose answers move, to a multiple of 64 tokens before it) and
predict the answers with decode steps reading the compressed cache (KIVI's and H2O's setting:
an exact prefill, then generation; H2O's prefill also chooses which prompt tokens stay); corpus
rows prefill one token and decode the rest, so their loss is that of a long generation under
the compressed cache.
Without compression the decode path gives the forward's numbers (tested), so a dense evaluation
is the baseline for these.

`write_evaluation` stores the result as RUN/evaluations/NAME.json (atomically); `memx report`
adds every run's evaluations to its report as a table and accuracy-versus-length plots.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memx._io import atomic_file
from memx.data import make_loader
from memx.data.config import DataConfig
from memx.errors import UserError
from memx.kernels.kv_quant import KVQuant
from memx.models.decode import decode_logits, kv_cache_bytes
from memx.models.transformer import TransformerLM
from memx.nn.kv_evict import H2O
from memx.sparse.plan import Plan, apply_plan
from memx.timing import feeding_back, median_time
from memx.train.loss import token_losses

EVALUATIONS_DIR = "evaluations"


def with_plan(model: TransformerLM, plan: Plan | None) -> TransformerLM:
  """The same weights under `plan` (None: the model itself)."""
  if plan is None:
    return model
  new = nnx.eval_shape(lambda: TransformerLM(apply_plan(model.cfg, plan), rngs=nnx.Rngs(0)))
  nnx.update(new, nnx.state(model))
  return new


@jax.jit
def _row_stats(logits, targets, weights, answer_mask):
  losses = token_losses(logits, targets)
  hit = jnp.argmax(logits, -1) == targets
  has_answer = answer_mask.any(-1)
  return (jnp.sum(losses * weights), jnp.sum(weights),
          jnp.sum((hit | ~answer_mask).all(-1) & has_answer), jnp.sum(has_answer),
          jnp.sum(hit & answer_mask), jnp.sum(answer_mask))


def _forward(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, inputs):
    return nnx.merge(graphdef, state)(inputs)

  return lambda inputs, answer_mask: fn(state, inputs)


PROMPT_STEP = 64  # decode-path prompt lengths are multiples of this: few distinct compiles


def _decode_forward(model, kv_quant: KVQuant | None, kv_evict: H2O | None = None,
                    step: int = PROMPT_STEP):
  """forward(inputs, answer_mask) through the decode path with a compressed cache (module
  doc): the prompt ends before the batch's first answer token (one token for rows with none),
  rounded down to a multiple of `step` (the prompt length is compiled in; rows whose answers
  move, as MQAR's, would otherwise compile a program per batch). step 1: the exact answer
  position (passkey rows: one per length, and the question stays in the prompt, where an
  eviction cache's prefill sees it)."""
  def fn(inputs, answer_mask):
    answers = np.flatnonzero(np.asarray(answer_mask).any(0))
    prompt = max(1, int(answers[0]) // step * step) if answers.size else 1
    return decode_logits(model, inputs, prompt, kv_quant=kv_quant, kv_evict=kv_evict)
  return fn


def _run(forward, data_cfg, batches, batch_size, seed, split):
  """(mean loss, exact-match rate over rows with an answer, answer-token accuracy).
  forward(inputs, answer_mask) → logits."""
  loader = make_loader(data_cfg, batch_size=batch_size, seed=seed, split=split)
  sums = np.zeros(6)
  for k in range(batches):
    b = loader.local_batch(k)
    logits = forward(jnp.asarray(b["inputs"]), b["answer_mask"])
    out = _row_stats(logits, b["targets"], b["weights"], b["answer_mask"])
    sums += np.array([float(x) for x in out])
  loss, weight, hits, rows, tok_hits, toks = sums
  return (loss / max(weight, 1.0), (hits / rows if rows else None),
          (tok_hits / toks if toks else None))


def decode_timer(model: TransformerLM, length: int, *, new_tokens: int = 16, batch: int = 1,
                 prefill_chunk: int | None = None, kv_quant: KVQuant | None = None,
                 kv_evict: H2O | None = None):
  """A no-argument callable that runs `new_tokens` decode steps (one jit'd scan) after a
  prompt of length - new_tokens, its cache prefilled here and fed back from call to call, as
  generation does. prefill_chunk: build the prompt's cache that many tokens at a time
  (activations then scale with the chunk, not the prompt: large batches). kv_quant: decode
  from a quantized cache; kv_evict: from H2O caches. Timed by `memx.timing` (the benchmarks
  alternate several)."""
  graphdef, state = nnx.split(model)
  prompt = jnp.zeros((batch, length - new_tokens), jnp.int32)

  @jax.jit
  def prefill(state, prompt):
    # Only the cache is used: last_logits spares the [B, T, V] float32 logits (2 GiB at 16k
    # tokens and a 32k vocabulary).
    return nnx.merge(graphdef, state).prefill(prompt, length, last_logits=True,
                                              chunk_size=prefill_chunk, kv_quant=kv_quant,
                                              kv_evict=kv_evict)

  @functools.partial(jax.jit, donate_argnums=1)
  def steps(state, cache, tok):
    # The cache is donated and fed back (no call copies it, as in generation); every call
    # decodes the same new_tokens positions after the prompt.
    cache = {**cache, "pos": jnp.asarray(length - new_tokens, jnp.int32)}

    def body(carry, _):
      cache, tok = carry
      logits, cache = nnx.merge(graphdef, state).decode_step(tok, cache)
      return (cache, jnp.argmax(logits, -1).astype(jnp.int32)), None
    (cache, tok), _ = jax.lax.scan(body, (cache, tok), None, length=new_tokens)
    return tok, cache

  _, cache = prefill(state, prompt)
  return feeding_back(steps, (state, cache, jnp.zeros((batch,), jnp.int32)), 1, 1)


def decode_tokens_per_s(model: TransformerLM, length: int, *, new_tokens: int = 16,
                        batch: int = 1, repeats: int = 3, prefill_chunk: int | None = None,
                        kv_quant: KVQuant | None = None, kv_evict: H2O | None = None
                        ) -> float:
  """Tokens/s of `new_tokens` decode steps after a prompt of length - new_tokens (jit'd;
  `decode_timer`), the median of `repeats` calls."""
  timer = decode_timer(model, length, new_tokens=new_tokens, batch=batch,
                       prefill_chunk=prefill_chunk, kv_quant=kv_quant, kv_evict=kv_evict)
  return batch * new_tokens / median_time(timer, (), repeats)


def effective_context(lengths: Sequence[int], accuracy: Sequence[float | None],
                      threshold: float = 0.9) -> int | None:
  """The longest evaluated length whose retrieval accuracy is at least `threshold` (MoA)."""
  ok = [n for n, acc in zip(lengths, accuracy, strict=True) if acc is not None and acc >= threshold]
  return max(ok) if ok else None


def evaluate(model: TransformerLM, data_cfg: DataConfig, lengths: Sequence[int], *,
             plan: Plan | None = None, depths: Sequence[float] = (0.1, 0.5, 0.9),
             batches: int = 2, batch_size: int = 8, seed: int = 4242,
             decode_new_tokens: int = 16, threshold: float = 0.9,
             kv_quant: KVQuant | None = None, kv_evict: H2O | None = None) -> dict:
  """Evaluates `model` (under `plan` if given; with a quantized KV cache if kv_quant, H2O
  caches if kv_evict); returns the JSON-ready result (module doc)."""
  if plan is not None and kv_quant is not None:
    raise ValueError("evaluate: a sparse plan's per-head ring caches are not quantized; "
                     "evaluate the plan or kv_quant, not both")
  if kv_evict is not None and (plan is not None or kv_quant is not None):
    raise ValueError("evaluate: kv_evict is evaluated alone (not with a plan or kv_quant), so "
                     "each evaluation compares one cache against the dense one")
  lengths = sorted(int(n) for n in lengths)
  # Retrieval at N is asked at the end of N tokens: full-length passkey prompts.
  # Every row is one document (corpus windows, passkey and MQAR rows): no document masks.
  base = dataclasses.replace(data_cfg, task=None, task_fraction=0.0, passkey_min_len=None,
                             document_mask=False, eos_id=None, text_separator=None)
  configs = {n: (dataclasses.replace(base, source="corpus", seq_len=n),
                 {d: dataclasses.replace(base, source="passkey", seq_len=n,
                                         passkey_depth=float(d)) for d in depths},
                 dataclasses.replace(base, source="mqar", seq_len=n)) for n in lengths}
  # Every data config is checked (e.g. a length too short for the passkey) before any compute.
  for lm, pks, mq in configs.values():
    for c in (lm, *pks.values(), mq):
      make_loader(c, batch_size=batch_size, seed=seed, split="eval")
  m = with_plan(model, plan)
  if kv_quant is not None:
    kv_quant.check(m.cfg.head_dim)
  compressed = kv_quant is not None or kv_evict is not None
  forward = _decode_forward(m, kv_quant, kv_evict) if compressed else _forward(m)
  exact = _decode_forward(m, kv_quant, kv_evict, step=1) if compressed else forward
  loss, passkey, passkey_tok, mqar, kv = {}, {}, {}, {}, {}
  for n, (lm, pks, mq) in configs.items():
    loss[n] = _run(forward, lm, batches, batch_size, seed, "eval")[0]
    passkey[n], passkey_tok[n] = {}, {}
    for d, pk in pks.items():
      _, passkey[n][d], passkey_tok[n][d] = _run(exact, pk, batches, batch_size, seed, "eval")
    mqar[n] = _run(forward, mq, batches, batch_size, seed, "eval")[2]
    kv[n] = kv_cache_bytes(m.cfg, n, kv_quant=kv_quant, kv_evict=kv_evict) / n
  mean_pk = [float(np.mean(list(passkey[n].values()))) for n in lengths]
  mean_tok = [float(np.mean(list(passkey_tok[n].values()))) for n in lengths]
  eff = effective_context(lengths, mean_pk, threshold)
  tps = decode_tokens_per_s(m, lengths[-1], new_tokens=min(decode_new_tokens, lengths[-1] - 1),
                            kv_quant=kv_quant, kv_evict=kv_evict)
  density = {n: (plan.density(n) if plan is not None else 1.0) for n in lengths}
  name = "dense" if plan is None else plan.kind
  if kv_quant is not None or kv_evict is not None:
    name = (kv_quant or kv_evict).name
  return {
      "kind": "evaluation", "method": name,
      "kv_quant": None if kv_quant is None else dataclasses.asdict(kv_quant),
      "kv_evict": None if kv_evict is None else dataclasses.asdict(kv_evict),
      "plan": None if plan is None else {"kind": plan.kind, "budget": plan.budget,
                                         "solver": plan.solver},
      "lengths": lengths, "depths": list(depths), "threshold": threshold,
      "eval_loss": {str(n): loss[n] for n in lengths},
      "passkey": {str(n): {str(d): passkey[n][d] for d in depths} for n in lengths},
      "passkey_mean": {str(n): a for n, a in zip(lengths, mean_pk, strict=True)},
      "passkey_digits": {str(n): {str(d): passkey_tok[n][d] for d in depths} for n in lengths},
      "passkey_digits_mean": {str(n): a for n, a in zip(lengths, mean_tok, strict=True)},
      "mqar": {str(n): mqar[n] for n in lengths},
      "density": {str(n): density[n] for n in lengths},
      "kv_bytes_per_token": {str(n): kv[n] for n in lengths},
      "effective_context": eff,
      "decode_tokens_per_s": tps, "decode_length": lengths[-1],
      # What `memx report` shows: one row of columns, curves against length.
      "columns": {
          "density@max": density[lengths[-1]],
          "eval loss@max": loss[lengths[-1]],
          # Retrieval at every length: where a method's accuracy falls off is the result.
          **{f"passkey@{n}": a for n, a in zip(lengths, mean_pk, strict=True)},
          "passkey digits@max": mean_tok[-1],
          "mqar@max": mqar[lengths[-1]],
          "effective ctx": eff,
          "KV B/token@max": kv[lengths[-1]],
          "decode tok/s": tps,
      },
      "curves": {
          "passkey accuracy": {"x": lengths, "y": mean_pk},
          "passkey digit accuracy": {"x": lengths, "y": mean_tok},
          "mqar accuracy": {"x": lengths, "y": [mqar[n] for n in lengths]},
          "eval loss": {"x": lengths, "y": [loss[n] for n in lengths]},
      },
  }


def check_evaluation_name(name: str) -> None:
  if not name or "/" in name or name.startswith("."):
    raise UserError(f"evaluation name {name!r} must be a plain file name.")


def write_evaluation(run_dir: str | pathlib.Path, name: str, result: dict) -> pathlib.Path:
  """RUN/evaluations/NAME.json, written atomically."""
  check_evaluation_name(name)
  out_dir = pathlib.Path(run_dir) / EVALUATIONS_DIR
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{name}.json"
  with atomic_file(path) as f:
    json.dump({"name": name, **result}, f, indent=1)
  return path
