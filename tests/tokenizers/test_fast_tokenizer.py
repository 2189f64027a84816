"""FAST action tokens: round trip, determinism, files, the public format, garbage handling."""

import json

import numpy as np
import pytest
import scipy.fft
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ki.tokenizers import fast
from tests.tokenizers.action_chunks import ACTION_DIM, HORIZON, smooth_chunks


def test_round_trip_error_is_within_the_quantisation_bound(fast_tokenizer):
  chunks = smooth_chunks(np.random.default_rng(10), 64)  # Not seen when fitting.
  decoded, valid = fast_tokenizer.decode(
    fast_tokenizer.encode(chunks), time_horizon=HORIZON, action_dim=ACTION_DIM
  )
  assert valid.all()
  # Rounding moves each coefficient by <= 0.5 / scale; the orthonormal DCT keeps L2 norms.
  bound = 0.5 * np.sqrt(HORIZON) / fast_tokenizer.scale
  per_dimension_error = np.linalg.norm(decoded - chunks, axis=1)  # [B, D]
  assert per_dimension_error.max() <= bound + 1e-6
  # And the error is exactly that of rounding the scaled coefficients, nothing else.
  coefficients = scipy.fft.dct(chunks, norm="ortho", axis=1) * fast_tokenizer.scale
  expected = scipy.fft.idct(np.rint(coefficients) / fast_tokenizer.scale, norm="ortho", axis=1)
  np.testing.assert_allclose(decoded, expected, atol=1e-6)


def test_smooth_chunks_compress_below_one_token_per_value(fast_tokenizer):
  tokens = fast_tokenizer.encode(smooth_chunks(np.random.default_rng(11), 32))
  assert max(map(len, tokens)) < HORIZON * ACTION_DIM / 2


def test_batch_and_single_encoding_agree(fast_tokenizer):
  chunks = smooth_chunks(np.random.default_rng(12), 4)
  assert fast_tokenizer.encode(chunks) == [fast_tokenizer.encode(chunk) for chunk in chunks]


def test_fit_is_deterministic_and_streams_with_given_bounds(training_chunks, fast_tokenizer):
  again = fast.FastTokenizer.fit(list(training_chunks), vocab_size=512, scale=10.0)
  assert again.bpe.get_vocab() == fast_tokenizer.bpe.get_vocab()
  assert again.min_token == fast_tokenizer.min_token
  # A one-shot generator streams in one pass when the coefficient range is given.
  streamed = fast.FastTokenizer.fit(
    (chunk for chunk in training_chunks),
    vocab_size=512,
    scale=10.0,
    min_token=fast_tokenizer.min_token,
    max_token=fast_tokenizer.max_coefficient,
  )
  probe = smooth_chunks(np.random.default_rng(13), 8)
  assert streamed.encode(probe) == fast_tokenizer.encode(probe)
  assert (streamed.time_horizon, streamed.action_dim) == (HORIZON, ACTION_DIM)


def test_fit_refuses_a_one_shot_iterator_without_bounds(training_chunks):
  with pytest.raises(ValueError, match="re-iterable"):
    fast.FastTokenizer.fit(iter(training_chunks), vocab_size=512)


def test_fit_refuses_a_vocabulary_smaller_than_the_alphabet(training_chunks):
  with pytest.raises(ValueError, match="cannot hold"):
    fast.FastTokenizer.fit(training_chunks, vocab_size=16)


def test_encode_rejects_bad_chunks(fast_tokenizer):
  with pytest.raises(ValueError, match="non-finite"):
    fast_tokenizer.encode(np.full((HORIZON, ACTION_DIM), np.nan))
  with pytest.raises(ValueError, match="dims"):
    fast_tokenizer.encode(np.zeros(HORIZON))


def test_coefficients_outside_the_fitted_range_are_clamped_not_dropped(fast_tokenizer):
  chunk = np.full((HORIZON, ACTION_DIM), 50.0)  # Far outside [-1, 1].
  decoded, valid = fast_tokenizer.decode(fast_tokenizer.encode(chunk))
  assert valid  # Every coefficient still has a symbol, so the length is right.
  # The DC coefficient is clamped to the largest fitted one.
  expected_mean = fast_tokenizer.max_coefficient / fast_tokenizer.scale / np.sqrt(HORIZON)
  np.testing.assert_allclose(decoded.mean(axis=0), expected_mean, atol=1e-5)


def test_save_then_load_gives_identical_tokens(fast_tokenizer, tmp_path):
  fast_tokenizer.save(tmp_path)
  config = json.loads((tmp_path / fast.PROCESSOR_CONFIG_FILE).read_text())
  assert config["processor_class"] == "UniversalActionProcessor"
  assert config["time_horizon"] == HORIZON and config["action_dim"] == ACTION_DIM
  loaded = fast.FastTokenizer.load(tmp_path)
  chunks = smooth_chunks(np.random.default_rng(14), 16)
  assert loaded.encode(chunks) == fast_tokenizer.encode(chunks)
  tokens = fast_tokenizer.encode(chunks[0])
  np.testing.assert_array_equal(loaded.decode(tokens)[0], fast_tokenizer.decode(tokens)[0])


def test_load_names_a_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    fast.FastTokenizer.load(tmp_path)


def _write_public_format(directory, chunks, scale=10.0, vocab_size=256):
  """Writes a folder as the public physical-intelligence/fast processor does: a byte-level BPE
  trained on one character per shifted coefficient, plus processor_config.json with null shape."""
  coefficients = np.rint(scipy.fft.dct(chunks, norm="ortho", axis=1) * scale).astype(int)
  min_token, max_token = int(coefficients.min()), int(coefficients.max())
  strings = ["".join(map(chr, (c.reshape(-1) - min_token).tolist())) for c in coefficients]
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=2,
    special_tokens=[],
    show_progress=False,
    initial_alphabet=[chr(i) for i in range(max_token - min_token + 1)],
    max_token_length=10000,
  )
  bpe.train_from_iterator(strings, trainer=trainer)
  bpe.save(str(directory / "tokenizer.json"))
  tokenizer_config = {"clean_up_tokenization_spaces": False}
  (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
  (directory / "processor_config.json").write_text(
    json.dumps(
      {
        "action_dim": None,
        "auto_map": {"AutoProcessor": "processing_action_tokenizer.UniversalActionProcessor"},
        "min_token": min_token,
        "processor_class": "UniversalActionProcessor",
        "scale": scale,
        "time_horizon": None,
        "vocab_size": vocab_size,
      }
    )
  )
  return bpe, min_token


def test_loads_a_folder_in_the_public_fast_format(training_chunks, tmp_path):
  public_bpe, min_token = _write_public_format(tmp_path, training_chunks)
  loaded = fast.FastTokenizer.load(tmp_path)
  assert loaded.min_token == min_token and loaded.time_horizon is None
  chunk = smooth_chunks(np.random.default_rng(15), 1)[0]
  tokens = loaded.encode(chunk)
  # The ids are those the public processor computes: its symbol string through its BPE.
  coefficients = np.rint(scipy.fft.dct(chunk, norm="ortho", axis=0) * 10.0).astype(int)
  symbols = "".join(map(chr, np.maximum(coefficients.reshape(-1) - min_token, 0).tolist()))
  assert tokens == public_bpe.encode(symbols).ids
  with pytest.raises(ValueError, match="time_horizon"):
    loaded.decode(tokens)  # The public config leaves the shape to the caller.
  decoded, valid = loaded.decode(tokens, time_horizon=HORIZON, action_dim=ACTION_DIM)
  assert valid
  assert np.linalg.norm(decoded - chunk, axis=0).max() <= 0.5 * np.sqrt(HORIZON) / 10.0 + 1e-6


@pytest.mark.parametrize(
  "garbage",
  [
    [],  # empty
    [10**6],  # outside the vocabulary
    [-3, 1],  # negative id
    "tokens",  # not ids at all
    [1.5, 2.5],  # not integers
  ],
)
def test_garbage_tokens_decode_to_zeros_and_invalid(fast_tokenizer, garbage):
  chunk, valid = fast_tokenizer.decode(garbage)
  assert not valid
  assert chunk.shape == (HORIZON, ACTION_DIM) and not chunk.any()


def test_wrong_length_sequences_decode_to_zeros_and_invalid(fast_tokenizer):
  tokens = fast_tokenizer.encode(smooth_chunks(np.random.default_rng(16), 1)[0])
  for broken in (tokens[:-1], tokens + tokens[-1:]):
    chunk, valid = fast_tokenizer.decode(broken)
    assert not valid and not chunk.any()
  # In a batch, only the broken sequence is flagged.
  chunks, valid = fast_tokenizer.decode([tokens, tokens[:-1], [10**6]])
  assert chunks.shape == (3, HORIZON, ACTION_DIM)
  np.testing.assert_array_equal(valid, [True, False, False])
  assert not chunks[1:].any()
