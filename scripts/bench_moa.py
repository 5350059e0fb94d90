"""Benchmark MoA plans against dense and a uniform window at the same density, one run.

Prefill: forward+backward of the attention kernel (memx.kernels.attention.attention, the
implementation dispatch picks) for a dense causal mask, a MoA-style heterogeneous plan and a
uniform window + sinks (StreamingLLM), both at `--density` of the causal pairs (exact, from
memx.sparse.rules). Median wall time of timed calls after warm-up, and XLA's compiled temporary
bytes. Decode: a TransformerLM with those masks in every layer, `decode` single-token steps after
a prompt of S - decode tokens (jit'd lax.scan, median of repeats), and the exact KV-cache bytes
of dense vs per-head ring caches (memx.models.decode.kv_cache_bytes).

The MoA-style plan here is synthetic (no trained model to profile in a benchmark): per head a
span β_h·N with β_h on a geometric ladder over a factor `--spread`, plus 4 sinks, scaled so the
mean density hits the budget, and one head in eight full; what the kernels see (heterogeneous
per-head windows) is what a searched plan gives them. `moa_kv` runs the same ladder over KV
groups (heads sharing a KV head share a rule), the shape a KV-budgeted search favours: its KV
cache is then its density, not its groups' widest members. With --equal-kv each sparse method
also decodes at the largest batch whose KV cache fits in dense's, the comparison behind MoA's
decode-throughput claim (a smaller cache serves more sequences at once).

  python scripts/bench_moa.py --out /tmp/bench_moa                  # CPU defaults (S = 2048)
  python scripts/bench_moa.py --out $OUT/bench_moa --size gpu       # S = 16384, H = 16, bf16
"""

import argparse
import datetime
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memx._io import atomic_file, write_json
from memx.kernels.attention import CAUSAL, attention, elastic_mask
from memx.models.config import ModelConfig
from memx.models.decode import kv_cache_bytes
from memx.models.transformer import TransformerLM
from memx.sparse.evaluate import decode_tokens_per_s
from memx.sparse.plan import uniform_plan
from memx.sparse.rules import Rule, density
from memx.timing import median_time

SIZES = {
    # batch, length, query heads, kv heads, head dim, dtype, decode batch, decode layers
    "cpu": dict(b=1, s=2048, h=8, g=4, d=64, dtype="float32", decode_batch=1, layers=2),
    "gpu": dict(b=1, s=16384, h=16, g=8, d=128, dtype="bfloat16", decode_batch=8, layers=4),
}


def moa_rules(n_heads: int, length: int, budget: float, *, spread: float = 16.0,
              n_sink: int = 4, share: int = 1) -> list[Rule]:
  """Heterogeneous rules (every 8th head full) whose mean density is just under budget.

  share > 1 gives each run of `share` consecutive heads (a GQA group) one rule: the ladder
  runs over groups. A per-head ring cache keeps each KV head's widest query head, so a plan
  whose group members differ pays the widest span for the whole group; a KV-budgeted search
  (`search_plan(kv_budget=...)`) steers toward such shared spans, this is its synthetic form.
  """
  groups = n_heads // share
  shape = np.repeat(np.geomspace(1.0, spread, groups), share)

  def make(scale):  # every 8th group full (fewer than 8 groups: none)
    return [Rule.full() if (h // share) % 8 == 7 else Rule(0.0, float(min(1.0, scale * x)),
                                                              n_sink)
            for h, x in enumerate(shape)]

  def mean(scale):
    return float(np.mean([density(r, length) for r in make(scale)]))

  if mean(0.0) > budget:
    raise SystemExit(f"density {budget} is below what {n_heads // 8} full heads need")
  lo, hi = 0.0, 1.0
  for _ in range(50):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if mean(mid) <= budget else (lo, mid)
  return make(lo)


def prefill(mask, cfg, repeats: int) -> dict:
  dt = jnp.dtype(cfg["dtype"])
  k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(k0, (cfg["b"], cfg["s"], cfg["h"], cfg["d"]), dt)
  k = jax.random.normal(k1, (cfg["b"], cfg["s"], cfg["g"], cfg["d"]), dt)
  v = jax.random.normal(k2, (cfg["b"], cfg["s"], cfg["g"], cfg["d"]), dt)

  def loss(q, k, v):
    return jnp.sum(attention(q, k, v, mask=mask).astype(jnp.float32))

  fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  compiled = fn.lower(q, k, v).compile()
  mem = compiled.memory_analysis()
  return {"fwd_bwd_s": median_time(compiled, (q, k, v), repeats),
          "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0))}


def decode_config(plan_rules, cfg) -> ModelConfig:
  """The decode benchmark's TransformerLM: the size's dims, the rules in every layer."""
  base = ModelConfig(vocab_size=256, d_model=cfg["h"] * cfg["d"], n_layers=cfg["layers"],
                     n_heads=cfg["h"], n_kv_heads=cfg["g"], compute_dtype=cfg["dtype"],
                     param_dtype=cfg["dtype"])
  if plan_rules is None:
    return base
  return ModelConfig(**{**base.__dict__, "attn_plan": tuple(
      tuple(r.as_tuple() for r in plan_rules) for _ in range(cfg["layers"]))})


def decode(plan_rules, cfg, new_tokens: int, repeats: int, batch: int | None = None) -> dict:
  """Decode tokens/s over `batch` sequences (default: the size's decode batch) and the exact
  KV-cache bytes they hold. Batches past the size's prefill their prompts in chunks of 2048,
  so that the prefill's activations stay those of the default batch or less."""
  batch = batch or cfg["decode_batch"]
  mc = decode_config(plan_rules, cfg)
  model = TransformerLM(mc, rngs=nnx.Rngs(0))
  chunk = 2048 if batch > cfg["decode_batch"] and cfg["s"] > 2048 else None
  tps = decode_tokens_per_s(model, cfg["s"], new_tokens=new_tokens, batch=batch,
                            repeats=repeats, prefill_chunk=chunk)
  return {"decode_tokens_per_s": tps, "decode_batch": batch,
          "kv_bytes": kv_cache_bytes(mc, cfg["s"], batch)}


def equal_kv_batch(plan_rules, cfg, kv_budget: int) -> int:
  """The most sequences whose KV caches fit in `kv_budget` bytes (at least 1): how MoA compares
  decode throughput, each method at the batch its memory allows."""
  return max(1, kv_budget // kv_cache_bytes(decode_config(plan_rules, cfg), cfg["s"], 1))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--size", default=None, choices=list(SIZES),
                  help="default: gpu on a GPU backend, else cpu")
  ap.add_argument("--density", type=float, default=0.25)
  ap.add_argument("--length", type=int, default=None, help="override the size's S")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--decode-tokens", type=int, default=32)
  ap.add_argument("--no-decode", action="store_true")
  ap.add_argument("--equal-kv", action="store_true",
                  help="also decode each sparse method at the batch whose KV cache fits in "
                       "dense's (MoA's throughput comparison)")
  args = ap.parse_args()
  size = args.size or ("gpu" if jax.default_backend() == "gpu" else "cpu")
  cfg = dict(SIZES[size])
  if args.length:
    cfg["s"] = args.length
  s, h = cfg["s"], cfg["h"]
  moa = moa_rules(h, s, args.density)
  moa_kv = moa_rules(h, s, args.density, share=h // cfg["g"])
  mc = ModelConfig(vocab_size=256, d_model=h * cfg["d"], n_layers=1, n_heads=h,
                   n_kv_heads=cfg["g"])
  uni = list(uniform_plan(mc, args.density, [s]).layers[0])
  methods = {"dense": None, "moa": moa, "moa_kv": moa_kv, "uniform": uni}
  out = pathlib.Path(args.out)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
  header = {"date": datetime.datetime.now(datetime.UTC).isoformat(), "commit": commit,
            "size": size, "config": cfg, "density_target": args.density}
  rows = {}
  for name, rules in methods.items():
    mask = CAUSAL if rules is None else elastic_mask([r.as_tuple() for r in rules], s)
    row = {"density": 1.0 if rules is None else float(np.mean([density(r, s) for r in rules]))}
    row |= prefill(mask, cfg, args.repeats)
    if not args.no_decode:
      row |= decode(rules, cfg, args.decode_tokens, max(3, args.repeats // 2))
      if args.equal_kv and rules is not None:
        batch = equal_kv_batch(rules, cfg, rows["dense"]["kv_bytes"])
        try:
          same = decode(rules, cfg, args.decode_tokens, max(3, args.repeats // 2), batch)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: keep the other rows
          same = {"decode_batch": batch, "error": f"{type(e).__name__}: {str(e)[:200]}"}
          print(f"{name} at batch {batch}: {same['error']}", flush=True)
        row |= {"equal_kv_" + k: v for k, v in same.items()}
    rows[name] = row
    print(name, row, flush=True)
    # After every method: a time limit keeps the rows that finished.
    write_json(out / "bench_moa.json", {**header, "rows": rows}, indent=1)
  d = rows["dense"]
  lines = [f"S = {s}, H = {h}, KV heads {cfg['g']}, D = {cfg['d']}, {cfg['dtype']}, "
           f"{jax.devices()[0].device_kind}",
           "", "| method | density | fwd+bwd ms | × dense | temp MiB | × dense | decode tok/s | "
           "× dense | KV MiB | × dense |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in rows.items():
    cells = [name, f"{r['density']:.3f}", f"{1e3 * r['fwd_bwd_s']:.1f}",
             f"{r['fwd_bwd_s'] / d['fwd_bwd_s']:.2f}", f"{r['temp_bytes'] / 2**20:.1f}",
             f"{r['temp_bytes'] / max(d['temp_bytes'], 1):.2f}"]
    if "decode_tokens_per_s" in r:
      cells += [f"{r['decode_tokens_per_s']:.0f}",
                f"{r['decode_tokens_per_s'] / d['decode_tokens_per_s']:.2f}",
                f"{r['kv_bytes'] / 2**20:.2f}", f"{r['kv_bytes'] / d['kv_bytes']:.3f}"]
    else:
      cells += ["–"] * 4
    lines.append("| " + " | ".join(cells) + " |")
  if any("equal_kv_decode_batch" in r for r in rows.values()):
    lines += ["", f"Decode at dense's KV memory ({d['kv_bytes'] / 2**20:.1f} MiB for "
              f"{d['decode_batch']} sequences): each method at the batch that fits it.", "",
              "| method | batch | KV MiB | decode tok/s | × dense |", "|---|---:|---:|---:|---:|",
              f"| dense | {d['decode_batch']} | {d['kv_bytes'] / 2**20:.2f} | "
              f"{d['decode_tokens_per_s']:.0f} | 1.00 |"]
    for name, r in rows.items():
      if "equal_kv_error" in r:
        lines.append(f"| {name} | {r['equal_kv_decode_batch']} | – | failed: "
                     f"{r['equal_kv_error'][:60]} | – |")
      elif "equal_kv_decode_tokens_per_s" in r:
        tps = r["equal_kv_decode_tokens_per_s"]
        lines.append(f"| {name} | {r['equal_kv_decode_batch']} | "
                     f"{r['equal_kv_kv_bytes'] / 2**20:.2f} | {tps:.0f} | "
                     f"{tps / d['decode_tokens_per_s']:.2f} |")
  table = "\n".join(lines)
  print(table)
  with atomic_file(out / "bench_moa.md") as f:
    f.write(table + "\n")


if __name__ == "__main__":
  main()
