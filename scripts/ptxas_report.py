"""Registers, spills and shared memory of memx's Pallas GPU kernels, without a GPU.

Lowers a kernel family for CUDA on the CPU (as the lowering tests do), captures each kernel's
Triton IR, compiles it for sm_90a with the pip `triton` package and reads `ptxas -v`. A tile
that spills registers rarely wins on an H100, so this prunes a GPU sweep before it costs device
time (session 8: the default attention dK/dV tile, 64 x 128 at 8 warps, spills ~580 B).

The compiler here is pip Triton's, not the one inside jaxlib: registers can differ by a few,
spills of hundreds of bytes rarely do. Needs `pip install triton` (any recent version with its
bundled ptxas); reads jax internals (the Pallas-Triton lowering hook), so a jax upgrade may need
this script adjusted.

  .venv/bin/python scripts/ptxas_report.py --family attention --seq 4096
  .venv/bin/python scripts/ptxas_report.py --family ssd --seq 16384
  .venv/bin/python scripts/ptxas_report.py --family ternary --sass /tmp/sass
  .venv/bin/python scripts/ptxas_report.py --family conv --seq 65536
  .venv/bin/python scripts/ptxas_report.py --family kv_quant --seq 16384
"""

import argparse
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from memx.kernels import _testing


def _capture_triton_modules():
  """Patches the Pallas-Triton lowering to record (kernel name, Triton IR text) per kernel."""
  from jax._src.pallas.triton import gpu_info  # noqa: PLC0415 - jax internals
  from jax._src.pallas.triton import pallas_call_registration as reg  # noqa: PLC0415
  reg.gpu_info_lib.get_gpu_info = lambda: gpu_info.GpuInfo(
      gpu_version=None, arch_name="9.0", compute_capability=90)
  modules, lower = [], reg.lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = lower(*args, **kwargs)
    text = result.module.operation.get_asm()
    name = text.split("tt.func public @")[1].split("(")[0] if "tt.func public @" in text else "?"
    modules.append((name, text))
    return result

  reg.lowering.lower_jaxpr_to_triton_module = capture
  return modules


def _ptxas(ir_text: str, num_warps: int, num_stages: int, sass: pathlib.Path | None = None) -> str:
  import triton  # noqa: PLC0415 - optional: only this script needs it
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415
  ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "k.ttir"
    path.write_text(ir_text)
    k = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    (path.with_suffix(".ptx")).write_text(k.asm["ptx"])
    err = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(path.with_suffix(".ptx")),
                          "-o", str(path.with_suffix(".cubin"))],
                         capture_output=True, text=True).stderr
    if sass is not None:  # the instructions themselves, to count what an inner loop issues
      sass.write_text(subprocess.run([str(ptxas.parent / "cuobjdump"), "-sass",
                                      str(path.with_suffix(".cubin"))],
                                     capture_output=True, text=True).stdout)
  regs = next((line.split("Used ")[1].split(" registers")[0] for line in err.splitlines()
               if "registers" in line), "?")
  spill = next((line.split(",")[1].strip().split(" ")[0] for line in err.splitlines()
                if "spill stores" in line), "?")
  return f"regs {regs:>3}  spill stores {spill:>5} B  smem {k.metadata.shared:6d} B"


def attention_candidates():
  from memx.kernels.attention import BlockSizes  # noqa: PLC0415
  return {"default": BlockSizes(), "kv64x64": BlockSizes(block_k_dkv=64),
          "kv32x128_s3": BlockSizes(block_q_dkv=32, num_stages_bwd=3)}


def lower_attention(blocks, seq: int):
  from memx.kernels.attention import CAUSAL  # noqa: PLC0415
  from memx.kernels.attention.pallas_gpu import attention_pallas_gpu  # noqa: PLC0415
  q = jax.ShapeDtypeStruct((1, seq, 16, 128), jnp.bfloat16)

  def loss(q, k, v):
    return attention_pallas_gpu(q, k, v, mask=CAUSAL, block_sizes=blocks).astype(
        jnp.float32).sum()
  jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(q, q, q).lower(
      lowering_platforms=("cuda",))
  b = blocks
  warps = b.num_warps_fwd or 8, b.num_warps_bwd or 8   # head dim 128: 8 warps by default
  return {"memx_attention_fwd": (warps[0], b.num_stages_fwd),
          "memx_attention_dkv": (warps[1], b.num_stages_bwd),
          "memx_attention_dq": (warps[1], b.num_stages_bwd)}


def ssd_candidates():
  from memx.kernels.ssd import BlockSizes  # noqa: PLC0415
  return {"sequential": BlockSizes(state_pass="sequential"),
          "parallel": BlockSizes(state_pass="parallel"),
          "seq bp128 bn16 w8": BlockSizes(state_pass="sequential", block_p=128, block_n=16,
                                          num_warps=8),
          "bwd bp16": BlockSizes(block_p_bwd=16)}


def lower_ssd(blocks, seq: int):
  from memx.kernels.ssd.api import _chunked  # noqa: PLC0415
  b, h, p, n = 1, 16, 128, 128
  args = (jax.ShapeDtypeStruct((b, seq, h, p), jnp.bfloat16),
          jax.ShapeDtypeStruct((b, seq, h), jnp.float32),
          jax.ShapeDtypeStruct((b, seq, h), jnp.float32),
          jax.ShapeDtypeStruct((b, seq, 1, n), jnp.bfloat16),
          jax.ShapeDtypeStruct((b, seq, 1, n), jnp.bfloat16),
          jax.ShapeDtypeStruct((h,), jnp.float32),
          jax.ShapeDtypeStruct((b, h, p, n), jnp.float32))

  def loss(x, dt, log_a, bm, cm, d, h0):
    y, last = _chunked("pallas_gpu", x, dt, log_a, bm, cm, d, h0, None, block_sizes=blocks,
                       interpret=False)
    return y.astype(jnp.float32).sum() + last.sum()
  # value_and_grad: the loss needs y, so the output kernel is not dead code in the forward.
  jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))).trace(*args).lower(
      lowering_platforms=("cuda",))
  fwd = (blocks.num_warps or 4, blocks.num_stages)
  out = (blocks.forward_warps(min(blocks.chunk, seq)), blocks.num_stages)
  bwd = (blocks.num_warps_bwd, blocks.num_stages_bwd)
  return {"memx_ssd_state_fwd": fwd, "memx_ssd_out_fwd": out, "memx_ssd_chunk_states": fwd,
          "memx_ssd_state_scan": fwd, "memx_ssd_state_bwd": bwd, "memx_ssd_chunk_bwd": bwd,
          "memx_ssd_chunk_states_bwd": bwd, "memx_ssd_state_scan_bwd": bwd}


def ternary_candidates():
  from memx.kernels.ternary import BlockSizes  # noqa: PLC0415
  vec = {f"vector n{n}k{k} s4": BlockSizes(block_n=n, block_k=k, split_k=4, vector=True)
         for n, k in ((64, 256), (128, 128), (256, 64), (32, 512))}
  return {"default": None,
          "dot s8": BlockSizes(block_m=16, block_n=64, block_k=256, split_k=8), **vec}


def lower_ternary(blocks, seq: int):
  """The decode matmul (M = 1, K = N = 4096) with int8 and bf16 activations, on packed bytes
  and on int32 words; seq unused."""
  from memx.kernels.ternary import BlockSizes, packed_matmul_pallas_gpu  # noqa: PLC0415
  del seq
  weights = (jax.ShapeDtypeStruct((1024, 4096), jnp.uint8),
             jax.ShapeDtypeStruct((1024, 1024), jnp.int32))
  for dtype in (jnp.int8, jnp.bfloat16):
    x = jax.ShapeDtypeStruct((1, 4096), dtype)
    for w in weights:
      jax.jit(lambda x, w: packed_matmul_pallas_gpu(x, w, block_sizes=blocks)).trace(
          x, w).lower(lowering_platforms=("cuda",))
  b = blocks or BlockSizes.get_default("pallas_gpu", rows=1)
  return {"ternary_packed_matmul": (b.num_warps, b.num_stages),
          "ternary_packed_matmul_words": (b.num_warps, b.num_stages)}


def conv_candidates():
  from memx.kernels.short_conv import BlockSizes  # noqa: PLC0415
  return {"default": BlockSizes(),
          "t64w8 bwd t8w4": BlockSizes(block_t=64, num_warps=8, block_t_bwd=8,
                                           num_warps_bwd=4),
          "t16w4 bwd t32w8": BlockSizes(block_t=16, block_t_bwd=32),
          "c256 w8": BlockSizes(block_c=256, num_warps=8),
          "fused bwd": BlockSizes(backward="fused")}


def lower_conv(blocks, seq: int):
  """Mamba-2's x conv at d_inner 2048, bf16, SiLU fused: forward and backward (two-pass by
  default: the g kernel and the dx kernel; `fused bwd`: one kernel)."""
  from memx.kernels.short_conv import causal_conv_pallas_gpu  # noqa: PLC0415
  x = jax.ShapeDtypeStruct((1, seq, 2048), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((4, 2048), jnp.bfloat16)
  b = jax.ShapeDtypeStruct((2048,), jnp.bfloat16)

  def loss(x, w, b):
    return causal_conv_pallas_gpu(x, w, b, activation="silu", block_sizes=blocks).astype(
        jnp.float32).sum()
  jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(x, w, b).lower(
      lowering_platforms=("cuda",))
  return {"memx_causal_conv_fwd": (blocks.num_warps, 1),
          "memx_causal_conv_bwd": (blocks.num_warps_bwd, 1),
          "memx_causal_conv_grad": (blocks.num_warps_bwd, 1),
          "memx_causal_conv_dx": (blocks.num_warps, 1)}


def kv_quant_candidates():
  return {f"b{bits} w{w} s{st}": (bits, w, st) for bits in (4, 2) for w, st in ((4, 2), (4, 3),
                                                                                 (8, 2))}


def lower_kv_quant(option, seq: int):
  """The quantized decode kernel (`memx.kernels.kv_quant`): a cache of `seq` tokens, 8 KV heads
  of 128 with 4 query heads each (rows padded to 16), bf16, groups of 32, 4 splits."""
  from memx.kernels.kv_quant import KVQuant, init_quant_cache  # noqa: PLC0415
  from memx.kernels.kv_quant.pallas_gpu import quantized_part  # noqa: PLC0415
  bits, warps, stages = option
  spec = KVQuant(bits, 32)
  cache = jax.eval_shape(lambda: init_quant_cache(spec, 1, seq, 8, 128, jnp.bfloat16))
  q = jax.ShapeDtypeStruct((1, 8, 16, 128), jnp.bfloat16)
  jax.jit(lambda q, c, p: quantized_part(q, c, p, left=None, sink=0, scale=128 ** -0.5,
                                         splits=4, num_warps=warps, num_stages=stages)).trace(
      q, cache, jax.ShapeDtypeStruct((), jnp.int32)).lower(lowering_platforms=("cuda",))
  return {"memx_kv_quant_decode": (warps, stages)}


FAMILIES = {"attention": (attention_candidates, lower_attention),
            "kv_quant": (kv_quant_candidates, lower_kv_quant),
            "conv": (conv_candidates, lower_conv),
            "ssd": (ssd_candidates, lower_ssd),
            "ternary": (ternary_candidates, lower_ternary)}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--family", choices=sorted(FAMILIES), required=True)
  ap.add_argument("--seq", type=int, default=4096)
  ap.add_argument("--sass", help="also write each kernel's SASS (cuobjdump -sass) into this folder")
  args = ap.parse_args(argv)
  try:
    import triton  # noqa: F401, PLC0415
  except ImportError:
    print("ptxas_report needs the pip `triton` package: .venv/bin/pip install triton",
          file=sys.stderr)
    return 2
  modules = _capture_triton_modules()
  candidates, lower = FAMILIES[args.family]
  for name, blocks in candidates().items():
    modules.clear()
    with jax.sharding.use_abstract_mesh(_testing.abstract_h100_mesh()):
      launch = lower(blocks, args.seq)
    for i, (kernel, ir_text) in enumerate(modules):
      warps, stages = launch.get(kernel, (4, 2))
      sass = None
      if args.sass:
        pathlib.Path(args.sass).mkdir(parents=True, exist_ok=True)
        sass = pathlib.Path(args.sass) / f"{name.replace(' ', '_')}.{kernel}.{i}.sass"
      print(f"{name:20s} {kernel:28s} w{warps} s{stages}  "
            f"{_ptxas(ir_text, warps, stages, sass)}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
