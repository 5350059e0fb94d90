"""Validation of decode states handed back to a layer (chunked prefill continues from one)."""

import jax


def check_state(owner: str, state, make_empty) -> None:
  """Raises ValueError unless `state` has the keys and shapes of `make_empty()` (a layer's
  `init_cache` for the same batch), evaluated abstractly: nothing is allocated."""
  want = jax.eval_shape(make_empty)
  if not isinstance(state, dict) or set(state) != set(want):
    got = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise ValueError(f"{owner}: the state to continue from must be a dict with keys "
                     f"{sorted(want)} (the layer's init_cache), got {got}")
  for k, w in want.items():
    if tuple(getattr(state[k], "shape", ())) != tuple(w.shape):
      raise ValueError(f"{owner}: state[{k!r}] must have shape {tuple(w.shape)} (init_cache for "
                       f"this batch), got {tuple(getattr(state[k], 'shape', ()))}")
