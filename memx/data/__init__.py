"""Data: byte tokenizer, embedded corpus, synthetic memory tasks and per-host loaders."""

from memx.data.config import DataConfig
from memx.data.corpus import load_corpus
from memx.data.documents import document_layout, model_kwargs
from memx.data.loader import Loader, check_training_mix, make_loader
from memx.data.tasks import (
    TaskRow,
    make_task,
    mqar,
    mqar_answers,
    passkey,
    passkey_answers,
    selective_copy,
    selective_copy_answers,
    verify_row,
)
from memx.data.tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "Loader",
    "TaskRow",
    "check_training_mix",
    "document_layout",
    "load_corpus",
    "make_loader",
    "make_task",
    "model_kwargs",
    "mqar",
    "mqar_answers",
    "passkey",
    "passkey_answers",
    "selective_copy",
    "selective_copy_answers",
    "verify_row",
]
