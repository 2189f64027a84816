"""FAST fitting (ki.data.prepared_frames.normalized_chunks, ki.tokenizers.fast_fit): normalised
delta chunks from the prepared data, a tokenizer that reloads."""

import numpy as np

from ki.data import prepared_frames
from ki.data.norm_stats import compute_norm_stats
from ki.tokenizers import fast_fit


def test_fits_a_tokenizer_that_roundtrips(prepared_droid, tmp_path):
  prepared, manifest = prepared_droid
  stats = compute_norm_stats(str(prepared))
  chunks = prepared_frames.normalized_chunks(str(prepared), stats, max_chunks=200)
  assert chunks.shape == (200, 16, 8) and chunks.dtype == np.float32
  # Quantile-normalised: about 98% of values inside [-1, 1] (up to the histogram resolution).
  assert np.mean(np.abs(chunks) <= 1.01) > 0.95
  tokenizer, report = fast_fit.fit(chunks, vocab_size=512, scale=10.0)
  assert report["decoded_valid_fraction"] == 1.0
  # Rounding bound of FAST: L2 error per dimension <= 0.5 * sqrt(H) / scale = 0.2.
  assert report["roundtrip_max_abs_error"] <= 0.2
  assert report["tokens_per_chunk_mean"] < 16 * 8 / 2  # BPE compresses smooth chunks.
  tokenizer.save(str(tmp_path / "fast"))
  from ki.tokenizers import fast

  loaded = fast.FastTokenizer.load(str(tmp_path / "fast"))
  assert loaded.encode(chunks[0]) == tokenizer.encode(chunks[0])
  decoded, valid = loaded.decode(loaded.encode(chunks[0]), time_horizon=16, action_dim=8)
  assert valid and np.abs(decoded - chunks[0]).max() <= 0.2
