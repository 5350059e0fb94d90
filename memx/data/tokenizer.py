"""ByteTokenizer: UTF-8 bytes as ids 0..255, then a few special ids; needs no files."""

import codecs

import numpy as np
from jaxtyping import Int

_NUM_BYTES = 256
_ERRORS = "memx_bytes"


def _surrogatepass_or_replace(exc: UnicodeError) -> tuple[str, int]:
  """Decode error handler: "surrogatepass" for encoded lone surrogates, else "replace".

  encode() uses "surrogatepass" so that every Python str (lone surrogates included) has bytes;
  decoding those 3-byte forms back is what makes the round trip exact for any str, while any
  other invalid byte sequence (a model's sample, a window cut mid-character) still becomes
  U+FFFD instead of raising.
  """
  if not isinstance(exc, UnicodeDecodeError):
    raise exc
  b = exc.object[exc.start:exc.start + 3]
  if len(b) == 3 and b[0] == 0xED and 0xA0 <= b[1] <= 0xBF and 0x80 <= b[2] <= 0xBF:
    return chr(((b[0] & 0x0F) << 12) | ((b[1] & 0x3F) << 6) | (b[2] & 0x3F)), exc.start + 3
  return "\ufffd", exc.end


codecs.register_error(_ERRORS, _surrogatepass_or_replace)


class ByteTokenizer:
  """Bytes tokenizer: id i < 256 is the byte i; special ids follow.

  Special ids: PAD=256, BOS=257 (start of a synthetic-task row), EOS=258 (end of a document;
  separates "text" files), SEP=259 (separates a task's context from its queries), BLANK=260
  (filler/noise slot in synthetic tasks). The vocabulary is 261 ids; a model head may be larger
  (ModelConfig.vocab_size only has to cover it).
  """

  PAD = 256
  BOS = 257
  EOS = 258
  SEP = 259
  BLANK = 260
  SPECIALS = {"PAD": PAD, "BOS": BOS, "EOS": EOS, "SEP": SEP, "BLANK": BLANK}

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce (bytes + specials)."""
    return _NUM_BYTES + len(self.SPECIALS)

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> Int[np.ndarray, " T"]:
    """Encodes text as its UTF-8 bytes.

    Args:
      text: any Python str (lone surrogates are kept via "surrogatepass").
      bos: prepend BOS.
      eos: append EOS.

    Returns:
      int32 ids, one per UTF-8 byte (plus BOS/EOS if asked).
    """
    ids = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8).astype(np.int32)
    if bos or eos:
      ids = np.concatenate([[self.BOS]] * bos + [ids] + [[self.EOS]] * eos).astype(np.int32)
    return ids

  def decode(self, ids) -> str:
    """Decodes ids to text, skipping every id that is not a byte.

    Args:
      ids: a sequence or array of integer ids. Specials, and ids beyond the vocabulary that a
        padded model head can emit, are skipped.

    Returns:
      The UTF-8 text; invalid byte sequences become U+FFFD (errors="replace"), except the
      encoded lone surrogates encode() produces, which decode back exactly.
    """
    ids = np.asarray(ids).reshape(-1)
    ids = ids[(ids >= 0) & (ids < _NUM_BYTES)]
    return ids.astype(np.uint8).tobytes().decode("utf-8", _ERRORS)
