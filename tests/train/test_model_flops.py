"""bench_train's model FLOP count vs XLA's own count of the compiled CPU train step.

On GPUs `cost_analysis` leaves out cuBLAS/cuDNN custom calls, so bench_train counts FLOPs from
the model; on the CPU every dot is an XLA op, which makes XLA's count an independent oracle.
It adds the elementwise work, the softmax and AdamW's update, a few percent at these sizes.
"""

import importlib.util
import pathlib

import jax
import pytest

SCRIPT = pathlib.Path(__file__).parents[2] / "scripts" / "bench_train.py"


@pytest.fixture(scope="module")
def bench_train():
  spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("size", [(128, 2, 4, 64, 8, 1), (256, 2, 4, 32, 8, 1)])
def test_model_flops_match_xla_cost_analysis_on_cpu(bench_train, size):
  cfg = bench_train.make_config(size, bf16=False)
  compiled, _, _, per_token = bench_train.compile_bare(cfg)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  tokens = cfg.train.batch_size * cfg.data.seq_len
  # The step is data-parallel over the test's 8 CPU devices: XLA counts one device's share.
  ratio = cost["flops"] * jax.device_count() / (per_token * tokens)
  assert 1.0 <= ratio <= 1.15, ratio
