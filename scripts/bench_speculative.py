"""Benchmark the parts of a speculative-decoding round and the speedup they allow.

A round costs k + 1 draft decode steps plus one target pass over k + 1 tokens
(`TransformerLM.extend`) and yields E = (1 - a^(k+1)) / (1 - a) tokens for a per-token
acceptance a (Leviathan et al. 2023, independent acceptances), where plain decoding pays one
target step per token. Measured here, at a context of N tokens and batch 1 (each in one jit'd
scan of --calls calls, caches donated and fed back, medians of rounds timed in alternation):
  target step: the target's decode step;
  verify k: the target's extend over k + 1 tokens (its position set back after each call, as a
    round's rewind does);
  draft step: the decode step of each draft (a Transformer and a Mamba-2 model, d/4 wide and
    L/4 deep).
Then, per draft and k, the break-even acceptance (speedup 1) and the predicted speedup
E·t_step / ((k + 1)·t_draft + t_verify) at a = 0.6, 0.8 and 0.9 (what trained drafts reach:
experiments/speculative/pipeline.py measures a on real text).

  python scripts/bench_speculative.py --out /tmp/spec                 # CPU, float32
  python scripts/bench_speculative.py --out $OUT/spec --size gpu      # bf16
"""

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from memx.benchmark import write_results
from memx.models.config import ModelConfig, SSMConfig
from memx.models.transformer import TransformerLM
from memx.timing import feeding_back, interleaved_medians

# size → (d_model, n_layers, n_heads, n_kv_heads, vocab, context N, compute dtype)
SIZES = {"cpu": (512, 8, 8, 4, 8192, 1024, "float32"),
         "gpu": (2048, 16, 16, 8, 32000, 4096, "bfloat16"),
         "tiny": (64, 4, 2, 2, 264, 64, "float32")}  # tiny: the script's test
DRAFT_LENS = (1, 2, 4, 6, 8)
ACCEPTANCE = (0.6, 0.8, 0.9)


def expected_tokens(a: float, k: int) -> float:
  """E[tokens per round] for per-token acceptance a and k drafted tokens."""
  return float(k + 1) if a == 1.0 else (1 - a ** (k + 1)) / (1 - a)


def break_even(cost_ratio: float, k: int) -> float | None:
  """The acceptance a at which E(a, k) = cost_ratio (round cost / target step), by bisection;
  None when even a = 1 does not pay."""
  if expected_tokens(1.0, k) < cost_ratio:
    return None
  lo, hi = 0.0, 1.0
  for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if expected_tokens(mid, k) < cost_ratio else (lo, mid)
  return hi


def _configs(size: str):
  d, n_layers, heads, kv, vocab, n, dtype = SIZES[size]
  target = ModelConfig(vocab_size=vocab, d_model=d, n_layers=n_layers, n_heads=heads,
                       n_kv_heads=kv, compute_dtype=dtype, param_dtype=dtype)
  small = dict(d_model=d // 4, n_layers=max(1, n_layers // 4), n_heads=max(1, heads // 4),
               n_kv_heads=max(1, kv // 4))
  drafts = {"attention": dataclasses.replace(target, **small),
            "mamba2": dataclasses.replace(
                target, **small, mlp=False, mixers=("mamba2",) * small["n_layers"],
                ssm=SSMConfig(head_dim=min(64, d // 4)))}
  return target, drafts, n


def _timer(model: TransformerLM, n: int, calls: int, feed: int | None):
  """A no-argument timer of `calls` decode steps (feed None) or extends over `feed` tokens,
  each at position n - 1 of a cache of n + feed tokens, in one jit'd scan."""
  graphdef, state = nnx.split(model)
  room = n + (feed or 1)

  @jax.jit
  def prefill(state, prompt):
    return nnx.merge(graphdef, state).prefill(prompt, room, last_logits=True, full_cache=True)

  @functools.partial(jax.jit, donate_argnums=1)
  def run(state, cache, toks):
    m = nnx.merge(graphdef, state)
    start = jnp.asarray(n - 1, jnp.int32)

    def body(carry, _):
      cache, toks = carry
      cache = {**cache, "pos": start}
      if feed is None:
        logits, cache = m.decode_step(toks[:, 0], cache)
        nxt = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
      else:
        logits, cache, _ = m.extend(toks, cache)
        nxt = jnp.argmax(logits, -1).astype(jnp.int32)
      return (cache, nxt), None

    (cache, toks), _ = jax.lax.scan(body, (cache, toks), None, length=calls)
    return toks, cache

  _, cache = prefill(state, jnp.zeros((1, n - 1), jnp.int32))
  return feeding_back(run, (state, cache, jnp.zeros((1, feed or 1), jnp.int32)), 1, 1)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--size", default="cpu", choices=tuple(SIZES))
  ap.add_argument("--calls", type=int, default=16, help="calls per timed program")
  ap.add_argument("--repeats", type=int, default=7)
  args = ap.parse_args(argv)
  target_cfg, draft_cfgs, n = _configs(args.size)
  target = TransformerLM(target_cfg, rngs=nnx.Rngs(0))
  timers = {"target step": _timer(target, n, args.calls, None)}
  for k in DRAFT_LENS:
    timers[f"verify {k}"] = _timer(target, n, args.calls, k + 1)
  for name, cfg in draft_cfgs.items():
    timers[f"draft {name}"] = _timer(TransformerLM(cfg, rngs=nnx.Rngs(1)), n, args.calls, None)
  names = list(timers)
  medians = interleaved_medians([lambda t=timers[k]: t() for k in names], (), args.repeats)
  per_call = {k: s / args.calls for k, s in zip(names, medians, strict=True)}
  step = per_call["target step"]
  rows = [{"part": k, "ms": v * 1e3, "× target step": v / step} for k, v in per_call.items()]
  for name in draft_cfgs:
    for k in DRAFT_LENS:
      cost = (k + 1) * per_call[f"draft {name}"] + per_call[f"verify {k}"]
      row = {"part": f"round: {name} draft, k={k}", "ms": cost * 1e3, "× target step": cost / step}
      even = break_even(cost / step, k)
      row["break-even a"] = "never" if even is None else round(even, 3)
      for a in ACCEPTANCE:
        row[f"speedup a={a}"] = expected_tokens(a, k) * step / cost
      rows.append(row)
  keys = sorted({key for r in rows for key in r}, key=lambda c: list(rows[-1]).index(c))
  rows = [{key: r.get(key, "") for key in keys} for r in rows]
  settings = {"size": args.size, "target": dataclasses.asdict(target_cfg),
              "drafts": {k: dataclasses.asdict(v) for k, v in draft_cfgs.items()},
              "context": n, "batch": 1, "calls": args.calls, "repeats": args.repeats}
  print(write_results(args.out, "Speculative decoding: round parts", settings, rows))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
