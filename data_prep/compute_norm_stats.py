r"""Normalisation statistics of a prepared DROID dataset, in openpi's norm_stats.json format.

  python -m data_prep.compute_norm_stats --data_dir=/data/droid_prepared \
    --out=assets/droid/norm_stats.json [--max_frames=1000000] [--delta_action_mask=1,1,1,1,1,1,1,0]

Mean, std and 1st/99th percentiles of the state and of the actions, the actions taken after the
delta transform the training pipeline applies (--delta_action_mask=none for absolute actions; the
same mask must be configured in training). The computation: ki/data/norm_stats.py
(`compute_norm_stats`, which this job calls).
"""

import time

from absl import app, flags, logging

from ki.data import normalize, prepared_frames
from ki.data.norm_stats import compute_norm_stats

_FLAGS = flags.FLAGS


def main(argv):
  del argv
  start = time.time()
  mask = prepared_frames.parse_delta_mask(_FLAGS.delta_action_mask)
  stats = compute_norm_stats(
    _FLAGS.data_dir, max_frames=_FLAGS.max_frames, delta_action_mask=mask, seed=_FLAGS.seed
  )
  normalize.save_norm_stats(stats, _FLAGS.out)
  logging.info("wrote %s in %.1fs (delta action mask: %s)", _FLAGS.out, time.time() - start, mask)
  for key, value in stats.items():
    logging.info("%s q01 %s", key, value.q01.astype(float).round(3).tolist())
    logging.info("%s q99 %s", key, value.q99.astype(float).round(3).tolist())


def _define_flags() -> None:
  """Flags exist only when run as a job, so the modules import side by side (tests, pipelines)."""
  flags.DEFINE_string(
    "data_dir", None, "Prepared dataset (droid_to_arrayrecord output).", required=True
  )
  flags.DEFINE_string("out", None, "Output path of norm_stats.json.", required=True)
  flags.DEFINE_integer("max_frames", None, "Use a uniform sample of this many frames (else all).")
  flags.DEFINE_string(
    "delta_action_mask",
    prepared_frames.DEFAULT_DELTA_MASK_TEXT,
    "Action dims made relative to the state before the statistics ('none': absolute).",
  )
  flags.DEFINE_integer("seed", 0, "Seed of the frame sample.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
