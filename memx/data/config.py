"""DataConfig: where tokens come from (embedded corpus, user files, synthetic memory tasks)."""

import dataclasses

from memx._validate import one_of, require

LM_SOURCES = ("corpus", "text", "npy")
TASKS = ("mqar", "passkey", "selective_copy")
SOURCES = LM_SOURCES + TASKS
PASSKEY_FILLERS = ("repeat", "corpus")
# ByteTokenizer's vocabulary (256 bytes + PAD/BOS/EOS/SEP/BLANK); task rows use all of it.
# Spelled out rather than imported so the config stays free of the data machinery.
BYTE_VOCAB_SIZE = 261
BYTE_EOS = 258  # ByteTokenizer.EOS: the separator the "text" source puts between files


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """Token source and sequence shape.

  Attributes:
    source: "corpus" (embedded English text, no download), "text" (UTF-8 files in `paths`),
      "npy" (pre-tokenized 1-D integer .npy files in `paths`), or a synthetic task: "mqar"
      (multi-query associative recall), "passkey" (needle in a haystack), "selective_copy".
    paths: files for "text" / "npy".
    seq_len: tokens per training row.
    task: synthetic task mixed into an LM source (None = none).
    task_fraction: fraction of each batch's rows drawn from `task` (LM sources only).
    eval_fraction: held-out tail of an LM source used for evaluation.
    mqar_pairs: key-value pairs per MQAR row (every key is queried once).
    passkey_depth: where the needle sits, as a fraction of the context (None = random).
    passkey_digits: digits of the passkey.
    copy_tokens: tokens to copy in selective copying.
    passkey_min_len: None, or the shortest passkey prompt: each row's prompt (BOS, filler with
      the needle, question, key) then ends at a random length in [passkey_min_len, seq_len]
      and filler fills the rest of the row (no loss on it), so training asks the question at
      every position, and the model retrieves at every length up to seq_len.
    passkey_filler: haystack of passkey rows: "repeat" (the classic repeated "The grass is
      green. ..." sentences) or "corpus" (random windows of the embedded corpus).
    vocab_size: the data's token id space, reported as Loader.vocab_size; None means the byte
      tokenizer's (261). Set it for "npy" files written by another tokenizer (every id must
      lie in [0, vocab_size)); byte-tokenized text and task rows need at least 261.
    document_mask: tokens attend to, and recurrent mixers carry state over, only their own
      document: a window that spans document boundaries is trained as separate documents
      (the attention mask of Llama 3's pre-training), with positions restarting at each one.
      The end-of-document token opens the next document (it acts as its BOS), so every target
      is predicted from its own document. Batches then carry "segment_ids" and "positions".
      Needs document boundaries: "text" (each file is a document; EOS between files) or
      "npy" with `eos_id`. Task rows are one document each.
    eos_id: the end-of-document token of "npy" files, for document_mask (text uses the byte
      tokenizer's EOS, 258).
    text_separator: a string that separates documents inside "text" files (for example
      "<|endoftext|>") or the embedded corpus ("\n\n": its paragraphs); each occurrence
      becomes one EOS token, as between files. None: each file (the corpus) is one document.
  """

  source: str = "corpus"
  paths: tuple[str, ...] = ()
  seq_len: int = 128
  task: str | None = None
  task_fraction: float = 0.0
  eval_fraction: float = 0.05
  mqar_pairs: int = 8
  passkey_depth: float | None = None
  passkey_digits: int = 5
  copy_tokens: int = 16
  passkey_filler: str = "repeat"
  passkey_min_len: int | None = None
  vocab_size: int | None = None
  document_mask: bool = False
  eos_id: int | None = None
  text_separator: str | None = None

  def __post_init__(self):
    one_of("data", "source", self.source, SOURCES)
    require(self.seq_len >= 8, "data", "seq_len", self.seq_len, "must be at least 8")
    if self.source in ("text", "npy"):
      require(len(self.paths) > 0, "data", "paths", self.paths,
              f"data.source = {self.source!r} needs at least one file in data.paths")

    if self.task is not None:
      one_of("data", "task", self.task, TASKS)
      require(self.source in LM_SOURCES, "data", "task", self.task,
              "a task is mixed into an LM source (corpus/text/npy); to train on the task "
              "alone set data.source to it")
    require(0.0 <= self.task_fraction <= 1.0, "data", "task_fraction", self.task_fraction,
            "must lie in [0, 1]")
    require(self.task is not None or self.task_fraction == 0.0, "data", "task_fraction",
            self.task_fraction, "needs data.task to be set")
    require(0.0 < self.eval_fraction < 0.5, "data", "eval_fraction", self.eval_fraction,
            "must lie in (0, 0.5)")
    require(self.mqar_pairs >= 1, "data", "mqar_pairs", self.mqar_pairs, "must be >= 1")
    require(self.passkey_depth is None or 0.0 <= self.passkey_depth <= 1.0, "data",
            "passkey_depth", self.passkey_depth, "must be None or lie in [0, 1]")
    require(1 <= self.passkey_digits <= 32, "data", "passkey_digits", self.passkey_digits,
            "must lie in [1, 32]")
    require(self.copy_tokens >= 1, "data", "copy_tokens", self.copy_tokens, "must be >= 1")
    one_of("data", "passkey_filler", self.passkey_filler, PASSKEY_FILLERS)
    if self.passkey_min_len is not None:
      require(self.task_name == "passkey", "data", "passkey_min_len", self.passkey_min_len,
              "shapes passkey rows: set data.source or data.task to 'passkey', or leave it None")
      require(isinstance(self.passkey_min_len, int) and 0 < self.passkey_min_len <= self.seq_len,
              "data", "passkey_min_len", self.passkey_min_len,
              f"must be None or an int in [1, data.seq_len = {self.seq_len}] (and at least the "
              "shortest passkey prompt, passkey_min_seq_len(passkey_digits))")
    if self.vocab_size is not None:
      # Only pre-tokenized ids can live in a smaller space; bytes and task rows use all 261.
      byte_ids = self.source != "npy" or self.task is not None
      require(self.vocab_size >= (BYTE_VOCAB_SIZE if byte_ids else 1), "data", "vocab_size",
              self.vocab_size, f"must be >= {BYTE_VOCAB_SIZE} (the byte tokenizer's vocabulary) "
              "unless data.source = 'npy' with no data.task, where it must be >= 1")

    require(isinstance(self.document_mask, bool), "data", "document_mask", self.document_mask,
            "must be true or false")
    if self.text_separator is not None:
      require(self.source in ("text", "corpus"), "data", "text_separator", self.text_separator,
              "splits documents in data.source = 'text' files or the 'corpus' only; leave it "
              "None otherwise")
      require(isinstance(self.text_separator, str) and self.text_separator != "", "data",
              "text_separator", self.text_separator, "must be None or a non-empty string")
    if self.document_mask:
      # (A task source is allowed: its rows are one document each, and a run's task-only
      # evaluation then gets batches of the same structure as its training rows.)
      require(self.source != "corpus" or self.text_separator is not None, "data",
              "document_mask", self.document_mask,
              "needs document boundaries in the token stream, and the embedded corpus is one "
              "text: set data.text_separator (e.g. '\\n\\n' for its paragraphs), or use "
              "'text' files (each a document) or 'npy' with data.eos_id")
      require(self.source != "npy" or self.eos_id is not None, "data", "eos_id", self.eos_id,
              "must name the end-of-document token id of the .npy files for data.document_mask")
    if self.eos_id is not None:
      require(self.source == "npy" and self.document_mask, "data", "eos_id", self.eos_id,
              "marks document ends in 'npy' files for data.document_mask = true; set both (text "
              f"files use the byte tokenizer's EOS, {BYTE_EOS})")
      require(isinstance(self.eos_id, int) and not isinstance(self.eos_id, bool)
              and 0 <= self.eos_id < (self.vocab_size or BYTE_VOCAB_SIZE), "data", "eos_id",
              self.eos_id, f"must be an int in [0, data.vocab_size = "
              f"{self.vocab_size or BYTE_VOCAB_SIZE})")

  @property
  def task_name(self) -> str | None:
    """The synthetic task this config evaluates accuracy on, if any."""
    return self.source if self.source in TASKS else self.task

  def task_only(self) -> "DataConfig":
    """The rows of this config's task alone (its accuracy evaluation): every row a task row,
    one document each (with document_mask, batches still carry segment ids and positions, so
    one compiled evaluation serves both). Keeps the paths, which a task source does not
    read."""
    assert self.task_name is not None, "task_only() of a config without a task"
    return dataclasses.replace(self, source=self.task_name, task=None, task_fraction=0.0,
                               eos_id=None, text_separator=None)
