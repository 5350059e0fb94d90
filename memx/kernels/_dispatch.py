"""The dispatch rule every kernel API shares: pick the first implementation that can serve.

`implementation` is None (the op's default order), one name (explicit: fail fast with the
reason), or a sequence of names (try in order, warning on each skip).
"""

import warnings
from collections.abc import Callable, Sequence

import jax


def gpu_backend() -> bool:
  """True when JAX's default backend is an NVIDIA GPU (CUDA)."""
  try:
    if jax.default_backend() != "gpu":
      return False
    return "cuda" in jax.devices()[0].client.platform_version.lower()
  except Exception:  # noqa: BLE001 - any backend probing failure means "not a CUDA GPU"
    return False


NEEDS_GPU = ("needs an NVIDIA GPU backend to compile; pass interpret=True to run the kernels in "
             "the Pallas interpreter")


def known_only(op: str, implementations: Sequence[str]) -> Callable[[str], None]:
  """The reason rule of an op whose implementations all serve every valid input: None for a
  known name, and an unknown one raises (a misspelt name in a list is no reason to skip on)."""
  def reason(name: str) -> None:
    if name not in implementations:
      raise NotImplementedError(f"{op}: unknown implementation {name!r}; available: "
                                f"{tuple(implementations)}")
  return reason


def portable_or_pallas_reason(op: str, name: str, implementations: Sequence[str], *,
                              interpret: bool, on_gpu: bool) -> str | None:
  """The reason rule of an op whose implementations are reference, xla and pallas_gpu with no
  input limits: pallas_gpu needs a GPU (or interpret=True); an unknown name raises.
  on_gpu: the api module's `gpu_backend()`, evaluated there (tests patch it per module)."""
  if name not in implementations:
    raise NotImplementedError(f"{op}: unknown implementation {name!r}; available: "
                              f"{tuple(implementations)}")
  if name == "pallas_gpu" and not interpret and not on_gpu:
    return NEEDS_GPU
  return None


def choose(op: str, implementation: str | Sequence[str] | None, default_order: Sequence[str],
           reason: Callable[[str], str | None], *,
           silent_default_skip: Callable[[int, str], bool] = lambda i, name: name != "pallas_gpu",
           stacklevel: int = 3) -> str:
  """Name of the implementation to run.

  Args:
    op: name used in messages.
    implementation: None, one name, or a sequence of names.
    default_order: the op's order for `implementation=None`.
    reason: name → why it cannot serve these inputs, or None when it can.
    silent_default_skip: (position, name) → True when skipping it in the *default* order is the
      rule rather than a fallback (e.g. a reference that is never the default choice); other
      default skips warn. Skips in an explicit sequence always warn.
    stacklevel: for warnings, so they point at the caller of the op.

  Raises:
    ValueError: an empty sequence.
    NotImplementedError: an explicit single choice cannot serve (with the reason), or nothing
      in the order can (with every reason).
  """
  single = isinstance(implementation, str)
  if implementation is None:
    order, explicit_sequence = tuple(default_order), False
  elif single:
    order, explicit_sequence = (implementation,), False
  else:
    order, explicit_sequence = tuple(implementation), True
    if not order:
      raise ValueError(f"{op}: implementation sequence is empty")
  errors = []
  for i, name in enumerate(order):
    why = reason(name)
    if why is None:
      return name
    if single:
      raise NotImplementedError(f"{op}[{name}]: {why}")
    errors.append(f"{name}: {why}")
    if explicit_sequence or not silent_default_skip(i, name):
      warnings.warn(f"{op}: skipping {name}: {why}", stacklevel=stacklevel)
  raise NotImplementedError(f"{op}: no usable implementation: " + "; ".join(errors))
