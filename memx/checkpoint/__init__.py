"""Orbax checkpointing: train state + data-iterator state + a compatibility fingerprint."""

from memx.checkpoint.manager import Checkpointer, state_fingerprint

__all__ = ["Checkpointer", "state_fingerprint"]
