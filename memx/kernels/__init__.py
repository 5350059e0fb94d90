"""Pure-JAX kernels: each op has a reference oracle, fast implementations and one dispatching API.

Import only jax, numpy, einops and jaxtyping here: never flax.
"""

from jax import checkpoint_policies as _policies

# Names (jax.ad_checkpoint.checkpoint_name) that memx kernels give the forward results their
# custom backward passes need: attention's output and log-sum-exp; SSD's output, chunk-entry
# states and final state (sequence parallelism corrects each device's output with the final
# states of the devices before it). Under jax.checkpoint, a policy that saves them
# (`save_kernel_results`) keeps these results instead of rerunning the kernel's forward pass
# to rebuild them; without a checkpoint the names do nothing.
ATTENTION_OUT, ATTENTION_LSE = "attention_out", "attention_lse"
SSD_OUT, SSD_STATES, SSD_FINAL_STATE = "ssd_out", "ssd_states", "ssd_final_state"
KERNEL_RESULTS = (ATTENTION_OUT, ATTENTION_LSE, SSD_OUT, SSD_STATES, SSD_FINAL_STATE)

# cuDNN's fused attention (jax.nn.dot_product_attention) does not name its residuals: its
# forward primitive is matched by name instead (jax._src.cudnn.fused_attention_stablehlo).
_CUDNN_ATTENTION_FORWARD = "dot_product_attention_fwd_wrapper"


def _cudnn_attention_forward(prim, *_, **__) -> bool:
  return prim.name == _CUDNN_ATTENTION_FORWARD


# A jax.checkpoint policy: save the memx kernels' named forward results and cuDNN attention's
# forward outputs, recompute everything else.
save_kernel_results = _policies.save_from_both_policies(
    _policies.save_only_these_names(*KERNEL_RESULTS), _cudnn_attention_forward)
