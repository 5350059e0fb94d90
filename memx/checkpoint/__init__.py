"""Orbax checkpointing: train state + data-iterator state + meta, sync/async/lazy saves."""

from memx.checkpoint.manager import (
    Checkpointer,
    remove_incomplete,
    state_fingerprint,
    step_digest,
)

__all__ = ["Checkpointer", "remove_incomplete", "state_fingerprint", "step_digest"]
