r"""Fits the FAST action tokenizer on normalised action chunks sampled from a prepared dataset.

  python -m data_prep.fit_fast_tokenizer --data_dir=/data/droid_prepared \
    --norm_stats=assets/droid/norm_stats.json --out_dir=assets/droid/fast_tokenizer \
    [--vocab_size=1024] [--scale=10] [--max_chunks=100000] [--delta_action_mask=1,1,1,1,1,1,1,0]

Each sampled chunk goes through exactly the training pipeline's action path: delta actions
(ki.data.droid.to_delta_actions, same mask as compute_norm_stats), then quantile normalisation with
the dataset's norm stats (ki.data.normalize). The tokenizer is saved in the
physical-intelligence/fast processor folder format (tokenizer.json + processor_config.json) and
reloads with ki.tokenizers.fast.FastTokenizer.load. The log reports tokens per chunk and the
round-trip error.
"""

import time

from absl import app, flags, logging
import numpy as np

from data_prep import prepared_frames
from ki.data import droid, normalize

_FLAGS = flags.FLAGS


def normalized_chunks(
  data_dir: str,
  norm_stats: dict[str, normalize.NormStats],
  *,
  max_chunks: int | None,
  delta_action_mask=droid.DEFAULT_DELTA_ACTION_MASK,
  seed: int = 0,
) -> np.ndarray:
  """float32 [N, H, 8]: sampled action chunks, as deltas where masked, quantile-normalised."""
  if "actions" not in norm_stats:
    raise ValueError(f"norm stats have no 'actions' entry (keys: {sorted(norm_stats)})")
  source = prepared_frames.open_frames(data_dir)
  indices = prepared_frames.sample_indices(len(source), max_chunks, seed)
  if len(indices) == 0:
    raise ValueError(f"{data_dir} holds no frames to fit a tokenizer on")
  chunks = []
  for state, actions in prepared_frames.iter_batches(source, indices):
    if delta_action_mask is not None:
      actions = droid.to_delta_actions(actions, state, delta_action_mask)
    chunks.append(normalize.quantile_normalize(actions, norm_stats["actions"]))
  return np.concatenate(chunks)


def fit(chunks: np.ndarray, *, vocab_size: int, scale: float):
  """Fits FastTokenizer on chunks [N, H, D]; returns (tokenizer, report dict)."""
  from ki.tokenizers import fast

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


def main(argv):
  del argv
  start = time.time()
  chunks = normalized_chunks(
    _FLAGS.data_dir,
    normalize.load_norm_stats(_FLAGS.norm_stats),
    max_chunks=_FLAGS.max_chunks,
    delta_action_mask=prepared_frames.parse_delta_mask(_FLAGS.delta_action_mask),
    seed=_FLAGS.seed,
  )
  tokenizer, report = fit(chunks, vocab_size=_FLAGS.vocab_size, scale=_FLAGS.scale)
  tokenizer.save(_FLAGS.out_dir)
  logging.info("wrote %s in %.1fs: %s", _FLAGS.out_dir, time.time() - start, report)


def _define_flags() -> None:
  """Flags exist only when run as a job, so the modules import side by side (tests, pipelines)."""
  flags.DEFINE_string(
    "data_dir", None, "Prepared dataset (droid_to_arrayrecord output).", required=True
  )
  flags.DEFINE_string("norm_stats", None, "norm_stats.json from compute_norm_stats.", required=True)
  flags.DEFINE_string("out_dir", None, "Output folder for the tokenizer.", required=True)
  flags.DEFINE_integer("vocab_size", 1024, "BPE vocabulary size.")
  flags.DEFINE_float("scale", 10.0, "DCT coefficient scale before rounding.")
  flags.DEFINE_integer("max_chunks", 100_000, "Uniform sample of this many chunks (all if fewer).")
  flags.DEFINE_string(
    "delta_action_mask",
    prepared_frames.DEFAULT_DELTA_MASK_TEXT,
    "Action dims made relative to the state ('none': absolute); as for compute_norm_stats.",
  )
  flags.DEFINE_integer("seed", 0, "Seed of the chunk sample.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
