"""Where FAST action ids live in the language model's vocabulary.

The VLM predicts FAST tokens with its ordinary text head, so every FAST id k needs an id of the
language-model vocabulary that no prompt ever uses. openpi's pi0-FAST puts them at the top of
PaliGemma's vocabulary, just below its 128 <segNNN> pieces: k -> vocab_size - 1 - 128 - k, i.e. on
the 1024 <locNNNN> pieces for a 1024-token FAST. pi0.5's own pre-training range was never published
(openpi issue #708), so the mapping is a configuration choice, checked before training starts: a
FAST id on a special token or on a piece that prompt text can produce would silently corrupt both.
"""

import dataclasses

import numpy as np

SCHEMES = ("pi0_fast", "offset")


@dataclasses.dataclass(frozen=True)
class FastTokenMapping:
  """A bijection between FAST ids [0, fast_vocab_size) and language-model ids.

  Attributes:
    scheme: "pi0_fast": k -> lm_vocab_size - 1 - skip_tokens - k (openpi's pi0-FAST, the default);
      "offset": k -> offset + k (e.g. onto rows appended after the SentencePiece vocabulary).
    skip_tokens: ids "pi0_fast" leaves free at the top of the vocabulary (PaliGemma's <seg>s).
    offset: the language-model id of FAST id 0 under "offset".
  """

  scheme: str = "pi0_fast"
  skip_tokens: int = 128
  offset: int = 0

  def __post_init__(self):
    if self.scheme not in SCHEMES:
      raise ValueError(f"Unknown FAST mapping scheme {self.scheme!r}; choose one of {SCHEMES}")
    if self.skip_tokens < 0 or self.offset < 0:
      raise ValueError(f"FAST mapping needs skip_tokens >= 0 and offset >= 0, got {self}")

  def to_lm(self, fast_ids, lm_vocab_size: int) -> np.ndarray:
    """FAST ids [...] -> language-model ids [...] (int32)."""
    fast_ids = np.asarray(fast_ids, np.int64)
    if self.scheme == "pi0_fast":
      return (lm_vocab_size - 1 - self.skip_tokens - fast_ids).astype(np.int32)
    return (self.offset + fast_ids).astype(np.int32)

  def to_fast(self, lm_ids, lm_vocab_size: int) -> np.ndarray:
    """Language-model ids [...] -> FAST ids [...] (int64; the inverse of `to_lm`)."""
    lm_ids = np.asarray(lm_ids, np.int64)
    if self.scheme == "pi0_fast":
      return lm_vocab_size - 1 - self.skip_tokens - lm_ids
    return lm_ids - self.offset

  def lm_range(self, fast_vocab_size: int, lm_vocab_size: int) -> tuple[int, int]:
    """The language-model ids FAST occupies, as a half-open range [low, high)."""
    ends = self.to_lm([0, fast_vocab_size - 1], lm_vocab_size)
    return int(ends.min()), int(ends.max()) + 1

  def check(
    self,
    *,
    fast_vocab_size: int,
    lm_vocab_size: int,
    reserved_ids: np.ndarray,
    describe_id=str,
  ) -> None:
    """Refuses a mapping that leaves the vocabulary or lands on a reserved id.

    Args:
      fast_vocab_size: number of FAST ids to place.
      lm_vocab_size: rows of the language model's embedding table.
      reserved_ids: bool [prompt vocab size], True for ids that special tokens or prompt text use
        (`PromptTokenizer.reserved_ids()`); ids past its end are free embedding rows.
      describe_id: id -> readable name, for the error message.
    """
    low, high = self.lm_range(fast_vocab_size, lm_vocab_size)
    if low < 0 or high > lm_vocab_size:
      raise ValueError(
        f"FAST mapping {self} puts {fast_vocab_size} FAST ids on language-model ids "
        f"[{low}, {high}), outside the vocabulary [0, {lm_vocab_size})"
      )
    reserved = np.asarray(reserved_ids, bool)
    collisions = np.flatnonzero(reserved[low:high]) + low
    if collisions.size:
      examples = ", ".join(f"{i} ({describe_id(int(i))})" for i in collisions[:5])
      raise ValueError(
        f"FAST mapping {self} puts {fast_vocab_size} FAST ids on language-model ids "
        f"[{low}, {high}), which collide with {collisions.size} ids used by special tokens or "
        f"prompt text, e.g. {examples}. Use a smaller FAST vocabulary, another skip_tokens/offset, "
        f"or an 'offset' mapping onto rows past the SentencePiece vocabulary."
      )
