"""FAST action tokens: orthonormal DCT along time, quantisation, byte-pair encoding.

Pertsch et al. 2025, "FAST: Efficient Action Tokenization for Vision-Language-Action Models"
(arXiv 2501.09747). A normalised chunk [H, D] becomes a short list of integer tokens:

  1. DCT-II (orthonormal) along time, separately per action dimension -> coefficients [H, D];
  2. multiply by `scale`, round to integers;
  3. flatten frequency-major (row-major over [frequency, dimension]: every dimension's lowest
     frequency first), so the high-frequency zeros of a smooth chunk form one long tail;
  4. subtract `min_token` (the smallest coefficient seen when fitting) and clamp into the alphabet;
  5. write one character per integer and compress the string with byte-pair encoding (the
     `tokenizers` library; its BPE merges runs of coefficients into single tokens).

The files are those of the public `physical-intelligence/fast` processor: `tokenizer.json` (a
`tokenizers` serialisation) and `processor_config.json` (scale, vocab_size, min_token, action_dim,
time_horizon). A folder holding the downloaded FAST+ (vocab 2048, scale 10, min_token -354) loads
with `FastTokenizer.load`. That tokenizer was trained with a byte-level BPE, ours with a plain one
(one character per coefficient, no pre-tokenizer); both run through `tokenizers.Tokenizer`, which
applies whatever pipeline the file describes, so either kind encodes and decodes the same way.

Round-trip error: rounding moves each scaled coefficient by at most 0.5, i.e. each coefficient by at
most 0.5 / scale; the orthonormal DCT preserves the L2 norm, so over H steps the error of one action
dimension has L2 norm <= 0.5 * sqrt(H) / scale (for coefficients inside the fitted range).
"""

from collections.abc import Iterable, Iterator, Sequence
import json
import logging
import os

import numpy as np
import scipy.fft
import tokenizers
from tokenizers import decoders, models, trainers

TOKENIZER_FILE = "tokenizer.json"
PROCESSOR_CONFIG_FILE = "processor_config.json"
# The class name the public processor's config carries; written so that the Hugging Face
# `AutoProcessor` route (with the public processing_action_tokenizer.py) can read our folders too.
_PROCESSOR_CLASS = "UniversalActionProcessor"
_TIME_AXIS = -2


def _dct_coefficients(chunks: np.ndarray, scale: float) -> np.ndarray:
  """Quantised DCT coefficients, [..., H, D] float -> [..., H, D] int64 (frequency along H)."""
  coefficients = scipy.fft.dct(chunks, type=2, norm="ortho", axis=_TIME_AXIS)
  return np.rint(coefficients * scale).astype(np.int64)


def _check_chunks(chunks, ndims: Sequence[int], what: str) -> np.ndarray:
  array = np.asarray(chunks, dtype=np.float64)
  if array.ndim not in ndims:
    allowed = " or ".join(map(str, ndims))
    raise ValueError(f"{what} must have {allowed} dims, got shape {array.shape}")
  if array.shape[-1] == 0 or array.shape[-2] == 0:
    raise ValueError(f"{what} must have a non-empty time axis and action axis, got {array.shape}")
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{what} holds non-finite values (NaN or inf)")
  return array


class FastTokenizer:
  """Encodes normalised action chunks [H, D] into FAST token ids and back.

  Attributes:
    scale: multiplier applied to the DCT coefficients before rounding.
    vocab_size: the FAST vocabulary size from the config (ids live in [0, vocab_size)).
    min_token: the integer subtracted from every quantised coefficient before it becomes a symbol.
    action_dim, time_horizon: the chunk shape used by `decode` when it is not passed (may be None,
      as in the public FAST+ config).
  """

  def __init__(
    self,
    bpe: tokenizers.Tokenizer,
    *,
    scale: float,
    vocab_size: int,
    min_token: int,
    action_dim: int | None = None,
    time_horizon: int | None = None,
  ):
    if scale <= 0:
      raise ValueError(f"FAST scale must be positive, got {scale}")
    if bpe.get_vocab_size() > vocab_size:
      # The public fit allows an alphabet one larger than vocab_size; every id the BPE can emit
      # must still get a slot in the language-model vocabulary, so the larger number wins.
      logging.warning(
        "FAST BPE holds %d tokens, more than its config's vocab_size=%d; using %d",
        bpe.get_vocab_size(),
        vocab_size,
        bpe.get_vocab_size(),
      )
      vocab_size = bpe.get_vocab_size()
    self.bpe = bpe
    self.scale = float(scale)
    self.vocab_size = int(vocab_size)
    self.min_token = int(min_token)
    self.action_dim = action_dim
    self.time_horizon = time_horizon
    self._num_symbols = self._count_symbols()

  def _count_symbols(self) -> int:
    """How many coefficient symbols (chr(0) .. chr(n - 1)) the tokenizer can encode.

    A plain BPE has every symbol of its alphabet as a single-character token, and drops characters
    outside it, so encoding clamps into that alphabet. A byte-level BPE (the public FAST+) encodes
    any character; its fit guaranteed max_token - min_token <= vocab_size, which bounds the
    symbols it was trained on.
    """
    if self.bpe.pre_tokenizer is not None:
      return self.vocab_size + 1
    single = [ord(token) for token in self.bpe.get_vocab() if len(token) == 1]
    if not single:
      raise ValueError("The BPE vocabulary holds no single-character tokens: not a FAST tokenizer")
    return max(single) + 1

  @property
  def max_coefficient(self) -> int:
    """The largest quantised coefficient that encodes without clamping."""
    return self.min_token + self._num_symbols - 1

  # ----------------------------------------------------------------------------------- encoding

  def _symbols(self, coefficients: np.ndarray) -> str:
    """One example's quantised coefficients [H, D] -> its symbol string (frequency-major)."""
    shifted = np.clip(coefficients.reshape(-1) - self.min_token, 0, self._num_symbols - 1)
    return "".join(map(chr, shifted.tolist()))

  def encode(self, chunks) -> list[int] | list[list[int]]:
    """Normalised chunk [H, D] -> FAST ids; or a batch [B, H, D] -> one id list per chunk.

    Coefficients outside the fitted range are clamped into it (like the public processor, which
    clamps at the low end), so a chunk far outside [-1, 1] decodes to a bounded approximation.
    """
    array = _check_chunks(chunks, (2, 3), "FAST encode input")
    coefficients = _dct_coefficients(array, self.scale)
    if array.ndim == 2:
      return self.bpe.encode(self._symbols(coefficients)).ids
    strings = [self._symbols(example) for example in coefficients]
    return [encoding.ids for encoding in self.bpe.encode_batch(strings)]

  # ----------------------------------------------------------------------------------- decoding

  def _decode_one(self, tokens, time_horizon: int, action_dim: int) -> tuple[np.ndarray, bool]:
    invalid = np.zeros((time_horizon, action_dim), np.float32), False
    try:
      ids = np.asarray(tokens)
    except (TypeError, ValueError):
      return invalid
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
      return invalid
    if ids.min() < 0 or ids.max() >= self.bpe.get_vocab_size():
      return invalid  # The BPE would silently skip unknown ids and shift every later coefficient.
    symbols = np.fromiter(map(ord, self.bpe.decode(ids.tolist())), dtype=np.int64)
    if symbols.size != time_horizon * action_dim or np.any(symbols >= self._num_symbols):
      return invalid
    coefficients = (symbols + self.min_token).reshape(time_horizon, action_dim) / self.scale
    chunk = scipy.fft.idct(coefficients, type=2, norm="ortho", axis=0)
    return chunk.astype(np.float32), True

  def decode(
    self, tokens, *, time_horizon: int | None = None, action_dim: int | None = None
  ) -> tuple[np.ndarray, bool] | tuple[np.ndarray, np.ndarray]:
    """FAST ids -> (chunk float32 [H, D], valid); or a batch of id lists -> ([B, H, D], bool[B]).

    Never raises on the tokens: a sequence that is empty, holds ids outside the BPE vocabulary or
    does not reshape to (H, D) gives an all-zero chunk and valid=False. `time_horizon` and
    `action_dim` default to the values in the processor config; one of the two must give them.
    """
    time_horizon = time_horizon or self.time_horizon
    action_dim = action_dim or self.action_dim
    if not time_horizon or not action_dim:
      raise ValueError(
        "FAST decode needs time_horizon and action_dim: pass them, or save them in the "
        f"processor config (got time_horizon={time_horizon}, action_dim={action_dim})"
      )
    if _is_batch(tokens):
      decoded = [self._decode_one(sequence, time_horizon, action_dim) for sequence in tokens]
      if not decoded:
        return np.zeros((0, time_horizon, action_dim), np.float32), np.zeros((0,), bool)
      chunks, valid = zip(*decoded)
      return np.stack(chunks), np.asarray(valid, bool)
    return self._decode_one(tokens, time_horizon, action_dim)

  # ----------------------------------------------------------------------------------- fitting

  @classmethod
  def fit(
    cls,
    chunks: Iterable[np.ndarray],
    *,
    vocab_size: int = 1024,
    scale: float = 10.0,
    min_token: int | None = None,
    max_token: int | None = None,
  ) -> "FastTokenizer":
    """Trains the BPE on a stream of normalised chunks [H, D] (any H, D per chunk).

    The symbol alphabet spans [min_token, max_token] (quantised coefficients). When both are
    given, `chunks` is read once; otherwise it must be re-iterable (a list, or an object whose
    `__iter__` restarts the stream): a first pass measures the range, a second trains the BPE. No
    pass holds more than one chunk, so millions of DROID chunks stream through.
    """
    if (min_token is None) != (max_token is None):
      raise ValueError("Give both min_token and max_token, or neither (then they are measured)")
    if min_token is None:
      if iter(chunks) is chunks:
        raise ValueError(
          "FastTokenizer.fit got a one-shot iterator but no min_token/max_token: pass a "
          "re-iterable source (its range is measured in a first pass) or give both bounds"
        )
      min_token, max_token = _coefficient_range(chunks, scale)
    if max_token < min_token:
      raise ValueError(f"max_token={max_token} is below min_token={min_token}")
    alphabet_size = max_token - min_token + 1
    if alphabet_size > vocab_size:
      raise ValueError(
        f"vocab_size={vocab_size} cannot hold the {alphabet_size} coefficient values in "
        f"[{min_token}, {max_token}] at scale {scale}: raise vocab_size or lower scale"
      )
    if alphabet_size + 100 > vocab_size:
      logging.warning(
        "FAST alphabet (%d symbols) nearly fills vocab_size=%d: few merges remain",
        alphabet_size,
        vocab_size,
      )

    shapes = set()

    def symbol_strings() -> Iterator[str]:
      for chunk in chunks:
        array = _check_chunks(chunk, (2,), "FAST fit chunk")
        shapes.add(array.shape)
        coefficients = _dct_coefficients(array, scale).reshape(-1) - min_token
        yield "".join(map(chr, np.clip(coefficients, 0, alphabet_size - 1).tolist()))

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.decoder = decoders.Fuse()  # Tokens are runs of symbols: join them with nothing between.
    trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      min_frequency=2,
      initial_alphabet=[chr(i) for i in range(alphabet_size)],
      special_tokens=[],
      max_token_length=10000,  # A long tail of zero coefficients may merge into one token.
      show_progress=False,
    )
    bpe.train_from_iterator(symbol_strings(), trainer=trainer)
    if not shapes:
      raise ValueError("FastTokenizer.fit got no chunks")
    # A single chunk shape is remembered for decoding; mixed shapes (a universal tokenizer such as
    # FAST+) leave it to the caller, like the public config's nulls.
    time_horizon, action_dim = shapes.pop() if len(shapes) == 1 else (None, None)
    return cls(
      bpe,
      scale=scale,
      vocab_size=vocab_size,
      min_token=min_token,
      action_dim=action_dim,
      time_horizon=time_horizon,
    )

  # ----------------------------------------------------------------------------------- files

  def save(self, directory: str | os.PathLike) -> None:
    """Writes tokenizer.json + processor_config.json (the public FAST processor's folder)."""
    os.makedirs(directory, exist_ok=True)
    self.bpe.save(os.path.join(directory, TOKENIZER_FILE))
    config = {
      "scale": self.scale,
      "vocab_size": self.vocab_size,
      "min_token": self.min_token,
      "action_dim": self.action_dim,
      "time_horizon": self.time_horizon,
      "processor_class": _PROCESSOR_CLASS,
    }
    with open(os.path.join(directory, PROCESSOR_CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=2)

  @classmethod
  def load(cls, directory: str | os.PathLike) -> "FastTokenizer":
    """Reads a folder written by `save`, or a downloaded physical-intelligence/fast (FAST+)."""
    tokenizer_path = os.path.join(directory, TOKENIZER_FILE)
    config_path = os.path.join(directory, PROCESSOR_CONFIG_FILE)
    for path in (tokenizer_path, config_path):
      if not os.path.isfile(path):
        raise FileNotFoundError(f"FAST tokenizer folder {directory} lacks {os.path.basename(path)}")
    with open(config_path) as f:
      config = json.load(f)
    missing = [key for key in ("scale", "vocab_size", "min_token") if key not in config]
    if missing:
      raise ValueError(f"{config_path} lacks the fields {missing}")
    return cls(
      tokenizers.Tokenizer.from_file(tokenizer_path),
      scale=config["scale"],
      vocab_size=config["vocab_size"],
      min_token=config["min_token"],
      action_dim=config.get("action_dim"),
      time_horizon=config.get("time_horizon"),
    )


def _coefficient_range(chunks: Iterable[np.ndarray], scale: float) -> tuple[int, int]:
  """First pass of `fit`: the smallest and largest quantised DCT coefficient in the stream."""
  low, high = None, None
  for chunk in chunks:
    coefficients = _dct_coefficients(_check_chunks(chunk, (2,), "FAST fit chunk"), scale)
    low = coefficients.min() if low is None else min(low, coefficients.min())
    high = coefficients.max() if high is None else max(high, coefficients.max())
  if low is None:
    raise ValueError("FastTokenizer.fit got no chunks")
  return int(low), int(high)


def _is_batch(tokens) -> bool:
  """Whether `tokens` is a batch of id sequences rather than one sequence."""
  if isinstance(tokens, np.ndarray):
    return tokens.ndim == 2
  if isinstance(tokens, (list, tuple)) and tokens:
    return isinstance(tokens[0], (list, tuple, np.ndarray))
  return False
