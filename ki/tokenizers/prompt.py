"""The text side: PaliGemma's SentencePiece tokenizer and the pi0.5 prompt with discrete state.

pi0.5 (as in openpi's `PaligemmaTokenizer.tokenize` with a state) reads

  BOS + "Task: {instruction}, State: {s_1 s_2 ... s_S};\\nAction: "      ar = 0, no loss
        + FAST action ids + ids of "|" + EOS                               ar = 1, loss (training)

where s_i = digitize(state_i, linspace(-1, 1, 257)[:-1]) - 1 is the normalised state cut into 256
uniform bins (below -1 gives -1, above 1 gives 255; only the robot's real state dims appear). The
instruction is cleaned as openpi does (strip; "_" and newlines become spaces) and not lower-cased.
A VLM co-training example reads BOS + prompt (ar = 0) + answer + EOS (ar = 1, loss).

Sequences are right-padded with 0 to max_token_len. One that does not fit is dropped (None) and
counted in `num_dropped`, never truncated: a cut FAST postfix would teach the model a wrong action.
"""

import io
import os
import re

import numpy as np
import sentencepiece
from sentencepiece import sentencepiece_model_pb2

from ki.tokenizers import fast as fast_lib
from ki.tokenizers import fast_mapping as mapping_lib

# PaliGemma appends these after Gemma's text pieces: 1024 detection and 128 segmentation tokens.
# Prompt text never contains them, which is why FAST ids may live there.
NUM_LOC_PIECES = 1024
NUM_SEG_PIECES = 128
_LOC_OR_SEG = re.compile(r"<loc\d{4}>|<seg\d{3}>")
STATE_BINS = 256
END_OF_ACTIONS = "|"

_Piece = sentencepiece_model_pb2.ModelProto.SentencePiece


def _read_bytes(path: str | os.PathLike) -> bytes:
  path = os.fspath(path)
  if "://" in path:  # gs:// and other remote filesystems go through TensorFlow's gfile.
    import tensorflow as tf  # Imported here: it is slow to import and local paths do not need it.

    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  with open(path, "rb") as f:
    return f.read()


class PromptTokenizer:
  """A SentencePiece model (PaliGemma's, or one built by `build_sentencepiece_model`)."""

  def __init__(self, model_path: str | os.PathLike, *, expected_vocab_size: int | None = None):
    """Loads the model from a local path or a gs:// URL.

    Raises ValueError when `expected_vocab_size` (the model config's vocabulary) disagrees.
    """
    self.model_path = os.fspath(model_path)
    self._proto_bytes = _read_bytes(model_path)
    self._processor = sentencepiece.SentencePieceProcessor(model_proto=self._proto_bytes)
    if expected_vocab_size is not None and self.vocab_size != expected_vocab_size:
      raise ValueError(
        f"SentencePiece model {self.model_path} has {self.vocab_size} pieces but the model "
        f"config expects vocab_size={expected_vocab_size}"
      )
    self._reserved = None

  @property
  def vocab_size(self) -> int:
    return self._processor.vocab_size()

  @property
  def bos_id(self) -> int:
    return self._processor.bos_id()

  @property
  def eos_id(self) -> int:
    return self._processor.eos_id()

  @property
  def pad_id(self) -> int:
    return self._processor.pad_id()

  def encode(self, text: str) -> list[int]:
    """Text -> piece ids, without BOS or EOS."""
    return self._processor.encode(text)

  def decode(self, ids) -> str:
    return self._processor.decode([int(i) for i in ids])

  def id_to_piece(self, token_id: int) -> str:
    if 0 <= token_id < self.vocab_size:
      return self._processor.id_to_piece(token_id)
    return "<past the SentencePiece vocabulary>"

  def reserved_ids(self) -> np.ndarray:
    """bool [vocab_size]: ids that special tokens use or that encoding prompt text can produce.

    Free are the <locNNNN>/<segNNN> pieces of PaliGemma's layout and unused or extra control
    pieces; everything else (normal, byte-fallback, other user-defined pieces) may appear in text.
    """
    if self._reserved is None:
      proto = sentencepiece_model_pb2.ModelProto.FromString(self._proto_bytes)
      free_types = (_Piece.CONTROL, _Piece.UNUSED)
      reserved = np.array(
        [p.type not in free_types and not _LOC_OR_SEG.fullmatch(p.piece) for p in proto.pieces]
      )
      specials = [self.pad_id, self.bos_id, self.eos_id, self._processor.unk_id()]
      reserved[[i for i in specials if i >= 0]] = True
      self._reserved = reserved
    return self._reserved


def build_sentencepiece_model(texts, out_path: str | os.PathLike, *, text_vocab_size: int) -> str:
  """Trains a small SentencePiece model in PaliGemma's layout; returns `out_path`.

  The layout: Gemma's special ids (pad 0, eos 1, bos 2, unk 3), `text_vocab_size` text pieces
  (byte fallback, digits split, no dummy prefix, text kept as is), then 1024 <locNNNN> and 128
  <segNNN> user-defined pieces at the end, so FAST ids map onto <loc> pieces exactly as with the
  real PaliGemma tokenizer. The vocabulary is always text_vocab_size + 1152: when the texts
  support fewer text pieces, the rest are filled with unused pieces.

  Args:
    texts: an iterable of training sentences (e.g. prompts of the synthetic data).
    out_path: where the .model file goes.
    text_vocab_size: size of the text part; >= 300 leaves room for the 256 byte pieces.
  """
  writer = io.BytesIO()
  try:
    sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_writer=writer,
      model_type="bpe",
      vocab_size=text_vocab_size,
      hard_vocab_limit=False,
      normalization_rule_name="identity",
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      split_digits=True,
      byte_fallback=True,
      pad_id=0,
      eos_id=1,
      bos_id=2,
      unk_id=3,
      num_threads=1,
      minloglevel=2,
    )
  except RuntimeError as error:  # SentencePiece reports bad sizes as RuntimeError.
    raise ValueError(
      f"SentencePiece could not build a {text_vocab_size}-piece text vocabulary: {error}"
    ) from error
  proto = sentencepiece_model_pb2.ModelProto.FromString(writer.getvalue())
  for i in range(text_vocab_size - len(proto.pieces)):
    proto.pieces.add(piece=f"<unused{i}>", score=0.0, type=_Piece.UNUSED)
  for i in range(NUM_LOC_PIECES):
    proto.pieces.add(piece=f"<loc{i:04d}>", score=0.0, type=_Piece.USER_DEFINED)
  for i in range(NUM_SEG_PIECES):
    proto.pieces.add(piece=f"<seg{i:03d}>", score=0.0, type=_Piece.USER_DEFINED)
  out_path = os.fspath(out_path)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, "wb") as f:
    f.write(proto.SerializeToString())
  return out_path


def clean_instruction(instruction: str) -> str:
  """openpi's cleaning: strip; underscores and newlines become spaces. Case is kept (pi0.5)."""
  return instruction.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: np.ndarray) -> np.ndarray:
  """Normalised state [S] -> bin indices int [S] in [-1, 255] (openpi's np.digitize convention)."""
  return np.digitize(state, bins=np.linspace(-1, 1, STATE_BINS + 1)[:-1]) - 1


def robot_prompt_text(instruction: str, state: np.ndarray) -> str:
  """The pi0.5 prefix text (without BOS) for an instruction and a normalised state [S]."""
  bins = " ".join(map(str, discretize_state(state)))
  return f"Task: {clean_instruction(instruction)}, State: {bins};\nAction: "


class Pi05Tokenizer:
  """Builds the token arrays of the host batch for robot and VLM co-training examples.

  Each call returns a dict of arrays [max_token_len]: tokenized_prompt int32,
  tokenized_prompt_mask bool, token_ar_mask int32, token_loss_mask bool (openpi's Observation
  field names) — or None when the example does not fit (counted in `num_dropped`).
  """

  def __init__(
    self,
    prompt_tokenizer: PromptTokenizer,
    fast_tokenizer: fast_lib.FastTokenizer | None,
    *,
    max_token_len: int,
    lm_vocab_size: int | None = None,
    fast_mapping: mapping_lib.FastTokenMapping | None = None,
  ):
    """
    Args:
      prompt_tokenizer: the SentencePiece model.
      fast_tokenizer: FAST action tokens for the training postfix; None for inference only.
      max_token_len: the padded length L.
      lm_vocab_size: rows of the language model's embedding table (default: the SentencePiece
        vocabulary size); must be at least that size.
      fast_mapping: where FAST ids go in the LM vocabulary; checked here against collisions.
    """
    if max_token_len <= 0:
      raise ValueError(f"max_token_len must be positive, got {max_token_len}")
    lm_vocab_size = lm_vocab_size or prompt_tokenizer.vocab_size
    if lm_vocab_size < prompt_tokenizer.vocab_size:
      raise ValueError(
        f"lm_vocab_size={lm_vocab_size} is smaller than the SentencePiece vocabulary "
        f"({prompt_tokenizer.vocab_size} pieces)"
      )
    fast_mapping = fast_mapping or mapping_lib.FastTokenMapping()
    if fast_tokenizer is not None:
      fast_mapping.check(
        fast_vocab_size=fast_tokenizer.vocab_size,
        lm_vocab_size=lm_vocab_size,
        reserved_ids=prompt_tokenizer.reserved_ids(),
        describe_id=lambda i: repr(prompt_tokenizer.id_to_piece(i)),
      )
    self.prompt_tokenizer = prompt_tokenizer
    self.fast_tokenizer = fast_tokenizer
    self.max_token_len = max_token_len
    self.lm_vocab_size = lm_vocab_size
    self.fast_mapping = fast_mapping
    self.num_dropped = 0
    self._end_of_actions = prompt_tokenizer.encode(END_OF_ACTIONS) + [prompt_tokenizer.eos_id]
    self._fast_lm_range = None
    if fast_tokenizer is not None:
      self._fast_lm_range = fast_mapping.lm_range(fast_tokenizer.vocab_size, lm_vocab_size)

  def _encode_text(self, text: str) -> list[int]:
    """Text -> ids, refusing text that spells out pieces on the FAST range (e.g. "<loc0042>" in
    detection-style co-training answers): the model could not tell them from action tokens."""
    ids = self.prompt_tokenizer.encode(text)
    if self._fast_lm_range is not None and ids:
      low, high = self._fast_lm_range
      array = np.asarray(ids)
      clashes = array[(array >= low) & (array < high)]
      if clashes.size:
        pieces = [self.prompt_tokenizer.id_to_piece(int(i)) for i in clashes[:3]]
        raise ValueError(
          f"Text {text[:80]!r} encodes to pieces {pieces} inside the FAST id range [{low}, "
          f"{high}); remove them from the data or map FAST ids elsewhere"
        )
    return ids

  def _pack(self, prefix: list[int], postfix: list[int]) -> dict[str, np.ndarray] | None:
    """prefix (ar 0, no loss) + postfix (ar 1, loss) -> padded arrays [L], or None if too long."""
    length = len(prefix) + len(postfix)
    if length > self.max_token_len:
      self.num_dropped += 1
      return None
    tokens = np.zeros(self.max_token_len, np.int32)  # Right-padded with 0.
    tokens[:length] = prefix + postfix
    positions = np.arange(self.max_token_len)
    is_postfix = (positions >= len(prefix)) & (positions < length)
    return {
      "tokenized_prompt": tokens,
      "tokenized_prompt_mask": positions < length,
      "token_ar_mask": is_postfix.astype(np.int32),
      "token_loss_mask": is_postfix,
    }

  def fast_postfix(self, actions: np.ndarray) -> list[int]:
    """Normalised actions [H, D] -> LM ids of FAST tokens + "|" + EOS."""
    if self.fast_tokenizer is None:
      raise ValueError("Pi05Tokenizer has no FAST tokenizer: it cannot tokenize actions")
    fast_ids = self.fast_tokenizer.encode(actions)
    lm_ids = self.fast_mapping.to_lm(fast_ids, self.lm_vocab_size).tolist()
    return lm_ids + self._end_of_actions

  def tokenize_robot(
    self, instruction: str, state: np.ndarray, actions: np.ndarray | None = None
  ) -> dict[str, np.ndarray] | None:
    """A robot example: instruction, normalised state [S] (real dims only), and in training the
    normalised actions [H, D] (real dims only) for the FAST postfix."""
    state = np.asarray(state)
    if state.ndim != 1 or not np.all(np.isfinite(state)):
      raise ValueError(f"state must be a finite vector [S], got shape {state.shape}")
    text = robot_prompt_text(instruction, state)
    prefix = [self.prompt_tokenizer.bos_id] + self._encode_text(text)
    postfix = [] if actions is None else self.fast_postfix(actions)
    return self._pack(prefix, postfix)

  def tokenize_vlm(self, prompt: str, answer: str) -> dict[str, np.ndarray] | None:
    """A VLM co-training example: BOS + prompt (ar 0, no loss) + answer + EOS (ar 1, loss)."""
    prefix = [self.prompt_tokenizer.bos_id] + self._encode_text(prompt)
    postfix = self._encode_text(answer) + [self.prompt_tokenizer.eos_id]
    return self._pack(prefix, postfix)

  def decode_actions(
    self, lm_ids, *, time_horizon: int | None = None, action_dim: int | None = None
  ) -> tuple[np.ndarray, bool]:
    """Generated LM ids [N] (the FAST postfix, up to EOS) -> (normalised chunk [H, D], valid).

    Reads ids up to the first one outside the FAST range (the "|" that closes the actions, EOS or
    padding); like `FastTokenizer.decode`, never raises on the ids and flags what does not decode.
    """
    if self.fast_tokenizer is None:
      raise ValueError("Pi05Tokenizer has no FAST tokenizer: it cannot decode actions")
    low, high = self._fast_lm_range
    ids = np.asarray(lm_ids).reshape(-1)
    if ids.dtype.kind not in "iu":
      ids = np.zeros((0,), np.int64)  # Not token ids: decodes to the invalid zero chunk.
    outside = np.flatnonzero((ids < low) | (ids >= high))
    fast_ids = self.fast_mapping.to_fast(
      ids[: outside[0] if outside.size else ids.size], self.lm_vocab_size
    )
    return self.fast_tokenizer.decode(fast_ids, time_horizon=time_horizon, action_dim=action_dim)
