"""Which parameters a low-rank optimizer (GaLore, APOLLO) projects, and as which matrix.

A weight tensor is viewed as the matrix split where its smaller side is largest; the smaller
side is projected (from the left when rows <= cols, else from the right) when it exceeds the
rank. Anything else (vectors, thin matrices) keeps plain Adam moments.
"""

import math

import jax


def split(shape) -> int:
  """How many leading dims form the matrix's rows: the split whose smaller side is largest
  (ties: fewer). memx stores a projection's input dims first, so this finds [d, heads·k] for
  wq [d, heads, k] and [heads·k, d] for wo [heads, k, d], where a fixed split after the first
  dim would make wo [heads, k·d], too thin to project."""
  splits = range(1, len(shape))
  return max(splits, key=lambda i: (min(math.prod(shape[:i]), math.prod(shape[i:])), -i))


def dims(shape) -> tuple[int, int]:
  """(rows, cols) of the matrix view."""
  i = split(shape)
  return math.prod(shape[:i]), math.prod(shape[i:])


def plan(shape, rank: int) -> str:
  """"left", "right" or "adam" for a leaf of this shape."""
  if len(shape) < 2:
    return "adam"
  m, n = dims(shape)
  if min(m, n) <= rank:
    return "adam"
  return "left" if m <= n else "right"


def matrix(x):
  return x.reshape(dims(x.shape))


def plans(params, rank: int, eligible=None):
  """plan() per leaf of params; leaves eligible(params) marks False (a pytree of bools) get
  "adam"."""
  allowed = eligible(params) if eligible is not None else jax.tree.map(lambda _: True, params)
  return jax.tree.map(lambda p, ok: plan(p.shape, rank) if ok else "adam", params, allowed)
