"""attention(): the one entry point layers call; picks an implementation for the inputs."""

from typing import Literal

from memx.kernels.attention.mask import CAUSAL, Mask
from memx.kernels.attention.reference import attention_reference

Implementation = Literal["reference"]
_IMPLS = {"reference": attention_reference}


def _check_inputs(q, k, v):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention: q, k, v must be [B, T, H, D]; got shapes "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape[:3] + (k.shape[3],) or q.shape[0] != k.shape[0]:
    raise ValueError(f"attention: k {k.shape} and v {v.shape} must share [B, S, Hkv], and batch "
                     f"must match q {q.shape}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"attention: q and k head dims differ ({q.shape[3]} vs {k.shape[3]})")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"attention: query heads ({q.shape[2]}) must be a multiple of kv heads "
                     f"({k.shape[2]})")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")


def attention(q, k, v, *, mask: Mask = CAUSAL, segment_ids=None, scale=None,
              implementation: Implementation | None = None, interpret: bool = False,
              block_sizes=None):
  """Softmax attention, q [B, T, Hq, D], k/v [B, S, Hkv, D]; see reference for the math."""
  del interpret, block_sizes
  _check_inputs(q, k, v)
  name = "reference" if implementation is None else implementation
  if name not in _IMPLS:
    raise NotImplementedError(f"attention: unknown implementation {name!r}; "
                              f"available: {sorted(_IMPLS)}")
  return _IMPLS[name](q, k, v, mask=mask, segment_ids=segment_ids, scale=scale)
