"""Fitting the FAST action tokenizer on normalised action chunks, with a report of how well it fits.

The chunks come from a prepared dataset through the training pipeline's action path
(ki.data.prepared_frames.normalized_chunks); the command line is data_prep/fit_fast_tokenizer.py.
"""

import numpy as np

from ki.tokenizers import fast


def fit(chunks: np.ndarray, *, vocab_size: int, scale: float):
  """Fits FastTokenizer on chunks [N, H, D]; returns (tokenizer, report dict): chunks, tokens per
  chunk (mean, max), the fraction that decodes and the round-trip error."""
  tokenizer = fast.FastTokenizer.fit(list(chunks), vocab_size=vocab_size, scale=scale)
  tokens = tokenizer.encode(chunks)
  decoded, valid = tokenizer.decode(
    tokens, time_horizon=chunks.shape[1], action_dim=chunks.shape[2]
  )
  lengths = np.array([len(t) for t in tokens])
  report = {
    "chunks": int(len(chunks)),
    "tokens_per_chunk_mean": float(lengths.mean()),
    "tokens_per_chunk_max": int(lengths.max()),
    "decoded_valid_fraction": float(valid.mean()),
    "roundtrip_max_abs_error": float(np.abs(decoded[valid] - chunks[valid]).max()),
  }
  return tokenizer, report
