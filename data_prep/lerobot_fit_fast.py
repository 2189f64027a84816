r"""Fits the FAST action tokenizer on a local LeRobot dataset's normalised action chunks.

  python -m data_prep.lerobot_fit_fast --dataset=/data/libero \
    --norm_stats=assets/libero/norm_stats.json --out_dir=assets/libero/fast_tokenizer \
    --state_key=state --action_key=actions --action_horizon=10 [--delta_action_mask=none] \
    [--vocab_size=1024] [--scale=10] [--max_chunks=100000]

Chunks go through the training pipeline's action path (cut within the episode, end-clamped,
delta where masked, quantile-normalised with the dataset's norm stats:
ki.data.lerobot_stats.normalized_chunks); the fit is ki.tokenizers.fast_fit.fit, saved in the
physical-intelligence/fast folder format.
"""

import time

from absl import app, flags, logging

from ki.data import lerobot_stats, normalize, prepared_frames
from ki.tokenizers import fast_fit

_FLAGS = flags.FLAGS


def main(argv):
  del argv
  start = time.time()
  chunks = lerobot_stats.normalized_chunks(
    _FLAGS.dataset,
    normalize.load_norm_stats(_FLAGS.norm_stats),
    state_key=_FLAGS.state_key,
    action_key=_FLAGS.action_key,
    action_horizon=_FLAGS.action_horizon,
    delta_action_mask=prepared_frames.parse_delta_mask(_FLAGS.delta_action_mask),
    max_chunks=_FLAGS.max_chunks,
    seed=_FLAGS.seed,
  )
  tokenizer, report = fast_fit.fit(chunks, vocab_size=_FLAGS.vocab_size, scale=_FLAGS.scale)
  tokenizer.save(_FLAGS.out_dir)
  logging.info("wrote %s in %.1fs: %s", _FLAGS.out_dir, time.time() - start, report)


def _define_flags() -> None:
  """Flags exist only when run as a job, so the modules import side by side (tests, pipelines)."""
  flags.DEFINE_string(
    "dataset", None, "LeRobot dataset folder (has meta/info.json).", required=True
  )
  flags.DEFINE_string("norm_stats", None, "norm_stats.json (lerobot_norm_stats).", required=True)
  flags.DEFINE_string("out_dir", None, "Output folder for the tokenizer.", required=True)
  flags.DEFINE_string("state_key", "state", "The state feature (data.robot.state_key).")
  flags.DEFINE_string("action_key", "actions", "The action feature (data.robot.action_key).")
  flags.DEFINE_integer("action_horizon", 10, "The model's action horizon.")
  flags.DEFINE_string(
    "delta_action_mask", "none", "As for lerobot_norm_stats ('none': absolute actions)."
  )
  flags.DEFINE_integer("vocab_size", 1024, "BPE vocabulary size.")
  flags.DEFINE_float("scale", 10.0, "DCT coefficient scale before rounding.")
  flags.DEFINE_integer("max_chunks", 100_000, "Uniform sample of this many chunks (all if fewer).")
  flags.DEFINE_integer("seed", 0, "Seed of the chunk sample.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
