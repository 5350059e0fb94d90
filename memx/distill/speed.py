"""Prefill and decode cost of a model at one sequence length: time, compiled memory, state bytes.

Shared by scripts/bench_distill.py and the distillation experiment (experiments/distill). Times
are medians of compiled calls after a warm-up call, each ended by block_until_ready; memory is
XLA's memory_analysis of the compiled prefill (temporaries + outputs: activations and the
returned decode state; parameters excluded); the decode state is counted exactly in bytes.
"""

import sys
import time
import traceback

import jax
import jax.numpy as jnp
from flax import nnx

from memx.models.config import ModelConfig
from memx.models.decode import cache_bytes
from memx.models.transformer import TransformerLM, count_params
from memx.timing import feeding_back, median_time


def measure(name: str, cfg: ModelConfig, length: int, *, batch: int = 1, repeats: int = 3,
            budget_s: float = 10.0, mem_limit: int | None = None,
            model: TransformerLM | None = None, decode_tokens: int = 16,
            prefill_chunk: int | None = None, timed: bool = True) -> dict:
  """{"model", "length", "prefill_chunk", "compile_s" (the prefill's trace + compile), "prefill_s",
  "prefill_bytes", "decode_s",
  "state_bytes", "params", "prefill_status"} of `cfg` (random weights unless `model` is given)
  at `length` tokens. decode_s is seconds per token: `decode_tokens` steps in one compiled
  scan, divided. prefill_chunk: prefill in chunks of that many tokens (`TransformerLM.prefill`'s
  chunk_size; None = the whole prompt at once). timed=False only compiles: memory and state
  bytes, no times (exact on any backend, so CPU can read the memory of GPU-sized models)."""
  row = {"model": name, "length": length, "prefill_chunk": prefill_chunk}
  decode_tokens = max(1, min(decode_tokens, length))
  if model is None:  # untimed: shapes suffice, nothing is allocated
    make = lambda: TransformerLM(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    model = make() if timed else nnx.eval_shape(make)
  graphdef, state = nnx.split(model)
  tokens = jnp.zeros((batch, length), jnp.int32)

  def prefill(state, tokens):
    return nnx.merge(graphdef, state).prefill(tokens, length, chunk_size=prefill_chunk,
                                              last_logits=True)

  def decode(state, token, cache):
    # `decode_tokens` steps in one compiled scan, as memx.models.decode.generate runs them:
    # a host call per token would add its dispatch and argument flattening (~0.3-0.9 ms on an
    # H200, more than the device time of these steps) to every token. The cache is donated and
    # fed back (`feeding_back`), so no call copies it; every call decodes the same last
    # positions, where each step's attention reads (nearly) the whole cache.
    m = nnx.merge(graphdef, state)
    cache = {**cache, "pos": jnp.asarray(length - decode_tokens, jnp.int32)}

    def body(carry, _):
      token, cache = carry
      logits, cache = m.decode_step(token, cache)
      return (jnp.argmax(logits, -1).astype(token.dtype), cache), None

    (token, cache), _ = jax.lax.scan(body, (token, cache), None, length=decode_tokens)
    return token, cache

  try:
    t0 = time.perf_counter()
    compiled = jax.jit(prefill).lower(state, tokens).compile()
    row["compile_s"] = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    if ma is not None:
      row["prefill_bytes"] = int(ma.temp_size_in_bytes + ma.output_size_in_bytes)
    if not timed:
      row["prefill_status"] = "ok"
    elif mem_limit and row.get("prefill_bytes", 0) > 0.9 * mem_limit:
      row["prefill_status"] = f"skipped: needs {row['prefill_bytes'] / 2**30:.1f} GiB"
    else:
      row["prefill_s"] = median_time(compiled, (state, tokens), repeats, budget_s)
      row["prefill_status"] = "ok"
  except Exception as e:  # noqa: BLE001 - record and go on (e.g. out of memory)
    row["prefill_status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
    traceback.print_exc(file=sys.stderr)
  try:
    cache = (model.init_cache(batch, length) if timed else
             jax.eval_shape(lambda: model.init_cache(batch, length)))
    row["state_bytes"] = cache_bytes(cache)
    if timed:
      token = jnp.zeros((batch,), jnp.int32)
      step = jax.jit(decode, donate_argnums=2).lower(state, token, cache).compile()
      row["decode_s"] = (median_time(feeding_back(step, (state, token, cache), 2, 1), (),
                                     repeats, budget_s) / decode_tokens)
  except Exception as e:  # noqa: BLE001
    row["decode_status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
    traceback.print_exc(file=sys.stderr)
  row["params"] = count_params(model)
  return row


def fmt_ms(s):
  return "–" if s is None else f"{s * 1e3:.1f}"


def fmt_bytes(b):
  if b is None:
    return "–"
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if b >= size:
      return f"{b / size:.1f} {unit}"
  return f"{b} B"


def _less(fraction: float, digits: int) -> str:
  """0.25 → "25% less", -0.4 → "40% more"."""
  return f"{100 * abs(fraction):.{digits}f}% {'less' if fraction >= 0 else 'more'}"


def summarize(rows: list[dict], names: list[str]) -> list[str]:
  """Crossover length and the ratios at the longest length both models ran, per student (with
  memory-only rows: the memory ratios at the longest length both compiled)."""
  by = {(r["model"], r["length"]): r for r in rows}
  lengths = sorted({r["length"] for r in rows})
  timed = any(r.get("prefill_s") for r in rows)
  key = "prefill_s" if timed else "prefill_bytes"
  lines = []
  for student in names[1:]:
    both = [n for n in lengths if by.get(("teacher", n), {}).get(key)
            and by.get((student, n), {}).get(key)]
    if not both:
      lines.append(f"{student}: no length where both ran")
      continue
    n = both[-1]
    t, s = by[("teacher", n)], by[(student, n)]
    mem = 1 - s["prefill_bytes"] / t["prefill_bytes"] if t.get("prefill_bytes") else None
    dec = 1 - s["state_bytes"] / t["state_bytes"] if t.get("state_bytes") else None
    if timed:
      faster = [m for m in both if by[(student, m)][key] < by[("teacher", m)][key]]
      cross = f"{faster[0]}" if faster else f"none up to {both[-1]}"
      head = (f"{student}: prefill crossover at L = {cross}; at L = {n}: prefill "
              f"{t['prefill_s'] / s['prefill_s']:.2f}x faster, ")
    else:
      head = f"{student}: at L = {n} (compiled, not run): "
    lines.append(
        head + ("–" if mem is None else f"{_less(mem, 1)} prefill memory")
        + ("" if dec is None else f", {100 * dec:.1f}% smaller decode state")
        + (f", decode step {t['decode_s'] / s['decode_s']:.2f}x faster"
           if t.get("decode_s") and s.get("decode_s") else ""))
  return lines


def best_of_modes(rows_by_mode: dict[str, list[dict]], names: list[str]) -> list[str]:
  """Each model at its best prefill mode (whole or chunked), at the longest length the teacher
  ran in every mode: the fastest against the fastest and the leanest against the leanest, so
  that a slow chunked teacher never flatters a student."""
  if len(rows_by_mode) < 2:
    return []
  by = {(mode, r["model"], r["length"]): r for mode, rows in rows_by_mode.items() for r in rows}

  def best(model, n, key):
    got = [(by[(m, model, n)][key], m) for m in rows_by_mode
           if by.get((m, model, n), {}).get(key)]
    return min(got) if len(got) == len(rows_by_mode) else None

  lines = []
  for student in names[1:]:
    both = sorted({n for (_, model, n) in by if model == student
                   and best("teacher", n, "prefill_bytes") and best(student, n, "prefill_bytes")})
    if not both:
      continue
    n = both[-1]
    parts = []
    t, s = best("teacher", n, "prefill_s"), best(student, n, "prefill_s")
    if t and s:
      parts.append(f"fastest prefill {t[0] / s[0]:.2f}x faster (teacher {t[1]} "
                   f"{fmt_ms(t[0])} ms, {student} {s[1]} {fmt_ms(s[0])} ms)")
    t, s = best("teacher", n, "prefill_bytes"), best(student, n, "prefill_bytes")
    parts.append(f"leanest prefill {_less(1 - s[0] / t[0], 1)} memory (teacher {t[1]} "
                 f"{fmt_bytes(t[0])}, {student} {s[1]} {fmt_bytes(s[0])})")
    lines.append(f"best of each mode: {student} at L = {n}: " + "; ".join(parts))
  return lines


def markdown(rows: list[dict], names: list[str]) -> str:
  out = ["| L | model | prefill ms | prefill memory | decode ms/token | decode state | "
         "prefill time vs teacher | prefill memory vs teacher |",
         "|---|---|---|---|---|---|---|---|"]
  by = {(r["model"], r["length"]): r for r in rows}
  for n in sorted({r["length"] for r in rows}):
    t = by.get(("teacher", n), {})
    for name in names:
      r = by.get((name, n))
      if r is None:
        continue
      ratio = mem = "–"
      if name != "teacher" and t.get("prefill_s") and r.get("prefill_s"):
        ratio = f"{t['prefill_s'] / r['prefill_s']:.2f}x faster"
      if name != "teacher" and t.get("prefill_bytes") and r.get("prefill_bytes"):
        mem = _less(1 - r["prefill_bytes"] / t["prefill_bytes"], 0)
      status = "" if r.get("prefill_status", "ok") == "ok" else f" ({r['prefill_status']})"
      out.append(f"| {n} | {name} | {fmt_ms(r.get('prefill_s'))}{status} | "
                 f"{fmt_bytes(r.get('prefill_bytes'))} | {fmt_ms(r.get('decode_s'))} | "
                 f"{fmt_bytes(r.get('state_bytes'))} | {ratio} | {mem} |")
  return "\n".join(out)
