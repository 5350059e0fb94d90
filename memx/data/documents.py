"""Document masks: training windows that span documents, trained as separate documents.

LM rows are random windows of a token stream in which documents follow each other, separated
by an end-of-document token. With `data.document_mask`, a row carries segment ids (tokens see
only their own document: attention masks, SSM and recurrent states restart) and positions that
restart at each document (RoPE sees each document from 0). The separator opens the next
document, as a BOS would: the last token of a document predicts the separator within its
document, and the separator predicts the next document's first token from nothing else.
"""

import numpy as np
from jaxtyping import Int

from memx.errors import ConfigError

MODEL_KEYS = ("positions", "segment_ids")


def document_layout(inputs: Int[np.ndarray, "B T"], eos_id: int
                    ) -> tuple[Int[np.ndarray, "B T"], Int[np.ndarray, "B T"]]:
  """(segment ids, positions), int32 [B, T], of windows `inputs` whose documents end in eos_id.

  A row's segment id counts the separators at or before each token, so ids increase along the
  row and change exactly where a document starts; a token's position is its distance from the
  first token of its document within the window (a window that starts mid-document numbers
  that document from 0, as windows without document masks do).
  """
  starts = inputs == eos_id
  segment_ids = np.cumsum(starts, axis=1, dtype=np.int32)
  index = np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape)
  first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  return segment_ids, (index - first).astype(np.int32)


def model_kwargs(batch: dict) -> dict:
  """The batch's positions and segment ids, where it has them: keyword arguments of
  `TransformerLM.__call__` / `features` (none for batches without document masks)."""
  return {k: batch[k] for k in MODEL_KEYS if k in batch}


def check_model(data, model) -> None:
  """ConfigError for a model whose attention rules count from the row's start, which a
  document that starts mid-row cannot follow: sinks (the row's first tokens, invisible to every
  later document) and sparse plans (spans of alpha + beta·N for the row's length N); and for
  cuDNN attention, which takes no segment ids."""
  if not data.document_mask:
    return
  if model.attn_sinks:
    raise ConfigError(
        f"model.attn_sinks = {model.attn_sinks} is not allowed with data.document_mask = true: "
        "sinks are the row's first tokens, which documents after the first cannot see (they "
        "would train without sinks). Use model.attn_sinks = 0 or data.document_mask = false.")
  if model.attn_impl == "cudnn" and (model.mixers is None or "attention" in model.mixers):
    raise ConfigError(
        "model.attn_impl = 'cudnn' is not allowed with data.document_mask = true: "
        "jax.nn.dot_product_attention exposes no segment ids. Leave model.attn_impl unset "
        "(dispatch picks memx's Pallas kernel on GPU) or set 'pallas_gpu'.")
  if model.attn_plan is not None:
    raise ConfigError(
        "model.attn_plan is not allowed with data.document_mask = true: a sparse plan's spans "
        "(alpha + beta·N, n_sink first tokens) are set for the row's length N and start, not "
        "for each document's. Evaluate plans on rows of one document.")


__all__ = ["MODEL_KEYS", "check_model", "document_layout", "model_kwargs"]
