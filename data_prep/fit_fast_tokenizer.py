r"""Fits the FAST action tokenizer on normalised action chunks sampled from a prepared dataset.

  python -m data_prep.fit_fast_tokenizer --data_dir=/data/droid_prepared \
    --norm_stats=assets/droid/norm_stats.json --out_dir=assets/droid/fast_tokenizer \
    [--vocab_size=1024] [--scale=10] [--max_chunks=100000] [--delta_action_mask=1,1,1,1,1,1,1,0]

Each sampled chunk goes through exactly the training pipeline's action path (delta actions with
the same mask as compute_norm_stats, then quantile normalisation with the dataset's norm stats:
ki.data.prepared_frames.normalized_chunks); the fit is ki.tokenizers.fast_fit.fit. The tokenizer
is saved in the physical-intelligence/fast processor folder format (tokenizer.json +
processor_config.json) and reloads with ki.tokenizers.fast.FastTokenizer.load. The log reports
tokens per chunk and the round-trip error.
"""

import time

from absl import app, flags, logging

from ki.data import normalize, prepared_frames
from ki.tokenizers import fast_fit

_FLAGS = flags.FLAGS


def main(argv):
  del argv
  start = time.time()
  chunks = prepared_frames.normalized_chunks(
    _FLAGS.data_dir,
    normalize.load_norm_stats(_FLAGS.norm_stats),
    max_chunks=_FLAGS.max_chunks,
    delta_action_mask=prepared_frames.parse_delta_mask(_FLAGS.delta_action_mask),
    seed=_FLAGS.seed,
  )
  tokenizer, report = fast_fit.fit(chunks, vocab_size=_FLAGS.vocab_size, scale=_FLAGS.scale)
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
